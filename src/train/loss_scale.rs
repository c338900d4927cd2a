//! What a step with a non-finite loss or gradient costs. Such a step is skipped (the trainer
//! does not apply it); under f16 the loss scale is halved and regrows after a run of clean
//! steps (dynamic loss scaling), elsewhere too many skipped steps in a row end the run.

use super::checkpoint::TrainerState;
use super::progress::Progress;
use super::stats::StepStats;
use super::TrainConfig;
use anyhow::{bail, Result};
use candle_core::DType;

pub struct LossScaler {
    f16: bool,
    init: f64,
    growth_interval: u64,
    max_bad_steps: u32,
}

impl LossScaler {
    pub fn new(cfg: &TrainConfig) -> Result<Self> {
        Ok(LossScaler {
            f16: crate::model::dtype::parse_dtype(&cfg.dtype)? == DType::F16,
            init: cfg.loss_scale_init,
            growth_interval: cfg.loss_scale_growth_interval,
            max_bad_steps: cfg.max_bad_steps,
        })
    }

    /// Whether the scale is dynamic (f16 training), and so worth logging.
    pub fn dynamic(&self) -> bool {
        self.f16
    }

    /// The scale a fresh run starts with: 1 unless f16.
    pub fn initial(&self) -> f64 {
        if self.f16 {
            self.init
        } else {
            1.0
        }
    }

    /// Updates the scale and the skip counters after step `state.step`.
    pub fn record(
        &self,
        state: &mut TrainerState,
        stats: &StepStats,
        progress: &Progress,
    ) -> Result<()> {
        if stats.applied {
            state.bad_streak = 0;
            state.clean_steps += 1;
            if self.f16 && state.clean_steps >= self.growth_interval {
                state.loss_scale *= 2.0;
                state.clean_steps = 0;
            }
            return Ok(());
        }
        state.skipped_steps += 1;
        state.bad_streak += 1;
        state.clean_steps = 0;
        progress.log(&format!(
            "step {}: non-finite loss {} or gradient norm {}; step skipped",
            state.step, stats.loss, stats.grad_norm
        ));
        if self.f16 {
            state.loss_scale /= 2.0;
            anyhow::ensure!(state.loss_scale >= 1.0, "f16 loss scale fell below 1 at step {}: the loss itself is not finite; use bf16 or f32, or lower train.lr", state.step);
        } else if state.bad_streak >= self.max_bad_steps {
            bail!("{} consecutive steps had a non-finite loss or gradient (last at step {}); lower train.lr, or use f32", state.bad_streak, state.step);
        }
        Ok(())
    }
}
