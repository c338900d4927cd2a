//! Each subcommand is a short recipe over the shared components: load a config, a model and
//! data, pick an objective, hand them to the trainer.

pub mod dpo;
pub mod evaluate;
pub mod generate;
pub mod merge;
pub mod pipeline;
pub mod reward_weighted;
pub mod sft;
pub mod summary;
pub mod train_rm;
pub mod utility;

use crate::cache::{cache_dir, model_digest, Digest};
use crate::data::{load_splits, DataConfig, DataReport, Parsed, Splits};
use crate::model::ctx::ForwardCtx;
use crate::model::loader::{apply_adapter, load_merged, select_device, Loaded};
use crate::model::lora::LoraConfig;
use crate::model::parse_dtype;
use crate::reward::RewardHead;
use crate::train::trainable::PeftAdapter;
use crate::train::trainer::{self, TrainOutcome};
use crate::train::{Objective, TrainConfig};
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

/// The model a command-line evaluation or generation runs: `--model`, `--adapter`, `--dtype`,
/// `--device`.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelOptions {
    /// Local model directory or Hub repo id.
    #[arg(long, default_value = crate::model::loader::DEFAULT_MODEL)]
    pub model: String,
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
    pub fn load(&self) -> Result<Loaded> {
        let device = select_device(&self.device)?;
        let dtype = parse_dtype(&self.dtype)?;
        crate::model::loader::load_pretrained(&self.model, self.adapter.as_deref(), dtype, &device)
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

/// How a training command was invoked besides its config.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunFlags {
    /// Continue from the newest complete checkpoint in the output directory.
    pub resume: bool,
    /// Log lines only, no progress bar.
    pub quiet: bool,
}

/// The sections every adapter-training stage has, flattened into its config:
/// `[model]`, `[lora]`, `[data]`, `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct AdapterStage {
    pub model: ModelConfig,
    pub lora: LoraConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
}

/// An adapter stage ready to train: its output directory (holding the resolved config), the
/// policy (base + a fresh or continued LoRA), and what its caches key on.
pub struct StageRun<'a> {
    pub stage: &'a AdapterStage,
    pub loaded: Loaded,
    pub out: PathBuf,
    /// Digest of the frozen weights (base + merged adapter, dtype).
    pub model_key: Digest,
    pub cache_dir: PathBuf,
    pub flags: RunFlags,
}

impl AdapterStage {
    /// Validates, writes `resolved` into the output directory, and loads the policy.
    pub fn start(&self, resolved: &impl Serialize, flags: RunFlags) -> Result<StageRun<'_>> {
        self.train.validate()?;
        let out = prepare_output(&self.train.output_dir, resolved)?;
        let loaded = load_policy(&self.model, &self.lora, &self.train)?;
        let model_key = model_digest(&loaded.files, self.model.adapter_path(), &self.train.dtype)?;
        Ok(StageRun {
            stage: self,
            loaded,
            out,
            model_key,
            cache_dir: cache_dir(self.train.cache_dir.as_deref()),
            flags,
        })
    }
}

impl StageRun<'_> {
    /// Loads, validates, tokenises and splits `[data]` with `parse`, and writes the data report.
    pub fn load_data<T>(
        &self,
        parse: impl Fn(&serde_json::Value, &mut DataReport) -> Parsed<T>,
    ) -> Result<Splits<T>> {
        let splits = load_splits(&self.stage.data, parse)?;
        splits.report(&self.out)?;
        Ok(splits)
    }

    /// The reward model at `rm_dir` and a backbone to score with: the policy's own frozen
    /// weights (adapter off) when the head was trained on them, else its recorded backbone.
    pub fn reward_model(&self, rm_dir: &Path) -> Result<(RewardHead, RewardBackbone<'_>)> {
        let head = RewardHead::load(rm_dir, &self.loaded.model.device)?;
        let model = &self.stage.model;
        let same = head.info.backbone_model == model.path
            && head.info.backbone_adapter.as_deref().map(Path::new) == model.adapter_path();
        let backbone = if same {
            RewardBackbone::Policy(self)
        } else {
            let cfg = ModelConfig {
                path: head.info.backbone_model.clone(),
                adapter: head.info.backbone_adapter.clone(),
                ..model.clone()
            };
            let loaded = load_base(&cfg, &self.stage.train)?;
            let key = model_digest(&loaded.files, cfg.adapter_path(), &self.stage.train.dtype)?;
            RewardBackbone::Own(Box::new(loaded), key)
        };
        Ok((head, backbone))
    }

    /// Trains the policy's adapter with `objective` through the shared trainer, saving PEFT
    /// files, and prints a one-line summary.
    pub fn train<O: Objective>(
        &self,
        objective: &O,
        train: &[O::Example],
        val: &[O::Example],
        label: &str,
    ) -> Result<TrainOutcome> {
        let adapter = PeftAdapter {
            model: &self.loaded.model,
            lora: &self.stage.lora,
            base_model: base_name(&self.stage.model),
        };
        let outcome = trainer::train(trainer::TrainRun {
            objective,
            trainable: &adapter,
            train,
            val,
            cfg: &self.stage.train,
            device: &self.loaded.model.device,
            output_dir: &self.out,
            group_by_length: self.stage.data.group_by_length,
            resume: self.flags.resume,
            quiet: self.flags.quiet,
            label,
        })?;
        let eval: String = ["eval_loss", "eval_rewards/accuracies"]
            .iter()
            .filter_map(|k| outcome.eval.get(*k).map(|v| format!(", {k} {v:.4}")))
            .collect();
        let loss = |l: Option<f64>| l.map_or("-".to_string(), |l| format!("{l:.4}"));
        eprintln!(
            "{label} done: {} steps in {:.1}s, loss {} -> {}{eval}; adapter in {}",
            outcome.steps,
            outcome.wall_s,
            loss(outcome.first_loss),
            loss(outcome.last_loss),
            self.out.display()
        );
        Ok(outcome)
    }
}

/// The model a reward head scores with, and the digest of its frozen weights.
pub enum RewardBackbone<'a> {
    /// The policy's base with its adapter switched off.
    Policy(&'a StageRun<'a>),
    /// A checkpoint of its own (the head's recorded backbone).
    Own(Box<Loaded>, Digest),
}

impl RewardBackbone<'_> {
    pub fn parts(&self) -> (&crate::model::Qwen2, ForwardCtx<'static>, &Digest) {
        match self {
            RewardBackbone::Policy(run) => {
                (&run.loaded.model, ForwardCtx::REFERENCE, &run.model_key)
            }
            RewardBackbone::Own(loaded, key) => (&loaded.model, ForwardCtx::EVAL, key),
        }
    }
}
