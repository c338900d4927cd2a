//! The pipeline's config: where each stage's config lives (`[pipeline]`) and how the stages
//! are judged (`[eval]`).

use crate::generate::SamplingArgs;
use serde::{Deserialize, Serialize};

/// The `[pipeline]` section: where each stage's config lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StagesConfig {
    pub output_dir: String,
    /// Optional first stage building the base model (an sft config, usually full fine-tuning
    /// of a `[model.tiny]` model): the demo's base is made, not downloaded.
    pub base: String,
    pub sft: String,
    pub train_rm: String,
    pub dpo: String,
    /// One hybrid-DPO config, or a list (one stage per weighting).
    #[serde(deserialize_with = "one_or_many")]
    pub hybrid_dpo: Vec<String>,
    /// Online stages (`mo-align grpo` configs), trained from the SFT model after the
    /// preference stages and judged like them.
    #[serde(deserialize_with = "one_or_many")]
    pub grpo: Vec<String>,
    /// `mo-align sweep` configs run after them (each point a stage of its own, judged like
    /// the others; the sweep's `[local]` / `[slurm]` backend runs its points).
    #[serde(
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub sweep: Vec<String>,
    /// A `mo-align pareto` config run last (its device and dtype are `[eval]`'s); the summary
    /// links its front.
    pub pareto: String,
    /// `--set` overrides applied to every stage (e.g. `train.device="cuda"`).
    pub overrides: Vec<String>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// The `[eval]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PipelineEvalConfig {
    /// Held-out prompts (`prompt`, `messages` or `chosen` records).
    pub prompts: String,
    pub max_prompts: Option<usize>,
    /// Judge: a train-rm directory or an HF sequence classifier; empty = this pipeline's RM.
    pub judge: String,
    /// Rule objectives (`reward::rules`) judging beside it: the ground truth, when known.
    pub rules: String,
    /// Sample generations per stage shown in the summary.
    pub samples: usize,
    pub judge_weights: Vec<f64>,
    /// Decoding; unset keys come from the base model's generation_config.json.
    #[serde(flatten)]
    pub sampling: SamplingArgs,
    pub gen_batch_size: usize,
    pub tie_margin: f64,
    pub dtype: String,
    pub device: String,
    /// Stages (by name) whose checkpoints are judged by the ground truth against the seconds
    /// they had trained: wall-time curves, and each stage's score at equal training time.
    pub curves: Vec<String>,
}

impl Default for PipelineEvalConfig {
    fn default() -> Self {
        Self {
            prompts: String::new(),
            max_prompts: Some(200),
            judge: String::new(),
            rules: String::new(),
            samples: 3,
            judge_weights: vec![],
            sampling: SamplingArgs::default(),
            gen_batch_size: 8,
            tie_margin: 0.0,
            dtype: "f32".into(),
            device: "auto".into(),
            curves: vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    pub pipeline: StagesConfig,
    pub eval: PipelineEvalConfig,
}
