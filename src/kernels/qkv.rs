//! The attention-input epilogue: from the fused q|k|v projection's GEMM output to the three
//! attention operands, in one pass.
//!
//! Per row (a token) and head: add the bias and the adapters' `u B^T`; for Qwen3, RMS-normalise
//! the head (q_norm / k_norm); rotate by the token's position (rotate-half RoPE,
//! [x1 cos - x2 sin, x2 cos + x1 sin]); scale queries by 1/sqrt(head_dim); write each head in
//! attention's [B, heads, T, head_dim] layout. The backward applies the inverse rotation
//! ([g1 cos + g2 sin, g2 cos - g1 sin]) and the norm's backward (recomputing the head's
//! pre-norm values from the saved GEMM output), and writes the gradient back in the
//! projection's [n, q|k|v] layout.

use super::cpu::{hold, Real};
use super::lora::{cpu_total_rank, up_row, HeldAdapters};
use super::norm::norm_backward_row;
use super::spec::QkvSpec;
use super::{nbytes, produce, Produce};
use candle_core::{CpuStorage, DType, Result, Shape, Tensor};
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};

/// The CPU twin's view of the geometry.
impl QkvSpec<'_> {
    fn rows(&self) -> usize {
        self.batch * self.seq
    }
    /// Head `h` of the output's concatenation (queries, then keys, then values): its column in
    /// the projection and its base offset in the output buffer.
    fn head(&self, h: usize) -> (usize, usize, Kind) {
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let n = self.rows();
        if h < nh {
            (h * d, h * self.seq * d, Kind::Query)
        } else if h < nh + nkv {
            let j = h - nh;
            (nh * d + j * d, n * nh * d + j * self.seq * d, Kind::Key)
        } else {
            let j = h - nh - nkv;
            (
                (nh + nkv) * d + j * d,
                n * (nh + nkv) * d + j * self.seq * d,
                Kind::Value,
            )
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Query,
    Key,
    Value,
}

/// The values of the epilogue's input for one row: GEMM output + bias + adapters.
fn pre_row<T: Real>(
    row: usize,
    width: usize,
    y: &[T],
    bias: Option<&[T]>,
    lora: Option<super::lora::CpuGroup<T>>,
    out: &mut [T],
    add: &mut [T],
) {
    out.copy_from_slice(&y[row * width..(row + 1) * width]);
    if let Some(b) = bias {
        for (o, &v) in out.iter_mut().zip(b) {
            *o += v;
        }
    }
    if let Some((u, ads, sum_r)) = lora {
        add.fill(T::zero());
        up_row(&u[row * sum_r..(row + 1) * sum_r], ads, add);
        for (o, &v) in out.iter_mut().zip(add.iter()) {
            *o += v;
        }
    }
}

struct Epilogue<'a> {
    y: &'a Tensor,
    spec: QkvSpec<'a>,
    backward: Option<&'a Tensor>,
}

impl Produce for Epilogue<'_> {
    fn name(&self) -> &'static str {
        if self.backward.is_some() {
            "mo-qkv-backward"
        } else {
            "mo-qkv"
        }
    }
    fn output(&self) -> (Shape, DType) {
        let n = self.spec.rows() * self.spec.width();
        if self.backward.is_some() {
            (
                Shape::from((self.spec.rows(), self.spec.width())),
                self.y.dtype(),
            )
        } else {
            (Shape::from(n), self.y.dtype())
        }
    }
    fn bytes(&self) -> u64 {
        let parts = 2 + self.backward.is_some() as usize;
        nbytes(parts * self.spec.rows() * self.spec.width(), self.y.dtype())
    }
    fn cpu(&self) -> Result<CpuStorage> {
        let s = &self.spec;
        let (hy, hcos, hsin, hpos) = (hold(self.y), hold(s.cos), hold(s.sin), hold(s.positions));
        let hb = s.bias.map(hold);
        let hl = s.lora.map(|(u, ads)| (hold(u), HeldAdapters::new(ads)));
        let hn = s.qk_norm.map(|(q, k, eps)| (hold(q), hold(k), eps));
        let hg = self.backward.map(hold);
        let (n, width, d) = (s.rows(), s.width(), s.head_dim);
        let half = d / 2;
        let total_heads = s.heads + 2 * s.kv_heads;
        crate::with_real!(self.y.dtype(), T => {
            let y = &hy.cpu::<T>()?[..n * width];
            let (cos, sin) = (hcos.cpu::<T>()?, hsin.cpu::<T>()?);
            let pos = &hpos.cpu::<u32>()?[..n];
            let bias = match &hb { Some(b) => Some(&b.cpu::<T>()?[..width]), None => None };
            let lora_ads = match &hl { Some((_, held)) => Some(held.cpu::<T>()?), None => None };
            let lora = match (&hl, &lora_ads) {
                (Some((u, _)), Some(ads)) => {
                    let sum_r = cpu_total_rank(ads);
                    Some((&u.cpu::<T>()?[..n * sum_r], &ads[..], sum_r))
                }
                _ => None,
            };
            let norms = match &hn {
                Some((q, k, eps)) => Some((&q.cpu::<T>()?[..d], &k.cpu::<T>()?[..d], *eps)),
                None => None,
            };
            let grad = match &hg { Some(g) => Some(&g.cpu::<T>()?[..n * width]), None => None };
            let q_scale = T::one() / T::of(d as f64).sqrt();
            // Rows are independent: each task handles one row, all heads.
            let mut out = vec![T::zero(); n * width];
            let ptr = super::cpu::SendPtr(out.as_mut_ptr());
            let lora_work = lora.map_or(0, |l| l.2);
            super::cpu::for_each_index(
                n,
                n * width * (8 + lora_work),
                || (vec![T::zero(); width], vec![T::zero(); d], vec![T::zero(); d], vec![T::zero(); width]),
                |(pre, v, g, add), row| {
                    let (b, t) = (row / s.seq, row % s.seq);
                    let p = pos[row] as usize;
                    let (c, sn) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
                    pre_row(row, width, y, bias, lora, pre, add);
                    for h in 0..total_heads {
                        let (col, base, kind) = s.head(h);
                        let heads = match kind { Kind::Query => s.heads, _ => s.kv_heads };
                        let at = base + b * heads * s.seq * d + t * d;
                        let x = &pre[col..col + d];
                        let norm_w = match (kind, norms) {
                            (Kind::Query, Some((q, _, eps))) => Some((q, eps)),
                            (Kind::Key, Some((_, k, eps))) => Some((k, eps)),
                            _ => None,
                        };
                        match grad {
                            None => {
                                // Forward: norm, rotate, scale.
                                match norm_w {
                                    Some((w, eps)) => super::norm::norm_row(x, w, eps, v),
                                    None => v.copy_from_slice(x),
                                }
                                // SAFETY: row `row` writes its own head positions only.
                                let o = unsafe { ptr.slice_mut(at, d) };
                                if kind == Kind::Value {
                                    o.copy_from_slice(v);
                                    continue;
                                }
                                for i in 0..half {
                                    let (x1, x2) = (v[i], v[i + half]);
                                    o[i] = x1 * c[i] - x2 * sn[i];
                                    o[i + half] = x2 * c[i] + x1 * sn[i];
                                }
                                if kind == Kind::Query {
                                    for e in o.iter_mut() { *e *= q_scale; }
                                }
                            }
                            Some(dq) => {
                                // Backward: unscale, inverse rotation, norm backward; written at
                                // the projection's columns.
                                let gi = &dq[at..at + d];
                                // SAFETY: row `row` writes its own row of the output.
                                let o = unsafe { ptr.slice_mut(row * width + col, d) };
                                if kind == Kind::Value {
                                    o.copy_from_slice(gi);
                                    continue;
                                }
                                let k = if kind == Kind::Query { q_scale } else { T::one() };
                                for i in 0..half {
                                    let (g1, g2) = (gi[i] * k, gi[i + half] * k);
                                    g[i] = g1 * c[i] + g2 * sn[i];
                                    g[i + half] = g2 * c[i] - g1 * sn[i];
                                }
                                match norm_w {
                                    Some((w, eps)) => {
                                        o.fill(T::zero());
                                        norm_backward_row(x, w, eps, g, o);
                                    }
                                    None => o.copy_from_slice(g),
                                }
                            }
                        }
                    }
                },
            );
            Ok(T::wrap(out))
        })
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, dev: &candle_core::CudaDevice) -> Result<candle_core::CudaStorage> {
        super::cuda::qkv(dev, self.y, &self.spec, self.backward)
    }
}

/// The epilogue's output as (q [B, nh, T, d], k [B, nkv, T, d], v [B, nkv, T, d]) views of one
/// buffer.
pub fn split(buf: &Tensor, spec: &QkvSpec) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, d) = (spec.batch, spec.seq, spec.head_dim);
    let nq = b * spec.heads * t * d;
    let nk = b * spec.kv_heads * t * d;
    Ok((
        buf.narrow(0, 0, nq)?.reshape((b, spec.heads, t, d))?,
        buf.narrow(0, nq, nk)?.reshape((b, spec.kv_heads, t, d))?,
        buf.narrow(0, nq + nk, nk)?
            .reshape((b, spec.kv_heads, t, d))?,
    ))
}

/// Forward: `y` [n, q|k|v] (the GEMM output) -> one buffer holding q, k, v (see `split`).
pub fn forward(y: &Tensor, spec: QkvSpec) -> Result<Tensor> {
    produce(
        &Epilogue {
            y,
            spec,
            backward: None,
        },
        y,
    )
}

/// Backward: the gradient at q, k, v (one buffer laid out as the forward's output) -> the
/// gradient at the projection's output [n, q|k|v]. `y` is the forward's input (read for
/// Qwen3's norms).
pub fn backward(y: &Tensor, spec: QkvSpec, grad: &Tensor) -> Result<Tensor> {
    produce(
        &Epilogue {
            y,
            spec,
            backward: Some(grad),
        },
        y,
    )
}
