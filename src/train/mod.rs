//! The one training loop every stage shares: objectives plug in, the loop stays the same.

pub mod checkpoint;
pub mod early_stopping;
pub mod events;
pub mod loss_scale;
pub mod metrics_log;
pub mod optim;
pub mod progress;
pub mod run_log;
pub mod schedule;
pub mod stats;
pub mod trainable;
pub mod trainer;
pub mod window;

use crate::model::ctx::ForwardCtx;
use candle_core::{Result, Tensor};
use schedule::SchedulerKind;
use serde::{Deserialize, Serialize};

/// What a stage trains for. The trainer owns batching, accumulation, clipping, the optimizer,
/// schedules, evaluation, checkpoints and logging; an objective only turns a batch into a loss
/// (it holds whatever it computes with: the model, reward scores, cached features).
pub trait Objective {
    type Example;

    /// Tokens the example runs through the model (for throughput figures).
    fn tokens(&self, ex: &Self::Example) -> usize;

    /// The example's weight in the loss mean: labelled tokens for NLL, 1 per pair for DPO. The
    /// trainer divides summed losses by the summed weights of a whole accumulated step, so
    /// accumulating k micro-batches equals one batch k times larger.
    fn weight(&self, ex: &Self::Example) -> f64;

    /// Summed loss over the batch and summed metrics (the trainer divides both by the summed
    /// weights). `ctx` carries the adapter switch, dropout, and whether a gradient will be
    /// taken. The objective holds what it computes with (model, scores, features).
    fn loss(&self, batch: &[&Self::Example], ctx: ForwardCtx) -> Result<LossOutput>;

    /// Optimizer steps each batch serves. Online objectives reuse one batch's samples for
    /// several updates (GRPO's inner iterations, with the importance ratio to the policy that
    /// sampled them); offline objectives take one step per batch.
    fn steps_per_batch(&self) -> u64 {
        1
    }

    /// Called before every training step with the step's index (0-based), so an objective that
    /// reuses a batch knows where in the cycle it is.
    fn begin_step(&self, _step: u64) {}

    /// What an exact resume needs beyond the trained weights and the optimizer (samples being
    /// reused); saved in every checkpoint's trainer state.
    fn state(&self) -> Option<serde_json::Value> {
        None
    }

    /// Restores `state()` from a checkpoint (`None`: the checkpoint held none).
    fn restore(&self, _state: Option<&serde_json::Value>) -> anyhow::Result<()> {
        Ok(())
    }
}

pub struct LossOutput {
    /// Scalar: sum over the batch of weight-scaled per-example losses.
    pub loss_sum: Tensor,
    /// (name, sum over the batch); reported as sum / total weight.
    pub metrics: Vec<(String, f64)>,
}

/// What a stage trains: a LoRA adapter on the frozen base, or every base weight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finetune {
    #[default]
    Lora,
    /// Full fine-tuning: every weight learns (f32 masters and AdamW moments for all of them);
    /// the output is a Hugging Face checkpoint directory. `sft` only.
    Full,
}

/// The `[train]` section shared by every training stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub output_dir: String,
    pub finetune: Finetune,
    pub epochs: u64,
    /// Overrides `epochs` when set.
    pub max_steps: Option<u64>,
    pub batch_size: usize,
    pub eval_batch_size: Option<usize>,
    pub grad_accum: usize,
    pub lr: f64,
    pub scheduler: SchedulerKind,
    pub warmup_ratio: f64,
    pub warmup_steps: Option<u64>,
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    /// Global-norm gradient clipping; 0 disables it.
    pub max_grad_norm: f64,
    /// Frozen base weights and activations: f32, bf16 or f16 (LoRA and AdamW are always f32).
    pub dtype: String,
    pub device: String,
    pub seed: u64,
    pub log_every: u64,
    pub eval_every: Option<u64>,
    pub save_every: Option<u64>,
    pub keep_checkpoints: usize,
    /// Stop when the validation loss has not improved for this many evaluations.
    pub early_stopping_patience: Option<u32>,
    pub early_stopping_min_delta: f64,
    /// Consecutive non-finite steps tolerated before the run stops.
    pub max_bad_steps: u32,
    /// f16 dynamic loss scaling.
    pub loss_scale_init: f64,
    pub loss_scale_growth_interval: u64,
    /// Rows of the LM head computed at once (memory is this times the vocabulary).
    pub logits_chunk: usize,
    /// Activation checkpointing: keep only each decoder layer's input and recompute the layer
    /// in the backward (about a third more compute, far less memory for long sequences).
    pub recompute_layers: bool,
    /// CPU threads for matmuls (default: all cores).
    pub threads: Option<usize>,
    /// Where work that depends only on frozen weights is cached (reference log-probs, reward
    /// features and scores); default `$MO_ALIGN_CACHE`, else `~/.cache/mo-align`.
    pub cache_dir: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            output_dir: "runs/out".to_string(),
            finetune: Finetune::Lora,
            epochs: 1,
            max_steps: None,
            batch_size: 2,
            eval_batch_size: None,
            grad_accum: 1,
            lr: 1e-5,
            scheduler: SchedulerKind::Cosine,
            warmup_ratio: 0.1,
            warmup_steps: None,
            min_lr_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 1.0,
            dtype: "f32".to_string(),
            device: "auto".to_string(),
            seed: 42,
            log_every: 10,
            eval_every: None,
            save_every: None,
            keep_checkpoints: 3,
            early_stopping_patience: None,
            early_stopping_min_delta: 0.0,
            max_bad_steps: 5,
            loss_scale_init: 65536.0,
            loss_scale_growth_interval: 2000,
            logits_chunk: 128,
            recompute_layers: false,
            threads: None,
            cache_dir: None,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.batch_size > 0, "train.batch_size must be at least 1");
        anyhow::ensure!(self.grad_accum > 0, "train.grad_accum must be at least 1");
        anyhow::ensure!(
            self.lr > 0.0 && self.lr.is_finite(),
            "train.lr must be a finite number > 0, got {}",
            self.lr
        );
        anyhow::ensure!(self.log_every > 0, "train.log_every must be at least 1");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.warmup_ratio),
            "train.warmup_ratio must be in [0, 1]"
        );
        anyhow::ensure!(
            self.max_steps.is_some() || self.epochs > 0,
            "train.epochs must be at least 1"
        );
        anyhow::ensure!(
            self.max_steps != Some(0),
            "train.max_steps must be at least 1 (leave it out to train for train.epochs)"
        );
        let finite_nonneg = |v: f64| v.is_finite() && v >= 0.0;
        anyhow::ensure!(
            finite_nonneg(self.max_grad_norm),
            "train.max_grad_norm must be >= 0 (0 turns clipping off), got {}",
            self.max_grad_norm
        );
        anyhow::ensure!(
            finite_nonneg(self.weight_decay),
            "train.weight_decay must be >= 0, got {}",
            self.weight_decay
        );
        for (name, b) in [
            ("adam_beta1", self.adam_beta1),
            ("adam_beta2", self.adam_beta2),
        ] {
            anyhow::ensure!(
                (0.0..1.0).contains(&b),
                "train.{name} must be in [0, 1), got {b}"
            );
        }
        anyhow::ensure!(
            self.adam_eps.is_finite() && self.adam_eps > 0.0,
            "train.adam_eps must be > 0, got {}",
            self.adam_eps
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.min_lr_ratio),
            "train.min_lr_ratio must be in [0, 1], got {}",
            self.min_lr_ratio
        );
        anyhow::ensure!(
            self.loss_scale_init.is_finite() && self.loss_scale_init >= 1.0,
            "train.loss_scale_init must be >= 1, got {}",
            self.loss_scale_init
        );
        if let Some(t) = self.threads {
            anyhow::ensure!(
                (1..=1024).contains(&t),
                "train.threads must be between 1 and 1024, got {t}"
            );
        }
        crate::model::dtype::parse_dtype(&self.dtype)?;
        Ok(())
    }
}
