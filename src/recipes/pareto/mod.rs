//! `mo-align pareto`: the trade-off a policy offers, measured. For every weighting (a simplex
//! grid or a list), each policy answers the same held-out prompts, the judge scores every
//! answer on every objective, and the report gives per weighting each objective's mean with a
//! 95% interval, and per policy its Pareto front, hypervolume, sparsity and spacing, and how
//! each objective's mean follows its weight (Spearman's rho). Policies: one conditioned adapter
//! (every weighting stated in its system prompt), adapters trained one per weighting, or a
//! Rewarded soup of per-objective adapters. Generations are cached per (policy, weighting) on
//! what they depend on, so a re-run only scores.

mod answers;
pub mod config;
mod markdown;
mod plan;
pub mod report;
mod sweep_policies;

use super::output_dir::prepare_report;
use crate::eval::win_rate::judge_answers;
use crate::plot::write_pareto_plots;
use answers::{weights_tag, Answerer};
use anyhow::Result;
use config::ParetoConfig;
use plan::Plan;
use report::{fmt_rho, Evaluated, ParetoReport, WeightingResult};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Runs the report: plan, then per (policy, weighting) generate and judge, then report;
/// returns its directory and `pareto.json`'s content.
pub fn run(
    config: Option<&Path>,
    overrides: &[String],
    quiet: bool,
    force: bool,
) -> Result<(PathBuf, ParetoReport)> {
    let started = Instant::now();
    let given: ParetoConfig = crate::util::config::load(config, overrides)?;
    // A sweep policy is its finished points; the report records the config as given.
    let cfg = sweep_policies::expand_sweep_policies(given.clone())?;
    let plan = Plan::new(&cfg)?;
    let mut run_dir = prepare_report(&cfg.pareto.output_dir, &given, force)?;
    // Everything is validated: the report starts writing (cached generations, then results).
    run_dir.commit()?;
    let out = run_dir.path.clone();
    let mut answerer = Answerer::new(&cfg, &plan, &out)?;
    let evaluated = evaluate(&cfg, &plan, &mut answerer, quiet)?;
    let report = ParetoReport::new(
        &cfg,
        &plan,
        evaluated,
        answerer.sampling,
        started.elapsed().as_secs_f64(),
    );
    crate::util::io::write_json_atomic(&out.join("pareto.json"), &report)?;
    let plots = write_pareto_plots(&out, &plan.judged, &report.points(), false)?;
    crate::util::io::write_atomic(&out.join("pareto.md"), report.markdown(&plots).as_bytes())?;
    eprintln!(
        "pareto done in {:.1}s: pareto.md and pareto.json in {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    for r in &report.policies {
        eprintln!(
            "  {:<16} hypervolume {:.4} (shared weightings {:.4}), front {} of {}, rho {}",
            r.name,
            r.hypervolume,
            r.hypervolume_shared,
            r.front_size,
            r.weightings.len(),
            fmt_rho(&r.spearman)
        );
    }
    Ok((out, report))
}

/// Every policy at each of its weightings: its answers (cached or generated), judged.
fn evaluate(
    cfg: &ParetoConfig,
    plan: &Plan,
    answerer: &mut Answerer,
    quiet: bool,
) -> Result<Evaluated> {
    let jobs = plan.jobs(cfg)?;
    let progress = crate::train::progress::Progress::new(jobs.len() as u64, 0, quiet, "pareto");
    let mut evaluated = Evaluated {
        results: vec![vec![]; cfg.policy.len()],
        seconds: vec![0.0; cfg.policy.len()],
    };
    for (n, job) in jobs.iter().enumerate() {
        let t = Instant::now();
        let answers = answerer.answers(job)?;
        let verdicts = judge_answers(
            &plan.judge,
            &plan.prompts,
            &answers,
            cfg.pareto.gen_batch_size,
        )?;
        evaluated.results[job.policy].push(WeightingResult::new(
            job.weights.values().to_vec(),
            &verdicts,
            plan.judged.len(),
            answerer.path(job).display().to_string(),
        ));
        evaluated.seconds[job.policy] += t.elapsed().as_secs_f64();
        let name = &cfg.policy[job.policy].name;
        progress.set(
            n as u64 + 1,
            format!("{name} {}", weights_tag(job.weights.values())),
        );
    }
    progress.finish();
    Ok(evaluated)
}
