//! What every adapter-training stage shares: its config sections, and the run that loads the
//! policy, the data and the reward model and hands them to the trainer.

use super::output_dir::prepare_output;
use super::{base_name, load_base, load_policy, ModelConfig, RunDir, RunFlags};
use crate::cache::{cache_dir, model_digest};
use crate::data::{load_splits, DataConfig, DataReport, Parsed, Splits};
use crate::model::ctx::ForwardCtx;
use crate::model::loader::Loaded;
use crate::model::lora::LoraConfig;
use crate::reward::RewardHead;
use crate::train::trainable::{FullModel, PeftAdapter, Trainable};
use crate::train::trainer::{self, TrainOutcome};
use crate::train::{Finetune, Objective, TrainConfig};
use crate::util::digest::Digest;
use anyhow::{bail, Result};
use candle_core::Var;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
pub struct StageRun {
    /// The stage as it runs (its LoRA possibly widened from the configured one).
    pub stage: AdapterStage,
    pub loaded: Loaded,
    pub out: PathBuf,
    /// Digest of the frozen weights (base + merged adapter, dtype).
    pub model_key: Digest,
    pub cache_dir: PathBuf,
    pub flags: RunFlags,
    /// Full fine-tuning: the model's trainable weights (`None`: a LoRA adapter trains).
    full: Option<Vec<(String, Var)>>,
    /// Holds the output directory's lock until the run ends; written into only from
    /// `train` on (`commit`), once the model and data are loaded and valid.
    dir: std::cell::RefCell<RunDir>,
}

impl AdapterStage {
    /// Refuses full fine-tuning for a stage that needs the adapter (its reference model is
    /// the policy with the adapter switched off).
    pub fn require_lora(&self, stage: &str) -> Result<()> {
        if self.train.finetune == Finetune::Full {
            bail!(
                "train.finetune = \"full\" is supported by sft only: {stage}'s reference is the policy with its LoRA adapter switched off"
            );
        }
        Ok(())
    }

    /// The `[train]` and `[lora]` values, checked without loading anything.
    pub fn check(&self) -> Result<()> {
        self.train.validate()?;
        if self.train.finetune == Finetune::Lora {
            self.lora.validate()?;
        }
        Ok(())
    }

    /// Validates, writes `resolved` into the output directory, and loads the policy: the base
    /// with a fresh (or continued) LoRA, or under full fine-tuning the base with every weight
    /// trainable.
    pub fn start<R: Serialize + Default>(&self, resolved: &R, flags: RunFlags) -> Result<StageRun> {
        self.check()?;
        let run_dir = prepare_output(&self.train.output_dir, resolved, Some(flags))?;
        let (loaded, full) = match self.train.finetune {
            Finetune::Lora => (load_policy(&self.model, &self.lora, &self.train)?, None),
            Finetune::Full => {
                if self.lora.init_from.is_some() {
                    bail!("lora.init_from is set but train.finetune = \"full\" trains no adapter");
                }
                let mut loaded = load_base(&self.model, &self.train)?;
                let vars = loaded.model.make_trainable()?;
                (loaded, Some(vars))
            }
        };
        let model_key = model_digest(&loaded.files, self.model.adapter_path(), &self.train.dtype)?;
        Ok(StageRun {
            stage: self.clone(),
            loaded,
            out: run_dir.path.clone(),
            dir: std::cell::RefCell::new(run_dir),
            model_key,
            cache_dir: cache_dir(self.train.cache_dir.as_deref()),
            flags,
            full,
        })
    }
}

impl StageRun {
    /// Loads, validates, tokenises and splits `[data]` with `parse`, and queues the data
    /// report for the output directory.
    pub fn load_data<T>(
        &self,
        parse: impl Fn(&serde_json::Value, &mut DataReport) -> Parsed<T>,
    ) -> Result<Splits<T>> {
        let splits = load_splits(&self.stage.data, parse)?;
        let (name, bytes) = splits.report()?;
        self.dir.borrow_mut().queue(name, bytes);
        Ok(splits)
    }

    /// A file for the output directory, written when the run starts (`commit`).
    pub fn queue(&self, name: &str, bytes: Vec<u8>) {
        self.dir.borrow_mut().queue(name, bytes);
    }

    /// Starts writing the run: the resolved config, the data report and whatever else was
    /// queued (`outputs::RunDir::commit`). `train` calls it; a recipe that writes before
    /// training (a cache inside the run) calls it first.
    pub fn commit(&self) -> Result<()> {
        self.dir.borrow_mut().commit()
    }

    /// The reward model at `rm_dir` and a backbone to score with: the policy's own frozen
    /// weights (adapter off) when the head was trained on them, else its recorded backbone.
    pub fn reward_model(&self, rm_dir: &Path) -> Result<(RewardHead, RewardBackbone<'_>)> {
        let head = RewardHead::load(rm_dir, &self.loaded.model.device)?;
        let model = &self.stage.model;
        let same = match head.is_backbone(&self.loaded.model)? {
            Some(same) => same,
            None => {
                head.info.backbone_model == model.path
                    && head.info.backbone_adapter.as_deref().map(Path::new) == model.adapter_path()
            }
        };
        let backbone = if same {
            RewardBackbone::Policy(self)
        } else {
            let (path, adapter) = head.info.backbone_paths(rm_dir)?;
            let cfg = ModelConfig {
                path,
                adapter,
                ..model.clone()
            };
            let loaded = load_base(&cfg, &self.stage.train)?;
            head.check_backbone(rm_dir, &loaded.model, "its recorded backbone as found now")?;
            let key = model_digest(&loaded.files, cfg.adapter_path(), &self.stage.train.dtype)?;
            RewardBackbone::Own(Box::new(loaded), key)
        };
        Ok((head, backbone))
    }

    /// Trains the policy (its adapter, or every weight) with `objective` through the shared
    /// trainer, saving PEFT files or a Hugging Face checkpoint, and prints a one-line summary.
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
        let full = self.full.as_ref().map(|vars| FullModel {
            loaded: &self.loaded,
            vars: vars.clone(),
        });
        let trainable: &dyn Trainable = match &full {
            Some(f) => f,
            None => &adapter,
        };
        self.commit()?;
        let outcome = trainer::train(trainer::TrainRun {
            objective,
            trainable,
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
        // Plots are a convenience: a drawing failure must not fail a finished run.
        if let Err(e) = crate::plot::plot_run(&self.out, false) {
            eprintln!("warning: plots not drawn: {e:#}");
        }
        let eval: String = ["eval_loss", "eval_rewards/accuracies"]
            .iter()
            .filter_map(|k| outcome.eval.get(*k).map(|v| format!(", {k} {v:.4}")))
            .collect();
        let loss = |l: Option<f64>| l.map_or("-".to_string(), |l| format!("{l:.4}"));
        eprintln!(
            "{label} done: {} steps in {:.1}s, loss {} -> {}{eval}; {} in {}",
            outcome.steps,
            outcome.wall_s,
            loss(outcome.first_loss),
            loss(outcome.last_loss),
            if self.full.is_some() {
                "model"
            } else {
                "adapter"
            },
            self.out.display()
        );
        Ok(outcome)
    }
}

/// The model a reward head scores with, and the digest of its frozen weights.
pub enum RewardBackbone<'a> {
    /// The policy's base with its adapter switched off.
    Policy(&'a StageRun),
    /// A checkpoint of its own (the head's recorded backbone).
    Own(Box<Loaded>, Digest),
}

impl RewardBackbone<'_> {
    pub fn parts(&self) -> (&crate::model::Qwen, ForwardCtx<'static>, &Digest) {
        match self {
            RewardBackbone::Policy(run) => {
                (&run.loaded.model, ForwardCtx::REFERENCE, &run.model_key)
            }
            RewardBackbone::Own(loaded, key) => (&loaded.model, ForwardCtx::EVAL, key),
        }
    }
}
