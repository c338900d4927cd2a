//! RMSNorm and the residual epilogue, forward and backward, one row per thread block (CUDA) or
//! per task (CPU).
//!
//!   forward    xhat = x / sqrt(mean(x^2) + eps),  y = w * xhat
//!   backward   g = dy * w,  dx = (g - xhat * mean(g * xhat)) / sqrt(mean(x^2) + eps)
//! The residual epilogue closes an attention or MLP block: it adds the block's projection (its
//! GEMM output, bias and LoRA up-projection) to the residual stream and normalises the sum for
//! the next block, writing both, so no separate add, norm or LoRA kernel runs. The backward
//! recomputes the row statistics from the saved input instead of keeping them.

use super::cpu::{hold, Real};
use super::lora::{dx_row, up_row, HeldAdapters};
use super::spec::{Adapter, Projection};
use super::{nbytes, produce, Produce};
use candle_core::{CpuStorage, DType, Result, Shape, Tensor};
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};

/// 1 / sqrt(mean(x^2) + eps) of one row.
#[inline]
pub(crate) fn inv_rms<T: Real>(x: &[T], eps: f64) -> T {
    let ss: T = x.iter().map(|&v| v * v).sum();
    T::one() / (ss / T::of(x.len() as f64) + T::of(eps)).sqrt()
}

/// `y = w * xhat` of one row.
#[inline]
pub(crate) fn norm_row<T: Real>(x: &[T], w: &[T], eps: f64, y: &mut [T]) {
    let inv = inv_rms(x, eps);
    for ((o, &v), &s) in y.iter_mut().zip(x).zip(w) {
        *o = v * inv * s;
    }
}

/// dx of one row (added into `dx`), given the gradient `dy` at the norm's output.
#[inline]
pub(crate) fn norm_backward_row<T: Real>(x: &[T], w: &[T], eps: f64, dy: &[T], dx: &mut [T]) {
    let inv = inv_rms(x, eps);
    let h = T::of(x.len() as f64);
    let proj: T = dy
        .iter()
        .zip(w)
        .zip(x)
        .map(|((&g, &s), &v)| g * s * (v * inv))
        .sum::<T>()
        / h;
    for (((d, &g), &s), &v) in dx.iter_mut().zip(dy).zip(w).zip(x) {
        *d += (g * s - v * inv * proj) * inv;
    }
}

struct Forward<'a> {
    x: &'a Tensor,
    w: &'a Tensor,
    eps: f64,
    add: Option<Projection<'a>>,
    n: usize,
    h: usize,
}

impl Produce for Forward<'_> {
    fn name(&self) -> &'static str {
        if self.add.is_some() {
            "mo-residual-norm"
        } else {
            "mo-rms-norm"
        }
    }
    fn output(&self) -> (Shape, DType) {
        let parts = if self.add.is_some() { 2 } else { 1 };
        (Shape::from((parts, self.n, self.h)), self.x.dtype())
    }
    fn bytes(&self) -> u64 {
        let rows = if self.add.is_some() { 4 } else { 2 };
        nbytes(rows * self.n * self.h, self.x.dtype())
    }
    fn cpu(&self) -> Result<CpuStorage> {
        let (hx, hw) = (hold(self.x), hold(self.w));
        let add = self.add.map(|p| {
            (
                hold(p.y),
                p.bias.map(hold),
                p.u.map(hold),
                HeldAdapters::new(p.adapters),
            )
        });
        let (n, h, eps) = (self.n, self.h, self.eps);
        crate::with_real!(self.x.dtype(), T => {
            let x = &hx.cpu::<T>()?[..n * h];
            let w = &hw.cpu::<T>()?[..h];
            let Some((hy, hb, hu, held)) = &add else {
                let mut out = vec![T::zero(); n * h];
                super::cpu::for_rows(&mut out, h, n * h * 4, || (), |_, r, y| {
                    norm_row(&x[r * h..(r + 1) * h], w, eps, y)
                });
                return Ok(T::wrap(out));
            };
            let ads = held.cpu::<T>()?;
            let y = &hy.cpu::<T>()?[..n * h];
            let bias = match hb { Some(b) => Some(&b.cpu::<T>()?[..h]), None => None };
            let sum_r = super::lora::cpu_total_rank(&ads);
            let u = match hu {
                Some(u) if sum_r > 0 => &u.cpu::<T>()?[..n * sum_r],
                _ => &[][..],
            };
            let mut out = vec![T::zero(); 2 * n * h];
            let normed_ptr = super::cpu::SendPtr(out[n * h..].as_mut_ptr());
            super::cpu::for_rows(&mut out[..n * h], h, n * h * (6 + 2 * sum_r), || vec![T::zero(); h], |lora, r, xo| {
                    // SAFETY: row r of the normalised half belongs to this call.
                    let yo = unsafe { normed_ptr.slice_mut(r * h, h) };
                    // The projection (GEMM + bias + adapters), then the residual add.
                    xo.copy_from_slice(&y[r * h..(r + 1) * h]);
                    if let Some(b) = bias {
                        for (o, &v) in xo.iter_mut().zip(b) { *o += v; }
                    }
                    if sum_r > 0 {
                        lora.fill(T::zero());
                        up_row(&u[r * sum_r..(r + 1) * sum_r], &ads, lora);
                        for (o, &v) in xo.iter_mut().zip(lora.iter()) { *o += v; }
                    }
                    for (o, &v) in xo.iter_mut().zip(&x[r * h..(r + 1) * h]) { *o += v; }
                    norm_row(xo, w, eps, yo);
                });
            Ok(T::wrap(out))
        })
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, dev: &candle_core::CudaDevice) -> Result<candle_core::CudaStorage> {
        super::cuda::norm_forward(
            dev,
            self.x,
            self.w,
            self.eps,
            self.add.as_ref(),
            self.n,
            self.h,
        )
    }
}

/// `w * xhat` of every row of `x` [n, H] (contiguous).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let h = w.elem_count();
    let n = x.elem_count() / h;
    let k = Forward {
        x,
        w,
        eps,
        add: None,
        n,
        h,
    };
    produce(&k, x)?.reshape(x.dims())
}

/// The residual epilogue: returns `[2, n, H]`, row 0 the new residual `x + proj`, row 1 its
/// normalisation `w * xhat` (the next block's input).
pub fn residual_norm(x: &Tensor, proj: Projection, w: &Tensor, eps: f64) -> Result<Tensor> {
    let h = w.elem_count();
    let n = x.elem_count() / h;
    let k = Forward {
        x,
        w,
        eps,
        add: Some(proj),
        n,
        h,
    };
    produce(&k, x)
}

struct Backward<'a> {
    dy: &'a Tensor,
    x: &'a Tensor,
    w: &'a Tensor,
    eps: f64,
    residual: Option<&'a Tensor>,
    lora: Option<(&'a Tensor, &'a [Adapter<'a>])>,
    n: usize,
    h: usize,
}

impl Produce for Backward<'_> {
    fn name(&self) -> &'static str {
        "mo-rms-norm-backward"
    }
    fn output(&self) -> (Shape, DType) {
        (Shape::from((self.n, self.h)), self.x.dtype())
    }
    fn bytes(&self) -> u64 {
        let rows = 3 + self.residual.is_some() as usize;
        nbytes(rows * self.n * self.h, self.x.dtype())
    }
    fn cpu(&self) -> Result<CpuStorage> {
        let (hdy, hx, hw) = (hold(self.dy), hold(self.x), hold(self.w));
        let hr = self.residual.map(hold);
        let lora = self
            .lora
            .map(|(du, ads)| (hold(du), HeldAdapters::new(ads)));
        let (n, h, eps) = (self.n, self.h, self.eps);
        crate::with_real!(self.x.dtype(), T => {
            let (dy, x, w) = (&hdy.cpu::<T>()?[..n * h], &hx.cpu::<T>()?[..n * h], &hw.cpu::<T>()?[..h]);
            let res = match &hr { Some(r) => Some(&r.cpu::<T>()?[..n * h]), None => None };
            let lora = match &lora {
                Some((du, held)) => {
                    let ads = held.cpu::<T>()?;
                    let sum_r = super::lora::cpu_total_rank(&ads);
                    Some((&du.cpu::<T>()?[..n * sum_r], ads, sum_r))
                }
                None => None,
            };
            let mut out = vec![T::zero(); n * h];
            let lora_work = lora.as_ref().map_or(0, |l| l.2 * 2);
            super::cpu::for_rows(
                &mut out,
                h,
                n * h * (8 + lora_work),
                || (vec![T::zero(); h], vec![]),
                |(g, tmp), r, dx| {
                    g.copy_from_slice(&dy[r * h..(r + 1) * h]);
                    if let Some((du, ads, sum_r)) = &lora {
                        let sum_r = *sum_r;
                        dx_row(r, &du[r * sum_r..(r + 1) * sum_r], ads, g, tmp);
                    }
                    if let Some(res) = res {
                        dx.copy_from_slice(&res[r * h..(r + 1) * h]);
                    }
                    norm_backward_row(&x[r * h..(r + 1) * h], w, eps, g, dx);
                },
            );
            Ok(T::wrap(out))
        })
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, dev: &candle_core::CudaDevice) -> Result<candle_core::CudaStorage> {
        super::cuda::norm_backward(
            dev,
            self.dy,
            self.x,
            self.w,
            self.eps,
            self.residual,
            self.lora,
            self.n,
            self.h,
        )
    }
}

/// The gradient at a norm's input `x` [n, H]: `residual + norm_backward(dy + lora)`, where `dy`
/// is the gradient at the norm's output from the base projections, `lora` = (du, adapters)
/// adds the adapters' input gradient `sum_i drop_i(du_i A_i)` to it, and `residual` is the
/// gradient reaching `x` along the residual stream.
pub fn norm_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    residual: Option<&Tensor>,
    lora: Option<(&Tensor, &[Adapter])>,
) -> Result<Tensor> {
    let h = w.elem_count();
    let n = x.elem_count() / h;
    let k = Backward {
        dy,
        x,
        w,
        eps,
        residual,
        lora,
        n,
        h,
    };
    produce(&k, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_diff;
    use candle_core::{Device, Var, D};

    fn plain_norm(x: &Tensor, w: &Tensor) -> Tensor {
        x.broadcast_div(
            &(x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-6)
                .unwrap()
                .sqrt()
                .unwrap(),
        )
        .unwrap()
        .broadcast_mul(w)
        .unwrap()
    }

    #[test]
    fn residual_epilogue_and_backward_match_autograd() -> Result<()> {
        let dev = Device::Cpu;
        let (n, h) = (4, 6);
        let x = Var::randn(0f64, 1.0, (n, h), &dev)?;
        let y = Var::randn(0f64, 1.0, (n, h), &dev)?;
        let w = Tensor::randn(0f64, 1.0, h, &dev)?;
        let bias = Tensor::randn(0f64, 1.0, h, &dev)?;
        let u = Tensor::randn(0f64, 1.0, (n, 3), &dev)?;
        let (a, b) = (
            Tensor::randn(0f64, 1.0, (3, 5), &dev)?,
            Tensor::randn(0f64, 1.0, (h, 3), &dev)?,
        );
        let ad = [Adapter {
            a: &a,
            b: &b,
            scale: 1.0,
            gate: None,
            dropout: None,
            out_offset: 0,
            u_offset: 0,
        }];
        let proj = Projection {
            y: y.as_tensor(),
            bias: Some(&bias),
            u: Some(&u),
            adapters: &ad,
        };
        let out = residual_norm(
            &x.as_tensor().detach(),
            Projection {
                y: &y.as_tensor().detach(),
                ..proj
            },
            &w,
            1e-6,
        )?;
        let res = (x.as_tensor() + (y.as_tensor().broadcast_add(&bias)? + u.matmul(&b.t()?)?)?)?;
        let normed = plain_norm(&res, &w);
        assert!(max_diff(&out.get(0)?, &res) < 1e-12);
        assert!(max_diff(&out.get(1)?, &normed) < 1e-12);
        // Backward: a gradient at the norm output plus one along the residual.
        let (dn, dr) = (
            Tensor::randn(0f64, 1.0, (n, h), &dev)?,
            Tensor::randn(0f64, 1.0, (n, h), &dev)?,
        );
        let g = ((&normed * &dn)?.sum_all()? + (&res * &dr)?.sum_all()?)?.backward()?;
        let dx = norm_backward(&dn, &out.get(0)?, &w, 1e-6, Some(&dr), None)?;
        assert!(max_diff(&dx, g.get(x.as_tensor()).unwrap()) < 1e-10);
        assert!(
            max_diff(
                &rms_norm(&x.as_tensor().detach(), &w, 1e-6)?,
                &plain_norm(x.as_tensor(), &w)
            ) < 1e-12
        );
        Ok(())
    }
}
