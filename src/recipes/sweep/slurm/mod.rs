//! The `slurm` backend: the points that are not done become one array job
//! (`slurm/array.sh`, one task per point, each `mo-align sweep --point NAME` with the
//! resources `[slurm]` asks for), submitted with `sbatch`, followed with `squeue` until no
//! task is left, and each point's state reported (Slurm's, from `sacct` when the cluster
//! keeps accounting; whether its run finished, from its directory, in any case).

use super::config::SlurmSection;
use super::plan::Plan;
use super::point::{state_of, step_of, PointState};
use crate::train::progress::Progress;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

/// What the array job did: its id, and Slurm's last state of each point's task.
pub struct Submitted {
    pub job: Option<String>,
    pub scheduler: Vec<Option<String>>,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The array job's script for the points `todo` (indices into the plan).
pub fn script(
    plan: &Plan,
    cfg: &SlurmSection,
    point_args: &[String],
    todo: &[usize],
) -> Result<String> {
    let cwd = std::env::current_dir().context("the current directory")?;
    let exe = super::binary(&cfg.binary)?;
    let dir = cwd.join(&plan.dir);
    let mut opts = vec![
        format!("--job-name={}", cfg.job_name),
        format!("--array=0-{}", todo.len() - 1),
        format!("--output={}", dir.join("slurm/%A_%a.out").display()),
        format!("--chdir={}", cwd.display()),
    ];
    let optional = [
        ("--partition", cfg.partition.clone()),
        ("--account", cfg.account.clone()),
        ("--mem", cfg.mem.clone()),
        ("--time", cfg.time.clone()),
    ];
    for (flag, v) in optional.iter().filter(|(_, v)| !v.is_empty()) {
        opts.push(format!("{flag}={v}"));
    }
    if cfg.gpus_per_job > 0 {
        opts.push(format!("--gres=gpu:{}", cfg.gpus_per_job));
    }
    if cfg.cpus_per_task > 0 {
        opts.push(format!("--cpus-per-task={}", cfg.cpus_per_task));
    }
    opts.extend(cfg.extra_args.iter().cloned());
    if let Some(o) = opts.iter().chain(&cfg.setup).find(|o| o.contains('\n')) {
        bail!(
            "{}: [slurm] value {o:?} holds a line break",
            plan.source.display()
        );
    }
    let mut s = String::from("#!/bin/bash\n# Written by mo-align sweep: one task per point.\n");
    for o in &opts {
        s.push_str(&format!("#SBATCH {o}\n"));
    }
    s.push_str("set -euo pipefail\n");
    for line in &cfg.setup {
        s.push_str(&format!("{line}\n"));
    }
    let names: Vec<String> = todo.iter().map(|&i| quote(&plan.points[i].name)).collect();
    s.push_str(&format!("points=({})\n", names.join(" ")));
    s.push_str("point=${points[$SLURM_ARRAY_TASK_ID]}\n");
    let mut cmd = vec![quote(&exe.display().to_string())];
    cmd.extend(point_args.iter().map(|a| quote(a)));
    cmd.push("--point \"$point\"".into());
    let logs = dir.join("logs");
    s.push_str(&format!(
        "exec {} >> {}/\"$point\".log 2>&1\n",
        cmd.join(" "),
        quote(&logs.display().to_string())
    ));
    Ok(s)
}

/// Runs a Slurm client command, its stdout on success.
fn slurm(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| {
        format!("{cmd}: cannot run (backend = \"slurm\" needs Slurm's client commands on the PATH)")
    })?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Task index -> state, from `JOB_INDEX|STATE` lines.
fn task_states(text: &str, job: &str) -> HashMap<usize, String> {
    text.lines()
        .filter_map(|l| {
            let (id, state) = l.trim().split_once('|')?;
            let idx = id.strip_prefix(job)?.strip_prefix('_')?.parse().ok()?;
            Some((idx, state.split_whitespace().next()?.to_string()))
        })
        .collect()
}

/// Submits the points that are not done and follows the job until none of its tasks is left.
pub fn run(
    plan: &Plan,
    cfg: &SlurmSection,
    point_args: &[String],
    states: &mut [PointState],
    quiet: bool,
) -> Result<Submitted> {
    let n = plan.points.len();
    let todo: Vec<usize> = (0..n).filter(|&i| states[i] != PointState::Done).collect();
    let mut scheduler = vec![None; n];
    if todo.is_empty() {
        return Ok(Submitted {
            job: None,
            scheduler,
        });
    }
    let text = script(plan, cfg, point_args, &todo)?;
    let path = plan.dir.join("slurm/array.sh");
    crate::util::io::write_atomic(&path, text.as_bytes())?;
    std::fs::create_dir_all(plan.dir.join("logs"))?;
    let out = slurm("sbatch", &["--parsable", &path.display().to_string()])?;
    let job = out.trim().split(';').next().unwrap_or("").to_string();
    if job.is_empty() {
        bail!("sbatch --parsable gave no job id");
    }
    let record = serde_json::json!({
        "job": job,
        "points": todo.iter().map(|&i| plan.points[i].name.clone()).collect::<Vec<_>>(),
    });
    crate::util::io::JsonlWriter::append(&plan.dir.join("slurm/jobs.jsonl"))?.write(&record)?;
    let done_before = (n - todo.len()) as u64;
    let progress = Progress::new(n as u64, done_before, quiet, "sweep");
    progress.log(&format!(
        "submitted Slurm job {job}: {} tasks ({}); following it (Ctrl-C stops following, not the job: `scancel {job}` does)",
        todo.len(),
        path.display()
    ));
    let mut failures = 0;
    loop {
        let listed = match slurm("squeue", &["-h", "-r", "-j", &job, "-o", "%i|%T"]) {
            Ok(text) => task_states(&text, &job),
            // Once the job has left the controller's memory it is an invalid id: finished.
            Err(e) if e.to_string().contains("Invalid job id") => HashMap::new(),
            Err(e) => {
                failures += 1;
                if failures >= 5 {
                    return Err(e.context(format!(
                        "following Slurm job {job} (it may still run: squeue -j {job})"
                    )));
                }
                std::thread::sleep(Duration::from_secs(cfg.poll_seconds.max(1)));
                continue;
            }
        };
        failures = 0;
        let mut running = vec![];
        for (t, &i) in todo.iter().enumerate() {
            match listed.get(&t) {
                Some(state) => {
                    if state == "RUNNING" {
                        states[i] = PointState::Running;
                        let p = &plan.points[i];
                        let step =
                            step_of(&p.out).map_or("starting".into(), |s| format!("step {s}"));
                        running.push(format!("{} {step}", p.name));
                    }
                    scheduler[i] = Some(state.clone());
                }
                None => scheduler[i] = Some("FINISHED".into()),
            }
        }
        let left = todo
            .iter()
            .enumerate()
            .filter(|(t, _)| listed.contains_key(t))
            .count();
        progress.set(n as u64 - left as u64, running.join(", "));
        if listed.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_secs(cfg.poll_seconds.max(1)));
    }
    progress.finish();
    // Slurm's own record of each task, where the cluster keeps accounting.
    match slurm("sacct", &["-n", "-P", "-X", "-j", &job, "-o", "JobID,State"]) {
        Ok(text) => {
            for (t, state) in task_states(&text, &job) {
                if let Some(&i) = todo.get(t) {
                    scheduler[i] = Some(state);
                }
            }
        }
        Err(e) => eprintln!(
            "note: no Slurm accounting for job {job} ({}); each point's state is its run directory's",
            e.to_string().lines().next().unwrap_or("")
        ),
    }
    for &i in &todo {
        states[i] = match state_of(plan, &plan.points[i])? {
            PointState::Done => PointState::Done,
            _ => PointState::Failed,
        };
    }
    Ok(Submitted {
        job: Some(job),
        scheduler,
    })
}
