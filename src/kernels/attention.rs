//! Masked softmax attention over the mask's spans, forward and backward, without a mask tensor
//! and without keeping the probabilities.
//!
//! Query t of batch row b sits at key index `past + t` and sees key j when
//!   j <= past + t,   start_b <= j < end_b,   and (j < seg1_b or seg(j) == seg(past + t)),
//! seg(x) = (x >= seg1_b) + (x >= seg2_b): causal, right or left padding, and a packed
//! [prompt | chosen | rejected] pair (each response sees the prompt and itself) are all spans.
//! Grouped-query attention: query head h reads key/value head h / (heads / kv_heads).
//!
//!   forward   S = Q K^T (Q already scaled), P = softmax over visible keys, O = P V,
//!             lse = log sum_j exp(S_j) kept per row
//!   backward  P = exp(S - lse) recomputed, D = rowsum(dO * O), dP = dO V^T,
//!             dS = P * (dP - D), dQ = dS K, dK = dS^T Q, dV = P^T dO
//! A row that sees no key (a left-padding query) gets O = 0 and no gradient.
//!
//! CPU twin: one (batch, head) per task, its scores as one [T, Tk] tile multiplied by gemm (the
//! tile of one head fits in cache, where the unfused path held [B, heads, T, Tk] at once).
//! CUDA: a flash-attention-style kernel that streams key tiles with an online softmax.

use super::cpu::{hold, Real, SendPtr};
use super::gemm::cpu_gemm;
use super::lora::{cpu_total_rank, dx_row, HeldAdapters};
use super::spec::{Adapter, AttnSpec, MatView};
use super::{nbytes, produce, Produce};
use candle_core::{CpuStorage, DType, Result, Shape, Tensor};
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};

/// One batch row's visible keys: `[start, end)` valid, `[0, seg1)` a prefix every segment sees,
/// segments starting at `seg1` and `seg2` (`u32::MAX`: no such segment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSpan {
    pub start: u32,
    pub end: u32,
    pub seg1: u32,
    pub seg2: u32,
}

impl RowSpan {
    /// Keys `[0, len)`, no segments.
    pub fn causal(len: usize) -> Self {
        RowSpan {
            start: 0,
            end: len as u32,
            seg1: u32::MAX,
            seg2: u32::MAX,
        }
    }

    #[inline]
    fn seg(&self, x: usize) -> u32 {
        (x as u32 >= self.seg1) as u32 + (x as u32 >= self.seg2) as u32
    }

    /// Whether the query at key index `qi` sees key `j`.
    #[inline]
    pub fn visible(&self, qi: usize, j: usize) -> bool {
        j <= qi
            && j >= self.start as usize
            && j < self.end as usize
            && (j < self.seg1 as usize || self.seg(j) == self.seg(qi))
    }

    /// The spans as the [B, 4] u32 rows kernels read.
    pub fn flatten(rows: &[RowSpan]) -> Vec<u32> {
        rows.iter()
            .flat_map(|r| [r.start, r.end, r.seg1, r.seg2])
            .collect()
    }

    fn read(v: &[u32], b: usize) -> RowSpan {
        RowSpan {
            start: v[4 * b],
            end: v[4 * b + 1],
            seg1: v[4 * b + 2],
            seg2: v[4 * b + 3],
        }
    }
}

struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    tk: usize,
    d: usize,
}

impl AttnSpec<'_> {
    fn dims(&self) -> Result<Dims> {
        let (b, nh, t, d) = self.q.dims4()?;
        let (_, nkv, tk, _) = self.k.dims4()?;
        Ok(Dims {
            b,
            nh,
            nkv,
            t,
            tk,
            d,
        })
    }
}

/// Query rows per tile of the CPU twin: a tile holds [QUERY_BLOCK, Tk] scores, so a
/// whole-context window never holds [T, Tk] at once.
const QUERY_BLOCK: usize = 256;

/// Scores of query rows `i0..i0 + len` of one head into `s` [len, Tk], then the masked softmax
/// in place (P); writes the rows' lse (-inf for a row that sees nothing). With `lse_in`,
/// P = exp(S - lse) instead.
#[allow(clippy::too_many_arguments)]
fn probs<T: Real>(
    s: &mut [T],
    q: &[T],
    k: &[T],
    dm: &Dims,
    span: RowSpan,
    past: usize,
    (i0, len): (usize, usize),
    lse_in: Option<&[T]>,
    lse_out: &mut [T],
) {
    let (tk, d) = (dm.tk, dm.d);
    let sv = MatView {
        batch: 1,
        rows: len,
        cols: tk,
        bs: 0,
        rs: tk,
        cs: 1,
    };
    let qv = MatView {
        batch: 1,
        rows: len,
        cols: d,
        bs: 0,
        rs: d,
        cs: 1,
    };
    let kv = MatView {
        batch: 1,
        rows: d,
        cols: tk,
        bs: 0,
        rs: 1,
        cs: d,
    };
    cpu_gemm(s, &sv, &q[i0 * d..], &qv, k, &kv, T::one(), false, false);
    for i in 0..len {
        let row = &mut s[i * tk..(i + 1) * tk];
        let qi = past + i0 + i;
        let hi = (qi + 1).min(span.end as usize).min(tk);
        let lo = (span.start as usize).min(hi);
        let vis = |j: usize| j >= lo && j < hi && span.visible(qi, j);
        match lse_in {
            Some(lse) => {
                let l = lse[i];
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if vis(j) { (*x - l).exp() } else { T::zero() };
                }
            }
            None => {
                let mut m = T::neg_infinity();
                for (j, &x) in row.iter().enumerate().take(hi).skip(lo) {
                    if vis(j) && x > m {
                        m = x;
                    }
                }
                if m == T::neg_infinity() {
                    row.fill(T::zero());
                    lse_out[i] = T::neg_infinity();
                    continue;
                }
                let mut sum = T::zero();
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if vis(j) {
                        let e = (*x - m).exp();
                        sum += e;
                        e
                    } else {
                        T::zero()
                    };
                }
                let inv = T::one() / sum;
                for x in row.iter_mut() {
                    *x *= inv;
                }
                lse_out[i] = m + sum.ln();
            }
        }
    }
}

struct Forward<'a> {
    spec: AttnSpec<'a>,
}

impl Produce for Forward<'_> {
    fn name(&self) -> &'static str {
        "mo-attention"
    }
    fn output(&self) -> (Shape, DType) {
        // The output [B, T, nh * d] followed by the f32 lse [B, nh, T] on the CPU twin, in the
        // model dtype (so one buffer); CUDA writes lse into its own f32 scratch (`forward`).
        let dm = self.spec.dims().expect("checked by forward");
        let lse_elems = dm.b * dm.nh * dm.t;
        (
            Shape::from(dm.b * dm.t * dm.nh * dm.d + lse_elems),
            self.spec.q.dtype(),
        )
    }
    fn bytes(&self) -> u64 {
        let s = &self.spec;
        nbytes(
            2 * s.q.elem_count() + s.k.elem_count() + s.v.elem_count(),
            s.q.dtype(),
        )
    }
    fn cpu(&self) -> Result<CpuStorage> {
        let s = &self.spec;
        let dm = s.dims()?;
        let (hq, hk, hv, hs) = (hold(s.q), hold(s.k), hold(s.v), hold(s.spans));
        let (b, nh, nkv, t, tk, d) = (dm.b, dm.nh, dm.nkv, dm.t, dm.tk, dm.d);
        let rep = nh / nkv;
        crate::with_real!(s.q.dtype(), T => {
            let (q, k, v) = (hq.cpu::<T>()?, hk.cpu::<T>()?, hv.cpu::<T>()?);
            let spans = hs.cpu::<u32>()?;
            let o_elems = b * t * nh * d;
            let mut out = vec![T::zero(); o_elems + b * nh * t];
            let ptr = SendPtr(out.as_mut_ptr());
            let qb = QUERY_BLOCK.min(t.max(1));
            super::cpu::for_each_index(
                b * nh,
                b * nh * t * tk * d * 4,
                || (vec![T::zero(); qb * tk], vec![T::zero(); qb]),
                |(sbuf, lse), bh| {
                    let (bi, h) = (bh / nh, bh % nh);
                    let g = h / rep;
                    let qh = &q[bh * t * d..(bh + 1) * t * d];
                    let kh = &k[(bi * nkv + g) * tk * d..(bi * nkv + g + 1) * tk * d];
                    let vh = &v[(bi * nkv + g) * tk * d..(bi * nkv + g + 1) * tk * d];
                    for i0 in (0..t).step_by(qb) {
                        let len = qb.min(t - i0);
                        probs(sbuf, qh, kh, &dm, RowSpan::read(spans, bi), s.past, (i0, len), None, lse);
                        // O[b, i0.., h*d..] = P V, straight into the [B, T, nh * d] layout.
                        // SAFETY: (b, h) owns rows b*T.. and columns h*d..(h+1)*d of the output.
                        let at = (bi * t + i0) * nh * d + h * d;
                        let o = unsafe { ptr.slice_mut(at, o_elems - at) };
                        let ov = MatView { batch: 1, rows: len, cols: d, bs: 0, rs: nh * d, cs: 1 };
                        let pv = MatView { batch: 1, rows: len, cols: tk, bs: 0, rs: tk, cs: 1 };
                        let vv = MatView { batch: 1, rows: tk, cols: d, bs: 0, rs: d, cs: 1 };
                        cpu_gemm(o, &ov, sbuf, &pv, vh, &vv, T::one(), false, false);
                        // SAFETY: (b, h) owns its lse row.
                        let l = unsafe { ptr.slice_mut(o_elems + bh * t + i0, len) };
                        l.copy_from_slice(&lse[..len]);
                    }
                },
            );
            Ok(T::wrap(out))
        })
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, dev: &candle_core::CudaDevice) -> Result<candle_core::CudaStorage> {
        super::cuda::attention_forward(dev, &self.spec)
    }
}

/// Attention's output `o` [B, T, nh * d] (the o-projection's input layout) and the row
/// log-sum-exp `lse` [B, nh, T] the backward needs (one buffer, two views).
pub fn forward(spec: AttnSpec) -> Result<(Tensor, Tensor)> {
    // On the GPU lse is an f32 tensor of its own (the twin keeps it in the output's dtype,
    // f32 or f64, in one buffer).
    #[cfg(feature = "cuda")]
    if spec.q.device().is_cuda() {
        return super::cuda::attention_forward_pair(spec);
    }
    let dm = spec.dims()?;
    let buf = produce(&Forward { spec }, spec.q)?;
    let o_elems = dm.b * dm.t * dm.nh * dm.d;
    let o = buf
        .narrow(0, 0, o_elems)?
        .reshape((dm.b, dm.t, dm.nh * dm.d))?;
    let lse = buf
        .narrow(0, o_elems, dm.b * dm.nh * dm.t)?
        .reshape((dm.b, dm.nh, dm.t))?;
    Ok((o, lse))
}

struct Backward<'a> {
    spec: AttnSpec<'a>,
    o: &'a Tensor,
    lse: &'a Tensor,
    dout: &'a Tensor,
    /// The o-projection adapters' (du, adapters): their input gradient is added to `dout`.
    lora: Option<(&'a Tensor, &'a [Adapter<'a>])>,
}

impl Produce for Backward<'_> {
    fn name(&self) -> &'static str {
        "mo-attention-backward"
    }
    fn output(&self) -> (Shape, DType) {
        let s = &self.spec;
        (
            Shape::from(s.q.elem_count() + s.k.elem_count() + s.v.elem_count()),
            s.q.dtype(),
        )
    }
    fn bytes(&self) -> u64 {
        let s = &self.spec;
        nbytes(
            3 * s.q.elem_count()
                + 2 * (s.k.elem_count() + s.v.elem_count())
                + 2 * self.o.elem_count(),
            s.q.dtype(),
        )
    }
    fn cpu(&self) -> Result<CpuStorage> {
        let s = &self.spec;
        let dm = s.dims()?;
        let (hq, hk, hv, hs) = (hold(s.q), hold(s.k), hold(s.v), hold(s.spans));
        let (ho, hl, hd) = (hold(self.o), hold(self.lse), hold(self.dout));
        let hlora = self
            .lora
            .map(|(du, ads)| (hold(du), HeldAdapters::new(ads)));
        let (b, nh, nkv, t, tk, d) = (dm.b, dm.nh, dm.nkv, dm.t, dm.tk, dm.d);
        let rep = nh / nkv;
        let width = nh * d;
        crate::with_real!(s.q.dtype(), T => {
            let (q, k, v) = (hq.cpu::<T>()?, hk.cpu::<T>()?, hv.cpu::<T>()?);
            let (o, lse_t) = (&ho.cpu::<T>()?[..b * t * width], &hl.cpu::<T>()?[..b * nh * t]);
            let spans = hs.cpu::<u32>()?;
            // dO with the o-projection adapters' input gradient added.
            let mut dout = hd.cpu::<T>()?[..b * t * width].to_vec();
            if let Some((hdu, held)) = &hlora {
                let ads = held.cpu::<T>()?;
                let sum_r = cpu_total_rank(&ads);
                let du = &hdu.cpu::<T>()?[..b * t * sum_r];
                super::cpu::for_rows(&mut dout, width, b * t * width * 2 * sum_r, Vec::new, |tmp, row, g| {
                    dx_row(row, &du[row * sum_r..(row + 1) * sum_r], &ads, g, tmp)
                });
            }
            let (nq, nk) = (b * nh * t * d, b * nkv * tk * d);
            let mut out = vec![T::zero(); nq + 2 * nk];
            let ptr = SendPtr(out.as_mut_ptr());
            // One task per (batch, kv head): the group's query heads accumulate into one dK/dV,
            // query rows in tiles.
            let qb = QUERY_BLOCK.min(t.max(1));
            super::cpu::for_each_index(
                b * nkv,
                b * nh * t * tk * d * 8,
                || (vec![T::zero(); qb * tk], vec![T::zero(); qb * tk], vec![T::zero(); qb]),
                |(p, dp, delta), bg| {
                    let (bi, g) = (bg / nkv, bg % nkv);
                    let span = RowSpan::read(spans, bi);
                    let kh = &k[bg * tk * d..(bg + 1) * tk * d];
                    let vh = &v[bg * tk * d..(bg + 1) * tk * d];
                    // SAFETY: (b, g) owns its dK and dV blocks and its query heads' dQ blocks.
                    let dk = unsafe { ptr.slice_mut(nq + bg * tk * d, tk * d) };
                    let dv = unsafe { ptr.slice_mut(nq + nk + bg * tk * d, tk * d) };
                    let kd = MatView { batch: 1, rows: tk, cols: d, bs: 0, rs: d, cs: 1 };
                    for h in g * rep..(g + 1) * rep {
                        let bh = bi * nh + h;
                        let qh = &q[bh * t * d..(bh + 1) * t * d];
                        for i0 in (0..t).step_by(qb) {
                            let len = qb.min(t - i0);
                            let lse = &lse_t[bh * t + i0..bh * t + i0 + len];
                            probs(p, qh, kh, &dm, span, s.past, (i0, len), Some(lse), &mut []);
                            // This tile's dO and O, [len, d] with row stride nh * d.
                            let off = (bi * t + i0) * width + h * d;
                            let (doh, oh) = (&dout[off..], &o[off..]);
                            for i in 0..len {
                                delta[i] = (0..d).map(|e| doh[i * width + e] * oh[i * width + e]).sum();
                            }
                            let rows = MatView { batch: 1, rows: len, cols: d, bs: 0, rs: width, cs: 1 };
                            let tile = MatView { batch: 1, rows: len, cols: tk, bs: 0, rs: tk, cs: 1 };
                            let tile_t = MatView { batch: 1, rows: tk, cols: len, bs: 0, rs: 1, cs: tk };
                            let vt = MatView { batch: 1, rows: d, cols: tk, bs: 0, rs: 1, cs: d };
                            // dP = dO V^T
                            cpu_gemm(dp, &tile, doh, &rows, vh, &vt, T::one(), false, false);
                            // dV += P^T dO
                            cpu_gemm(dv, &kd, p, &tile_t, doh, &rows, T::one(), true, false);
                            // dS = P * (dP - D), in place in dp
                            for i in 0..len {
                                for j in 0..tk {
                                    let pij = p[i * tk + j];
                                    dp[i * tk + j] = if pij == T::zero() { T::zero() } else { pij * (dp[i * tk + j] - delta[i]) };
                                }
                            }
                            // dQ = dS K
                            let dq = unsafe { ptr.slice_mut((bh * t + i0) * d, len * d) };
                            let qd = MatView { batch: 1, rows: len, cols: d, bs: 0, rs: d, cs: 1 };
                            cpu_gemm(dq, &qd, dp, &tile, kh, &kd, T::one(), false, false);
                            // dK += dS^T Q
                            cpu_gemm(dk, &kd, dp, &tile_t, &qh[i0 * d..], &qd, T::one(), true, false);
                        }
                    }
                },
            );
            Ok(T::wrap(out))
        })
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, dev: &candle_core::CudaDevice) -> Result<candle_core::CudaStorage> {
        super::cuda::attention_backward(dev, &self.spec, self.o, self.lse, self.dout, self.lora)
    }
}

/// The gradients (dq [B, nh, T, d], dk, dv [B, nkv, Tk, d]) as one buffer laid out like the
/// qkv epilogue's output (so `qkv::backward` reads it directly), given the forward's `o` and
/// `lse` and the gradient at `o` (`dout`, [B, T, nh * d]) before the o-projection adapters'
/// input gradient (`lora`), which is added here.
pub fn backward(
    spec: AttnSpec,
    o: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    lora: Option<(&Tensor, &[Adapter])>,
) -> Result<Tensor> {
    let k = Backward {
        spec,
        o,
        lse,
        dout,
        lora,
    };
    produce(&k, spec.q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_diff;
    use candle_core::{Device, Var, D};

    /// GQA over two batch rows: one right-padded, one a packed pair; against autograd of the
    /// plain softmax with an explicit bias.
    #[test]
    fn spans_attention_matches_autograd_of_masked_softmax() -> Result<()> {
        // One query tile, and three (the CPU twin tiles queries by QUERY_BLOCK).
        for t in [7, 2 * QUERY_BLOCK + 9] {
            spans_attention_case(t)?;
        }
        Ok(())
    }

    fn spans_attention_case(t: usize) -> Result<()> {
        let dev = Device::Cpu;
        let (b, nh, nkv, d) = (2, 4, 2, 4);
        let q = Var::randn(0f64, 1.0, (b, nh, t, d), &dev)?;
        let k = Var::randn(0f64, 1.0, (b, nkv, t, d), &dev)?;
        let v = Var::randn(0f64, 1.0, (b, nkv, t, d), &dev)?;
        let spans = [
            RowSpan::causal(t - 2),
            RowSpan {
                start: 0,
                end: t as u32,
                seg1: 2,
                seg2: (t / 2) as u32,
            },
        ];
        let mut bias = vec![-1e30f64; b * t * t];
        for (bi, sp) in spans.iter().enumerate() {
            for i in 0..t {
                for j in 0..t {
                    if sp.visible(i, j) {
                        bias[(bi * t + i) * t + j] = 0.0;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, t, t), &dev)?;
        let rep = nh / nkv;
        let expand = |x: &Tensor| -> Tensor {
            let (b, g, t, d) = x.dims4().unwrap();
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, g, rep, t, d))
                .unwrap()
                .reshape((b, g * rep, t, d))
                .unwrap()
        };
        let s = q
            .as_tensor()
            .matmul(&expand(k.as_tensor()).t()?)?
            .broadcast_add(&bias)?;
        let p = candle_nn::ops::softmax(&s, D::Minus1)?;
        let o_ref = p
            .matmul(&expand(v.as_tensor()))?
            .transpose(1, 2)?
            .reshape((b, t, nh * d))?;
        let sp = Tensor::from_vec(RowSpan::flatten(&spans), (b, 4), &dev)?;
        let (qd, kd, vd) = (
            q.as_tensor().detach(),
            k.as_tensor().detach(),
            v.as_tensor().detach(),
        );
        let spec = AttnSpec {
            q: &qd,
            k: &kd,
            v: &vd,
            spans: &sp,
            past: 0,
        };
        let (o, lse) = forward(spec)?;
        // Padded query rows (5, 6 of batch row 0) see the valid keys, as in the unfused path.
        assert!(max_diff(&o, &o_ref) < 1e-12, "forward");
        let dout = Tensor::randn(0f64, 1.0, (b, t, nh * d), &dev)?;
        let g = (&o_ref * &dout)?.sum_all()?.backward()?;
        let grads = backward(spec, &o, &lse, &dout, None)?;
        let (nq, nk) = (b * nh * t * d, b * nkv * t * d);
        let dq = grads.narrow(0, 0, nq)?.reshape((b, nh, t, d))?;
        let dk = grads.narrow(0, nq, nk)?.reshape((b, nkv, t, d))?;
        let dv = grads.narrow(0, nq + nk, nk)?.reshape((b, nkv, t, d))?;
        assert!(max_diff(&dq, g.get(q.as_tensor()).unwrap()) < 1e-10, "dq");
        assert!(max_diff(&dk, g.get(k.as_tensor()).unwrap()) < 1e-10, "dk");
        assert!(max_diff(&dv, g.get(v.as_tensor()).unwrap()) < 1e-10, "dv");
        Ok(())
    }
}
