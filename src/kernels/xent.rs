//! The LM head's fused cross entropy, one chunk of rows at a time:
//!   logits = h E^T                          [C, V]   (GEMM, f32 output)
//!   per row: lse = log sum exp(logits), logp = logits[t] - lse,
//!            logits <- softmax - onehot(t)  (in place, same pass)
//!   G = -(softmax - onehot) E = E[t] - E_softmax[E]   [C, H]   (GEMM)
//! G is the exact gradient of logp with respect to h, so the backward of the whole LM head is
//! one multiply by the incoming per-row gradient; no [C, V] tensor outlives the chunk, and the
//! frozen embedding gets no gradient.
//!
//! Output: rows of an f32 (f64 for an f64 model) buffer [N, H + 1], G in the first H columns
//! and logp in the last, so one op writes both.

use super::cpu::{hold, Real, SendPtr};
use super::gemm::cpu_gemm;
use super::spec::MatView;
use super::{nbytes, update, Update};
use candle_core::{CpuStorage, Layout, Result, Tensor};
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};

/// One row's log-sum-exp and target log-prob; with `grad` the row becomes softmax - onehot.
pub(crate) fn row<T: Real>(x: &mut [T], target: usize, grad: bool) -> T {
    let m = x
        .iter()
        .copied()
        .fold(T::neg_infinity(), num_traits::Float::max);
    let sum: T = x.iter().map(|&v| (v - m).exp()).sum();
    let lse = m + sum.ln();
    let logp = x[target] - lse;
    if grad {
        for v in x.iter_mut() {
            *v = (*v - lse).exp();
        }
        x[target] -= T::one();
    }
    logp
}

struct Chunk<'a> {
    h: &'a Tensor,
    w: &'a Tensor,
    targets: &'a Tensor,
    grad: bool,
}

impl Update for Chunk<'_> {
    fn name(&self) -> &'static str {
        "mo-cross-entropy"
    }
    fn bytes(&self) -> u64 {
        let (c, v) = (self.h.dims()[0], self.w.dims()[0]);
        let passes = if self.grad { 2 } else { 1 };
        // The weight once per product, the f32 logits written and read twice.
        passes * nbytes(self.w.elem_count(), self.w.dtype()) + (2 + 2 * passes) * 4 * (c * v) as u64
    }
    fn cpu(&self, dst: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (hh, hw, ht) = (hold(self.h), hold(self.w), hold(self.targets));
        let (c, hdim) = self.h.dims2()?;
        let v = self.w.dims()[0];
        let grad = self.grad;
        crate::with_real!(self.h.dtype(), T => {
            let (h, w) = (&hh.cpu::<T>()?[..c * hdim], &hw.cpu::<T>()?[..v * hdim]);
            let targets = &ht.cpu::<u32>()?[..c];
            let out = &mut T::slice_mut(dst)?[l.start_offset()..];
            let stride = l.stride()[0];
            let mut logits = vec![T::zero(); c * v];
            let lv = MatView { batch: 1, rows: c, cols: v, bs: 0, rs: v, cs: 1 };
            let hv = MatView { batch: 1, rows: c, cols: hdim, bs: 0, rs: hdim, cs: 1 };
            let wt = MatView { batch: 1, rows: hdim, cols: v, bs: 0, rs: 1, cs: hdim };
            cpu_gemm(&mut logits, &lv, h, &hv, w, &wt, T::one(), false, true);
            let ptr = SendPtr(out.as_mut_ptr());
            super::cpu::for_rows(&mut logits, v, c * v * 4, || (), |_, i, x| {
                let lp = row(x, targets[i] as usize, grad);
                // SAFETY: row i owns element (i, H) of the output.
                unsafe { ptr.slice_mut(i * stride + hdim, 1)[0] = lp };
            });
            if grad {
                // G = -(softmax - onehot) E, over vocabulary blocks: one product with a
                // 151,936-long inner dimension makes gemm keep per-thread packing buffers the
                // size of the whole embedding.
                const BLOCK: usize = 16384;
                let gv = MatView { batch: 1, rows: c, cols: hdim, bs: 0, rs: stride, cs: 1 };
                for (bi, start) in (0..v).step_by(BLOCK).enumerate() {
                    let len = BLOCK.min(v - start);
                    let pv = MatView { batch: 1, rows: c, cols: len, bs: 0, rs: v, cs: 1 };
                    let ev = MatView { batch: 1, rows: len, cols: hdim, bs: 0, rs: hdim, cs: 1 };
                    cpu_gemm(out, &gv, &logits[start..], &pv, &w[start * hdim..], &ev, -T::one(), bi > 0, true);
                }
            }
            Ok(())
        })
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, dst: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        super::cuda::cross_entropy(dst, l, self.h, self.w, self.targets, self.grad)
    }
}

/// Writes the chunk `h` [C, H]'s gradient rows G and log-probs of `targets` [C] (u32) under
/// the output weight `w` [V, H] into `out` [C, H + 1] (a row block of the step's buffer).
pub fn chunk_into(
    out: &Tensor,
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    grad: bool,
) -> Result<()> {
    update(
        &Chunk {
            h,
            w,
            targets,
            grad,
        },
        out,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_kernel_is_log_softmax_and_its_gradient() {
        let mut x = vec![0.5f64, -1.0, 2.0, 0.0];
        let lse = (0.5f64.exp() + (-1f64).exp() + 2f64.exp() + 1.0).ln();
        let lp = row(&mut x, 2, true);
        assert!((lp - (2.0 - lse)).abs() < 1e-14);
        let p2 = (2.0 - lse).exp();
        assert!((x[2] - (p2 - 1.0)).abs() < 1e-14);
        assert!(
            (x.iter().sum::<f64>()).abs() < 1e-14,
            "softmax - onehot sums to 0"
        );
    }
}
