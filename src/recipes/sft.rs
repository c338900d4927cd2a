//! `mo-align sft`: LoRA supervised fine-tuning on chat data, loss on assistant tokens only.

use super::{base_name, load_policy, prepare_output, ModelConfig};
use crate::data::chat::sft_example;
use crate::data::{load_records, shuffle_cap_split, DataConfig, DataReport};
use crate::model::lora::LoraConfig;
use crate::objectives::nll::Nll;
use crate::tokenizer::{ChatTokenizer, LabelledIds};
use crate::train::trainer::{train, TrainOutcome, TrainRun};
use crate::train::TrainConfig;
use anyhow::{bail, Result};
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
    if data.train_files.is_empty() {
        bail!("data.train_files is empty: name at least one JSONL or Parquet file");
    }
    let parse = |v: &serde_json::Value, r: &mut DataReport| sft_example(v, tok, data, r);
    let (records, report) = load_records(&data.train_files, data.on_bad_record, parse)?;
    let examples: Vec<LabelledIds> = records.into_iter().map(|(_, e)| e).collect();
    if data.validation_files.is_empty() {
        let (train, val) = shuffle_cap_split(
            examples,
            data.shuffle_seed,
            data.max_samples,
            data.validation_fraction,
        )?;
        return Ok((train, val, report, None));
    }
    let (train, _) = shuffle_cap_split(examples, data.shuffle_seed, data.max_samples, 0.0)?;
    let parse = |v: &serde_json::Value, r: &mut DataReport| sft_example(v, tok, data, r);
    let (val, val_report) = load_records(&data.validation_files, data.on_bad_record, parse)?;
    Ok((
        train,
        val.into_iter().map(|(_, e)| e).collect(),
        report,
        Some(val_report),
    ))
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
    let (train_set, val_set, report, val_report) = load_sft_data(&cfg.data, &loaded.tokenizer)?;
    eprintln!("train data: {}", report.summary());
    for e in &report.bad_examples {
        eprintln!("  skipped: {e}");
    }
    if let Some(r) = &val_report {
        eprintln!("validation data: {}", r.summary());
    }
    eprintln!(
        "{} training / {} validation examples",
        train_set.len(),
        val_set.len()
    );
    crate::io::write_json_atomic(
        &out.join("data_report.json"),
        &serde_json::json!({"train": report, "validation": val_report}),
    )?;
    let outcome = train(TrainRun {
        model: &loaded.model,
        objective: &Nll,
        train: &train_set,
        val: &val_set,
        cfg: &cfg.train,
        lora: &cfg.lora,
        base_model: &base_name(&cfg.model),
        output_dir: &out,
        group_by_length: cfg.data.group_by_length,
        resume,
        quiet,
        label: "sft",
    })?;
    eprintln!(
        "sft done: {} steps in {:.1}s, loss {} -> {}{}; adapter in {}",
        outcome.steps,
        outcome.wall_s,
        outcome.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
        outcome.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        outcome
            .eval
            .get("eval_loss")
            .map_or(String::new(), |l| format!(", eval_loss {l:.4}")),
        out.display()
    );
    Ok(outcome)
}
