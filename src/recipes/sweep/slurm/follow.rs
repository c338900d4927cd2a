//! Following submitted array jobs with `squeue` until none of their tasks is left, and asking
//! `sacct` (where the cluster keeps accounting) for each task's final state.

use super::Job;
use crate::train::progress::Progress;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// Polls after which a job Slurm has never listed (neither `squeue` nor `sacct`) is taken to
/// be over: a job that finished and left the controller's memory before the first poll.
const GRACE_POLLS: u32 = 5;

/// How often a pending job's reason is logged (the progress bar shows it at every poll).
const PENDING_NOTE: Duration = Duration::from_secs(300);

/// Task states after which a task does not run again.
const OVER: [&str; 11] = [
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "REVOKED",
    "SPECIAL_EXIT",
];

/// A task's state: Slurm's word, and why it waits (`%r`).
#[derive(Debug, Clone)]
pub struct Task {
    pub state: String,
    pub reason: String,
}

impl Task {
    pub fn over(&self) -> bool {
        OVER.contains(&self.state.as_str())
    }
}

/// Runs a Slurm client command, its stdout on success.
pub fn slurm(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| {
        format!("{cmd}: cannot run (backend = \"slurm\" needs Slurm's client commands on the PATH)")
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        bail!("{cmd} {}: {}", args.join(" "), lines.join("; "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `args` and, on a multi-cluster setup, `-M CLUSTER`.
fn on_cluster<'a>(job: &'a Job, args: &[&'a str]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    if let Some(c) = &job.cluster {
        v.extend(["-M", c.as_str()]);
    }
    v
}

/// Task index -> fields, from `JOB_INDEX|FIELD|...` lines.
fn by_task(text: &str, job: &str) -> HashMap<usize, Vec<String>> {
    text.lines()
        .filter_map(|l| {
            let mut fields = l.trim().split('|');
            let idx = fields
                .next()?
                .strip_prefix(job)?
                .strip_prefix('_')?
                .parse()
                .ok()?;
            Some((idx, fields.map(|f| f.trim().to_string()).collect()))
        })
        .collect()
}

/// The job's tasks as `squeue` lists them (finished ones too, while the controller remembers
/// them); `None`: Slurm does not know the job (any more).
pub fn look(job: &Job) -> Result<Option<HashMap<usize, Task>>> {
    let args = on_cluster(
        job,
        &["-h", "-r", "-t", "all", "-j", &job.id, "-o", "%i|%T|%r"],
    );
    let text = match slurm("squeue", &args) {
        Ok(text) => text,
        Err(e) if e.to_string().contains("Invalid job id") => return Ok(None),
        Err(e) => return Err(e),
    };
    let tasks = squeue_tasks(&text, &job.id);
    Ok((!tasks.is_empty()).then_some(tasks))
}

/// The tasks in `squeue -o %i|%T|%r` output; a line for tasks not yet split off the array
/// (`47_[2-3]`) names no one task and is left out.
fn squeue_tasks(text: &str, job: &str) -> HashMap<usize, Task> {
    by_task(text, job)
        .into_iter()
        .filter_map(|(t, f)| {
            let state = f.first()?.split_whitespace().next()?.to_string();
            let reason = f.get(1).cloned().unwrap_or_default();
            Some((t, Task { state, reason }))
        })
        .collect()
}

/// Each task's state in `sacct -o JobID,State` output (`CANCELLED by 1000` -> `CANCELLED`).
fn sacct_states(text: &str, job: &str) -> HashMap<usize, String> {
    by_task(text, job)
        .into_iter()
        .filter_map(|(t, f)| Some((t, f.first()?.split_whitespace().next()?.to_string())))
        .collect()
}

/// Each task's final state from `sacct`, where the cluster keeps accounting (empty where
/// not).
pub fn accounted(job: &Job) -> HashMap<usize, String> {
    let args = on_cluster(job, &["-n", "-P", "-X", "-j", &job.id, "-o", "JobID,State"]);
    slurm("sacct", &args)
        .map(|text| sacct_states(&text, &job.id))
        .unwrap_or_default()
}

/// Follows `jobs` until none of their tasks is left; calls `running` with each job's listed
/// tasks at every poll (for the progress bar); returns the last state seen of every task.
pub fn follow(
    jobs: &[Job],
    poll: Duration,
    progress: &Progress,
    mut running: impl FnMut(&Job, &HashMap<usize, Task>),
) -> Result<Vec<HashMap<usize, String>>> {
    let mut last: Vec<HashMap<usize, String>> = vec![HashMap::new(); jobs.len()];
    let mut seen = vec![false; jobs.len()];
    let mut unseen_polls = vec![0u32; jobs.len()];
    let mut over = vec![false; jobs.len()];
    let mut failures = 0;
    let mut noted: Option<Instant> = None;
    while over.iter().any(|o| !o) {
        let mut pending: Vec<String> = vec![];
        for (j, job) in jobs.iter().enumerate() {
            if over[j] {
                continue;
            }
            let tasks = match look(job) {
                Ok(t) => t,
                Err(e) => {
                    failures += 1;
                    if failures >= 5 {
                        return Err(e.context(format!(
                            "following Slurm job {} (it may still run: squeue -j {})",
                            job.id, job.id
                        )));
                    }
                    continue;
                }
            };
            failures = 0;
            match tasks {
                Some(tasks) => {
                    seen[j] = true;
                    over[j] = tasks.values().all(Task::over);
                    let mut listed: Vec<(&usize, &Task)> = tasks.iter().collect();
                    listed.sort_by_key(|(t, _)| **t);
                    for (t, task) in listed {
                        last[j].insert(*t, task.state.clone());
                        if task.state == "PENDING" {
                            let why = match task.reason.as_str() {
                                "" | "None" => String::new(),
                                r => format!(" ({r})"),
                            };
                            pending.push(format!("{}_{t}{why}", job.id));
                        }
                    }
                    running(job, &tasks);
                }
                // Gone from the controller: over once it was seen, or `sacct` has it; a job
                // never seen is given a few polls before it is taken to be over.
                None if seen[j] || !accounted(job).is_empty() => over[j] = true,
                None => {
                    unseen_polls[j] += 1;
                    if unseen_polls[j] >= GRACE_POLLS {
                        progress.log(&format!(
                            "note: Slurm has not listed job {} in {GRACE_POLLS} polls; taking it as over",
                            job.id
                        ));
                        over[j] = true;
                    }
                }
            }
        }
        if !pending.is_empty() && noted.is_none_or(|t| t.elapsed() >= PENDING_NOTE) {
            noted = Some(Instant::now());
            progress.log(&format!(
                "{} tasks pending: {}",
                pending.len(),
                pending
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if over.iter().any(|o| !o) {
            std::thread::sleep(poll);
        }
    }
    for (j, job) in jobs.iter().enumerate() {
        last[j].extend(accounted(job));
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_give_each_split_task_and_why_it_waits() {
        // As `squeue -h -r -t all -M c1 -o %i|%T|%r` prints them, a cluster header included.
        let text = "CLUSTER: c1\n47_0|COMPLETED|None\n47_1|RUNNING|None\n\
                    47_[2-3%1]|PENDING|JobArrayTaskLimit\n470_1|RUNNING|None\n47_4|PENDING|Priority\n";
        let tasks = squeue_tasks(text, "47");
        let mut got: Vec<(usize, &str, &str)> = tasks
            .iter()
            .map(|(t, k)| (*t, k.state.as_str(), k.reason.as_str()))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                (0, "COMPLETED", "None"),
                (1, "RUNNING", "None"),
                (4, "PENDING", "Priority")
            ]
        );
        assert!(tasks[&0].over() && !tasks[&1].over() && !tasks[&4].over());
    }

    #[test]
    fn sacct_states_keep_slurms_first_word() {
        let text = "47_0|COMPLETED\n47_1|CANCELLED by 1000\n47_2|OUT_OF_MEMORY\n\
                    47_3|TIMEOUT\n48_0|FAILED\n";
        let mut got: Vec<(usize, String)> = sacct_states(text, "47").into_iter().collect();
        got.sort();
        let want = ["COMPLETED", "CANCELLED", "OUT_OF_MEMORY", "TIMEOUT"];
        assert_eq!(
            got,
            want.iter()
                .enumerate()
                .map(|(i, s)| (i, s.to_string()))
                .collect::<Vec<_>>()
        );
    }
}
