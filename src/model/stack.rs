//! The decoder stack as one graph node: a forward that runs every layer with mo-align's own
//! kernels (`crate::kernels`), keeping what the backward needs, and a backward written out by
//! hand, layer by layer in reverse, that writes every adapter's gradient into the gradient
//! sink's flat buffer. Candle's autograd sees one node, so it makes no per-edge zero-fill,
//! no per-tensor gradient bookkeeping and no output copies inside the stack.
//!
//! One layer, forward (n = B x T rows, each line one op):
//!   qkv  = xn Wqkv^T                 u_qkv = lora_down(xn)
//!   q, k, v = qkv_epilogue(qkv, u_qkv)          bias, adapters, q/k norms, RoPE, layout
//!   o, lse = attention(q, k, v, spans)
//!   yo   = o Wo^T                    u_o   = lora_down(o)
//!   x2, xn2 = residual_norm(x + yo + u_o Bo^T)
//!   gu   = xn2 Wgu^T                 u_gu  = lora_down(xn2)
//!   h    = swiglu_epilogue(gu, u_gu)
//!   yd   = h Wd^T                    u_d   = lora_down(h)
//!   x3, xn3 = residual_norm(x2 + yd + u_d Bd^T)  (xn3: the next layer's input, or the output)
//! and backward, from dx3 (the gradient at x3, residual and norm paths summed):
//!   dh   = dx3 Wd                    du_d  = dx3 Bd s      lora_grads(down)
//!   dgu  = swiglu_backward(dh + drop(du_d Ad))
//!   dxn2 = dgu Wgu                   du_gu = dgu Bgu s     lora_grads(gate, up)
//!   dx2  = dx3 + norm_backward(dxn2 + drop(du_gu Agu))
//!   do   = dx2 Wo                    du_o  = dx2 Bo s      lora_grads(o)
//!   dq, dk, dv = attention_backward(do + drop(du_o Ao))
//!   dqkv = qkv_epilogue_backward(dq, dk, dv)
//!                                    du_qkv = dqkv Bqkv s  lora_grads(q, k, v)
//!   dxn  = dqkv Wqkv;  dx = dx2 + norm_backward(dxn + drop(du_qkv Aqkv))   (not for layer 0)
//!
//! Used for LoRA training and for no-grad passes (evaluation, reference passes, decoding) when
//! the dtype has kernels (CPU f32 / f64, CUDA f32 / bf16) and the mask is spans; everything
//! else (full fine-tuning, f16, CPU bf16, arbitrary masks) runs the unfused blocks.

use super::ctx::{Adapters, ForwardCtx};
use super::input::{AttentionMask, ModelInput};
use super::lora::LoraLinear;
use super::qwen::{DecoderLayer, KvCache, Qwen};
use crate::kernels::dropout::DropoutMask;
use crate::kernels::lora as klora;
use crate::kernels::spec::{Adapter, AttnSpec, GateUp, GradSlots, Projection, QkvSpec};
use crate::kernels::{attention, cpu::cpu_supported, gemm, norm, qkv, swiglu};
use crate::util::profile;
use candle_core::{DType, Result, Tensor, Var};

static FUSED: crate::util::switch::EnvSwitch =
    crate::util::switch::EnvSwitch::new("MO_ALIGN_FUSED");

/// Whether the fused decoder is used where it applies (`MO_ALIGN_FUSED=0` turns it off, for
/// A/B runs and to check it against the unfused blocks).
pub fn enabled() -> bool {
    FUSED.get(true)
}

pub fn set_enabled(on: bool) {
    FUSED.set(on);
}

/// Whether this forward runs fused.
fn applies(model: &Qwen, input: &ModelInput, ctx: &ForwardCtx, cached: bool) -> bool {
    if !enabled() || !matches!(input.mask, AttentionMask::Spans { .. }) {
        return false;
    }
    let dtype = model.dtype;
    let kernels = if model.device.is_cpu() {
        cpu_supported(dtype)
    } else {
        cfg!(feature = "cuda") && matches!(dtype, DType::F32 | DType::BF16)
    };
    if !kernels || model.embed_tokens.is_variable() {
        return false;
    }
    !(ctx.grad && (ctx.sink.is_none() || cached))
}

/// The adapters of one projection group, as the kernels take them.
struct Group<'a> {
    adapters: Vec<Adapter<'a>>,
    /// Gradient slots, parallel to `adapters` (training only).
    slots: Vec<GradSlots>,
}

impl Group<'_> {
    fn lora(&self) -> bool {
        !self.adapters.is_empty()
    }
}

/// What one forward needs besides the weights: each group's adapters (with this forward's
/// dropout masks, drawn in the unfused path's call order) and gates.
struct LayerPlan<'a> {
    qkv: Group<'a>,
    o: Group<'a>,
    gu: Group<'a>,
    down: Group<'a>,
}

fn group<'a>(
    linears: &[&'a LoraLinear],
    ctx: &ForwardCtx,
    gate: Option<&'a Tensor>,
    slots: Option<&std::collections::HashMap<candle_core::TensorId, (usize, Vec<usize>)>>,
) -> Group<'a> {
    let mut g = Group {
        adapters: vec![],
        slots: vec![],
    };
    let (mut out_offset, mut u_offset) = (0, 0);
    for lin in linears {
        if let (Some(l), Adapters::Enabled) = (&lin.lora, ctx.adapters) {
            let dropout: Option<DropoutMask> = match ctx.dropout {
                Some(rng) if l.dropout > 0.0 => Some(rng.mask(rng.next_call(), l.dropout)),
                _ => None,
            };
            g.adapters.push(Adapter {
                a: l.a.as_tensor(),
                b: l.b.as_tensor(),
                scale: l.scale,
                gate,
                dropout,
                out_offset,
                u_offset,
            });
            if let Some(s) = slots {
                g.slots.push(GradSlots {
                    a: s[&l.a.as_tensor().id()].0,
                    b: s[&l.b.as_tensor().id()].0,
                });
            }
            u_offset += l.a.dims()[0];
        }
        out_offset += lin.out_features();
    }
    g
}

impl<'a> LayerPlan<'a> {
    fn new(
        layer: &'a DecoderLayer,
        ctx: &ForwardCtx,
        gate: Option<&'a Tensor>,
        slots: Option<&std::collections::HashMap<candle_core::TensorId, (usize, Vec<usize>)>>,
    ) -> Self {
        let (a, m) = (&layer.self_attn, &layer.mlp);
        LayerPlan {
            qkv: group(&[&a.q_proj, &a.k_proj, &a.v_proj], ctx, gate, slots),
            o: group(&[&a.o_proj], ctx, gate, slots),
            gu: group(&[&m.gate_proj, &m.up_proj], ctx, gate, slots),
            down: group(&[&m.down_proj], ctx, gate, slots),
        }
    }
}

/// `x @ [W_1; W_2; ...]^T`: one GEMM against the layer's concatenated weight when it is still
/// the one the projections view, else one per projection into column blocks. Decoding's few
/// rows on the CPU read bf16-exact weights through their bf16 twins (`decode`).
fn project(
    x: &Tensor,
    fused: Option<&Tensor>,
    parts: &[&LoraLinear],
    decoding: bool,
) -> Result<Tensor> {
    let rows = x.dims()[0];
    if decoding && rows <= super::decode::MAX_ROWS && x.device().is_cpu() && x.dtype() == DType::F32
    {
        let twins: Vec<Option<Tensor>> = parts
            .iter()
            .map(|l| l.twin.get(&l.weight))
            .collect::<Result<_>>()?;
        if twins.iter().all(Option::is_some) {
            let products: Vec<Tensor> = twins
                .iter()
                .flatten()
                .map(|t| super::decode::bf16_rows_linear(x, t, None))
                .collect::<Result<_>>()?;
            return match products.as_slice() {
                [one] => Ok(one.clone()),
                many => Tensor::cat(many, 1),
            };
        }
    }
    if let Some(w) = fused {
        return gemm::mm(x, &w.t()?);
    }
    if let [one] = parts {
        return gemm::mm(x, &one.weight.t()?);
    }
    let width: usize = parts.iter().map(|l| l.out_features()).sum();
    let n = x.dims()[0];
    let wide = Tensor::zeros((n, width), x.dtype(), x.device())?;
    let mut col = 0;
    for p in parts {
        gemm::mm_into(
            &wide.narrow(1, col, p.out_features())?,
            x,
            &p.weight.t()?,
            1.0,
        )?;
        col += p.out_features();
    }
    Ok(wide)
}

/// `dy @ [W_1; W_2; ...]`: the input gradient through a group's base weights.
fn project_back(dy: &Tensor, fused: Option<&Tensor>, parts: &[&LoraLinear]) -> Result<Tensor> {
    if let Some(w) = fused {
        return gemm::mm(dy, w);
    }
    let mut col = 0;
    let mut out: Option<Tensor> = None;
    for p in parts {
        let block = dy.narrow(1, col, p.out_features())?;
        match &out {
            None => out = Some(gemm::mm(&block, &p.weight)?),
            Some(o) => gemm::mm_acc(o, &block, &p.weight, 1.0)?,
        }
        col += p.out_features();
    }
    out.ok_or_else(|| candle_core::Error::Msg("empty projection group".into()))
}

/// Everything a layer's backward reads.
struct Saved {
    x: Tensor,
    xn: Tensor,
    qkv: Tensor,
    u_qkv: Option<Tensor>,
    qkv_out: Tensor,
    o: Tensor,
    lse: Tensor,
    u_o: Option<Tensor>,
    x2: Tensor,
    xn2: Tensor,
    gu: Tensor,
    u_gu: Option<Tensor>,
    h: Tensor,
    u_d: Option<Tensor>,
}

/// The per-forward constants every layer shares.
struct Geometry<'a> {
    batch: usize,
    seq: usize,
    spans: &'a Tensor,
    positions: &'a Tensor,
    past: usize,
    /// No gradient: few-row products may read the weights' bf16 twins.
    decoding: bool,
}

#[allow(clippy::too_many_arguments)]
/// One layer forward from (x, xn) to (x3, xn3) where xn3 = `next_norm`(x3); with `save` the
/// intermediates come back for the backward.
fn layer_forward(
    model: &Qwen,
    layer: &DecoderLayer,
    plan: &LayerPlan,
    (x, xn): (&Tensor, &Tensor),
    next_norm: (&Tensor, f64),
    geo: &Geometry,
    cache: Option<&mut (Tensor, Tensor)>,
    save: bool,
) -> Result<(Tensor, Tensor, Option<Saved>)> {
    let dev = &model.device;
    let cfg = &model.config;
    let attn = &layer.self_attn;
    let n = geo.batch * geo.seq;
    let _attn_scope = profile::scope("attention.forward", dev);
    let qkv_parts = [&attn.q_proj, &attn.k_proj, &attn.v_proj];
    let qkv = project(xn, attn.fused_qkv(), &qkv_parts, geo.decoding)?;
    let u_qkv = plan
        .qkv
        .lora()
        .then(|| klora::down(xn, &plan.qkv.adapters))
        .transpose()?;
    let bias = attn.fused_qkv_bias();
    let spec = qkv_spec(model, layer, geo, bias.as_ref(), u_qkv.as_ref(), plan);
    let qkv_out = qkv::forward(&qkv, spec)?;
    let (q, k, v) = qkv::split(&qkv_out, &spec)?;
    let (k_all, v_all) = match cache {
        Some(c) => {
            if c.0.dims()[2] > 0 {
                c.0 = Tensor::cat(&[&c.0, &k], 2)?;
                c.1 = Tensor::cat(&[&c.1, &v], 2)?;
            } else {
                c.0 = k.clone();
                c.1 = v.clone();
            }
            (c.0.clone(), c.1.clone())
        }
        None => (k.clone(), v.clone()),
    };
    let aspec = AttnSpec {
        q: &q,
        k: &k_all,
        v: &v_all,
        spans: geo.spans,
        past: geo.past,
    };
    let (o, lse) = attention::forward(aspec)?;
    let o = o.reshape((n, cfg.num_attention_heads * cfg.head_dim))?;
    let yo = project(&o, None, &[&attn.o_proj], geo.decoding)?;
    let u_o = plan
        .o
        .lora()
        .then(|| klora::down(&o, &plan.o.adapters))
        .transpose()?;
    let xx = norm::residual_norm(
        x,
        Projection {
            y: &yo,
            bias: attn.o_proj.bias.as_ref(),
            u: u_o.as_ref(),
            adapters: &plan.o.adapters,
        },
        layer.post_attention_layernorm.weight(),
        cfg.rms_norm_eps,
    )?;
    let (x2, xn2) = (xx.get(0)?, xx.get(1)?);
    drop(_attn_scope);
    let _mlp_scope = profile::scope("mlp.forward", dev);
    let mlp = &layer.mlp;
    let gu = project(
        &xn2,
        mlp.fused_gate_up(),
        &[&mlp.gate_proj, &mlp.up_proj],
        geo.decoding,
    )?;
    let u_gu = plan
        .gu
        .lora()
        .then(|| klora::down(&xn2, &plan.gu.adapters))
        .transpose()?;
    let gate_up = GateUp {
        y: &gu,
        lora: u_gu.as_ref().map(|u| (u, &plan.gu.adapters[..])),
    };
    let h = swiglu::forward(gate_up)?;
    let yd = project(&h, None, &[&mlp.down_proj], geo.decoding)?;
    let u_d = plan
        .down
        .lora()
        .then(|| klora::down(&h, &plan.down.adapters))
        .transpose()?;
    let xx3 = norm::residual_norm(
        &x2,
        Projection {
            y: &yd,
            bias: mlp.down_proj.bias.as_ref(),
            u: u_d.as_ref(),
            adapters: &plan.down.adapters,
        },
        next_norm.0,
        next_norm.1,
    )?;
    let (x3, xn3) = (xx3.get(0)?, xx3.get(1)?);
    let saved = save.then(|| Saved {
        x: x.clone(),
        xn: xn.clone(),
        qkv,
        u_qkv,
        qkv_out,
        o,
        lse,
        u_o,
        x2,
        xn2,
        gu,
        u_gu,
        h,
        u_d,
    });
    Ok((x3, xn3, saved))
}

fn qkv_spec<'a>(
    model: &'a Qwen,
    layer: &'a DecoderLayer,
    geo: &Geometry<'a>,
    bias: Option<&'a Tensor>,
    u_qkv: Option<&'a Tensor>,
    plan: &'a LayerPlan,
) -> QkvSpec<'a> {
    let cfg = &model.config;
    let attn = &layer.self_attn;
    QkvSpec {
        batch: geo.batch,
        seq: geo.seq,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        bias,
        lora: u_qkv.map(|u| (u, &plan.qkv.adapters[..])),
        qk_norm: match (&attn.q_norm, &attn.k_norm) {
            (Some(q), Some(k)) => Some((q.weight(), k.weight(), cfg.rms_norm_eps)),
            _ => None,
        },
        cos: model.rope.cos(),
        sin: model.rope.sin(),
        positions: geo.positions,
    }
}

#[allow(clippy::too_many_arguments)]
/// One layer's backward from dx3; writes its adapters' gradients into `grads` and returns dx
/// (the gradient at the layer's input), or None for the first layer (the frozen embedding's
/// gradient is never needed).
fn layer_backward(
    model: &Qwen,
    layer: &DecoderLayer,
    plan: &LayerPlan,
    s: &Saved,
    geo: &Geometry,
    dx3: &Tensor,
    grads: &Tensor,
    first: bool,
) -> Result<Option<Tensor>> {
    let dev = &model.device;
    let cfg = &model.config;
    let eps = cfg.rms_norm_eps;
    let (attn, mlp) = (&layer.self_attn, &layer.mlp);
    let _mlp_scope = profile::scope("mlp.backward", dev);
    let dh = project_back(dx3, None, &[&mlp.down_proj])?;
    let du_d = if plan.down.lora() {
        let du = klora::up_backward(dx3, &plan.down.adapters)?;
        klora::grads(
            grads,
            &plan.down.slots,
            dx3,
            s.u_d.as_ref().expect("saved"),
            &du,
            &s.h,
            &plan.down.adapters,
        )?;
        Some(du)
    } else {
        None
    };
    let gate_up = GateUp {
        y: &s.gu,
        lora: s.u_gu.as_ref().map(|u| (u, &plan.gu.adapters[..])),
    };
    let dgu = swiglu::backward(
        gate_up,
        &dh,
        du_d.as_ref().map(|d| (d, &plan.down.adapters[..])),
    )?;
    let dxn2 = project_back(&dgu, mlp.fused_gate_up(), &[&mlp.gate_proj, &mlp.up_proj])?;
    let du_gu = if plan.gu.lora() {
        let du = klora::up_backward(&dgu, &plan.gu.adapters)?;
        klora::grads(
            grads,
            &plan.gu.slots,
            &dgu,
            s.u_gu.as_ref().expect("saved"),
            &du,
            &s.xn2,
            &plan.gu.adapters,
        )?;
        Some(du)
    } else {
        None
    };
    let dx2 = norm::norm_backward(
        &dxn2,
        &s.x2,
        layer.post_attention_layernorm.weight(),
        eps,
        Some(dx3),
        du_gu.as_ref().map(|d| (d, &plan.gu.adapters[..])),
    )?;
    drop(_mlp_scope);
    let _attn_scope = profile::scope("attention.backward", dev);
    let dout = project_back(&dx2, None, &[&attn.o_proj])?;
    let du_o = if plan.o.lora() {
        let du = klora::up_backward(&dx2, &plan.o.adapters)?;
        klora::grads(
            grads,
            &plan.o.slots,
            &dx2,
            s.u_o.as_ref().expect("saved"),
            &du,
            &s.o,
            &plan.o.adapters,
        )?;
        Some(du)
    } else {
        None
    };
    let bias = attn.fused_qkv_bias();
    let spec = qkv_spec(model, layer, geo, bias.as_ref(), s.u_qkv.as_ref(), plan);
    let (q, k, v) = qkv::split(&s.qkv_out, &spec)?;
    let aspec = AttnSpec {
        q: &q,
        k: &k,
        v: &v,
        spans: geo.spans,
        past: 0,
    };
    let o4 =
        s.o.reshape((geo.batch, geo.seq, cfg.num_attention_heads * cfg.head_dim))?;
    let dqkv_att = attention::backward(
        aspec,
        &o4,
        &s.lse,
        &dout.reshape(o4.dims())?,
        du_o.as_ref().map(|d| (d, &plan.o.adapters[..])),
    )?;
    let dqkv = qkv::backward(&s.qkv, spec, &dqkv_att)?;
    let du_qkv = if plan.qkv.lora() {
        let du = klora::up_backward(&dqkv, &plan.qkv.adapters)?;
        klora::grads(
            grads,
            &plan.qkv.slots,
            &dqkv,
            s.u_qkv.as_ref().expect("saved"),
            &du,
            &s.xn,
            &plan.qkv.adapters,
        )?;
        Some(du)
    } else {
        None
    };
    if first {
        return Ok(None);
    }
    let dxn = project_back(
        &dqkv,
        attn.fused_qkv(),
        &[&attn.q_proj, &attn.k_proj, &attn.v_proj],
    )?;
    Ok(Some(norm::norm_backward(
        &dxn,
        &s.x,
        layer.input_layernorm.weight(),
        eps,
        Some(&dx2),
        du_qkv.as_ref().map(|d| (d, &plan.qkv.adapters[..])),
    )?))
}

impl Qwen {
    /// Final hidden states [B, T, H] (after the last RMSNorm): the fused stack where it applies
    /// (see `applies`), else the unfused blocks (`Qwen::forward_unfused`).
    pub fn forward(
        &self,
        input: &ModelInput,
        ctx: ForwardCtx,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        match forward_fused(self, input, ctx, cache.as_deref_mut())? {
            Some(hidden) => Ok(hidden),
            None => self.forward_unfused(input, ctx, cache),
        }
    }
}

/// The fused forward when it applies (see `applies`), else `None`: final hidden states
/// [B, T, H] after the last norm, attached to the graph when `ctx.grad`.
fn forward_fused(
    model: &Qwen,
    input: &ModelInput,
    ctx: ForwardCtx,
    cache: Option<&mut KvCache>,
) -> Result<Option<Tensor>> {
    if !applies(model, input, &ctx, cache.is_some()) {
        return Ok(None);
    }
    let AttentionMask::Spans {
        past, device_rows, ..
    } = &input.mask
    else {
        return Ok(None);
    };
    let (b, t) = input.ids.dims2()?;
    let h = model.config.hidden_size;
    let dev = &model.device;
    // The qkv kernel reads the rotary tables at each position; past them it would read beyond.
    if input.max_position as usize >= model.config.max_position_embeddings {
        candle_core::bail!(
            "position {} is beyond the model's {} positions (max_position_embeddings)",
            input.max_position,
            model.config.max_position_embeddings
        );
    }
    let gate = match ctx.gate {
        Some(g) if g.dtype() != model.lora_dtype() => Some(g.to_dtype(model.lora_dtype())?),
        Some(g) => Some(g.clone()),
        None => None,
    };
    let geo = Geometry {
        batch: b,
        seq: t,
        spans: device_rows,
        positions: &input.positions,
        past: *past,
        decoding: !ctx.grad,
    };
    let scope = profile::scope("embedding", dev);
    let x0 = model
        .embed_tokens
        .detach()
        .index_select(&input.ids.flatten_all()?, 0)?;
    let xn0 = norm::rms_norm(
        &x0,
        model.layers[0].input_layernorm.weight(),
        model.config.rms_norm_eps,
    )?;
    drop(scope);
    let last = model.layers.len() - 1;
    let next_norm = |i: usize| -> (&Tensor, f64) {
        let w = if i == last {
            model.norm.weight()
        } else {
            model.layers[i + 1].input_layernorm.weight()
        };
        (w, model.config.rms_norm_eps)
    };
    if !ctx.grad {
        let mut cache = cache;
        let (mut x, mut xn) = (x0, xn0);
        for (i, layer) in model.layers.iter().enumerate() {
            let plan = LayerPlan::new(layer, &ctx, gate.as_ref(), None);
            let c = cache.as_mut().map(|c| &mut c.layers[i]);
            let (x3, xn3, _) =
                layer_forward(model, layer, &plan, (&x, &xn), next_norm(i), &geo, c, false)?;
            (x, xn) = (x3, xn3);
        }
        return Ok(Some(xn.reshape((b, t, h))?));
    }
    // Training. The masks are drawn now, in the unfused path's call order; the backward
    // rebuilds each layer's plan with them (`Replay`), from a clone of the model (its tensors
    // are shared, not copied).
    let sink = ctx.sink.expect("checked by applies").clone();
    let lora_vars = model.lora_vars();
    let tensors: Vec<&Tensor> = lora_vars.iter().map(|(_, v)| v.as_tensor()).collect();
    let flat = sink.flat(&tensors, model.lora_dtype(), dev)?;
    let masks: Vec<[Vec<Option<DropoutMask>>; 4]> = model
        .layers
        .iter()
        .map(|l| {
            let p = LayerPlan::new(l, &ctx, None, None);
            [&p.qkv, &p.o, &p.gu, &p.down].map(|g| g.adapters.iter().map(|a| a.dropout).collect())
        })
        .collect();
    let replay = Replay {
        masks,
        gate,
        adapters: ctx.adapters,
        slots: flat.slots,
    };
    let mut inputs: Vec<(Tensor, Tensor)> = vec![];
    let mut saved: Vec<Saved> = vec![];
    let (mut x, mut xn) = (x0, xn0);
    for (i, layer) in model.layers.iter().enumerate() {
        let plan = replay.plan(layer, i);
        if ctx.recompute {
            inputs.push((x.clone(), xn.clone()));
        }
        let (x3, xn3, s) = layer_forward(
            model,
            layer,
            &plan,
            (&x, &xn),
            next_norm(i),
            &geo,
            None,
            !ctx.recompute,
        )?;
        saved.extend(s);
        (x, xn) = (x3, xn3);
    }
    let hidden = xn.reshape((b, t, h))?;
    let m = model.clone();
    let (spans, positions) = (device_rows.clone(), input.positions.clone());
    let recompute = ctx.recompute;
    let grads = flat.buffer;
    let x_last = x;
    let backward = move |dy: &Tensor| -> Result<Option<Tensor>> {
        let geo = Geometry {
            batch: b,
            seq: t,
            spans: &spans,
            positions: &positions,
            past: 0,
            decoding: false,
        };
        let eps = m.config.rms_norm_eps;
        let last = m.layers.len() - 1;
        let dy = dy.reshape((b * t, h))?.contiguous()?;
        let s = profile::scope("final_norm.backward", &m.device);
        let mut dx = norm::norm_backward(&dy, &x_last, m.norm.weight(), eps, None, None)?;
        drop(s);
        for i in (0..m.layers.len()).rev() {
            let layer = &m.layers[i];
            let plan = replay.plan(layer, i);
            let recomputed;
            let s = if recompute {
                let _r = profile::scope("recompute", &m.device);
                let (xi, xni) = &inputs[i];
                let next = if i == last {
                    m.norm.weight()
                } else {
                    m.layers[i + 1].input_layernorm.weight()
                };
                let (_, _, s) =
                    layer_forward(&m, layer, &plan, (xi, xni), (next, eps), &geo, None, true)?;
                recomputed = s.expect("saved");
                &recomputed
            } else {
                &saved[i]
            };
            match layer_backward(&m, layer, &plan, s, &geo, &dx, &grads, i == 0)? {
                Some(d) => dx = d,
                None => break,
            }
        }
        // The anchor gets no gradient.
        Ok(None)
    };
    // The node's input: a one-element anchor. The embedding is frozen and needs no gradient,
    // but candle records an op only when one of its inputs is in a graph.
    let anchor = Var::zeros(1, model.dtype, dev)?;
    Ok(Some(super::fused::attach_opt(
        anchor.as_tensor(),
        hidden,
        Box::new(backward),
    )?))
}

/// The plans a backward rebuilds: the forward's masks, gates and gradient slots.
struct Replay {
    masks: Vec<[Vec<Option<DropoutMask>>; 4]>,
    gate: Option<Tensor>,
    adapters: Adapters,
    slots: std::collections::HashMap<candle_core::TensorId, (usize, Vec<usize>)>,
}

impl Replay {
    fn plan<'a>(&'a self, layer: &'a DecoderLayer, i: usize) -> LayerPlan<'a> {
        let ctx = ForwardCtx {
            adapters: self.adapters,
            ..ForwardCtx::EVAL
        };
        let mut p = LayerPlan::new(layer, &ctx, self.gate.as_ref(), Some(&self.slots));
        for (g, masks) in [&mut p.qkv, &mut p.o, &mut p.gu, &mut p.down]
            .into_iter()
            .zip(&self.masks[i])
        {
            for (a, m) in g.adapters.iter_mut().zip(masks) {
                a.dropout = *m;
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::dropout::DropoutRng;
    use crate::model::config::Family;
    use crate::model::ctx::GradSink;
    use crate::model::lora::LoraConfig;
    use crate::model::tiny::{random_model, tiny_config};
    use crate::test_support::max_diff;
    use candle_core::Device;

    /// A merged adapter replaces the projections' weights: the q|k|v and gate|up
    /// concatenations are made again, so a merged base keeps the one-GEMM path.
    #[test]
    fn merging_keeps_the_concatenated_weights() {
        for family in [Family::Qwen2, Family::Qwen3] {
            let mut m = model(family);
            m.merge_lora().unwrap();
            for layer in &m.layers {
                let a = &layer.self_attn;
                let qkv = a.fused_qkv().expect("q|k|v concatenated after a merge");
                let q = &a.q_proj.weight;
                assert_eq!(max_diff(&qkv.narrow(0, 0, q.dims()[0]).unwrap(), q), 0.0);
                assert!(layer.mlp.fused_gate_up().is_some());
                assert_eq!(a.fused_qkv_bias().is_some(), a.q_proj.bias.is_some());
            }
        }
    }

    fn model(family: Family) -> Qwen {
        let mut cfg = tiny_config();
        if family == Family::Qwen3 {
            cfg.family = Family::Qwen3;
            cfg.attention_bias = false;
        }
        let mut m = random_model(&cfg, DType::F64, &Device::Cpu).unwrap();
        let lora = LoraConfig {
            dropout: 0.2,
            r: 4,
            ..LoraConfig::default()
        };
        m.attach_lora(&lora, 3).unwrap();
        // Non-zero B, so every gradient is non-trivial.
        for (i, (_, v)) in m.lora_vars().into_iter().enumerate() {
            let t = Tensor::randn(0f64, 0.05, v.dims(), &Device::Cpu).unwrap();
            if i % 2 == 1 {
                v.set(&t).unwrap();
            }
        }
        m
    }

    /// The fused stack's hidden states and every adapter gradient equal the unfused blocks'
    /// (f64, dropout on, gated, both families, padded batches and a packed pair, with and
    /// without recomputation).
    #[test]
    fn fused_stack_matches_the_unfused_blocks() {
        let dev = Device::Cpu;
        for family in [Family::Qwen2, Family::Qwen3] {
            let m = model(family);
            let r = 4;
            let gate = Tensor::new(&[0.5f64, 1.5, 1.0, 0.25][..r], &dev).unwrap();
            let inputs = [
                ModelInput::right_padded(&[vec![5, 6, 7, 8, 9, 10], vec![11, 12, 13]], 0, &dev)
                    .unwrap(),
                ModelInput::packed_pair(&[1, 2, 3], &[4, 5], &[6, 7, 8], &dev).unwrap(),
            ];
            for (ii, input) in inputs.iter().enumerate() {
                for (gated, recompute) in [(false, false), (true, false), (false, true)] {
                    let g = gated.then_some(&gate);
                    let run = |fused: bool| -> (Tensor, Vec<Tensor>) {
                        let rng = DropoutRng::new(17);
                        let sink = GradSink::new();
                        let ctx = ForwardCtx::train(&rng).with_gate(g);
                        let ctx = match (fused, recompute) {
                            (true, false) => ctx.with_sink(&sink),
                            (true, true) => ctx.with_recompute(&sink),
                            (false, _) => ctx,
                        };
                        let hidden = m.forward(input, ctx, None).unwrap();
                        let proj = Tensor::randn(0f64, 1.0, hidden.dims(), &dev).unwrap();
                        // The same projection for both runs: seeded by the shape.
                        let proj = (proj.zeros_like().unwrap()
                            + hidden
                                .ones_like()
                                .unwrap()
                                .cumsum(2)
                                .unwrap()
                                .sin()
                                .unwrap())
                        .unwrap();
                        let store = (&hidden * &proj)
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .backward()
                            .unwrap();
                        let grads = m
                            .lora_vars()
                            .iter()
                            .map(|(name, v)| {
                                let a = store.get(v.as_tensor()).cloned();
                                let b = sink.take(v.as_tensor().id());
                                match (a, b) {
                                    (Some(a), None) | (None, Some(a)) => a,
                                    _ => panic!("{name}: gradient from both or neither path"),
                                }
                            })
                            .collect();
                        (hidden.detach(), grads)
                    };
                    let (h_old, g_old) = run(false);
                    let (h_new, g_new) = run(true);
                    let what = format!("{family:?} input {ii} gated {gated} recompute {recompute}");
                    let d = max_diff(&h_old, &h_new);
                    assert!(d < 1e-10, "{what}: hidden states differ by {d}");
                    for (i, (a, b)) in g_old.iter().zip(&g_new).enumerate() {
                        let d = max_diff(a, b);
                        let scale = a
                            .abs()
                            .unwrap()
                            .max_all()
                            .unwrap()
                            .to_scalar::<f64>()
                            .unwrap();
                        assert!(scale > 0.0, "{what}: gradient {i} is zero");
                        assert!(
                            d < 1e-9 * scale.max(1.0),
                            "{what}: gradient {i} differs by {d} (scale {scale})"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod decode_tests {
    use super::*;
    use crate::model::lora::LoraConfig;
    use crate::model::tiny::{random_model, tiny_config};
    use candle_core::Device;

    /// Prefill of left-padded prompts and three decoding steps through the KV cache: the fused
    /// and unfused paths give the same hidden states (f64, adapters attached).
    #[test]
    fn fused_decoding_with_a_kv_cache_matches_the_unfused_blocks() {
        let dev = Device::Cpu;
        let mut m = random_model(&tiny_config(), DType::F64, &dev).unwrap();
        m.attach_lora(&LoraConfig::default(), 1).unwrap();
        for (_, v) in m.lora_vars() {
            v.set(&Tensor::randn(0f64, 0.05, v.dims(), &dev).unwrap())
                .unwrap();
        }
        let run = |fused: bool| -> Vec<Tensor> {
            set_enabled(fused);
            let prompts = [vec![3u32, 4, 5, 6, 7], vec![8, 9]];
            let max = 5;
            let mut key_valid: Vec<Vec<bool>> = vec![];
            let (mut ids, mut pos) = (vec![], vec![]);
            for p in &prompts {
                let pad = max - p.len();
                ids.push(
                    std::iter::repeat_n(0, pad)
                        .chain(p.iter().copied())
                        .collect::<Vec<u32>>(),
                );
                key_valid.push((0..max).map(|i| i >= pad).collect());
                pos.push(
                    (0..max)
                        .map(|i| i.saturating_sub(pad) as u32)
                        .collect::<Vec<u32>>(),
                );
            }
            let mut cache = KvCache::new(&m, 2).unwrap();
            let mut input = ModelInput::new(&ids, &pos, &key_valid, &dev).unwrap();
            let mut out = vec![];
            let mut next: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
            for step in 0..4 {
                let h = m
                    .forward(&input, ForwardCtx::EVAL, Some(&mut cache))
                    .unwrap();
                out.push(h.clone());
                let tok = 10 + step as u32;
                for v in key_valid.iter_mut() {
                    v.push(true);
                }
                let step_ids = vec![vec![tok], vec![tok + 1]];
                let p: Vec<Vec<u32>> = next.iter().map(|&n| vec![n]).collect();
                next.iter_mut().for_each(|n| *n += 1);
                input = ModelInput::new(&step_ids, &p, &key_valid, &dev).unwrap();
            }
            set_enabled(true);
            out
        };
        let (a, b) = (run(false), run(true));
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            // The padding rows of the prompt pass attend to nothing in the fused path (zeros);
            // compare the valid rows: every row from step 1, the prompt rows at their positions.
            let (x, y) = if i == 0 {
                (x.narrow(1, 3, 2).unwrap(), y.narrow(1, 3, 2).unwrap())
            } else {
                (x.clone(), y.clone())
            };
            let d = (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-10, "step {i}: hidden states differ by {d}");
        }
    }
}
