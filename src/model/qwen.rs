//! The Qwen2 / Qwen2.5 and Qwen3 decoder with LoRA, read top to bottom like candle-transformers' model
//! files, but built only from ops that have a backward (no fused rms_norm / rope /
//! softmax_last_dim, which drop gradients silently) and frozen-operand ops for every weight.
//!
//! Each block (RMSNorm, rope, attention, SwiGLU, LoRA linear) is a fused op with a hand-written
//! backward (`fused.rs`), so the graph keeps one node per block.
//!
//! Qwen3 is the same decoder with two differences, both in the attention: each query and key
//! head is RMS-normalised (its own `q_norm` / `k_norm` scale over `head_dim`) before the rotary
//! embedding, and q/k/v have no biases. One file serves both, as transformers' modeling_qwen3
//! is modeling_qwen2 with those lines changed.
//!
//! `forward` returns final hidden states; `lm_head` turns them into log-probs of given targets
//! without materialising full-vocabulary logits.

use super::checkpointing::checkpointed;
use super::config::QwenConfig;
use super::ctx::ForwardCtx;
use super::fused;
use super::input::ModelInput;
use super::lora::{LoraConfig, LoraLinear};
use candle_core::{DType, Device, Result, Tensor, Var};

/// RMSNorm in f32, as transformers computes it, then scaled by the (frozen) weight.
#[derive(Clone)]
pub struct RmsNorm {
    pub(crate) weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// `grad`: whether a trainable scale (full fine-tuning) records its gradient.
    fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        if grad {
            fused::rms_norm(x, &self.weight, self.eps)
        } else {
            fused::rms_norm(x, &self.weight.detach(), self.eps)
        }
    }
}

/// cos / sin tables for rotary embeddings, built in f32 (f64 for an f64 model), never in the
/// model's half dtype: in bf16, positions above 256 round to the wrong angle.
#[derive(Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &QwenConfig, dtype: DType, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let n = cfg.max_position_embeddings;
        if dtype == DType::F64 {
            let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
            // An f64 model (finite-difference tests) gets f64 tables throughout.
            let inv: Vec<f64> = (0..half)
                .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / cfg.head_dim as f64))
                .collect();
            for p in 0..n {
                for f in &inv {
                    cos.push((p as f64 * f).cos());
                    sin.push((p as f64 * f).sin());
                }
            }
            return Ok(Self {
                cos: Tensor::from_vec(cos, (n, half), device)?,
                sin: Tensor::from_vec(sin, (n, half), device)?,
            });
        }
        // transformers' f32 arithmetic (inv_freq = 1 / theta^(2i/d), angle = position *
        // inv_freq, both f32); cos/sin rounded from f64.
        let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
        let theta = cfg.rope_theta as f32;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        for p in 0..n {
            for f in &inv {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (n, half), device)?,
            sin: Tensor::from_vec(sin, (n, half), device)?,
        })
    }

    /// cos(position * inv_freq) [max positions, head_dim / 2].
    pub fn cos(&self) -> &Tensor {
        &self.cos
    }

    pub fn sin(&self) -> &Tensor {
        &self.sin
    }

    /// Rotate-half RoPE of `x` [B, H, T, hd] at `positions` [B, T].
    fn apply(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (b, _h, t, hd) = x.dims4()?;
        let half = hd / 2;
        let flat = positions.flatten_all()?;
        let cos = self
            .cos
            .index_select(&flat, 0)?
            .reshape((b, 1, t, half))?
            .to_dtype(x.dtype())?;
        let sin = self
            .sin
            .index_select(&flat, 0)?
            .reshape((b, 1, t, half))?
            .to_dtype(x.dtype())?;
        fused::rope(x, &cos, &sin)
    }
}

#[derive(Clone)]
pub struct Attention {
    pub q_proj: LoraLinear,
    pub k_proj: LoraLinear,
    pub v_proj: LoraLinear,
    pub o_proj: LoraLinear,
    /// Qwen3's per-head RMSNorm of queries and keys (scale [head_dim]); None for Qwen2.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    /// q|k|v weights (and biases) as one tensor that the three projections view, so the fused
    /// decoder makes one GEMM of three (`None` for a model assembled otherwise).
    pub(crate) fused: Option<Fused>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        input: &ModelInput,
        rope: &Rope,
        ctx: ForwardCtx,
        cache: Option<&mut (Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let rep = nh / nkv;
        let q = self.q_proj.forward(x, ctx)?.reshape((b, t, nh, hd))?;
        let k = self.k_proj.forward(x, ctx)?.reshape((b, t, nkv, hd))?;
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q, ctx.grad)?, kn.forward(&k, ctx.grad)?),
            _ => (q, k),
        };
        let (q, k) = (q.transpose(1, 2)?, k.transpose(1, 2)?);
        let v = self
            .v_proj
            .forward(x, ctx)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?;
        let q = (rope.apply(&q, &input.positions)? * (1.0 / (hd as f64).sqrt()))?;
        let k = rope.apply(&k, &input.positions)?;
        let v = v.contiguous()?;
        let (k, v) = match cache {
            Some(c) => {
                if c.0.dims()[2] > 0 {
                    c.0 = Tensor::cat(&[&c.0, &k], 2)?;
                    c.1 = Tensor::cat(&[&c.1, &v], 2)?;
                } else {
                    c.0 = k;
                    c.1 = v;
                }
                (c.0.clone(), c.1.clone())
            }
            None => (k, v),
        };
        // Grouped-query attention without copying K/V: query heads sharing a KV head are stacked
        // along the time axis ([B, nkv, rep*T, hd]) so one matmul serves the whole group.
        let q = q.contiguous()?.reshape((b, nkv, rep * t, hd))?;
        let out = fused::attention(&q, &k, &v, &input.mask, rep)?;
        let out = out
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, nh * hd))?;
        self.o_proj.forward(&out, ctx)
    }
}

#[derive(Clone)]
pub struct Mlp {
    pub gate_proj: LoraLinear,
    pub up_proj: LoraLinear,
    pub down_proj: LoraLinear,
    /// gate|up as one tensor the two projections view (see `Attention::fused`).
    pub(crate) fused: Option<Fused>,
}

/// Projections' weights (and biases) concatenated along the output dimension, with the ids of
/// the views the projections hold: a projection whose weight was replaced since (a merge, a
/// test) no longer matches, and the fused decoder multiplies the parts one by one.
#[derive(Clone)]
pub(crate) struct Fused {
    weight: Tensor,
    bias: Option<Tensor>,
    parts: Vec<candle_core::TensorId>,
}

impl Fused {
    /// Concatenates the linears' weights and makes each linear hold a view of the result.
    fn build(linears: &mut [&mut LoraLinear]) -> Result<Option<Self>> {
        let weights: Vec<&Tensor> = linears.iter().map(|l| &l.weight).collect();
        if weights.iter().any(|w| w.is_variable()) {
            return Ok(None);
        }
        let weight = Tensor::cat(&weights, 0)?;
        let bias = if linears.iter().all(|l| l.bias.is_some()) {
            let b: Vec<&Tensor> = linears.iter().filter_map(|l| l.bias.as_ref()).collect();
            Some(Tensor::cat(&b, 0)?)
        } else if linears.iter().all(|l| l.bias.is_none()) {
            None
        } else {
            return Ok(None);
        };
        let mut parts = vec![];
        let mut row = 0;
        for lin in linears.iter_mut() {
            let rows = lin.weight.dims()[0];
            lin.weight = weight.narrow(0, row, rows)?;
            if let Some(b) = &bias {
                lin.bias = Some(b.narrow(0, row, rows)?);
            }
            parts.push(lin.weight.id());
            if let Some(b) = &lin.bias {
                parts.push(b.id());
            }
            row += rows;
        }
        Ok(Some(Fused {
            weight,
            bias,
            parts,
        }))
    }

    /// The concatenation, while the linears still hold its views.
    fn current(&self, linears: &[&LoraLinear]) -> Option<&Self> {
        let ids: Vec<candle_core::TensorId> = linears
            .iter()
            .flat_map(|l| std::iter::once(l.weight.id()).chain(l.bias.as_ref().map(|b| b.id())))
            .collect();
        (ids == self.parts).then_some(self)
    }
}

impl Attention {
    /// The q|k|v weight [q + 2 kv, H] when the projections still view it.
    pub(crate) fn fused_qkv(&self) -> Option<&Tensor> {
        let parts = [&self.q_proj, &self.k_proj, &self.v_proj];
        self.fused
            .as_ref()
            .and_then(|f| f.current(&parts))
            .map(|f| &f.weight)
    }

    /// The q|k|v bias, concatenated (made on the fly when the projections' views changed).
    pub(crate) fn fused_qkv_bias(&self) -> Option<Tensor> {
        let parts = [&self.q_proj, &self.k_proj, &self.v_proj];
        if let Some(f) = self.fused.as_ref().and_then(|f| f.current(&parts)) {
            return f.bias.clone();
        }
        let b: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias.as_ref()).collect();
        (b.len() == 3).then(|| Tensor::cat(&b, 0).ok()).flatten()
    }
}

impl Mlp {
    /// The gate|up weight [2I, H] when the projections still view it.
    pub(crate) fn fused_gate_up(&self) -> Option<&Tensor> {
        let parts = [&self.gate_proj, &self.up_proj];
        self.fused
            .as_ref()
            .and_then(|f| f.current(&parts))
            .map(|f| &f.weight)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor, ctx: ForwardCtx) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x, ctx)?;
        let up = self.up_proj.forward(x, ctx)?;
        self.down_proj.forward(&fused::swiglu(&gate, &up)?, ctx)
    }
}

#[derive(Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    pub fn forward(
        &self,
        x: &Tensor,
        input: &ModelInput,
        rope: &Rope,
        ctx: ForwardCtx,
        cache: Option<&mut (Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let h = self.self_attn.forward(
            &self.input_layernorm.forward(x, ctx.grad)?,
            input,
            rope,
            ctx,
            cache,
        )?;
        // Blocks compute in the model dtype; the residual stream may be wider (f16 models).
        let x = (x + h.to_dtype(x.dtype())?)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x, ctx.grad)?, ctx)?;
        let h = h.to_dtype(x.dtype())?;
        x + h
    }

    pub fn linears(&self) -> [&LoraLinear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    /// The layer's trainable tensors: A and B of every adapted projection, and under full
    /// fine-tuning every weight, bias and norm scale.
    pub fn trainable_vars(&self) -> Vec<Var> {
        let mut out: Vec<Var> = self
            .linears()
            .into_iter()
            .filter_map(|lin| lin.lora.as_ref())
            .flat_map(|l| [l.a.clone(), l.b.clone()])
            .collect();
        let norms = [
            Some(&self.input_layernorm.weight),
            Some(&self.post_attention_layernorm.weight),
            self.self_attn.q_norm.as_ref().map(|n| &n.weight),
            self.self_attn.k_norm.as_ref().map(|n| &n.weight),
        ];
        let weights = self
            .linears()
            .into_iter()
            .flat_map(|lin| std::iter::once(&lin.weight).chain(lin.bias.as_ref()))
            .chain(norms.into_iter().flatten());
        out.extend(
            weights
                .filter(|t| t.is_variable())
                .filter_map(|t| Var::from_tensor(t).ok()),
        );
        out
    }

    /// Concatenates q|k|v and gate|up again where a projection's weight was replaced.
    fn refuse(&mut self) -> Result<()> {
        let a = &mut self.self_attn;
        if a.fused_qkv().is_none() {
            a.fused = Fused::build(&mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj])?;
        }
        let m = &mut self.mlp;
        if m.fused_gate_up().is_none() {
            m.fused = Fused::build(&mut [&mut m.gate_proj, &mut m.up_proj])?;
        }
        Ok(())
    }

    pub fn linears_mut(&mut self) -> [&mut LoraLinear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }
}

/// Per-layer key/value cache for decoding.
pub struct KvCache {
    pub(crate) layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn new(model: &Qwen, batch: usize) -> Result<Self> {
        let c = &model.config;
        let empty = Tensor::zeros(
            (batch, c.num_key_value_heads, 0, c.head_dim),
            model.dtype,
            &model.device,
        )?;
        Ok(Self {
            layers: (0..c.num_hidden_layers)
                .map(|_| (empty.clone(), empty.clone()))
                .collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone)]
pub struct Qwen {
    pub config: QwenConfig,
    /// [V, H]; also the LM head when embeddings are tied (held once in memory).
    pub embed_tokens: Tensor,
    /// Only for checkpoints with untied embeddings.
    pub lm_head: Option<Tensor>,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub rope: Rope,
    pub dtype: DType,
    pub device: Device,
    /// Rows of the LM head processed at once (bounds logits memory to chunk x vocab).
    pub logits_chunk: usize,
    /// The output projection in bf16 for decoding's few-row logits, when that is exact.
    pub output_twin: super::decode::Bf16Twin,
}

impl Qwen {
    pub fn from_parts(
        config: QwenConfig,
        embed_tokens: Tensor,
        lm_head: Option<Tensor>,
        layers: Vec<DecoderLayer>,
        norm: RmsNorm,
    ) -> Result<Self> {
        let device = embed_tokens.device().clone();
        let dtype = embed_tokens.dtype();
        let rope = Rope::new(&config, dtype, &device)?;
        Ok(Self {
            config,
            embed_tokens,
            lm_head,
            layers,
            norm,
            rope,
            dtype,
            device,
            logits_chunk: 128,
            output_twin: Default::default(),
        })
    }

    /// Builds the model from a source of named tensors; `get(name, shape)` must return a
    /// tensor of that shape (the loader checks files, `init-tiny` and benches make them up).
    pub fn build(
        cfg: QwenConfig,
        mut get: impl FnMut(&str, &[usize]) -> anyhow::Result<Tensor>,
    ) -> anyhow::Result<Self> {
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for idx in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{idx}");
            let mut t = |leaf: &str| get(&format!("{p}.{leaf}"), &cfg.tensor_shape(leaf));
            let mut lin = |name: &str, bias: bool| -> anyhow::Result<LoraLinear> {
                let w = t(&format!("{name}.weight"))?;
                let b = if bias {
                    Some(t(&format!("{name}.bias"))?)
                } else {
                    None
                };
                Ok(LoraLinear::new(format!("{p}.{name}"), w, b))
            };
            let bias = cfg.attention_bias;
            let mut q_proj = lin("self_attn.q_proj", bias)?;
            let mut k_proj = lin("self_attn.k_proj", bias)?;
            let mut v_proj = lin("self_attn.v_proj", bias)?;
            let o_proj = lin("self_attn.o_proj", false)?;
            let (mut gate_proj, mut up_proj) =
                (lin("mlp.gate_proj", false)?, lin("mlp.up_proj", false)?);
            let fused_qkv = Fused::build(&mut [&mut q_proj, &mut k_proj, &mut v_proj])?;
            let fused_gu = Fused::build(&mut [&mut gate_proj, &mut up_proj])?;
            let mlp = Mlp {
                gate_proj,
                up_proj,
                down_proj: lin("mlp.down_proj", false)?,
                fused: fused_gu,
            };
            let mut t = |leaf: &str| get(&format!("{p}.{leaf}"), &cfg.tensor_shape(leaf));
            let (q_norm, k_norm) = if cfg.family.has_qk_norm() {
                let eps = cfg.rms_norm_eps;
                (
                    Some(RmsNorm::new(t("self_attn.q_norm.weight")?, eps)),
                    Some(RmsNorm::new(t("self_attn.k_norm.weight")?, eps)),
                )
            } else {
                (None, None)
            };
            let self_attn = Attention {
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                q_norm,
                k_norm,
                fused: fused_qkv,
                n_heads: cfg.num_attention_heads,
                n_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
            };
            layers.push(DecoderLayer {
                input_layernorm: RmsNorm::new(t("input_layernorm.weight")?, cfg.rms_norm_eps),
                self_attn,
                post_attention_layernorm: RmsNorm::new(
                    t("post_attention_layernorm.weight")?,
                    cfg.rms_norm_eps,
                ),
                mlp,
            });
        }
        let embed = get(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, cfg.hidden_size],
        )?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(get("lm_head.weight", &[cfg.vocab_size, cfg.hidden_size])?)
        };
        let norm = RmsNorm::new(
            get("model.norm.weight", &[cfg.hidden_size])?,
            cfg.rms_norm_eps,
        );
        Ok(Self::from_parts(cfg, embed, lm_head, layers, norm)?)
    }

    /// Final hidden states [B, T, H] (after the last RMSNorm), layer by layer through the
    /// unfused blocks. `Qwen::forward` (in `stack`) runs the fused stack instead where it applies.
    pub(crate) fn forward_unfused(
        &self,
        input: &ModelInput,
        ctx: ForwardCtx,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t) = input.ids.dims2()?;
        // A trainable embedding (full fine-tuning) records its gradient only when one is wanted.
        let embed = if ctx.grad {
            self.embed_tokens.clone()
        } else {
            self.embed_tokens.detach()
        };
        let mut x = embed
            .index_select(&input.ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden_size))?
            .to_dtype(super::dtype::residual_dtype(self.dtype))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            x = match ctx.sink {
                Some(sink) if ctx.grad && ctx.recompute => {
                    let (layer, input, rope) = (layer.clone(), input.clone(), self.rope.clone());
                    let params = layer.trainable_vars();
                    checkpointed(&x, ctx, sink, params, move |x, ctx| {
                        layer.forward(x, &input, &rope, ctx, None)
                    })?
                }
                _ => layer.forward(&x, input, &self.rope, ctx, layer_cache)?,
            };
        }
        self.norm.forward(&x, ctx.grad)
    }

    /// The dtype of the adapters, their gradients and the optimizer state: f32 (f64 for an f64
    /// model), whatever the base dtype.
    pub fn lora_dtype(&self) -> DType {
        super::dtype::compute_dtype(self.dtype)
    }

    /// The output projection [V, H] (the embedding when tied).
    pub fn output_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    // ---- LoRA management -------------------------------------------------------------------

    /// Adds fresh adapters (A Kaiming-uniform, B zero) to the targeted projections.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        // A rank beyond a matrix's smaller side is not low-rank (and a mistyped huge one would
        // abort in the allocator): refused before anything is allocated.
        for lin in self.linears() {
            let side = lin.in_features().min(lin.out_features());
            if cfg.targets(module_name(&lin.path)) && cfg.r > side {
                candle_core::bail!(
                    "lora.r = {} exceeds {}'s smaller dimension {side}: choose a rank at most that",
                    cfg.r,
                    module_name(&lin.path)
                );
            }
        }
        for (li, layer) in self.layers.iter_mut().enumerate() {
            for (mi, lin) in layer.linears_mut().into_iter().enumerate() {
                if cfg.targets(module_name(&lin.path)) {
                    lin.attach_fresh(cfg, seed, (li * 16 + mi) as u64)?;
                }
            }
        }
        Ok(())
    }

    /// Every linear layer, in layer order then q, k, v, o, gate, up, down.
    pub fn linears(&self) -> impl Iterator<Item = &LoraLinear> {
        self.layers.iter().flat_map(|l| l.linears())
    }

    pub fn linears_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear> {
        self.layers.iter_mut().flat_map(|l| l.linears_mut())
    }

    /// Trainable tensors with PEFT-style names (`<module>.lora_A.weight`), in a fixed order.
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = vec![];
        for lin in self.linears() {
            if let Some(l) = &lin.lora {
                out.push((format!("{}.lora_A.weight", lin.path), l.a.clone()));
                out.push((format!("{}.lora_B.weight", lin.path), l.b.clone()));
            }
        }
        out
    }

    pub fn has_lora(&self) -> bool {
        self.linears().any(|l| l.lora.is_some())
    }

    /// Multiplies every attached adapter's scale by `factor` (a Rewarded-soup coefficient).
    pub fn scale_lora(&mut self, factor: f64) {
        for lin in self.linears_mut() {
            if let Some(l) = lin.lora.as_mut() {
                l.scale *= factor;
            }
        }
    }

    /// Folds every adapter into its base weight and removes the adapters.
    pub fn merge_lora(&mut self) -> Result<()> {
        for layer in self.layers.iter_mut() {
            for lin in layer.linears_mut() {
                lin.merge()?;
            }
            // A merge replaces the weights the q|k|v and gate|up concatenations were made of:
            // they are made again, so a merged base keeps one GEMM per group in every step.
            layer.refuse()?;
        }
        Ok(())
    }

    /// The adapters as (module path, A, B), for saving.
    pub fn lora_tensors(&self) -> Vec<(String, Tensor, Tensor)> {
        self.linears()
            .filter_map(|lin| {
                lin.lora.as_ref().map(|l| {
                    (
                        lin.path.clone(),
                        l.a.as_tensor().clone(),
                        l.b.as_tensor().clone(),
                    )
                })
            })
            .collect()
    }
}

/// `model.layers.3.self_attn.q_proj` -> `q_proj`.
pub fn module_name(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

impl RmsNorm {
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Qwen {
    /// A fingerprint of the base weights (adapters not included, merged ones are): every
    /// tensor's name and shape and 16 evenly spaced values, hashed. It tells two models apart
    /// whatever their paths, and survives copying a checkpoint. With `bf16` the values are
    /// rounded to bf16 first, so an f32 and a bf16 copy of one checkpoint agree (f32 -> bf16
    /// rounding is the one the loader does).
    pub fn fingerprint(&self, bf16: bool) -> Result<String> {
        let mut d = crate::util::digest::Digest::default();
        for (name, t) in self.named_weights() {
            d.str(&name);
            for dim in t.dims() {
                d.bytes(&(*dim as u64).to_le_bytes());
            }
            let flat = t.flatten_all()?;
            let n = flat.elem_count();
            let picks: Vec<u32> = (0..16.min(n))
                .map(|i| (i * n / 16.min(n).max(1)) as u32)
                .collect();
            let idx = Tensor::from_vec(picks.clone(), picks.len(), t.device())?;
            let picked = flat.index_select(&idx, 0)?;
            let picked = if bf16 {
                picked.to_dtype(DType::BF16)?
            } else {
                picked
            };
            let values = picked.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            for v in values {
                d.bytes(&v.to_le_bytes());
            }
        }
        Ok(d.hex())
    }

    /// Full fine-tuning: every base weight becomes a trainable tensor (in place, f32 or f64
    /// masters), returned under its Hugging Face name in `named_weights` order. The tied
    /// embedding is one tensor serving both the input and the LM head, as in transformers.
    pub fn make_trainable(&mut self) -> anyhow::Result<Vec<(String, Var)>> {
        anyhow::ensure!(
            matches!(self.dtype, DType::F32 | DType::F64),
            "full fine-tuning keeps f32 weights (got {:?}): set train.dtype = \"f32\"",
            self.dtype
        );
        anyhow::ensure!(
            !self.has_lora(),
            "full fine-tuning and a LoRA adapter at once are not supported"
        );
        fn make(t: &mut Tensor) -> Result<Var> {
            let v = Var::from_tensor(t)?;
            *t = v.as_tensor().clone();
            Ok(v)
        }
        make(&mut self.embed_tokens)?;
        for layer in &mut self.layers {
            make(&mut layer.input_layernorm.weight)?;
            make(&mut layer.post_attention_layernorm.weight)?;
            let attn = &mut layer.self_attn;
            for norm in [attn.q_norm.as_mut(), attn.k_norm.as_mut()]
                .into_iter()
                .flatten()
            {
                make(&mut norm.weight)?;
            }
            for lin in layer.linears_mut() {
                make(&mut lin.weight)?;
                if let Some(b) = lin.bias.as_mut() {
                    make(b)?;
                }
            }
        }
        make(&mut self.norm.weight)?;
        if let Some(h) = self.lm_head.as_mut() {
            make(h)?;
        }
        self.named_weights()
            .into_iter()
            .map(|(name, t)| Ok((name, Var::from_tensor(&t)?)))
            .collect()
    }

    /// Every base weight under its Hugging Face name (adapters not included; merge first).
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                layer.input_layernorm.weight().clone(),
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.weight().clone(),
            ));
            let attn = &layer.self_attn;
            for (leaf, norm) in [("q_norm", &attn.q_norm), ("k_norm", &attn.k_norm)] {
                if let Some(n) = norm {
                    out.push((
                        format!("model.layers.{i}.self_attn.{leaf}.weight"),
                        n.weight().clone(),
                    ));
                }
            }
            for lin in layer.linears() {
                out.push((format!("{}.weight", lin.path), lin.weight.clone()));
                if let Some(b) = &lin.bias {
                    out.push((format!("{}.bias", lin.path), b.clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.weight().clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        out
    }
}
