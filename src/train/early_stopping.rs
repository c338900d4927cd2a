//! Early stopping: the run ends once `eval_loss` has not improved by more than `min_delta` for
//! `patience` evaluations in a row.

use super::checkpoint::TrainerState;
use super::progress::Progress;
use super::TrainConfig;

pub struct EarlyStopping {
    patience: Option<u32>,
    min_delta: f64,
}

impl EarlyStopping {
    pub fn new(cfg: &TrainConfig) -> Self {
        EarlyStopping {
            patience: cfg.early_stopping_patience,
            min_delta: cfg.early_stopping_min_delta,
        }
    }

    /// Records an evaluation's loss; sets `state.early_stopped` when patience runs out.
    pub fn record(&self, state: &mut TrainerState, eval_loss: f64, progress: &Progress) {
        if state
            .best_eval_loss
            .is_none_or(|b| eval_loss < b - self.min_delta)
        {
            state.best_eval_loss = Some(eval_loss);
            state.evals_without_improvement = 0;
            return;
        }
        state.evals_without_improvement += 1;
        if self
            .patience
            .is_some_and(|p| state.evals_without_improvement >= p)
        {
            state.early_stopped = true;
            progress.log(&format!(
                "early stopping at step {}: eval_loss has not improved for {} evaluations",
                state.step, state.evals_without_improvement
            ));
        }
    }
}
