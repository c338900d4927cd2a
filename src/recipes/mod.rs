//! Each subcommand is a short recipe over the shared components: load a config, a model and
//! data, pick an objective, hand them to the trainer.

pub mod conditioned;
pub mod dpo;
pub mod evaluate;
pub mod generate;
pub mod grpo;
pub mod merge;
pub mod multi_objective;
pub mod pareto;
pub mod pipeline;
pub mod reward_weighted;
pub mod sft;
pub mod stage;
pub mod summary;
pub mod train_rm;
pub mod utility;

pub use stage::{AdapterStage, RewardBackbone, RunFlags, StageRun};

use crate::model::loader::{apply_adapter, load_merged, select_device, Loaded};
use crate::model::lora::LoraConfig;
use crate::model::parse_dtype;
use crate::train::TrainConfig;
use anyhow::{bail, Result};
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
        if dir.exists() {
            // A directory written for another `[model.tiny]` (say, before `arch` changed) is
            // never silently reused, nor replaced.
            crate::model::tiny::check_made_for(dir, &spec)?;
        } else {
            crate::model::tiny::write_tiny_checkpoint_of(dir, model.tiny_seed, &spec)?;
        }
    }
    let device = select_device(&train.device)?;
    if device.is_cpu() {
        eprintln!("{}", crate::cpu::kernel_report());
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

/// Settings a resumed run may change with `--allow-config-change`: the schedule and the
/// cadence of logs, evaluations and checkpoints, and where and how fast it runs. Everything
/// else (data, model, LoRA, batch, seed, dropout, precision) would make the record describe a
/// run that did not happen.
const CHANGEABLE_ON_RESUME: [&str; 19] = [
    "train.lr",
    "train.scheduler",
    "train.warmup_ratio",
    "train.warmup_steps",
    "train.min_lr_ratio",
    "train.max_steps",
    "train.epochs",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.early_stopping_patience",
    "train.early_stopping_min_delta",
    "train.eval_batch_size",
    "train.threads",
    "train.device",
    "train.cache_dir",
    "train.logits_chunk",
    "train.recompute_layers",
];

/// Claims the output directory (`outputs::RunDir`: checked against every path the config
/// reads, locked, and judged against the run it may already hold) and queues the resolved
/// config for it; nothing is written until the caller commits, once the run is validated and
/// starts. A training run (`training` given) that resumes a checkpoint must resume the same
/// config: changed keys are refused with their old and new values, unless every one is in
/// `CHANGEABLE_ON_RESUME` and `--allow-config-change` was given, which records the change in
/// `config.changes.jsonl`. Without `training` the directory holds a report, rewritten each run.
pub fn prepare_output<R: Serialize + Default>(
    output_dir: &str,
    resolved: &R,
    training: Option<RunFlags>,
) -> Result<RunDir> {
    prepare(output_dir, resolved, training, false)
}

/// `prepare_output` for a report (pipeline summary, Pareto report): a directory holding the
/// report of another config is replaced only with `force` (the same config rewrites its own
/// report, reusing its caches).
pub fn prepare_report<R: Serialize + Default>(
    output_dir: &str,
    resolved: &R,
    force: bool,
) -> Result<RunDir> {
    prepare(output_dir, resolved, None, force)
}

fn prepare<R: Serialize + Default>(
    output_dir: &str,
    resolved: &R,
    training: Option<RunFlags>,
    report_force: bool,
) -> Result<RunDir> {
    let path = PathBuf::from(output_dir);
    let text = crate::config::to_toml(resolved)?;
    let inputs = crate::outputs::Inputs::from_config(&text)?;
    crate::outputs::check_cache_dirs(&text, &inputs)?;
    let mode = crate::outputs::RunMode {
        resume: training.is_some_and(|f| f.resume),
        force: training.is_some_and(|f| f.force),
        report: training.is_none(),
    };
    let flag = if training.is_some() {
        "train.output_dir"
    } else {
        "output_dir"
    };
    let mut dir = RunDir::claim(&path, flag, &inputs, mode)?;
    let config_path = path.join(crate::outputs::RUN_RECORD);
    if training.is_none() && !report_force {
        if let Ok(old) = std::fs::read_to_string(&config_path) {
            let changes = crate::config::changed_keys(&old, &text, None)?;
            if !changes.is_empty() {
                let list: Vec<String> = changes
                    .iter()
                    .take(3)
                    .map(|(k, a, b)| format!("{k}: {a} -> {b}"))
                    .collect();
                bail!(
                    "{}: holds the report of another config ({}{}); pass --force to replace it, or choose another output_dir",
                    path.display(),
                    list.join(", "),
                    if changes.len() > 3 { ", ..." } else { "" }
                );
            }
        }
    }
    let resuming = dir.state == crate::outputs::RunState::Resume;
    if resuming {
        crate::outputs::check_inputs_unchanged(&path, &text)?;
    } else if training.is_some() {
        dir.record_inputs(text.clone());
    }
    if let (true, Ok(old)) = (resuming, std::fs::read_to_string(&config_path)) {
        // A run recorded before an upgrade lacks the keys added since; at their defaults
        // they are what the run used.
        let defaults = crate::config::to_toml(&R::default())?;
        let changes = crate::config::changed_keys(&old, &text, Some(&defaults))?;
        if !changes.is_empty() {
            let list = changes
                .iter()
                .map(|(k, a, b)| format!("{k}: {a} -> {b}"))
                .collect::<Vec<_>>()
                .join(", ");
            let allowed = training.is_some_and(|f| f.allow_config_change);
            let unsafe_keys: Vec<&str> = changes
                .iter()
                .map(|(k, _, _)| k.as_str())
                .filter(|k| !CHANGEABLE_ON_RESUME.contains(k))
                .collect();
            if !unsafe_keys.is_empty() {
                bail!(
                    "{}: --resume with a changed config ({list}); {} cannot change within a run: restore them, or start a new train.output_dir",
                    config_path.display(),
                    unsafe_keys.join(", ")
                );
            }
            if !allowed {
                bail!(
                    "{}: --resume with a changed config ({list}); pass --allow-config-change to continue with the new values (the change is recorded)",
                    config_path.display()
                );
            }
            let entry: serde_json::Map<String, serde_json::Value> = changes
                .iter()
                .map(|(k, a, b)| (k.clone(), serde_json::json!({"old": a, "new": b})))
                .collect();
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            dir.queue_line(
                "config.changes.jsonl",
                serde_json::json!({"unix_time": since, "changes": entry}),
            );
            eprintln!("resuming with changed settings: {list} (recorded in config.changes.jsonl)");
        }
    }
    dir.queue(crate::outputs::RUN_RECORD, text.into_bytes());
    Ok(dir)
}

/// What `base_model_name_or_path` says in adapter files.
pub fn base_name(model: &ModelConfig) -> String {
    model.path.clone()
}
