//! The MLP epilogue: the fused gate|up projection's GEMM output plus the adapters' `u B^T`,
//! then `h = silu(g) * u`; and its backward, which first adds the down-projection adapters'
//! input gradient to dh.
//!
//!   silu(g) = g * sigmoid(g),  d silu / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
//!   dg = dh * u * dsilu(g),    du = dh * silu(g)
//! The pre-activations are recomputed from the saved GEMM output in the backward, not kept.

use super::cpu::{hold, Real};
use super::lora::{cpu_total_rank, dx_row, up_row, HeldAdapters};
use super::spec::{Adapter, GateUp, GroupRef};
use super::{nbytes, produce, Produce};
use candle_core::{CpuStorage, DType, Result, Shape, Tensor};
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};

struct Kernel<'a> {
    gu: GateUp<'a>,
    /// Backward: dh [n, I] and the down adapters' (du, adapters).
    backward: Option<(&'a Tensor, Option<GroupRef<'a>>)>,
    n: usize,
    i: usize,
}

impl Produce for Kernel<'_> {
    fn name(&self) -> &'static str {
        if self.backward.is_some() {
            "mo-swiglu-backward"
        } else {
            "mo-swiglu"
        }
    }
    fn output(&self) -> (Shape, DType) {
        let w = if self.backward.is_some() { 2 } else { 1 };
        (Shape::from((self.n, w * self.i)), self.gu.y.dtype())
    }
    fn bytes(&self) -> u64 {
        let cols = if self.backward.is_some() { 5 } else { 3 };
        nbytes(cols * self.n * self.i, self.gu.y.dtype())
    }
    fn cpu(&self) -> Result<CpuStorage> {
        let (n, i) = (self.n, self.i);
        let hy = hold(self.gu.y);
        let hl = self
            .gu
            .lora
            .map(|(u, ads)| (hold(u), HeldAdapters::new(ads)));
        let hb = self.backward.map(|(dh, down)| {
            (
                hold(dh),
                down.map(|(du, ads)| (hold(du), HeldAdapters::new(ads))),
            )
        });
        crate::with_real!(self.gu.y.dtype(), T => {
            let y = &hy.cpu::<T>()?[..n * 2 * i];
            let lads = match &hl { Some((_, h)) => Some(h.cpu::<T>()?), None => None };
            let lora = match (&hl, &lads) {
                (Some((u, _)), Some(ads)) => {
                    let r = cpu_total_rank(ads);
                    Some((&u.cpu::<T>()?[..n * r], &ads[..], r))
                }
                _ => None,
            };
            let dads = match &hb { Some((_, Some((_, h)))) => Some(h.cpu::<T>()?), _ => None };
            let back = match &hb {
                Some((dh, down)) => {
                    let down = match (down, &dads) {
                        (Some((du, _)), Some(ads)) => {
                            let r = cpu_total_rank(ads);
                            Some((&du.cpu::<T>()?[..n * r], &ads[..], r))
                        }
                        _ => None,
                    };
                    Some((&dh.cpu::<T>()?[..n * i], down))
                }
                None => None,
            };
            let width = if back.is_some() { 2 * i } else { i };
            let mut out = vec![T::zero(); n * width];
            let lora_work = lora.map_or(0, |l| l.2) + back.and_then(|b| b.1).map_or(0, |d| d.2);
            super::cpu::for_rows(
                &mut out,
                width,
                n * i * (12 + 2 * lora_work),
                || (vec![T::zero(); 2 * i], vec![T::zero(); i], Vec::new(), vec![T::zero(); 2 * i]),
                |(pre, g, tmp, add), row, o| {
                    pre.copy_from_slice(&y[row * 2 * i..(row + 1) * 2 * i]);
                    if let Some((u, ads, r)) = lora {
                        add.fill(T::zero());
                        up_row(&u[row * r..(row + 1) * r], ads, add);
                        for (p, &a) in pre.iter_mut().zip(add.iter()) { *p += a; }
                    }
                    let (gate, up) = pre.split_at(i);
                    match back {
                        None => {
                            for ((h, &a), &b) in o.iter_mut().zip(gate).zip(up) {
                                let sig = T::one() / (T::one() + (-a).exp());
                                *h = a * sig * b;
                            }
                        }
                        Some((dh, down)) => {
                            g.copy_from_slice(&dh[row * i..(row + 1) * i]);
                            if let Some((du, ads, r)) = down {
                                dx_row(row, &du[row * r..(row + 1) * r], ads, g, tmp);
                            }
                            let (dg, du) = o.split_at_mut(i);
                            for c in 0..i {
                                let (a, b, d) = (gate[c], up[c], g[c]);
                                let sig = T::one() / (T::one() + (-a).exp());
                                let dsilu = sig * (a * (T::one() - sig) + T::one());
                                dg[c] = d * b * dsilu;
                                du[c] = d * (a * sig);
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
        super::cuda::swiglu(dev, &self.gu, self.backward, self.n, self.i)
    }
}

/// h = silu(gate) * up [n, I].
pub fn forward(gu: GateUp) -> Result<Tensor> {
    let w = gu.y.dims()[gu.y.rank() - 1];
    let k = Kernel {
        gu,
        backward: None,
        n: gu.y.elem_count() / w,
        i: w / 2,
    };
    produce(&k, gu.y)
}

/// [dgate | dup] [n, 2I] from dh [n, I] (plus the down adapters' input gradient).
pub fn backward(gu: GateUp, dh: &Tensor, down: Option<(&Tensor, &[Adapter])>) -> Result<Tensor> {
    let w = gu.y.dims()[gu.y.rank() - 1];
    let k = Kernel {
        gu,
        backward: Some((dh, down)),
        n: gu.y.elem_count() / w,
        i: w / 2,
    };
    produce(&k, gu.y)
}
