//! The sweep's summary: one row per point (axis values, state, training time, final
//! metrics), as `summary.json` and `summary.md` in the sweep directory.

use super::plan::Plan;
use super::point::{metrics_of, PointMetrics, PointState};
use anyhow::Result;
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize)]
pub struct PointRow {
    pub name: String,
    pub values: serde_json::Map<String, serde_json::Value>,
    pub state: PointState,
    /// Whether this run of the sweep ran it (false: it was done already).
    pub ran: bool,
    /// The scheduler's last word on it (Slurm's job state), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler_state: Option<String>,
    pub output_dir: PathBuf,
    pub log: PathBuf,
    #[serde(flatten)]
    pub metrics: PointMetrics,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepSummary {
    pub stage: String,
    pub base: String,
    pub backend: String,
    /// The Slurm job ids this run submitted.
    pub jobs: Vec<String>,
    pub wall_seconds: f64,
    pub points: Vec<PointRow>,
}

/// The row of every point, given each point's state (and scheduler state).
pub fn rows(
    plan: &Plan,
    states: &[(PointState, Option<String>)],
    before: &[PointState],
) -> Result<Vec<PointRow>> {
    plan.points
        .iter()
        .zip(states)
        .zip(before)
        .map(|((p, (state, sched)), before)| {
            let values = p
                .values
                .iter()
                .map(|(k, v)| Ok((k.clone(), serde_json::to_value(v)?)))
                .collect::<Result<_>>()?;
            Ok(PointRow {
                name: p.name.clone(),
                values,
                state: *state,
                ran: *before != PointState::Done,
                scheduler_state: sched.clone(),
                output_dir: p.out.clone(),
                log: super::log_path(plan, &p.name),
                metrics: metrics_of(&p.out),
            })
        })
        .collect()
}

impl SweepSummary {
    pub fn write(&self, plan: &Plan) -> Result<String> {
        crate::util::io::write_json_atomic(&plan.dir.join("summary.json"), self)?;
        let md = self.markdown(plan);
        crate::util::io::write_atomic(&plan.dir.join("summary.md"), md.as_bytes())?;
        Ok(md)
    }

    /// The table: point, axis values, state, training time, step, and the final loss and
    /// evaluation metrics the runs logged.
    pub fn markdown(&self, plan: &Plan) -> String {
        // Metric columns: the final train loss and the main evaluation figures some point
        // logged (summary.json has every metric).
        const SHOWN: [&str; 4] = [
            "loss",
            "eval_loss",
            "eval_rewards/accuracies",
            "eval_rewards/margins",
        ];
        let keys: Vec<String> = SHOWN
            .iter()
            .filter(|k| self.points.iter().any(|r| r.metrics.last.contains_key(**k)))
            .map(|k| k.to_string())
            .collect();
        let done = self
            .points
            .iter()
            .filter(|r| r.state == PointState::Done)
            .count();
        let mut md = format!(
            "# Sweep: {} from {}\n\n{} of {} points done ({} backend{}); {:.1}s this run.\n\n",
            self.stage,
            self.base,
            done,
            self.points.len(),
            self.backend,
            if self.jobs.is_empty() {
                String::new()
            } else {
                format!(", Slurm job {}", self.jobs.join(", "))
            },
            self.wall_seconds
        );
        let axes: Vec<&str> = plan.axes.iter().map(|a| a.key.as_str()).collect();
        let mut head = vec!["point"];
        head.extend(&axes);
        head.extend(["state", "train s", "step"]);
        head.extend(keys.iter().map(String::as_str));
        md.push_str(&format!("| {} |\n", head.join(" | ")));
        md.push_str(&format!("|{}\n", " --- |".repeat(head.len())));
        for r in &self.points {
            let mut cells = vec![format!("`{}`", r.name)];
            cells.extend(
                axes.iter()
                    .map(|k| r.values.get(*k).map(|v| v.to_string()).unwrap_or_default()),
            );
            let state = match &r.scheduler_state {
                Some(s) if r.state != PointState::Done => format!("{} ({s})", r.state.word()),
                _ => r.state.word().to_string(),
            };
            cells.push(state);
            cells.push(
                r.metrics
                    .train_seconds
                    .filter(|s| s.is_finite())
                    .map(|s| format!("{s:.1}"))
                    .unwrap_or_else(|| "-".into()),
            );
            cells.push(r.metrics.step.map(|s| s.to_string()).unwrap_or("-".into()));
            for k in &keys {
                cells.push(
                    r.metrics
                        .last
                        .get(k)
                        .and_then(|v| v.as_f64())
                        .map(|v| format!("{v:.4}"))
                        .unwrap_or_else(|| "-".into()),
                );
            }
            md.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        md
    }
}
