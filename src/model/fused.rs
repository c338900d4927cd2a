//! Fused blocks with hand-written backwards: RMSNorm, rotary embedding, attention, SwiGLU and
//! the LoRA linear layer.
//!
//! Each block computes its forward with plain tensor ops on detached inputs (no graph), then
//! attaches the result to its inputs through a custom op whose backward is the block's gradient
//! formula. The graph holds one node per block instead of dozens, keeps only what the backward
//! needs (the attention probabilities are recomputed, dropout masks are regenerated from their
//! seed), and the backward is a few matmuls instead of candle's per-node gradient bookkeeping.
//! The forward/backward pairs are checked against autograd of the plain formulas (unit tests
//! below) and, through the whole model, against PyTorch and finite differences.

use super::dtype::compute_dtype;
use super::input::AttentionMask;
use super::matmul::{matmul, matmul_t};
use crate::kernels::dropout::DropoutMask;
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D,
};

type Grad1 = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;
/// A backward that may give its input no gradient.
pub(crate) type Grad1Opt = Box<dyn Fn(&Tensor) -> Result<Option<Tensor>> + Send + Sync>;
pub(crate) type Grad3 =
    Box<dyn Fn(&Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> + Send + Sync>;

/// A precomputed value whose forward "computes" by copying it, and whose backward is a closure.
/// The value is taken out by that copy, so the graph keeps only the op's output, not two copies.
struct Attached<G> {
    value: std::sync::Mutex<Option<Tensor>>,
    grad: G,
}

impl<G> Attached<G> {
    fn new(value: Tensor, grad: G) -> Self {
        Self {
            value: std::sync::Mutex::new(Some(value)),
            grad,
        }
    }

    fn take(&self) -> Result<Tensor> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused op poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("fused op forward ran twice".into()))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let value = self.take()?;
        let (s, l) = value.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok((c.to_dtype(l, value.dtype())?, l.shape().clone())),
            _ => candle_core::bail!("fused op: value not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let value = self.take()?;
        let (s, l) = value.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Ok((c.to_dtype(l, value.dtype())?, l.shape().clone())),
            _ => candle_core::bail!("fused op: value not on the GPU"),
        }
    }
}

impl CustomOp1 for Attached<Grad1> {
    fn name(&self) -> &'static str {
        "fused1"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.grad)(grad)?))
    }
}

impl CustomOp1 for Attached<Grad1Opt> {
    fn name(&self) -> &'static str {
        "fused1-opt"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.grad)(grad)
    }
}

impl CustomOp3 for Attached<Grad3> {
    fn name(&self) -> &'static str {
        "fused3"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        (self.grad)(grad)
    }
}

/// `value` as a function of `x` with gradient `grad(dy) = dx` (when `x` is in a graph).
pub(crate) fn attach1(x: &Tensor, value: Tensor, grad: Grad1) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(value);
    }
    x.apply_op1(Attached::new(value, grad))
}

/// `value` attached to `x`'s graph through a backward that returns `x`'s gradient or none
/// (the fused decoder's node: its work is the parameter gradients it deposits).
pub(crate) fn attach_opt(x: &Tensor, value: Tensor, grad: Grad1Opt) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(value);
    }
    x.apply_op1(Attached::new(value, grad))
}

/// `value` as a function of (a, b, c) with gradient `grad(dy) = (da, db, dc)`.
pub(crate) fn attach3(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    value: Tensor,
    grad: Grad3,
) -> Result<Tensor> {
    if !(a.track_op() || b.track_op() || c.track_op()) {
        return Ok(value);
    }
    a.apply_op3(b, c, Attached::new(value, grad))
}

/// RMSNorm as transformers computes it (statistics in f32): y = w * (x / rms(x)). The output
/// takes the weight's dtype (the model dtype), the input may be wider (an f32 residual stream
/// under f16); the input gradient comes back in the input's dtype.
/// With a trainable `weight` (full fine-tuning) its gradient is returned too.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let acc = compute_dtype(dtype);
    let xf = x.detach().to_dtype(acc)?;
    let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let xhat = xf.broadcast_mul(&inv)?;
    let wd = weight.detach();
    let y = xhat.to_dtype(wd.dtype())?.broadcast_mul(&wd)?;
    let w = wd.to_dtype(acc)?;
    // dx = inv * (g - xhat * mean(g * xhat)), g = dy * w
    let input_grad = {
        let (xhat, inv) = (xhat.clone(), inv.clone());
        move |dy: &Tensor| -> Result<Tensor> {
            let g = dy.to_dtype(acc)?.broadcast_mul(&w)?;
            let proj = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
            g.broadcast_sub(&xhat.broadcast_mul(&proj)?)?
                .broadcast_mul(&inv)?
                .to_dtype(dtype)
        }
    };
    if !weight.track_op() {
        return attach1(x, y, Box::new(input_grad));
    }
    // The scale learns too: dw = sum over every row of dy * xhat.
    let (need_dx, wdtype) = (x.track_op(), wd.dtype());
    attach3(
        x,
        weight,
        weight,
        y,
        Box::new(move |dy| {
            let dx = if need_dx { Some(input_grad(dy)?) } else { None };
            let h = xhat.dim(D::Minus1)?;
            let dw = (dy.to_dtype(acc)? * &xhat)?
                .reshape(((), h))?
                .sum(0)?
                .to_dtype(wdtype)?;
            Ok((dx, Some(dw), None))
        }),
    )
}

/// y = x W^T + b over the last dimension with gradients for W, b and (when it is in a graph)
/// x: the projections of full fine-tuning. dW = dy^T x, db = sum of dy's rows, dx = dy W.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (inp, out) = (dims[dims.len() - 1], weight.dim(0)?);
    let n = x.elem_count() / inp;
    let x2 = x.detach().reshape((n, inp))?.contiguous()?;
    let wd = weight.detach();
    let mut y = matmul_t(&x2, &wd)?;
    if let Some(b) = bias {
        y = y.broadcast_add(&b.detach())?;
    }
    let mut out_dims = dims.clone();
    *out_dims.last_mut().expect("rank >= 1") = out;
    let y = y.reshape(out_dims)?;
    let need_dx = x.track_op();
    let has_bias = bias.is_some();
    attach3(
        x,
        weight,
        bias.unwrap_or(weight),
        y,
        Box::new(move |dy| {
            let dy2 = dy.reshape((n, out))?.contiguous()?;
            let dw = matmul(&dy2.t()?, &x2)?;
            let db = if has_bias { Some(dy2.sum(0)?) } else { None };
            let dx = if need_dx {
                Some(matmul(&dy2, &wd)?.reshape(dims.as_slice())?)
            } else {
                None
            };
            Ok((dx, Some(dw), db))
        }),
    )
}

/// Rotate-half rotary embedding of x [B, H, T, d] with cos/sin [B, 1, T, d/2].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let rotate = |t: &Tensor, sign: f64| -> Result<Tensor> {
        let half = t.dim(D::Minus1)? / 2;
        let (t1, t2) = (
            t.narrow(D::Minus1, 0, half)?,
            t.narrow(D::Minus1, half, half)?,
        );
        // forward (sign 1): [t1 cos - t2 sin, t2 cos + t1 sin]; backward is the inverse rotation.
        let r1 = (t1.broadcast_mul(cos)? - (t2.broadcast_mul(sin)? * sign)?)?;
        let r2 = (t2.broadcast_mul(cos)? + (t1.broadcast_mul(sin)? * sign)?)?;
        Tensor::cat(&[r1, r2], D::Minus1)
    };
    let y = rotate(&x.detach(), 1.0)?;
    let (cos, sin) = (cos.clone(), sin.clone());
    attach1(
        x,
        y,
        Box::new(move |dy| {
            let half = dy.dim(D::Minus1)? / 2;
            let (g1, g2) = (
                dy.narrow(D::Minus1, 0, half)?,
                dy.narrow(D::Minus1, half, half)?,
            );
            let d1 = (g1.broadcast_mul(&cos)? + g2.broadcast_mul(&sin)?)?;
            let d2 = (g2.broadcast_mul(&cos)? - g1.broadcast_mul(&sin)?)?;
            Tensor::cat(&[d1, d2], D::Minus1)
        }),
    )
}

/// Softmax attention with grouped heads: q [B, nkv, rep*T, d] (already scaled), k, v
/// [B, nkv, Tk, d], and the mask (a [B, 1, T, Tk] bias of 0 or the most negative float, or
/// causal). Returns [B, nkv, rep*T, d].
/// The backward recomputes the probabilities instead of keeping them (O(T) memory per head).
/// As under autocast, the four products run in the model dtype and the softmax and its
/// gradient in f32.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    rep: usize,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let acc = compute_dtype(dtype);
    let (b, nkv, rt, d) = q.dims4()?;
    let (t, tk) = (rt / rep, k.dim(2)?);
    // Without a gradient, long sequences run in blocks of query positions, so the scores held
    // at once are [B, heads, QUERY_BLOCK, Tk] rather than [B, heads, T, Tk] (a whole-context
    // perplexity window fits in memory). Rows are independent, so the result is the same.
    const QUERY_BLOCK: usize = 1024;
    if t > QUERY_BLOCK && !(q.track_op() || k.track_op() || v.track_op()) {
        let q5 = q.reshape((b, nkv, rep, t, d))?;
        let mut blocks = vec![];
        for start in (0..t).step_by(QUERY_BLOCK) {
            let len = QUERY_BLOCK.min(t - start);
            let qb = q5
                .narrow(3, start, len)?
                .contiguous()?
                .reshape((b, nkv, rep * len, d))?;
            let rows = AttentionMask::Bias(mask.rows(start, len, tk, q.device())?);
            let yb = attention(&qb, k, v, &rows, rep)?;
            blocks.push(yb.reshape((b, nkv, rep, len, d))?);
        }
        return Tensor::cat(&blocks, 3)?.reshape((b, nkv, rt, d));
    }
    let probs = move |q: &Tensor, k: &Tensor, bias: &Tensor| -> Result<Tensor> {
        let s = matmul_t(q, k)?
            .to_dtype(acc)?
            .reshape((b, nkv * rep, t, tk))?;
        let s = s.broadcast_add(&bias.to_dtype(acc)?)?;
        candle_nn::ops::softmax_last_dim(&s)?.reshape((b, nkv, rt, tk))
    };
    let bias = mask.rows(0, t, tk, q.device())?;
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let p = probs(&qd, &kd, &bias)?;
    let y = matmul(&p.to_dtype(dtype)?, &vd)?;
    drop(p);
    attach3(
        q,
        k,
        v,
        y,
        Box::new(move |dy| {
            let dy = dy.contiguous()?;
            let p = probs(&qd, &kd, &bias)?; // [B, nkv, rT, Tk] in acc
            let pd = p.to_dtype(dtype)?;
            let dv = matmul(&pd.t()?, &dy)?;
            drop(pd);
            let dp = matmul_t(&dy, &vd)?.to_dtype(acc)?;
            let rowdot = (&dp * &p)?.sum_keepdim(D::Minus1)?;
            let ds = (p * dp.broadcast_sub(&rowdot)?)?.to_dtype(dtype)?;
            let dq = matmul(&ds, &kd)?;
            let dk = matmul(&ds.t()?, &qd)?;
            Ok((Some(dq), Some(dk), Some(dv)))
        }),
    )
}

/// silu(gate) * up
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let (g, u) = (gate.detach(), up.detach());
    let y = (g.silu()? * &u)?;
    if !(gate.track_op() || up.track_op()) {
        return Ok(y);
    }
    let dtype = gate.dtype();
    let acc = compute_dtype(dtype);
    // Pass `up` through the three-input op twice: (gate, up, up) with the last gradient None.
    let up2 = up.clone();
    attach3(
        gate,
        up,
        &up2,
        y,
        Box::new(move |dy| {
            let (gf, uf, dyf) = (g.to_dtype(acc)?, u.to_dtype(acc)?, dy.to_dtype(acc)?);
            let sig = candle_nn::ops::sigmoid(&gf)?;
            let silu = (&gf * &sig)?;
            // d silu / dg = sig * (1 + g * (1 - sig))
            let dsilu = (&sig * ((&gf * (1.0 - &sig)?)? + 1.0)?)?;
            let dg = ((&dyf * &uf)? * dsilu)?.to_dtype(dtype)?;
            let du = (dyf * silu)?.to_dtype(dtype)?;
            Ok((Some(dg), Some(du), None))
        }),
    )
}

/// The adapter part of a LoRA linear layer, as the fused op needs it.
pub struct LoraParts<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
    /// The dropout mask on the adapter's input, when dropout is on.
    pub dropout: Option<DropoutMask>,
    /// Per-rank gates ([r]) on the adapter's intermediate (`ForwardCtx::gate`).
    pub gate: Option<&'a Tensor>,
}

/// The adapter's scale s and per-rank gates g folded into one factor on the rank-r
/// intermediate [n, r].
pub struct RankScale {
    scale: f64,
    gate: Option<Tensor>,
}

impl RankScale {
    pub fn new(gate: Option<&Tensor>, scale: f64, dtype: DType) -> Result<Self> {
        let gate = match gate {
            Some(g) => Some((g.to_dtype(dtype)? * scale)?.unsqueeze(0)?),
            None => None,
        };
        Ok(RankScale { scale, gate })
    }

    pub fn apply(&self, t: Tensor) -> Result<Tensor> {
        match &self.gate {
            Some(g) => t.broadcast_mul(g),
            None => t * self.scale,
        }
    }
}

/// y = x W^T + b + s * B(g * A(dropout(x))) over the last dimension (g the per-rank gates, 1
/// when absent), with gradients for x, A and B.
/// The adapter runs in the model dtype like PEFT under autocast (A and B, kept in f32, are cast
/// for the product; their gradients come back in f32). The backward keeps only x and the
/// rank-r intermediate and redraws the dropout mask.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    lora: LoraParts,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (inp, out) = (dims[dims.len() - 1], weight.dim(0)?);
    let n = x.elem_count() / inp;
    let dtype = x.dtype();
    let ldt = lora.a.dtype();
    let x2 = x.detach().reshape((n, inp))?.contiguous()?;
    let mut y = matmul_t(&x2, weight)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    let (a, b) = (
        lora.a.detach().to_dtype(dtype)?,
        lora.b.detach().to_dtype(dtype)?,
    );
    let drop = |t: &Tensor| match &lora.dropout {
        Some(m) => m.apply(t),
        None => Ok(t.clone()),
    };
    let rank_scale = RankScale::new(lora.gate, lora.scale, dtype)?;
    let u = rank_scale.apply(matmul_t(&drop(&x2)?, &a)?)?; // [n, r]
    let mut out_dims = dims.clone();
    *out_dims.last_mut().expect("rank >= 1") = out;
    let y = (y + matmul_t(&u, &b)?)?.reshape(out_dims)?;
    let (w, mask) = (weight.clone(), lora.dropout);
    // The first layer's input (embeddings) needs no gradient: skip its dx matmuls.
    let need_dx = x.track_op();
    attach3(
        x,
        lora.a,
        lora.b,
        y,
        Box::new(move |dy| {
            let drop = |t: &Tensor| match &mask {
                Some(m) => m.apply(t),
                None => Ok(t.clone()),
            };
            let dy2 = dy.reshape((n, out))?.contiguous()?;
            let db = matmul(&dy2.t()?, &u)?; // s and g are already in u
            let du = rank_scale.apply(matmul(&dy2, &b)?)?; // [n, r]: d/d(A x) = s g * (dy B)
            let da = matmul(&du.t()?, &drop(&x2)?)?;
            let (da, db) = (da.to_dtype(ldt)?, db.to_dtype(ldt)?);
            if !need_dx {
                return Ok((None, Some(da), Some(db)));
            }
            let dxl = drop(&matmul(&du, &a)?)?;
            let dx = (matmul(&dy2, &w)? + dxl)?.reshape(dims.as_slice())?;
            Ok((Some(dx), Some(da), Some(db)))
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_diff;
    use candle_core::{DType, Device, Var};

    fn var(shape: &[usize]) -> Var {
        Var::randn(0f64, 1.0, shape, &Device::Cpu).expect("randn")
    }

    /// The fused block `y` and the plain-op formula `yr` of the same inputs `vars`: equal values,
    /// and equal gradients of a random projection <y, P> for every input.
    fn same_values_and_gradients(vars: &[&Var], y: &Tensor, yr: &Tensor) -> Result<()> {
        assert!(max_diff(y, yr) < 1e-12, "forward differs");
        let proj = Tensor::randn(0f64, 1.0, y.dims(), &Device::Cpu)?;
        let g = (y * &proj)?.sum_all()?.backward()?;
        let gr = (yr * &proj)?.sum_all()?.backward()?;
        for (i, v) in vars.iter().enumerate() {
            let d = max_diff(
                g.get(v).expect("fused grad"),
                gr.get(v).expect("autograd grad"),
            );
            assert!(d < 1e-10, "input {i}: gradient differs by {d}");
        }
        Ok(())
    }

    #[test]
    fn rms_norm_matches_autograd() -> Result<()> {
        let x = var(&[3, 8]);
        let w = Tensor::randn(0f64, 1.0, 8, &Device::Cpu)?;
        let xt = x.as_tensor();
        let yr = xt
            .broadcast_div(&(xt.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)?
            .broadcast_mul(&w)?;
        same_values_and_gradients(&[&x], &rms_norm(xt, &w, 1e-6)?, &yr)
    }

    /// Full fine-tuning: the norm's scale learns.
    #[test]
    fn rms_norm_with_a_trainable_scale_matches_autograd() -> Result<()> {
        let (x, w) = (var(&[2, 3, 8]), var(&[8]));
        let xt = x.as_tensor();
        let yr = xt
            .broadcast_div(&(xt.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)?
            .broadcast_mul(w.as_tensor())?;
        same_values_and_gradients(&[&x, &w], &rms_norm(xt, w.as_tensor(), 1e-6)?, &yr)
    }

    #[test]
    fn linear_with_trainable_weight_and_bias_matches_autograd() -> Result<()> {
        let (x, w, b) = (var(&[2, 3, 6]), var(&[5, 6]), var(&[5]));
        let xt = x.as_tensor();
        let yr = xt
            .broadcast_matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?;
        let y = linear(xt, w.as_tensor(), Some(b.as_tensor()))?;
        same_values_and_gradients(&[&x, &w, &b], &y, &yr)?;
        let yr = xt.broadcast_matmul(&w.as_tensor().t()?)?;
        same_values_and_gradients(&[&x, &w], &linear(xt, w.as_tensor(), None)?, &yr)
    }

    #[test]
    fn rope_matches_autograd() -> Result<()> {
        let x = var(&[2, 3, 5, 8]);
        let ang = Tensor::randn(0f64, 1.0, (2, 1, 5, 4), &Device::Cpu)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let (x1, x2) = (
            x.as_tensor().narrow(3, 0, 4)?,
            x.as_tensor().narrow(3, 4, 4)?,
        );
        let yr = Tensor::cat(
            &[
                (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?,
                (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?,
            ],
            3,
        )?;
        same_values_and_gradients(&[&x], &rope(x.as_tensor(), &cos, &sin)?, &yr)
    }

    /// Two query heads per KV head and a causal mask.
    #[test]
    fn grouped_attention_matches_autograd() -> Result<()> {
        let (q, k, v) = (
            var(&[1, 2, 2 * 4, 8]),
            var(&[1, 2, 4, 8]),
            var(&[1, 2, 4, 8]),
        );
        let mut bias = vec![0f64; 16];
        for i in 0..4 {
            for j in i + 1..4 {
                bias[i * 4 + j] = f64::MIN;
            }
        }
        let bias = Tensor::from_vec(bias, (1, 1, 4, 4), &Device::Cpu)?;
        let mask = AttentionMask::Bias(bias.clone());
        let y = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 2)?;
        let s = q
            .as_tensor()
            .matmul(&k.as_tensor().t()?)?
            .reshape((1, 4, 4, 4))?
            .broadcast_add(&bias)?;
        let yr = candle_nn::ops::softmax(&s, D::Minus1)?
            .reshape((1, 2, 8, 4))?
            .matmul(v.as_tensor())?;
        same_values_and_gradients(&[&q, &k, &v], &y, &yr)
    }

    #[test]
    fn swiglu_matches_autograd() -> Result<()> {
        let (a, b) = (var(&[3, 6]), var(&[3, 6]));
        let yr = (a.as_tensor().silu()? * b.as_tensor())?;
        same_values_and_gradients(&[&a, &b], &swiglu(a.as_tensor(), b.as_tensor())?, &yr)
    }

    #[test]
    fn lora_linear_with_dropout_matches_autograd() -> Result<()> {
        let x = var(&[2, 3, 6]);
        let w = Tensor::randn(0f64, 1.0, (5, 6), &Device::Cpu)?;
        let bias = Tensor::randn(0f64, 1.0, 5, &Device::Cpu)?;
        let (la, lb) = (var(&[2, 6]), var(&[5, 2]));
        let mask = crate::kernels::dropout::DropoutRng::new(9).mask(0, 0.3);
        let parts = LoraParts {
            a: la.as_tensor(),
            b: lb.as_tensor(),
            scale: 1.5,
            dropout: Some(mask),
            gate: None,
        };
        let y = lora_linear(x.as_tensor(), &w, Some(&bias), parts)?;
        let m = mask
            .apply(&Tensor::ones((6, 6), DType::F64, &Device::Cpu)?)?
            .reshape((2, 3, 6))?;
        let xt = x.as_tensor();
        let yr = (xt.broadcast_matmul(&w.t()?)?.broadcast_add(&bias)?
            + ((xt * &m)?
                .broadcast_matmul(&la.as_tensor().t()?)?
                .broadcast_matmul(&lb.as_tensor().t()?)?
                * 1.5)?)?;
        same_values_and_gradients(&[&x, &la, &lb], &y, &yr)
    }

    #[test]
    fn gated_lora_linear_matches_autograd() -> Result<()> {
        let x = var(&[2, 3, 6]);
        let w = Tensor::randn(0f64, 1.0, (5, 6), &Device::Cpu)?;
        let (la, lb) = (var(&[4, 6]), var(&[5, 4]));
        // Two blocks of rank 2, weighted 0.3 and 0.7.
        let gate = Tensor::new(&[0.3f64, 0.3, 0.7, 0.7], &Device::Cpu)?;
        let parts = LoraParts {
            a: la.as_tensor(),
            b: lb.as_tensor(),
            scale: 1.5,
            dropout: None,
            gate: Some(&gate),
        };
        let y = lora_linear(x.as_tensor(), &w, None, parts)?;
        let xt = x.as_tensor();
        let yr = (xt.broadcast_matmul(&w.t()?)?
            + (xt
                .broadcast_matmul(&la.as_tensor().t()?)?
                .broadcast_mul(&gate)?
                .broadcast_matmul(&lb.as_tensor().t()?)?
                * 1.5)?)?;
        same_values_and_gradients(&[&x, &la, &lb], &y, &yr)
    }
}
