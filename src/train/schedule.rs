//! Learning-rate schedules with transformers' semantics: optimizer step s (0-based) uses
//! base_lr * lambda(s); linear warmup over ceil(warmup_ratio * total) steps, then cosine or
//! linear decay to `min_lr_ratio * base_lr`, or constant.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub kind: SchedulerKind,
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    pub fn new(
        base_lr: f64,
        kind: SchedulerKind,
        total_steps: u64,
        warmup_ratio: f64,
        warmup_steps: Option<u64>,
        min_lr_ratio: f64,
    ) -> Self {
        let warmup_steps =
            warmup_steps.unwrap_or_else(|| (warmup_ratio * total_steps as f64).ceil() as u64);
        Self {
            base_lr,
            warmup_steps,
            total_steps,
            kind,
            min_lr_ratio,
        }
    }

    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.multiplier(step)
    }

    fn multiplier(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        let decayed = match self.kind {
            SchedulerKind::Constant => return 1.0,
            SchedulerKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            SchedulerKind::Linear => 1.0 - progress,
        };
        self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decayed.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers_cosine_and_linear_with_warmup() {
        // transformers.get_cosine_schedule_with_warmup(opt, 3, 10) multipliers for steps 0..10.
        let s = LrSchedule::new(1.0, SchedulerKind::Cosine, 10, 0.3, None, 0.0);
        let want = [
            0.0,
            1.0 / 3.0,
            2.0 / 3.0,
            1.0,
            0.9504844,
            0.8117449,
            0.6112605,
            0.3887395,
            0.1882551,
            0.0495156,
        ];
        for (i, w) in want.iter().enumerate() {
            assert!(
                (s.lr(i as u64) - w).abs() < 1e-6,
                "step {i}: {} vs {w}",
                s.lr(i as u64)
            );
        }
        let s = LrSchedule::new(2.0, SchedulerKind::Linear, 10, 0.0, Some(2), 0.0);
        assert_eq!(s.lr(1), 1.0);
        assert!((s.lr(6) - 2.0 * 0.5).abs() < 1e-12);
        assert_eq!(
            LrSchedule::new(2.0, SchedulerKind::Constant, 10, 0.0, Some(0), 0.0).lr(9),
            2.0
        );
    }
}
