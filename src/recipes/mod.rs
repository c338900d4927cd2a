//! Each subcommand is a short recipe over the shared components: load a config, a model and
//! data, pick an objective, hand them to the trainer.

pub mod conditioned;
pub mod dpo;
pub mod evaluate;
pub mod generate;
pub mod grpo;
pub mod merge;
pub mod multi_objective;
pub mod output_dir;
pub mod pareto;
pub mod pipeline;
pub mod reuse;
pub mod reward_weighted;
pub mod sft;
pub mod stage;
pub mod sweep;
pub mod train_rm;
pub mod utility;

use crate::model::dtype::parse_dtype;
use crate::model::loader::{apply_adapter, load_merged, select_device, Loaded};
use crate::model::lora::LoraConfig;
use crate::train::TrainConfig;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How a training command was invoked besides its config.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunFlags {
    /// Continue from the newest complete checkpoint in the output directory.
    pub resume: bool,
    /// Replace the run the output directory holds (once the new run has started).
    pub force: bool,
    /// Log lines only, no progress bar.
    pub quiet: bool,
    /// On resume, accept changed schedule and cadence settings (recorded in the run directory).
    pub allow_config_change: bool,
}

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
    /// The shape of that tiny model (the test model's when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tiny: Option<crate::model::tiny::TinySpec>,
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
            tiny: None,
        }
    }
}

/// The model a command-line evaluation or generation runs: `--model`, `--adapter`, `--dtype`,
/// `--device`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelOptions {
    /// Local model directory or Hub repo id [default: Qwen/Qwen2.5-0.5B].
    #[arg(long)]
    pub model: Option<String>,
    /// PEFT adapter directory to apply on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Dtype of the frozen weights and activations: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl ModelOptions {
    /// `--model`, or the default model.
    pub fn spec(&self) -> &str {
        self.model
            .as_deref()
            .unwrap_or(crate::model::loader::DEFAULT_MODEL)
    }

    pub fn load(&self) -> Result<Loaded> {
        let device = select_device(&self.device)?;
        let dtype = parse_dtype(&self.dtype)?;
        crate::model::loader::load_pretrained(self.spec(), self.adapter.as_deref(), dtype, &device)
    }
}

/// Loads the base model (merging `model.adapter` into it) on the configured device/dtype.
pub fn load_base(model: &ModelConfig, train: &TrainConfig) -> Result<Loaded> {
    if let Some(n) = train.threads {
        // Candle's CPU kernels size their thread pool from this variable.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if model.create_tiny_if_missing {
        let (dir, spec) = (
            Path::new(&model.path),
            model.tiny.clone().unwrap_or_default(),
        );
        if !dir.exists() {
            // Written aside and renamed into place: a sweep's points start at once, and one
            // must never read another's half-written checkpoint. Whoever renames first wins;
            // the others' copies (the same seed and spec) are dropped.
            let tmp = crate::util::io::AtomicDir::new(dir)?;
            crate::model::tiny::write_tiny_checkpoint_of(tmp.path(), model.tiny_seed, &spec)?;
            tmp.commit_new()?;
        }
        // A directory written for another `[model.tiny]` (say, before `arch` changed) is
        // never silently reused, nor replaced.
        crate::model::tiny::check_made_for(dir, &spec)?;
    }
    let device = select_device(&train.device)?;
    if device.is_cpu() {
        eprintln!(
            "{}",
            crate::util::cpu::kernel_report(crate::model::decode::kernel_name())
        );
    }
    let dtype = parse_dtype(&train.dtype)?;
    let mut loaded = load_merged(&model.path, model.adapter_path(), dtype, &device)?;
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

pub use crate::outputs::RunDir;

/// What `base_model_name_or_path` says in adapter files.
pub fn base_name(model: &ModelConfig) -> String {
    model.path.clone()
}
