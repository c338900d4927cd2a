//! `mo-align sweep`: a base stage config and axes (weightings, seeds, any config key) expanded
//! into one run directory per point, run on this machine (`local`, N at a time) or as one
//! Slurm array job (`slurm`). Every point is a single run under the same lock, resume and
//! reuse rules (`recipes::reuse`): a rerun skips finished points, resumes unfinished ones, and
//! refuses points whose config changed. The sweep directory holds `sweep.json` (its points,
//! which `pareto` reads) and `summary.{md,json}` (every point's state, time and metrics).

pub(crate) mod axes;
pub mod config;
mod local;
pub(crate) mod manifest;
pub mod plan;
pub mod point;
mod slurm;
pub mod summary;

use crate::outputs::{Inputs, RunDir, RunMode, RUN_RECORD};
use anyhow::{bail, Context, Result};
use config::{Backend, SweepConfig};
use manifest::{check_rerun, Manifest, MANIFEST};
use plan::Plan;
use point::{state_of, PointState};
use std::path::{Path, PathBuf};
use std::time::Instant;
use summary::SweepSummary;

/// How `mo-align sweep` was invoked besides its config.
#[derive(Debug, Clone, Default)]
pub struct SweepOptions {
    /// List the points and their states (and the Slurm script), run nothing, write nothing.
    pub dry_run: bool,
    /// Run this one point here (what each local child and each Slurm task does).
    pub point: Option<String>,
    pub quiet: bool,
}

/// `mo-align sweep --config FILE [--set ...] [--dry-run | --point NAME]`.
pub fn run(config: Option<&Path>, overrides: &[String], opts: SweepOptions) -> Result<()> {
    let Some(source) = config else {
        bail!("sweep needs --config FILE");
    };
    if let Some(name) = &opts.point {
        let cfg: SweepConfig = crate::util::config::load(Some(source), overrides)?;
        let plan = Plan::new(&cfg, source)?;
        return point::run_point(&plan, name, opts.quiet);
    }
    if opts.dry_run {
        return dry_run(source, overrides);
    }
    let (_, summary) = run_sweep(source, overrides, &[], opts.quiet)?;
    // Slurm's word says why a task ended (OUT_OF_MEMORY, TIMEOUT, ...) where the log may not.
    let failed: Vec<String> = summary
        .points
        .iter()
        .filter(|r| r.state != PointState::Done)
        .map(|r| match r.scheduler_state.as_deref() {
            None | Some("COMPLETED" | "FINISHED") => r.name.clone(),
            Some(s) => format!("{} (Slurm: {s})", r.name),
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} points did not finish ({}); see their logs in {}",
            failed.len(),
            summary.points.len(),
            failed.join(", "),
            summary
                .points
                .first()
                .and_then(|r| r.log.parent())
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// Runs the sweep: every point not done, on its backend; writes `sweep.json` and the summary
/// (printed). `point_overrides` are applied to every point besides `sweep.overrides` (the
/// pipeline's own). Points that did not finish are in the summary, not an error.
pub fn run_sweep(
    source: &Path,
    overrides: &[String],
    point_overrides: &[String],
    quiet: bool,
) -> Result<(Plan, SweepSummary)> {
    let started = Instant::now();
    let mut overrides = overrides.to_vec();
    if !point_overrides.is_empty() {
        let cfg: SweepConfig = crate::util::config::load(Some(source), &overrides)?;
        let all: Vec<toml::Value> = cfg
            .sweep
            .overrides
            .iter()
            .chain(point_overrides)
            .map(|s| toml::Value::String(s.clone()))
            .collect();
        overrides.push(format!("sweep.overrides={}", toml::Value::Array(all)));
    }
    let cfg: SweepConfig = crate::util::config::load(Some(source), &overrides)?;
    let plan = Plan::new(&cfg, source)?;
    check_rerun(&plan)?;
    let mut states: Vec<PointState> = plan
        .points
        .iter()
        .map(|p| state_of(&plan, p))
        .collect::<Result<_>>()?;
    let before = states.clone();
    let mut dir = claim(&plan, &cfg)?;
    dir.queue(MANIFEST, serde_json::to_vec_pretty(&Manifest::of(&plan)?)?);
    dir.commit()?;
    let done = states.iter().filter(|s| **s == PointState::Done).count();
    eprintln!(
        "sweep {}: {} points, {done} up to date, {} to run ({} backend)",
        plan.dir.display(),
        plan.points.len(),
        plan.points.len() - done,
        cfg.sweep.backend.name()
    );
    let args = point_args(source, &overrides);
    let (jobs, scheduler) = match cfg.sweep.backend {
        Backend::Local => {
            local::run(&plan, &cfg.local, &args, &mut states, quiet)?;
            (vec![], vec![None; plan.points.len()])
        }
        Backend::Slurm => {
            let s = slurm::run(&plan, &cfg.slurm, &args, &mut states, quiet)?;
            (s.jobs, s.scheduler)
        }
    };
    let with_sched: Vec<(PointState, Option<String>)> = states.into_iter().zip(scheduler).collect();
    let summary = SweepSummary {
        stage: plan.kind.name().to_string(),
        base: plan.base.display().to_string(),
        backend: cfg.sweep.backend.name().to_string(),
        jobs,
        wall_seconds: started.elapsed().as_secs_f64(),
        points: summary::rows(&plan, &with_sched, &before)?,
    };
    let md = summary.write(&plan)?;
    println!("{md}");
    drop(dir);
    Ok((plan, summary))
}

/// Claims the sweep directory (locked against a second sweep, checked against what the
/// points read) and records the sweep's config; a directory holding anything but a sweep is
/// refused.
fn claim(plan: &Plan, cfg: &SweepConfig) -> Result<RunDir> {
    let d = &plan.dir;
    if d.exists() && !d.join(MANIFEST).is_file() {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .with_context(|| format!("{}: cannot list", d.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != crate::util::io::LOCK_FILE)
            .collect();
        names.sort();
        if !names.is_empty() {
            bail!(
                "sweep.output_dir {}: holds files that are not a sweep ({}); choose an empty or new directory",
                d.display(),
                names.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    let mut inputs = Inputs::new();
    inputs
        .add("sweep config", &plan.source)
        .add("sweep.base", &plan.base);
    if let Some(p) = plan.points.first() {
        let st = plan.kind.state(&plan.base, &p.overrides)?;
        for (key, path) in crate::outputs::config_inputs(&st.resolved)? {
            inputs.add(&key, path);
        }
    }
    let mode = RunMode {
        report: true,
        ..RunMode::default()
    };
    let mut dir = RunDir::claim(d, "sweep.output_dir", &inputs, mode)?;
    dir.queue(RUN_RECORD, crate::util::config::to_toml(cfg)?.into_bytes());
    Ok(dir)
}

/// `--dry-run`: the points, their states and commands; for Slurm, the array script.
fn dry_run(source: &Path, overrides: &[String]) -> Result<()> {
    let cfg: SweepConfig = crate::util::config::load(Some(source), overrides)?;
    let plan = Plan::new(&cfg, source)?;
    check_rerun(&plan)?;
    println!(
        "sweep {} ({} from {}): {} points, {} backend",
        plan.dir.display(),
        plan.kind.name(),
        plan.base.display(),
        plan.points.len(),
        cfg.sweep.backend.name()
    );
    let mut todo = vec![];
    for (i, p) in plan.points.iter().enumerate() {
        let state = state_of(&plan, p)?;
        if state != PointState::Done {
            todo.push(i);
        }
        let values: Vec<String> = p.values.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  {:<32} {:<10} {}", p.name, state.word(), values.join(" "));
    }
    if cfg.sweep.backend == Backend::Slurm && !todo.is_empty() {
        let args = point_args(source, overrides);
        let parts = slurm::chunks(&todo);
        for (k, part) in parts.iter().enumerate() {
            println!(
                "\nthe array job it would submit ({} of {}, {} points; points still running in a job an earlier run submitted are followed instead):\n",
                k + 1,
                parts.len(),
                part.len()
            );
            print!("{}", slurm::script(&plan, &cfg.slurm, &args, part)?);
        }
    }
    Ok(())
}

/// The arguments that run one of the sweep's points, but `--point NAME`.
fn point_args(source: &Path, overrides: &[String]) -> Vec<String> {
    let mut args: Vec<String> = vec!["sweep".into(), "--config".into()];
    args.push(source.display().to_string());
    for o in overrides {
        args.extend(["--set".to_string(), o.clone()]);
    }
    args.push("--quiet".into());
    args
}

/// The mo-align binary the points run: `configured` when given, else this one.
pub(crate) fn binary(configured: &str) -> Result<PathBuf> {
    if !configured.is_empty() {
        return Ok(PathBuf::from(configured));
    }
    std::env::current_exe().context("finding the mo-align binary the points run")
}

/// Where a point's output (its child process's, or its Slurm task's) is logged.
pub(crate) fn log_path(plan: &Plan, name: &str) -> PathBuf {
    plan.dir.join("logs").join(format!("{name}.log"))
}
