//! LoRA linear layers with PEFT semantics, and PEFT adapter files.
//!
//! y = W x + b + s * B(A(dropout(x))), s = alpha / r (or alpha / sqrt(r) with rsLoRA).
//! A is [r, in], Kaiming-uniform (a = sqrt(5)); B is [out, r], zero, so a fresh adapter changes
//! nothing. A and B are f32 `Var`s whatever the base dtype: f16 moments and updates underflow.

use super::frozen::frozen_linear;
use super::fused::{self, LoraParts};
use crate::io::write_atomic;
use crate::rng::{stream_rng, uniform_vec, DropoutRng};
use anyhow::{bail, Context};
use candle_core::{DType, Device, Result, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The projections LoRA may target, in the order PEFT lists them for Qwen2.
pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Whether a forward pass uses the LoRA adapters. `Disabled` is the DPO reference model: the
/// same weights without a second copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adapters {
    Enabled,
    Disabled,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    /// Start from this PEFT adapter's weights instead of a fresh adapter (its r, alpha and
    /// targets must match this section); training continues that adapter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: ALL_TARGETS.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            init_from: None,
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.r == 0 {
            bail!("lora.r must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("lora.dropout must be in [0, 1), got {}", self.dropout);
        }
        if self.target_modules.is_empty() {
            bail!("lora.target_modules is empty");
        }
        for t in &self.target_modules {
            if !ALL_TARGETS.contains(&t.as_str()) {
                bail!(
                    "lora.target_modules: unknown module `{t}` (expected some of {ALL_TARGETS:?})"
                );
            }
        }
        Ok(())
    }

    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|t| t == module)
    }
}

/// One adapter pair on one linear layer.
#[derive(Clone)]
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
}

/// A frozen linear layer (weight, optional bias) with an optional LoRA adapter.
#[derive(Clone)]
pub struct LoraLinear {
    /// HF module path, e.g. `model.layers.3.self_attn.q_proj`.
    pub path: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Lora>,
}

/// Per-forward switches for the adapters.
#[derive(Clone, Copy)]
pub struct LoraCtx<'a> {
    pub adapters: Adapters,
    /// Dropout masks when training; `None` means no dropout (eval, reference, generation).
    pub dropout: Option<&'a DropoutRng>,
    /// Whether a gradient will be taken. Without one the adapters enter as constants, so the
    /// forward records no graph and keeps no activations (candle has no no-grad mode).
    pub grad: bool,
    /// Activation checkpointing: decoder layers are recomputed in the backward, and the
    /// adapter gradients found there are deposited in this sink for the trainer.
    pub recompute: Option<&'a std::sync::Arc<super::checkpointing::GradSink>>,
}

impl<'a> LoraCtx<'a> {
    pub const EVAL: LoraCtx<'static> = LoraCtx {
        adapters: Adapters::Enabled,
        dropout: None,
        grad: false,
        recompute: None,
    };
    pub const REFERENCE: LoraCtx<'static> = LoraCtx {
        adapters: Adapters::Disabled,
        dropout: None,
        grad: false,
        recompute: None,
    };
    /// Adapters on, gradients recorded, no dropout.
    pub const TRAIN: LoraCtx<'static> = LoraCtx {
        adapters: Adapters::Enabled,
        dropout: None,
        grad: true,
        recompute: None,
    };

    /// Adapters on, gradients recorded, dropout masks from `rng`.
    pub fn train(rng: &'a DropoutRng) -> Self {
        LoraCtx {
            adapters: Adapters::Enabled,
            dropout: Some(rng),
            grad: true,
            recompute: None,
        }
    }

    /// The same context with decoder layers recomputed in the backward (see `checkpointing`).
    pub fn with_recompute(self, sink: &'a std::sync::Arc<super::checkpointing::GradSink>) -> Self {
        LoraCtx {
            recompute: Some(sink),
            ..self
        }
    }
}

impl LoraLinear {
    pub fn new(path: String, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            path,
            weight,
            bias,
            lora: None,
        }
    }

    pub fn forward(&self, x: &Tensor, ctx: LoraCtx) -> Result<Tensor> {
        let lora = match (&self.lora, ctx.adapters) {
            (Some(l), Adapters::Enabled) => l,
            _ => return frozen_linear(x, &self.weight, self.bias.as_ref()),
        };
        // Without a gradient the adapter enters as constants, so no graph is recorded.
        let (a, b) = if ctx.grad {
            (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
        } else {
            (lora.a.detach(), lora.b.detach())
        };
        let dropout = match ctx.dropout {
            Some(rng) if lora.dropout > 0.0 => Some(rng.mask(rng.next_call(), lora.dropout)),
            _ => None,
        };
        fused::lora_linear(
            x,
            &self.weight,
            self.bias.as_ref(),
            LoraParts {
                a: &a,
                b: &b,
                scale: lora.scale,
                dropout,
            },
        )
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// A fresh PEFT-style adapter: A Kaiming-uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)),
    /// B zero. Each layer draws from its own seeded stream.
    pub fn attach_fresh(&mut self, cfg: &LoraConfig, seed: u64, stream: u64) -> Result<()> {
        let (inp, out) = (self.in_features(), self.out_features());
        let mut rng = stream_rng(seed, stream);
        let bound = 1.0 / (inp as f32).sqrt();
        let a = Tensor::from_vec(
            uniform_vec(&mut rng, cfg.r * inp, bound),
            (cfg.r, inp),
            self.weight.device(),
        )?;
        let b = Tensor::zeros((out, cfg.r), DType::F32, self.weight.device())?;
        self.attach(cfg, a, b)
    }

    pub fn attach(&mut self, cfg: &LoraConfig, a: Tensor, b: Tensor) -> Result<()> {
        let (inp, out) = (self.in_features(), self.out_features());
        if a.dims() != [cfg.r, inp] || b.dims() != [out, cfg.r] {
            candle_core::bail!(
                "{}: lora_A {:?} / lora_B {:?} do not fit r={} and weight [{out}, {inp}]",
                self.path,
                a.dims(),
                b.dims(),
                cfg.r
            );
        }
        // f32 at least: f16/bf16 adapters and moments underflow; f64 follows an f64 base.
        let dtype = super::compute_dtype(self.weight.dtype());
        self.lora = Some(Lora {
            a: Var::from_tensor(&a.to_dtype(dtype)?)?,
            b: Var::from_tensor(&b.to_dtype(dtype)?)?,
            scale: cfg.scale(),
            dropout: cfg.dropout,
        });
        Ok(())
    }

    /// W <- W + s * B A, computed in f32, then the adapter is removed.
    pub fn merge(&mut self) -> Result<()> {
        if let Some(l) = self.lora.take() {
            let dtype = self.weight.dtype();
            let delta =
                super::matmul::matmul(l.b.as_tensor(), l.a.as_tensor())?.affine(l.scale, 0.0)?;
            let acc = delta.dtype();
            self.weight = (self.weight.to_dtype(acc)? + delta)?.to_dtype(dtype)?;
        }
        Ok(())
    }
}

/// PEFT's adapter_config.json (the fields PEFT, vLLM and transformers read).
pub fn peft_config_json(cfg: &LoraConfig, base_model: &str) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "use_dora": false,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
        "auto_mapping": null,
    })
}

/// PEFT tensor key of a LoRA matrix: `base_model.model.<module>.lora_A.weight`.
pub fn peft_key(module_path: &str, which: char) -> String {
    format!("base_model.model.{module_path}.lora_{which}.weight")
}

/// Reads adapter_config.json into our LoraConfig, rejecting what we cannot reproduce exactly.
pub fn read_peft_config(dir: &Path) -> anyhow::Result<LoraConfig> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read adapter config", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let ctx = |field: &str| format!("{}: field `{field}`", path.display());
    let peft_type = v
        .get("peft_type")
        .and_then(|x| x.as_str())
        .unwrap_or("LORA");
    if peft_type != "LORA" {
        bail!(
            "{}: peft_type `{peft_type}` is not supported (LORA only)",
            ctx("peft_type")
        );
    }
    for (flag, what) in [("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out")] {
        if v.get(flag).and_then(|x| x.as_bool()).unwrap_or(false) {
            bail!("{}: {what} adapters are not supported", ctx(flag));
        }
    }
    if let Some(b) = v.get("bias").and_then(|x| x.as_str()) {
        if b != "none" {
            bail!(
                "{}: bias = `{b}` is not supported (\"none\" only)",
                ctx("bias")
            );
        }
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if v.get(k)
            .and_then(|x| x.as_object())
            .is_some_and(|m| !m.is_empty())
        {
            bail!("{}: per-module ranks/alphas are not supported", ctx(k));
        }
    }
    if v.get("modules_to_save").is_some_and(|m| !m.is_null()) {
        bail!(
            "{}: modules_to_save is not supported",
            ctx("modules_to_save")
        );
    }
    let r = v
        .get("r")
        .and_then(|x| x.as_u64())
        .with_context(|| ctx("r"))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(|x| x.as_f64())
        .with_context(|| ctx("lora_alpha"))?;
    let target_modules = match v.get("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(|s| s.rsplit('.').next().unwrap_or(s).to_string())
            })
            .collect::<Option<Vec<_>>>()
            .with_context(|| ctx("target_modules"))?,
        Some(serde_json::Value::String(s)) => {
            bail!(
                "{}: a regex target (`{s}`) is not supported; list module names",
                ctx("target_modules")
            )
        }
        _ => bail!("{}: missing", ctx("target_modules")),
    };
    let cfg = LoraConfig {
        r,
        alpha,
        dropout: v
            .get("lora_dropout")
            .and_then(|x| x.as_f64())
            .unwrap_or(0.0) as f32,
        target_modules,
        use_rslora: v
            .get("use_rslora")
            .and_then(|x| x.as_bool())
            .unwrap_or(false),
        init_from: None,
    };
    cfg.validate().with_context(|| path.display().to_string())?;
    Ok(cfg)
}

/// Reads adapter_model.safetensors: module path -> (A, B). Keys with PEFT's adapter name
/// (`lora_A.default.weight`) are accepted too.
pub fn read_peft_tensors(
    dir: &Path,
    device: &Device,
) -> anyhow::Result<HashMap<String, (Tensor, Tensor)>> {
    let path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&path, device)
        .with_context(|| format!("{}: cannot read adapter weights", path.display()))?;
    let mut a_map = HashMap::new();
    let mut b_map = HashMap::new();
    for (key, t) in tensors {
        let k = key.replace(".default.weight", ".weight");
        let k = k.strip_prefix("base_model.model.").unwrap_or(&k);
        if let Some(m) = k.strip_suffix(".lora_A.weight") {
            a_map.insert(m.to_string(), t);
        } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
            b_map.insert(m.to_string(), t);
        } else {
            bail!(
                "{}: tensor `{key}` is not a LoRA A/B matrix",
                path.display()
            );
        }
    }
    let mut out = HashMap::new();
    for (m, a) in a_map {
        let b = b_map
            .remove(&m)
            .with_context(|| format!("{}: `{m}` has lora_A but no lora_B", path.display()))?;
        out.insert(m, (a, b));
    }
    if let Some(m) = b_map.keys().next() {
        bail!("{}: `{m}` has lora_B but no lora_A", path.display());
    }
    Ok(out)
}

/// Writes adapter_config.json and adapter_model.safetensors (atomically, each file).
pub fn write_peft_adapter(
    dir: &Path,
    cfg: &LoraConfig,
    base_model: &str,
    tensors: &[(String, Tensor, Tensor)],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (module, a, b) in tensors {
        map.insert(peft_key(module, 'A'), a.to_dtype(DType::F32)?);
        map.insert(peft_key(module, 'B'), b.to_dtype(DType::F32)?);
    }
    let bytes = safetensors_bytes(
        &map,
        Some(HashMap::from([("format".to_string(), "pt".to_string())])),
    )?;
    write_atomic(&dir.join("adapter_model.safetensors"), &bytes)?;
    let cfg_json = serde_json::to_string_pretty(&peft_config_json(cfg, base_model))?;
    write_atomic(&dir.join("adapter_config.json"), cfg_json.as_bytes())?;
    Ok(())
}

/// Serialises tensors to safetensors bytes (keys sorted, so files are reproducible).
pub fn safetensors_bytes(
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> anyhow::Result<Vec<u8>> {
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    let mut data = Vec::with_capacity(keys.len());
    for k in keys {
        let t = tensors[k].contiguous()?;
        let dtype = match t.dtype() {
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F64 => safetensors::Dtype::F64,
            DType::U32 => safetensors::Dtype::U32,
            DType::I64 => safetensors::Dtype::I64,
            DType::U8 => safetensors::Dtype::U8,
            d => bail!("cannot save dtype {d:?}"),
        };
        let bytes = tensor_le_bytes(&t)?;
        data.push((k.clone(), dtype, t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(k, d, s, b)| {
            Ok((
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b)?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(safetensors::serialize(views, metadata)?)
}

fn tensor_le_bytes(t: &Tensor) -> anyhow::Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U32 => t
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        d => bail!("cannot save dtype {d:?}"),
    })
}
