//! Each subcommand is a short recipe over the shared components: load a config, a model and
//! data, pick an objective, hand them to the trainer.

pub mod dpo;
pub mod evaluate;
pub mod merge;
pub mod pipeline;
pub mod sft;
pub mod train_rm;

use crate::model::loader::{apply_adapter, load_pretrained, select_device, Loaded};
use crate::model::lora::LoraConfig;
use crate::model::parse_dtype;
use crate::train::TrainConfig;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The `[model]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Local directory or Hub repo id.
    pub path: String,
    /// An adapter merged into the base weights before a fresh LoRA is attached (e.g. the SFT
    /// adapter for DPO); it is also part of the frozen reference.
    pub adapter: Option<String>,
    /// Write a tiny random checkpoint at `path` when it does not exist (demos, tests).
    pub create_tiny_if_missing: bool,
    pub tiny_seed: u64,
}

impl ModelConfig {
    /// The adapter to merge, if any (an empty string means none, so `--set model.adapter=""`
    /// can switch it off).
    pub fn adapter_path(&self) -> Option<&Path> {
        self.adapter
            .as_deref()
            .filter(|a| !a.is_empty())
            .map(Path::new)
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: crate::model::loader::DEFAULT_MODEL.to_string(),
            adapter: None,
            create_tiny_if_missing: false,
            tiny_seed: 0,
        }
    }
}

/// Loads the base model (merging `model.adapter` into it) on the configured device/dtype.
pub fn load_base(model: &ModelConfig, train: &TrainConfig) -> Result<Loaded> {
    if let Some(n) = train.threads {
        // Candle's CPU kernels size their thread pool from this variable.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if model.create_tiny_if_missing && !Path::new(&model.path).exists() {
        crate::model::tiny::write_tiny_checkpoint(Path::new(&model.path), model.tiny_seed)?;
    }
    let device = select_device(&train.device)?;
    let dtype = parse_dtype(&train.dtype)?;
    let mut loaded = load_pretrained(&model.path, None, dtype, &device)?;
    if let Some(adapter) = model.adapter_path() {
        apply_adapter(&mut loaded.model, adapter)?;
        loaded.model.merge_lora()?;
    }
    loaded.model.logits_chunk = train.logits_chunk;
    Ok(loaded)
}

/// Loads the base and attaches a fresh LoRA (seeded by `train.seed`).
pub fn load_policy(model: &ModelConfig, lora: &LoraConfig, train: &TrainConfig) -> Result<Loaded> {
    lora.validate()?;
    let mut loaded = load_base(model, train)?;
    match lora.init_from.as_deref().filter(|p| !p.is_empty()) {
        None => loaded.model.attach_lora(lora, train.seed)?,
        Some(dir) => {
            let file = apply_adapter(&mut loaded.model, Path::new(dir))?;
            let mut want = lora.target_modules.clone();
            let mut got = file.target_modules.clone();
            want.sort();
            got.sort();
            if (file.r, file.alpha, file.use_rslora, got)
                != (lora.r, lora.alpha, lora.use_rslora, want)
            {
                anyhow::bail!(
                    "lora.init_from {dir}: its r={}, alpha={}, use_rslora={}, targets {:?} differ from [lora]",
                    file.r,
                    file.alpha,
                    file.use_rslora,
                    file.target_modules
                );
            }
            for lin in loaded.model.linears_mut() {
                if let Some(l) = lin.lora.as_mut() {
                    l.dropout = lora.dropout;
                }
            }
        }
    }
    Ok(loaded)
}

/// Creates the output directory and writes the resolved config into it.
pub fn prepare_output(output_dir: &str, resolved: &impl Serialize) -> Result<PathBuf> {
    let dir = PathBuf::from(output_dir);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create output directory", dir.display()))?;
    let text = crate::config::to_toml(resolved)?;
    crate::io::write_atomic(&dir.join("config.resolved.toml"), text.as_bytes())?;
    Ok(dir)
}

/// What `base_model_name_or_path` says in adapter files.
pub fn base_name(model: &ModelConfig) -> String {
    model.path.clone()
}

/// What an adapter-training recipe hands the trainer besides its objective and data.
pub struct AdapterRun<'a> {
    pub loaded: &'a Loaded,
    pub lora: &'a LoraConfig,
    pub model: &'a ModelConfig,
    pub train: &'a TrainConfig,
    pub out: &'a Path,
    pub group_by_length: bool,
    pub resume: bool,
    pub quiet: bool,
    pub label: &'a str,
}

/// Trains the model's LoRA adapter with `objective` through the shared trainer, saving PEFT
/// files, and prints a one-line summary.
pub fn train_adapter<O: crate::train::Objective>(
    run: AdapterRun,
    objective: &O,
    train: &[O::Example],
    val: &[O::Example],
) -> Result<crate::train::trainer::TrainOutcome> {
    let adapter = crate::train::trainable::PeftAdapter {
        model: &run.loaded.model,
        lora: run.lora,
        base_model: base_name(run.model),
    };
    let outcome = crate::train::trainer::train(crate::train::trainer::TrainRun {
        objective,
        trainable: &adapter,
        train,
        val,
        cfg: run.train,
        device: &run.loaded.model.device,
        output_dir: run.out,
        group_by_length: run.group_by_length,
        resume: run.resume,
        quiet: run.quiet,
        label: run.label,
    })?;
    let eval: String = ["eval_loss", "eval_rewards/accuracies"]
        .iter()
        .filter_map(|k| outcome.eval.get(*k).map(|v| format!(", {k} {v:.4}")))
        .collect();
    let loss = |l: Option<f64>| l.map_or("-".to_string(), |l| format!("{l:.4}"));
    eprintln!(
        "{} done: {} steps in {:.1}s, loss {} -> {}{eval}; adapter in {}",
        run.label,
        outcome.steps,
        outcome.wall_s,
        loss(outcome.first_loss),
        loss(outcome.last_loss),
        run.out.display()
    );
    Ok(outcome)
}
