//! One point: what its run directory holds, running it (in this process, as a single run
//! under the same lock, resume and reuse rules), and what its run logged.

use super::plan::{Plan, Point};
use crate::recipes::reuse::{finished, recorded_seconds, train_recorded, StageKind};
use crate::recipes::RunFlags;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// Where a point stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PointState {
    /// A finished run of its config on unchanged inputs.
    Done,
    /// Running now (this sweep's child, or a Slurm task).
    Running,
    /// Ran in this sweep and did not finish (its log says why).
    Failed,
    /// Holds a run that did not finish (killed, or failed earlier): the next run resumes it.
    Unfinished,
    /// Not started.
    Pending,
}

impl PointState {
    pub fn word(self) -> &'static str {
        match self {
            PointState::Done => "done",
            PointState::Running => "running",
            PointState::Failed => "failed",
            PointState::Unfinished => "unfinished",
            PointState::Pending => "pending",
        }
    }
}

/// The point's state from its directory, checked as a single run is: a run there of another
/// config (a changed base config, or a point whose axis values changed) is refused, naming
/// the point and the keys that differ.
pub fn state_of(plan: &Plan, p: &Point) -> Result<PointState> {
    plan.kind
        .check(&plan.base, &p.overrides)
        .with_context(|| format!("point {}", p.name))?;
    let st = plan
        .kind
        .state(&plan.base, &p.overrides)
        .with_context(|| format!("point {}", p.name))?;
    Ok(if st.done {
        PointState::Done
    } else if p.out.join(crate::outputs::RUN_RECORD).is_file() {
        PointState::Unfinished
    } else {
        PointState::Pending
    })
}

/// The state of the point run in `dir` judged by its own record, for a reader that has the
/// sweep directory but not its config (`pareto`): done when it holds a finished run of its
/// recorded config on inputs unchanged since (the check `state_of` makes), unfinished when it
/// holds a run that did not finish, pending when it holds none.
pub fn recorded_state(kind: StageKind, dir: &Path) -> Result<PointState> {
    let record = dir.join(crate::outputs::RUN_RECORD);
    let Ok(text) = std::fs::read_to_string(&record) else {
        return Ok(PointState::Pending);
    };
    let artifact = kind
        .artifact(&text)
        .with_context(|| format!("{}: not a {} config", record.display(), kind.name()))?;
    Ok(if finished(dir, artifact, &text, &record)? {
        PointState::Done
    } else {
        PointState::Unfinished
    })
}

/// `mo-align sweep --point NAME`: runs one point here, as `mo-align <stage> --resume` would
/// (an unfinished run continues; a finished one is up to date and not run again), and
/// records its training time.
pub fn run_point(plan: &Plan, name: &str, quiet: bool) -> Result<()> {
    let p = plan.point(name)?;
    let st = plan
        .kind
        .state(&plan.base, &p.overrides)
        .with_context(|| format!("point {}", p.name))?;
    if st.done {
        eprintln!("point {}: up to date in {}", p.name, st.out.display());
        return Ok(());
    }
    eprintln!(
        "point {}: {} in {}",
        p.name,
        plan.kind.name(),
        st.out.display()
    );
    let flags = RunFlags {
        resume: true,
        quiet,
        ..RunFlags::default()
    };
    let seconds = train_recorded(false, &st.resolved, &st.out, || {
        plan.kind.train(&plan.base, &p.overrides, flags)
    })
    .with_context(|| format!("point {}", p.name))?;
    eprintln!("point {}: trained in {seconds:.1}s", p.name);
    Ok(())
}

/// What a point's run logged: its last step, and each metric's last value.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PointMetrics {
    pub step: Option<u64>,
    pub train_seconds: Option<f64>,
    /// Every numeric metric of `metrics.jsonl` at its last logged value.
    pub last: serde_json::Map<String, serde_json::Value>,
}

/// Reads the point's `metrics.jsonl` (absent: nothing logged yet) and recorded time.
pub fn metrics_of(out: &Path) -> PointMetrics {
    let mut m = PointMetrics {
        train_seconds: recorded_seconds(out),
        ..PointMetrics::default()
    };
    let Ok(text) = std::fs::read_to_string(out.join("metrics.jsonl")) else {
        return m;
    };
    for line in text.lines() {
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(line) else {
            continue;
        };
        for (k, v) in obj {
            if k == "step" {
                m.step = v.as_u64().or(m.step);
            } else if v.is_number() {
                m.last.insert(k, v);
            }
        }
    }
    m
}

/// The step a running point has reached, for the progress bar. Asked every second for every
/// running point, so it reads the log's tail, not the whole log of a long run (the whole log
/// only when the tail holds no step).
pub fn step_of(out: &Path) -> Option<u64> {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL: u64 = 64 * 1024;
    let last_step = |text: &str| {
        text.lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v["step"].as_u64())
    };
    let mut file = std::fs::File::open(out.join("metrics.jsonl")).ok()?;
    let len = file.metadata().ok()?.len();
    if len > TAIL {
        file.seek(SeekFrom::Start(len - TAIL)).ok()?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail).ok()?;
        // The first line of the tail is cut; a cut line does not parse and is skipped.
        if let Some(step) = last_step(&String::from_utf8_lossy(&tail)) {
            return Some(step);
        }
        file.seek(SeekFrom::Start(0)).ok()?;
    }
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    last_step(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_of_reads_a_long_logs_tail_and_the_whole_log_when_the_tail_has_no_step() {
        let dir = std::env::temp_dir().join(format!("mo-align-step-of-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let line = |s: u64| {
            format!(
                "{{\"step\":{s},\"loss\":1.25,\"note\":\"{}\"}}\n",
                "x".repeat(200)
            )
        };
        let log: String = (1..=1000).map(line).collect();
        assert!(log.len() > 64 * 1024);
        std::fs::write(dir.join("metrics.jsonl"), &log).unwrap();
        assert_eq!(step_of(&dir), Some(1000));
        // A last record longer than the tail, without a step: the whole log is read.
        let long = format!(
            "{{\"eval_loss\":1.0,\"note\":\"{}\"}}\n",
            "y".repeat(70 * 1024)
        );
        std::fs::write(dir.join("metrics.jsonl"), format!("{log}{long}")).unwrap();
        assert_eq!(step_of(&dir), Some(1000));
        std::fs::write(dir.join("metrics.jsonl"), line(3)).unwrap();
        assert_eq!(step_of(&dir), Some(3));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
