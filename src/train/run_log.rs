//! What a run reports as it goes: the progress bar after every step, and a log line (on the
//! console and in `metrics.jsonl`) for each log window and each evaluation.

use super::checkpoint::TrainerState;
use super::metrics_log::MetricsLog;
use super::progress::Progress;
use super::stats::StepStats;
use super::window::fmt_num;
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;

pub struct RunLog {
    pub progress: Progress,
    metrics: MetricsLog,
    /// Whether window lines carry the loss scale (f16's dynamic scaling).
    loss_scale: bool,
    /// The mean training loss of the last logged window.
    pub last_loss: Option<f64>,
}

impl RunLog {
    /// Continues `output_dir`'s `metrics.jsonl` after step `resumed_at`, or starts it afresh.
    pub fn open(
        progress: Progress,
        output_dir: &Path,
        resumed_at: Option<u64>,
        loss_scale: bool,
    ) -> Result<Self> {
        Ok(RunLog {
            progress,
            metrics: MetricsLog::open(output_dir, resumed_at)?,
            loss_scale,
            last_loss: None,
        })
    }

    /// Adds step `state.step` to the log window and shows it on the bar. The window and the
    /// first loss live in `state`, so a resumed run's log lines and its final "loss X -> Y"
    /// cover the same steps as an uninterrupted run's.
    pub fn step(&self, state: &mut TrainerState, stats: &StepStats, lr: f64, seconds: f64) {
        if stats.applied {
            state.first_loss.get_or_insert(stats.loss);
        }
        state.window.add(stats, lr, seconds);
        self.progress.set(state.step, state.window.bar_message());
    }

    /// Writes the log window's line and starts the next window.
    pub fn window(&mut self, state: &mut TrainerState, epoch: f64) -> Result<()> {
        let mut line = state.window.flush(state.step, epoch);
        line["skipped_steps"] = state.skipped_steps.into();
        line["elapsed_s"] = state.elapsed_s.into();
        if self.loss_scale {
            line["loss_scale"] = state.loss_scale.into();
        }
        self.last_loss = line["loss"].as_f64().or(self.last_loss);
        self.write(&line)
    }

    /// Writes an evaluation's line.
    pub fn eval(
        &mut self,
        state: &TrainerState,
        epoch: f64,
        eval: &BTreeMap<String, f64>,
    ) -> Result<()> {
        let mut line =
            serde_json::json!({"step": state.step, "epoch": epoch, "elapsed_s": state.elapsed_s});
        for (k, v) in eval {
            line[k] = (*v).into();
        }
        self.write(&line)
    }

    fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        self.progress.log(&console_line(line));
        self.metrics.write(line)
    }
}

/// `key=value` pairs, floats in `fmt_num`'s short form.
fn console_line(v: &serde_json::Value) -> String {
    let obj = v.as_object().map(|o| {
        o.iter()
            .map(|(k, v)| match v.as_f64() {
                Some(x) if v.is_f64() => format!("{k}={}", fmt_num(x)),
                _ => format!("{k}={v}"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    });
    obj.unwrap_or_default()
}
