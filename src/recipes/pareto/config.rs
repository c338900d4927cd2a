//! The Pareto report's config: the `[pareto]` section, decoding, and the `[[policy]]` list.

use crate::generate::SamplingArgs;
use serde::{Deserialize, Serialize};

/// The `[pareto]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParetoSection {
    pub output_dir: String,
    /// The checkpoint every policy's adapters apply to.
    pub model: String,
    /// An adapter merged into `model` first (e.g. a LoRA SFT adapter).
    pub base_adapter: Option<String>,
    /// Held-out prompts (`prompt`, `messages` or `chosen` records).
    pub prompts: String,
    pub max_prompts: Option<usize>,
    /// `rules:FILE` (rule objectives) or a train-rm directory.
    pub judge: String,
    /// The objectives weightings are over, in order (default: the first conditioned policy's,
    /// else the judge's).
    pub objectives: Vec<String>,
    /// Simplex grid resolution: weights in steps of 1/grid.
    pub grid: usize,
    /// Weightings to evaluate instead of the grid.
    pub weights: Vec<Vec<f64>>,
    /// Hypervolume reference point, one value per judged objective (default: each objective's
    /// lowest possible score for rules, 0 for a reward model).
    pub reference_point: Vec<f64>,
    pub gen_batch_size: usize,
    pub dtype: String,
    pub device: String,
}

impl Default for ParetoSection {
    fn default() -> Self {
        Self {
            output_dir: "runs/pareto".into(),
            model: String::new(),
            base_adapter: None,
            prompts: String::new(),
            max_prompts: Some(200),
            judge: String::new(),
            objectives: vec![],
            grid: 4,
            weights: vec![],
            reference_point: vec![],
            gen_batch_size: 8,
            dtype: "f32".into(),
            device: "auto".into(),
        }
    }
}

/// One `[[policy]]`: exactly one of `conditioned`, `adapters`, `soup` or `sweep`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySpec {
    pub name: String,
    /// A weight-conditioned adapter (it has conditioning.json): one model, every weighting.
    pub conditioned: String,
    /// Adapters trained one per weighting ...
    pub adapters: Vec<String>,
    /// ... and the weighting each was trained for (same order).
    pub adapter_weights: Vec<Vec<f64>>,
    /// One adapter per objective (in the objectives' order), mixed by each weighting.
    pub soup: Vec<String>,
    /// A `mo-align sweep` directory: every finished point as an adapter at the weighting it
    /// trained for (one policy per combination of the sweep's other axes).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sweep: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ParetoConfig {
    pub pareto: ParetoSection,
    /// Decoding; unset keys come from the model's generation_config.json.
    pub sampling: SamplingArgs,
    pub policy: Vec<PolicySpec>,
}

impl PolicySpec {
    /// `conditioned`, `adapters` or `soup`: which one the policy gives.
    pub fn kind(&self) -> &'static str {
        if !self.conditioned.is_empty() {
            "conditioned"
        } else if !self.adapters.is_empty() {
            "adapters"
        } else {
            "soup"
        }
    }
}
