//! LoRA linear layers with PEFT semantics (the adapter files are in `peft.rs`).
//!
//! y = W x + b + s * B(A(dropout(x))), s = alpha / r (or alpha / sqrt(r) with rsLoRA).
//! A is [r, in], Kaiming-uniform (a = sqrt(5)); B is [out, r], zero, so a fresh adapter changes
//! nothing. A and B are f32 `Var`s whatever the base dtype: f16 moments and updates underflow.

use super::ctx::{Adapters, ForwardCtx};
use super::decode::{self, Bf16Twin};
use super::frozen::frozen_linear;
use super::fused::{self, LoraParts};
use super::matmul::matmul_t;
use crate::util::rng::{stream_rng, uniform_vec};
use anyhow::bail;
use candle_core::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

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
        // Checked against the model's matrices when the adapter is attached; this bound stops
        // a mistyped rank before anything is loaded.
        if self.r > 65_536 {
            bail!(
                "lora.r must be at most 65536 (and at most a target matrix's smaller side), got {}",
                self.r
            );
        }
        // alpha = 0 trains an adapter that is multiplied by zero; NaN poisons the first step.
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("lora.alpha must be a finite number > 0, got {}", self.alpha);
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
    /// The weight in bf16 for decoding's few-row products, when that is exact (`decode`).
    pub twin: Bf16Twin,
}

impl LoraLinear {
    pub fn new(path: String, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            path,
            weight,
            bias,
            lora: None,
            twin: Bf16Twin::default(),
        }
    }

    pub fn forward(&self, x: &Tensor, ctx: ForwardCtx) -> Result<Tensor> {
        if !ctx.grad && ctx.dropout.is_none() {
            if let Some(y) = self.decode_forward(x, ctx)? {
                return Ok(y);
            }
        }
        let lora = match (&self.lora, ctx.adapters) {
            (Some(l), Adapters::Enabled) => l,
            // Full fine-tuning: the projection itself learns.
            _ if ctx.grad && self.weight.is_variable() => {
                return fused::linear(x, &self.weight, self.bias.as_ref())
            }
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
                gate: ctx.gate,
            },
        )
    }

    /// A decoding step's product (at most `decode::MAX_ROWS` rows, f32, CPU) against the bf16
    /// twin of the weight, plus the adapter's term in f32; `None` where the GEMM path applies.
    fn decode_forward(&self, x: &Tensor, ctx: ForwardCtx) -> Result<Option<Tensor>> {
        let k = self.in_features();
        let rows = x.elem_count() / k;
        if rows > decode::MAX_ROWS || x.dtype() != DType::F32 || !x.device().is_cpu() {
            return Ok(None);
        }
        let Some(twin) = self.twin.get(&self.weight)? else {
            return Ok(None);
        };
        let x2 = x.reshape((rows, k))?;
        let mut y = decode::bf16_rows_linear(&x2, &twin, self.bias.as_ref())?;
        if let (Some(l), Adapters::Enabled) = (&self.lora, ctx.adapters) {
            let rank_scale = fused::RankScale::new(ctx.gate, l.scale, DType::F32)?;
            let u = rank_scale.apply(matmul_t(&x2, &l.a.as_tensor().detach())?)?;
            y = (y + matmul_t(&u, &l.b.as_tensor().detach())?)?;
        }
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = self.out_features();
        Ok(Some(y.reshape(dims)?))
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
        let dtype = super::dtype::compute_dtype(self.weight.dtype());
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
            self.weight = merged_weight(&self.weight, l.a.as_tensor(), l.b.as_tensor(), l.scale)?;
        }
        Ok(())
    }
}

/// W + s * B A in the adapter's dtype (f32 at least), returned in W's dtype: the one merge
/// formula, shared by a loaded model and the streaming `merge` export.
pub fn merged_weight(weight: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let delta = super::matmul::matmul(b, a)?.affine(scale, 0.0)?;
    let acc = delta.dtype();
    (weight.to_dtype(acc)? + delta)?.to_dtype(weight.dtype())
}
