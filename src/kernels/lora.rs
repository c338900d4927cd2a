//! The LoRA adapters of one group of projections that share an input (q/k/v; o; gate/up;
//! down), as fused kernels.
//!
//! For adapter i with rank r_i, scale s_i (alpha / r, times the per-rank gates g of a
//! weight-conditioned policy) and dropout mask m_i over its input x [n, in]:
//!   forward   u_i  = s_i g ⊙ (drop_i(x) A_i^T)           [n, r_i]   (`down`)
//!             y_i += u_i B_i^T                           (in the consumer's epilogue)
//!   backward  du_i = s_i g ⊙ (dy_i B_i)                  [n, r_i]   (`up_backward`)
//!             dB_i = dy_i^T u_i,  dA_i = du_i^T drop_i(x)           (`grads`)
//!             dx  += drop_i(du_i A_i)                    (in the consumer: `dx_row`)
//! The dropout mask is never stored: element (row, c) of x is kept when
//! `counter_bits(key, row * in + c) >= threshold` (`dropout`), and survivors are scaled by
//! 1 / (1 - p), exactly the mask the unfused path draws for the same call.
//! The u of all adapters of a group sit side by side in one [n, sum r_i] buffer.

use super::cpu::{hold, Held, Real};
use super::dropout::{counter_bits, threshold};
use super::gemm::cpu_gemm;
use super::spec::{total_rank, Adapter, GradSlots, MatView};
use super::{nbytes, produce, update, Produce, Update};
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};

/// An adapter read on the CPU: its A matrix and its per-rank scale and mask.
pub(crate) struct CpuAdapter<'a, T> {
    pub a: &'a [T],
    pub b: &'a [T],
    pub r: usize,
    pub inp: usize,
    pub out: usize,
    pub out_offset: usize,
    pub u_offset: usize,
    /// s * g per rank.
    pub scale: Vec<T>,
    /// (key, threshold, 1 / (1 - p)) when dropout is on.
    pub mask: Option<(u64, u32, T)>,
}

impl<T: Real> CpuAdapter<'_, T> {
    /// Whether element (row, c) of the input survives dropout, and its factor.
    #[inline]
    pub fn keep(&self, row: usize, c: usize) -> T {
        match self.mask {
            None => T::one(),
            Some((key, thr, k)) => {
                if counter_bits(key, (row * self.inp + c) as u64) >= thr {
                    k
                } else {
                    T::zero()
                }
            }
        }
    }

    /// `drop(x_row)` into `out`.
    pub fn drop_row(&self, row: usize, x: &[T], out: &mut [T]) {
        match self.mask {
            None => out.copy_from_slice(x),
            Some(_) => {
                for (c, (o, &v)) in out.iter_mut().zip(x).enumerate() {
                    // The unfused path multiplies by the factor, then keeps or zeroes.
                    let k = self.keep(row, c);
                    *o = if k == T::zero() { T::zero() } else { v * k };
                }
            }
        }
    }
}

/// A group as a CPU twin reads it: the [n, sum r] intermediate's elements, the adapters, and
/// sum r.
pub(crate) type CpuGroup<'a, T> = (&'a [T], &'a [CpuAdapter<'a, T>], usize);

/// Holds of every adapter's tensors (read locks for the length of an op).
pub(crate) struct HeldAdapters<'a> {
    a: Vec<Held<'a>>,
    b: Vec<Held<'a>>,
    gate: Vec<Option<Held<'a>>>,
    specs: Vec<Adapter<'a>>,
}

impl<'a> HeldAdapters<'a> {
    pub fn new(adapters: &[Adapter<'a>]) -> Self {
        HeldAdapters {
            a: adapters.iter().map(|x| hold(x.a)).collect(),
            b: adapters.iter().map(|x| hold(x.b)).collect(),
            gate: adapters.iter().map(|x| x.gate.map(hold)).collect(),
            specs: adapters.to_vec(),
        }
    }

    /// The adapters as the CPU twins read them (A and B in the compute type `T`).
    pub fn cpu<T: Real>(&self) -> Result<Vec<CpuAdapter<'_, T>>> {
        let mut out = vec![];
        for (i, s) in self.specs.iter().enumerate() {
            let (r, inp, o) = (s.rank(), s.in_features(), s.out_features());
            if s.a.dtype() != T::DTYPE || s.b.dtype() != T::DTYPE {
                candle_core::bail!(
                    "mo-align lora kernel: adapters in {:?} for a {:?} model",
                    s.a.dtype(),
                    T::DTYPE
                );
            }
            let scale = match &self.gate[i] {
                Some(g) => {
                    let g = g.cpu::<T>()?;
                    (0..r).map(|j| g[j] * T::of(s.scale)).collect()
                }
                None => vec![T::of(s.scale); r],
            };
            let mask = s.dropout.filter(|m| m.p > 0.0).map(|m| {
                let k = 1.0f32 / (1.0f32 - m.p);
                (m.key, threshold(m.p), T::of(k as f64))
            });
            out.push(CpuAdapter {
                a: &self.a[i].cpu::<T>()?[..r * inp],
                b: &self.b[i].cpu::<T>()?[..o * r],
                r,
                inp,
                out: o,
                out_offset: s.out_offset,
                u_offset: s.u_offset,
                scale,
                mask,
            });
        }
        Ok(out)
    }
}

/// Adds `sum_i drop_i(du_i A_i)` for one row into `out` ([in]): the input gradient through the
/// adapters. `du_row` is the row of the group's (scaled) [n, sum r] gradient.
pub(crate) fn dx_row<T: Real>(
    row: usize,
    du_row: &[T],
    adapters: &[CpuAdapter<T>],
    out: &mut [T],
    tmp: &mut Vec<T>,
) {
    for ad in adapters {
        tmp.clear();
        tmp.resize(ad.inp, T::zero());
        for j in 0..ad.r {
            let g = du_row[ad.u_offset + j];
            if g == T::zero() {
                continue;
            }
            let arow = &ad.a[j * ad.inp..(j + 1) * ad.inp];
            for (t, &w) in tmp.iter_mut().zip(arow) {
                *t += g * w;
            }
        }
        for (c, (o, &t)) in out.iter_mut().zip(tmp.iter()).enumerate() {
            let k = ad.keep(row, c);
            if k != T::zero() {
                *o += t * k;
            }
        }
    }
}

/// Adds `sum_j u[row, j] B[c, j]` for every output column c of every adapter into `out` (a row
/// of the group's output, all adapters' columns): the adapters' part of the forward.
pub(crate) fn up_row<T: Real>(u_row: &[T], adapters: &[CpuAdapter<T>], out: &mut [T]) {
    for ad in adapters {
        let u = &u_row[ad.u_offset..ad.u_offset + ad.r];
        let o = &mut out[ad.out_offset..ad.out_offset + ad.out];
        for (c, y) in o.iter_mut().enumerate() {
            let brow = &ad.b[c * ad.r..(c + 1) * ad.r];
            let mut s = T::zero();
            for (&w, &x) in brow.iter().zip(u) {
                s += w * x;
            }
            *y += s;
        }
    }
}

/// Total rank of a group as the CPU twins read it.
pub(crate) fn cpu_total_rank<T>(adapters: &[CpuAdapter<T>]) -> usize {
    adapters.iter().map(|a| a.u_offset + a.r).max().unwrap_or(0)
}

// ---- forward: u = s g ⊙ (drop(x) A^T) --------------------------------------------------------

struct Down<'a> {
    x: &'a Tensor,
    adapters: &'a [Adapter<'a>],
    n: usize,
    sum_r: usize,
}

impl Produce for Down<'_> {
    fn name(&self) -> &'static str {
        "mo-lora-down"
    }
    fn output(&self) -> (Shape, DType) {
        (Shape::from((self.n, self.sum_r)), self.x.dtype())
    }
    fn bytes(&self) -> u64 {
        nbytes(self.x.elem_count() + self.n * self.sum_r, self.x.dtype())
            + self
                .adapters
                .iter()
                .map(|a| super::param_bytes(a.a.elem_count()))
                .sum::<u64>()
    }
    fn cpu(&self) -> Result<CpuStorage> {
        let hx = hold(self.x);
        let held = HeldAdapters::new(self.adapters);
        crate::with_real!(self.x.dtype(), T => {
            let ads = held.cpu::<T>()?;
            let inp = ads[0].inp;
            let x = &hx.cpu::<T>()?[..self.n * inp];
            let mut u = vec![T::zero(); self.n * self.sum_r];
            super::cpu::for_rows(
                &mut u,
                self.sum_r,
                self.n * inp * (ads.len() + self.sum_r),
                || vec![T::zero(); inp],
                |xd, row, urow| {
                    let xr = &x[row * inp..(row + 1) * inp];
                    for ad in &ads {
                        ad.drop_row(row, xr, xd);
                        for j in 0..ad.r {
                            let arow = &ad.a[j * inp..(j + 1) * inp];
                            let dot: T = arow.iter().zip(xd.iter()).map(|(&w, &v)| w * v).sum();
                            urow[ad.u_offset + j] = dot * ad.scale[j];
                        }
                    }
                },
            );
            Ok(T::wrap(u))
        })
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, dev: &candle_core::CudaDevice) -> Result<candle_core::CudaStorage> {
        super::cuda::lora_down(dev, self.x, self.adapters, self.n, self.sum_r)
    }
}

/// The group's intermediate u [n, sum r] for input `x` [n, in] (contiguous).
pub fn down(x: &Tensor, adapters: &[Adapter]) -> Result<Tensor> {
    let n = x.elem_count() / adapters[0].in_features();
    let k = Down {
        x,
        adapters,
        n,
        sum_r: total_rank(adapters),
    };
    produce(&k, x)
}

// ---- backward: du = s g ⊙ (dy B) -------------------------------------------------------------

struct UpBackward<'a> {
    dy: &'a Tensor,
    adapters: &'a [Adapter<'a>],
    n: usize,
    width: usize,
    sum_r: usize,
}

impl Produce for UpBackward<'_> {
    fn name(&self) -> &'static str {
        "mo-lora-up-backward"
    }
    fn output(&self) -> (Shape, DType) {
        (Shape::from((self.n, self.sum_r)), self.dy.dtype())
    }
    fn bytes(&self) -> u64 {
        nbytes(self.n * (self.width + self.sum_r), self.dy.dtype())
    }
    fn cpu(&self) -> Result<CpuStorage> {
        let hy = hold(self.dy);
        let held = HeldAdapters::new(self.adapters);
        let width = self.width;
        crate::with_real!(self.dy.dtype(), T => {
            let ads = held.cpu::<T>()?;
            let dy = &hy.cpu::<T>()?[..self.n * width];
            let mut du = vec![T::zero(); self.n * self.sum_r];
            super::cpu::for_rows(&mut du, self.sum_r, self.n * width * 8, || (), |_, row, durow| {
                let yr = &dy[row * width..(row + 1) * width];
                for ad in &ads {
                    let yi = &yr[ad.out_offset..ad.out_offset + ad.out];
                    for j in 0..ad.r {
                        let mut s = T::zero();
                        for (c, &g) in yi.iter().enumerate() {
                            s += g * ad.b[c * ad.r + j];
                        }
                        durow[ad.u_offset + j] = s * ad.scale[j];
                    }
                }
            });
            Ok(T::wrap(du))
        })
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, dev: &candle_core::CudaDevice) -> Result<candle_core::CudaStorage> {
        super::cuda::lora_up_backward(dev, self.dy, self.adapters, self.n, self.width, self.sum_r)
    }
}

/// du [n, sum r] from the group's output gradient `dy` [n, width] (contiguous).
pub fn up_backward(dy: &Tensor, adapters: &[Adapter]) -> Result<Tensor> {
    let width = dy.dims()[dy.rank() - 1];
    let k = UpBackward {
        dy,
        adapters,
        n: dy.elem_count() / width,
        width,
        sum_r: total_rank(adapters),
    };
    produce(&k, dy)
}

// ---- gradients: dB += dy^T u, dA += du^T drop(x), into the flat gradient buffer -------------

struct Grads<'a> {
    dy: &'a Tensor,
    u: &'a Tensor,
    du: &'a Tensor,
    x: &'a Tensor,
    adapters: &'a [Adapter<'a>],
    slots: &'a [GradSlots],
    n: usize,
}

impl Update for Grads<'_> {
    fn name(&self) -> &'static str {
        "mo-lora-grads"
    }
    fn bytes(&self) -> u64 {
        let params: usize = self
            .adapters
            .iter()
            .map(|a| a.a.elem_count() + a.b.elem_count())
            .sum();
        nbytes(
            self.dy.elem_count() + self.u.elem_count() + self.du.elem_count() + self.x.elem_count(),
            self.x.dtype(),
        ) + 2 * super::param_bytes(params)
    }
    fn cpu(&self, dst: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (hy, hu, hdu, hx) = (hold(self.dy), hold(self.u), hold(self.du), hold(self.x));
        let held = HeldAdapters::new(self.adapters);
        let n = self.n;
        crate::with_real!(self.x.dtype(), T => {
            let ads = held.cpu::<T>()?;
            let out = &mut T::slice_mut(dst)?[l.start_offset()..];
            let (width, sum_r, inp) = (self.dy.elem_count() / n, self.u.elem_count() / n, ads[0].inp);
            let (dy, u, du, x) = (hy.cpu::<T>()?, hu.cpu::<T>()?, hdu.cpu::<T>()?, hx.cpu::<T>()?);
            let mut dropped: Vec<T> = vec![];
            for (ad, slot) in ads.iter().zip(self.slots) {
                // dB [out, r] += dy_i^T [out, n] @ u_i [n, r]
                let dv = MatView { batch: 1, rows: ad.out, cols: ad.r, bs: 0, rs: ad.r, cs: 1 };
                let av = MatView { batch: 1, rows: ad.out, cols: n, bs: 0, rs: 1, cs: width };
                let bv = MatView { batch: 1, rows: n, cols: ad.r, bs: 0, rs: sum_r, cs: 1 };
                cpu_gemm(&mut out[slot.b..], &dv, &dy[ad.out_offset..], &av, &u[ad.u_offset..], &bv, T::one(), true, true);
                // dA [r, in] += du_i^T [r, n] @ drop(x) [n, in]
                let xs: &[T] = if ad.mask.is_some() {
                    dropped.resize(n * inp, T::zero());
                    super::cpu::for_rows(&mut dropped, inp, n * inp * 4, || (), |_, row, o| {
                        ad.drop_row(row, &x[row * inp..(row + 1) * inp], o);
                    });
                    &dropped
                } else {
                    x
                };
                let dv = MatView { batch: 1, rows: ad.r, cols: inp, bs: 0, rs: inp, cs: 1 };
                let av = MatView { batch: 1, rows: ad.r, cols: n, bs: 0, rs: 1, cs: sum_r };
                let bv = MatView { batch: 1, rows: n, cols: inp, bs: 0, rs: inp, cs: 1 };
                cpu_gemm(&mut out[slot.a..], &dv, &du[ad.u_offset..], &av, xs, &bv, T::one(), true, true);
            }
            Ok(())
        })
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, dst: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        super::cuda::lora_grads(
            dst,
            l.start_offset(),
            self.dy,
            self.u,
            self.du,
            self.x,
            self.adapters,
            self.slots,
            self.n,
        )
    }
}

/// Accumulates the group's A and B gradients into `grads` (the flat f32/f64 buffer of every
/// adapter's gradient) at `slots`: `dy` [n, width] the group's output gradient, `u` and `du`
/// [n, sum r], `x` [n, in] the group's input.
pub fn grads(
    grads: &Tensor,
    slots: &[GradSlots],
    dy: &Tensor,
    u: &Tensor,
    du: &Tensor,
    x: &Tensor,
    adapters: &[Adapter],
) -> Result<()> {
    let k = Grads {
        dy,
        u,
        du,
        x,
        adapters,
        slots,
        n: u.elem_count() / total_rank(adapters).max(1),
    };
    update(&k, grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_diff;
    use candle_core::{Device, Var, D};

    /// Two adapters (different ranks, one gated, both with dropout) on one input: the fused
    /// forward, input gradient and A/B gradients equal autograd of the plain formulas.
    #[test]
    fn fused_group_matches_autograd_of_the_plain_formulas() -> Result<()> {
        let dev = Device::Cpu;
        let (n, inp) = (5, 7);
        let x = Var::randn(0f64, 1.0, (n, inp), &dev)?;
        let (a1, b1) = (
            Var::randn(0f64, 1.0, (2, inp), &dev)?,
            Var::randn(0f64, 1.0, (3, 2), &dev)?,
        );
        let (a2, b2) = (
            Var::randn(0f64, 1.0, (4, inp), &dev)?,
            Var::randn(0f64, 1.0, (6, 4), &dev)?,
        );
        let gate = Tensor::new(&[0.5f64, 0.5, 1.5, 1.5], &dev)?;
        let m1 = crate::kernels::dropout::DropoutRng::new(3).mask(0, 0.3);
        let m2 = crate::kernels::dropout::DropoutRng::new(3).mask(1, 0.2);
        let ads = [
            Adapter {
                a: a1.as_tensor(),
                b: b1.as_tensor(),
                scale: 2.0,
                gate: None,
                dropout: Some(m1),
                out_offset: 0,
                u_offset: 0,
            },
            Adapter {
                a: a2.as_tensor(),
                b: b2.as_tensor(),
                scale: 0.5,
                gate: Some(&gate),
                dropout: Some(m2),
                out_offset: 3,
                u_offset: 2,
            },
        ];
        // Plain formulas with autograd.
        let ones = Tensor::ones((n, inp), DType::F64, &dev)?;
        let (d1, d2) = (m1.apply(&ones)?, m2.apply(&ones)?);
        let u1 = ((x.as_tensor() * &d1)?.matmul(&a1.as_tensor().t()?)? * 2.0)?;
        let u2 = (x.as_tensor() * &d2)?
            .matmul(&a2.as_tensor().t()?)?
            .broadcast_mul(&(&gate * 0.5)?)?;
        let y = Tensor::cat(
            &[
                u1.matmul(&b1.as_tensor().t()?)?,
                u2.matmul(&b2.as_tensor().t()?)?,
            ],
            D::Minus1,
        )?;
        let dy = Tensor::randn(0f64, 1.0, (n, 9), &dev)?;
        let g = (&y * &dy)?.sum_all()?.backward()?;
        // Fused.
        let xd = x.as_tensor().detach();
        let u = down(&xd, &ads)?;
        assert!(max_diff(&u, &Tensor::cat(&[&u1, &u2], 1)?) < 1e-12);
        let du = up_backward(&dy, &ads)?;
        let buf = Tensor::zeros(2 * inp + 3 * 2 + 4 * inp + 6 * 4, DType::F64, &dev)?;
        let slots = [
            GradSlots { a: 0, b: 2 * inp },
            GradSlots {
                a: 2 * inp + 6,
                b: 6 * inp + 6,
            },
        ];
        grads(&buf, &slots, &dy, &u, &du, &xd, &ads)?;
        let piece = |off: usize, shape: (usize, usize)| {
            buf.narrow(0, off, shape.0 * shape.1)
                .unwrap()
                .reshape(shape)
                .unwrap()
        };
        for (name, got, var) in [
            ("A1", piece(0, (2, inp)), &a1),
            ("B1", piece(2 * inp, (3, 2)), &b1),
            ("A2", piece(2 * inp + 6, (4, inp)), &a2),
            ("B2", piece(6 * inp + 6, (6, 4)), &b2),
        ] {
            let d = max_diff(&got, g.get(var.as_tensor()).unwrap());
            assert!(d < 1e-10, "{name}: {d}");
        }
        // The input gradient through both adapters.
        let (hdu, held) = (hold(&du), HeldAdapters::new(&ads));
        let cads = held.cpu::<f64>()?;
        let du_v = hdu.cpu::<f64>()?;
        let mut dx = vec![0f64; n * inp];
        let mut tmp = vec![];
        for row in 0..n {
            dx_row(
                row,
                &du_v[row * 6..(row + 1) * 6],
                &cads,
                &mut dx[row * inp..(row + 1) * inp],
                &mut tmp,
            );
        }
        let dx = Tensor::from_vec(dx, (n, inp), &dev)?;
        assert!(max_diff(&dx, g.get(x.as_tensor()).unwrap()) < 1e-10);
        Ok(())
    }
}
