//! `mo-align sft`: LoRA supervised fine-tuning on chat data, loss on assistant tokens only.

use super::{load_policy, prepare_output, train_adapter, AdapterRun, ModelConfig};
use crate::data::chat::sft_example;
use crate::data::{load_splits, DataConfig, DataReport};
use crate::model::lora::LoraConfig;
use crate::objectives::nll::Nll;
use crate::tokenizer::{ChatTokenizer, LabelledIds};
use crate::train::trainer::TrainOutcome;
use crate::train::TrainConfig;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    pub model: ModelConfig,
    pub lora: LoraConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
}

/// Train and validation examples, with what happened to the records of each.
pub type SftData = (
    Vec<LabelledIds>,
    Vec<LabelledIds>,
    DataReport,
    Option<DataReport>,
);

/// Loads, validates, tokenises and splits the SFT data.
pub fn load_sft_data(data: &DataConfig, tok: &ChatTokenizer) -> Result<SftData> {
    let s = load_splits(data, |v, r| sft_example(v, tok, data, r))?;
    Ok((s.train, s.val, s.train_report, s.val_report))
}

pub fn run(
    config: Option<&Path>,
    overrides: &[String],
    resume: bool,
    quiet: bool,
) -> Result<TrainOutcome> {
    let cfg: SftConfig = crate::config::load(config, overrides)?;
    cfg.train.validate()?;
    let out = prepare_output(&cfg.train.output_dir, &cfg)?;
    let loaded = load_policy(&cfg.model, &cfg.lora, &cfg.train)?;
    let data = load_splits(&cfg.data, |v, r| {
        sft_example(v, &loaded.tokenizer, &cfg.data, r)
    })?;
    data.report(&out)?;
    let (train_set, val_set) = (&data.train, &data.val);
    let run = AdapterRun {
        loaded: &loaded,
        lora: &cfg.lora,
        model: &cfg.model,
        train: &cfg.train,
        out: &out,
        group_by_length: cfg.data.group_by_length,
        resume,
        quiet,
        label: "sft",
    };
    train_adapter(
        run,
        &Nll {
            model: &loaded.model,
        },
        train_set,
        val_set,
    )
}
