//! The `slurm` backend: the points that are not done become array jobs (`slurm/array.sh`,
//! one task per point, each `mo-align sweep --point NAME` with the resources `[slurm]` asks
//! for), submitted with `sbatch` and recorded in `slurm/jobs.jsonl`, followed with `squeue`
//! until no task is left, and each point's state reported (Slurm's, from `sacct` when the
//! cluster keeps accounting; whether its run finished, from its directory, in any case). A
//! rerun while a recorded job still runs follows that job rather than submitting its points
//! again.

mod follow;
mod script;

use super::config::SlurmSection;
use super::plan::Plan;
use super::point::{state_of, step_of, PointState};
use crate::train::progress::Progress;
use anyhow::{bail, Context, Result};
use follow::{follow, look, slurm};
pub use script::script;
use script::MAX_TASKS;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the jobs did: their ids, and Slurm's last state of each point's task.
pub struct Submitted {
    pub jobs: Vec<String>,
    pub scheduler: Vec<Option<String>>,
}

/// An array job, as `slurm/jobs.jsonl` records it: task `t` runs point `points[t]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    #[serde(rename = "job")]
    pub id: String,
    /// The cluster `sbatch --parsable` named (multi-cluster setups), for `-M`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    pub points: Vec<String>,
}

fn jobs_file(plan: &Plan) -> PathBuf {
    plan.dir.join("slurm/jobs.jsonl")
}

/// The script of the `k`th of `n` arrays submitted at once.
fn script_path(plan: &Plan, k: usize, n: usize) -> PathBuf {
    let name = if n == 1 {
        "array.sh".to_string()
    } else {
        format!("array-{k}.sh")
    };
    plan.dir.join("slurm").join(name)
}

/// The points not done in chunks of at most `MAX_TASKS`, one array each.
pub fn chunks(todo: &[usize]) -> Vec<&[usize]> {
    todo.chunks(MAX_TASKS).collect()
}

/// The jobs `slurm/jobs.jsonl` records whose tasks Slurm still lists as not over.
fn live_jobs(plan: &Plan, states: &[PointState]) -> Result<Vec<Job>> {
    let path = jobs_file(plan);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(vec![]);
    };
    let mut live = vec![];
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let job: Job = serde_json::from_str(line)
            .with_context(|| format!("{}: line {} is not a job record", path.display(), n + 1))?;
        // A job all of whose points are done has nothing left to follow.
        let open = job.points.iter().any(|name| {
            plan.points
                .iter()
                .position(|p| p.name == *name)
                .is_some_and(|i| states[i] != PointState::Done)
        });
        if !open {
            continue;
        }
        let tasks = look(&job).with_context(|| {
            format!(
                "checking whether Slurm job {} ({}) still runs",
                job.id,
                path.display()
            )
        })?;
        if tasks.is_some_and(|t| t.values().any(|t| !t.over())) {
            live.push(job);
        }
    }
    Ok(live)
}

/// Submits `todo` as one array job and records it.
fn submit(
    plan: &Plan,
    cfg: &SlurmSection,
    args: &[String],
    todo: &[usize],
    path: &Path,
) -> Result<Job> {
    let text = script(plan, cfg, args, todo)?;
    crate::util::io::write_atomic(path, text.as_bytes())?;
    let out = slurm("sbatch", &["--parsable", &path.display().to_string()])
        .with_context(|| format!("submitting {}", path.display()))?;
    // `--parsable` prints `ID` or `ID;CLUSTER`.
    let mut parts = out.trim().splitn(2, ';');
    let id = parts.next().unwrap_or("").trim().to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!(
            "sbatch --parsable {}: gave `{}`, not a job id",
            path.display(),
            out.trim()
        );
    }
    let job = Job {
        id,
        cluster: parts
            .next()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty()),
        points: todo.iter().map(|&i| plan.points[i].name.clone()).collect(),
    };
    crate::util::io::JsonlWriter::append(&jobs_file(plan))?.write(&serde_json::to_value(&job)?)?;
    Ok(job)
}

/// Follows the recorded jobs that still run, submits the points that are neither done nor in
/// one of them, and follows every job until none of its tasks is left.
pub fn run(
    plan: &Plan,
    cfg: &SlurmSection,
    point_args: &[String],
    states: &mut [PointState],
    quiet: bool,
) -> Result<Submitted> {
    let n = plan.points.len();
    let mut scheduler = vec![None; n];
    script::check(plan, cfg)?;
    let index = |name: &str| plan.points.iter().position(|p| p.name == name);
    let mut jobs = live_jobs(plan, states)?;
    let followed: Vec<usize> = jobs
        .iter()
        .flat_map(|j| j.points.iter().filter_map(|p| index(p)))
        .collect();
    let todo: Vec<usize> = (0..n)
        .filter(|&i| states[i] != PointState::Done && !followed.contains(&i))
        .collect();
    if todo.is_empty() && jobs.is_empty() {
        return Ok(Submitted {
            jobs: vec![],
            scheduler,
        });
    }
    let progress = Progress::new(n as u64, 0, quiet, "sweep");
    for job in &jobs {
        progress.log(&format!(
            "Slurm job {} (submitted earlier) still runs {} of this sweep's points: following it rather than submitting them again",
            job.id,
            job.points.len()
        ));
    }
    std::fs::create_dir_all(plan.dir.join("logs"))?;
    let parts = chunks(&todo);
    for (k, part) in parts.iter().enumerate() {
        let path = script_path(plan, k, parts.len());
        let job = submit(plan, cfg, point_args, part, &path)?;
        progress.log(&format!(
            "submitted Slurm job {}: {} tasks ({}); following it (Ctrl-C stops following, not the job: `scancel {}` does)",
            job.id,
            part.len(),
            path.display(),
            job.id
        ));
        jobs.push(job);
    }
    let poll = Duration::from_secs(cfg.poll_seconds.max(1));
    // Per job: its tasks not over, and its running points with their steps.
    let mut now: HashMap<String, (u64, Vec<String>)> = HashMap::new();
    let last = follow(&jobs, poll, &progress, |job, tasks| {
        let running: Vec<String> = tasks
            .iter()
            .filter(|(_, t)| t.state == "RUNNING")
            .filter_map(|(t, _)| index(job.points.get(*t)?))
            .map(|i| {
                let p = &plan.points[i];
                let step = step_of(&p.out).map_or("starting".into(), |s| format!("step {s}"));
                format!("{} {step}", p.name)
            })
            .collect();
        let left = tasks.values().filter(|t| !t.over()).count() as u64;
        now.insert(job.id.clone(), (left, running));
        let left: u64 = now.values().map(|(l, _)| l).sum();
        let running: Vec<&str> = now
            .values()
            .flat_map(|(_, r)| r)
            .map(String::as_str)
            .collect();
        progress.set((n as u64).saturating_sub(left), running.join(", "));
    })?;
    progress.finish();
    for (job, tasks) in jobs.iter().zip(&last) {
        for (name, t) in job.points.iter().zip(0..) {
            if let Some(i) = index(name) {
                scheduler[i] = tasks.get(&t).cloned().or(Some("FINISHED".into()));
                states[i] = match state_of(plan, &plan.points[i])? {
                    PointState::Done => PointState::Done,
                    _ => PointState::Failed,
                };
            }
        }
    }
    Ok(Submitted {
        jobs: jobs.into_iter().map(|j| j.id).collect(),
        scheduler,
    })
}
