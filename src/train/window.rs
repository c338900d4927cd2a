//! The log window: what accumulates between two log lines (loss and metrics weighted like the
//! loss, gradient norms, tokens and seconds). It is saved in every checkpoint, so a resumed
//! run logs the same windows as an uninterrupted one.

use super::stats::StepStats;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Accumulates steps between log lines (loss and metrics weighted like the loss).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Window {
    loss: f64,
    weight: f64,
    grad_norm: f64,
    steps: u64,
    tokens: usize,
    seconds: f64,
    lr: f64,
    metrics: BTreeMap<String, f64>,
    last_loss: f64,
    last_tps: f64,
}

impl Window {
    pub fn add(&mut self, s: &StepStats, lr: f64, seconds: f64) {
        if s.applied {
            self.loss += s.loss * s.weight;
            self.weight += s.weight;
            self.grad_norm += s.grad_norm;
            self.steps += 1;
            for (k, v) in &s.metrics {
                *self.metrics.entry(k.clone()).or_default() += v * s.weight;
            }
        }
        self.tokens += s.tokens;
        self.seconds += seconds;
        self.lr = lr;
        self.last_loss = s.loss;
        self.last_tps = s.tokens as f64 / seconds.max(1e-9);
    }

    pub fn bar_message(&self) -> String {
        format!(
            "loss {} lr {} {:.0} tok/s",
            fmt_num(self.last_loss),
            fmt_num(self.lr),
            self.last_tps
        )
    }

    pub fn flush(&mut self, step: u64, epoch: f64) -> serde_json::Value {
        let w = self.weight.max(f64::MIN_POSITIVE);
        let mut line = serde_json::json!({
            "step": step,
            "epoch": epoch,
            "loss": if self.steps > 0 { serde_json::json!(self.loss / w) } else { serde_json::Value::Null },
            "lr": self.lr,
            "grad_norm": if self.steps > 0 { serde_json::json!(self.grad_norm / self.steps as f64) } else { serde_json::Value::Null },
            "tokens_per_s": self.tokens as f64 / self.seconds.max(1e-9),
        });
        for (k, v) in &self.metrics {
            line[k] = (v / w).into();
        }
        *self = Window::default();
        line
    }
}

pub fn fmt_num(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e5) {
        format!("{x:.3e}")
    } else {
        format!("{x:.4}")
    }
}
