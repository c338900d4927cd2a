//! What the trainer updates and saves: a LoRA adapter (PEFT files), every weight of the model (a
//! Hugging Face checkpoint), or a reward head. The loop does not care which; checkpoints hold
//! the artifact, the optimizer state and the trainer state.

use crate::model::lora::LoraConfig;
use crate::model::peft::{read_peft_tensors, write_peft_adapter};
use crate::model::Qwen;
use anyhow::{Context, Result};
use candle_core::Var;
use std::path::Path;

pub trait Trainable {
    /// The trainable tensors, named, in a fixed order.
    fn vars(&self) -> Vec<(String, Var)>;
    /// Writes the artifact's files into `dir` (atomically, file by file).
    fn save(&self, dir: &Path) -> Result<()>;
    /// Restores the values saved by `save` from `dir`.
    fn load(&self, dir: &Path) -> Result<()>;
}

/// The model's LoRA adapters, saved as PEFT files.
pub struct PeftAdapter<'a> {
    pub model: &'a Qwen,
    pub lora: &'a LoraConfig,
    /// Written into adapter_config.json's `base_model_name_or_path`.
    pub base_model: String,
}

impl Trainable for PeftAdapter<'_> {
    fn vars(&self) -> Vec<(String, Var)> {
        self.model.lora_vars()
    }

    fn save(&self, dir: &Path) -> Result<()> {
        write_peft_adapter(dir, self.lora, &self.base_model, &self.model.lora_tensors())
    }

    fn load(&self, dir: &Path) -> Result<()> {
        let tensors = read_peft_tensors(dir, &self.model.device)?;
        for lin in self.model.linears() {
            if let Some(l) = &lin.lora {
                let (a, b) = tensors.get(&lin.path).with_context(|| {
                    format!(
                        "{}: checkpoint lacks the adapter of `{}`",
                        dir.display(),
                        lin.path
                    )
                })?;
                anyhow::ensure!(
                    a.dims() == l.a.dims() && b.dims() == l.b.dims(),
                    "{}: adapter shapes of `{}` changed (different lora.r?)",
                    dir.display(),
                    lin.path
                );
                l.a.set(&a.to_dtype(l.a.dtype())?)?;
                l.b.set(&b.to_dtype(l.b.dtype())?)?;
            }
        }
        Ok(())
    }
}

/// Every weight of the model (full fine-tuning), saved as a Hugging Face checkpoint directory
/// (model.safetensors, config.json, tokenizer files) that transformers and mo-align load.
pub struct FullModel<'a> {
    pub loaded: &'a crate::model::loader::Loaded,
    /// From `Qwen2::make_trainable`.
    pub vars: Vec<(String, Var)>,
}

impl Trainable for FullModel<'_> {
    fn vars(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let dtype = self.loaded.model.dtype;
        crate::model::loader::save_pretrained(self.loaded, dir, dtype)
    }

    fn load(&self, dir: &Path) -> Result<()> {
        let path = dir.join("model.safetensors");
        let tensors = candle_core::safetensors::load(&path, &self.loaded.model.device)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        for (name, var) in &self.vars {
            let t = tensors
                .get(name)
                .with_context(|| format!("{}: lacks `{name}`", path.display()))?;
            anyhow::ensure!(
                t.dims() == var.dims(),
                "{}: `{name}` has shape {:?}, the model {:?}",
                path.display(),
                t.dims(),
                var.dims()
            );
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}
