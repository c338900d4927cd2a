//! Matrix products over strided views: `dst = a @ b` into a new buffer, or `dst += alpha a @ b`
//! into a view of an existing one (a column block of a wider activation, a parameter's slice of
//! the flat gradient buffer). One cuBLAS call on CUDA, one `gemm` crate call (per batch entry)
//! on the CPU; no operand is copied first.
//!
//! Candle's own matmul allocates and zero-fills its output, refuses column slices on CUDA and
//! cannot accumulate; these three costs are what a fused step avoids.

use super::cpu::{hold, Real};
use super::spec::MatView;
use super::{nbytes, produce, update, Produce, Update};
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
#[allow(unused_imports)]
use num_traits::{Float as _, One as _, Zero as _};

/// The product's shape: (batch, m, n, k) after checking the operands agree.
fn product_dims(a: &MatView, b: &MatView) -> Result<(usize, usize, usize, usize)> {
    if a.cols != b.rows || (a.batch != b.batch && b.batch != 1 && a.batch != 1) {
        candle_core::bail!(
            "mo-align gemm: [{}x{}x{}] @ [{}x{}x{}] do not fit",
            a.batch,
            a.rows,
            a.cols,
            b.batch,
            b.rows,
            b.cols
        );
    }
    Ok((a.batch.max(b.batch), a.rows, b.cols, a.cols))
}

/// The CPU product `dst = (accumulate ? dst : 0) + alpha * a @ b` on raw slices (each starting
/// at its view's first element), batch by batch; `parallel` lets gemm use the thread pool.
/// Exposed for the twins that multiply tiles inside a parallel loop of their own.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cpu_gemm<T: Real>(
    dst: &mut [T],
    d: &MatView,
    a: &[T],
    av: &MatView,
    b: &[T],
    bv: &MatView,
    alpha: T,
    accumulate: bool,
    parallel: bool,
) {
    let (batch, m, n, k) = (d.batch, d.rows, d.cols, av.cols);
    if m == 0 || n == 0 {
        return;
    }
    let threads = crate::util::cpu::threads();
    let par = if parallel && threads > 1 && m * n * k > 1 << 15 {
        ::gemm::Parallelism::Rayon(threads)
    } else {
        ::gemm::Parallelism::None
    };
    for i in 0..batch {
        let (ao, bo) = (
            if av.batch == 1 { 0 } else { i * av.bs },
            if bv.batch == 1 { 0 } else { i * bv.bs },
        );
        let dptr = dst[i * d.bs..].as_mut_ptr();
        if k == 0 {
            if !accumulate {
                for r in 0..m {
                    for c in 0..n {
                        // SAFETY: inside the destination view.
                        unsafe { *dptr.add(r * d.rs + c * d.cs) = T::zero() };
                    }
                }
            }
            continue;
        }
        // SAFETY: the views lie inside their slices (checked by the callers' layouts), and
        // gemm reads lhs/rhs and writes dst through the given strides only.
        unsafe {
            ::gemm::gemm(
                m,
                n,
                k,
                dptr,
                d.cs as isize,
                d.rs as isize,
                accumulate,
                a[ao..].as_ptr(),
                av.cs as isize,
                av.rs as isize,
                b[bo..].as_ptr(),
                bv.cs as isize,
                bv.rs as isize,
                T::one(),
                alpha,
                false,
                false,
                false,
                par,
            )
        }
    }
}

/// `a @ b` (optionally times `alpha`) into a new contiguous tensor of `out_dtype`.
struct NewProduct<'a> {
    a: &'a Tensor,
    b: &'a Tensor,
    alpha: f64,
    out_dtype: DType,
    shape: Shape,
}

impl Produce for NewProduct<'_> {
    fn name(&self) -> &'static str {
        "mo-gemm"
    }
    fn output(&self) -> (Shape, DType) {
        (self.shape.clone(), self.out_dtype)
    }
    fn bytes(&self) -> u64 {
        nbytes(self.a.elem_count(), self.a.dtype())
            + nbytes(self.b.elem_count(), self.b.dtype())
            + nbytes(self.shape.elem_count(), self.out_dtype)
    }
    fn cpu(&self) -> Result<CpuStorage> {
        let (ha, hb) = (hold(self.a), hold(self.b));
        let (av, bv) = (MatView::of(ha.layout)?, MatView::of(hb.layout)?);
        let (batch, m, n, _) = product_dims(&av, &bv)?;
        if self.out_dtype != self.a.dtype() || self.a.dtype() != self.b.dtype() {
            candle_core::bail!("mo-align gemm: the CPU multiplies one dtype");
        }
        let d = MatView {
            batch,
            rows: m,
            cols: n,
            bs: m * n,
            rs: n,
            cs: 1,
        };
        crate::with_real!(self.a.dtype(), T => {
            let mut out = vec![T::zero(); batch * m * n];
            cpu_gemm(&mut out, &d, ha.cpu::<T>()?, &av, hb.cpu::<T>()?, &bv, T::of(self.alpha), false, true);
            Ok(T::wrap(out))
        })
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, dev: &candle_core::CudaDevice) -> Result<candle_core::CudaStorage> {
        let (ha, hb) = (hold(self.a), hold(self.b));
        let (av, bv) = (MatView::of(ha.layout)?, MatView::of(hb.layout)?);
        let (batch, m, n, _) = product_dims(&av, &bv)?;
        let d = MatView {
            batch,
            rows: m,
            cols: n,
            bs: m * n,
            rs: n,
            cs: 1,
        };
        let mut out = super::alloc(dev, self.out_dtype, batch * m * n)?;
        super::cuda::gemm(dev, &mut out, 0, &d, &ha, &av, &hb, &bv, self.alpha, false)?;
        Ok(out)
    }
}

/// `dst += alpha * a @ b` (or `dst = alpha * a @ b` without `accumulate`), dst a view.
struct IntoProduct<'a> {
    a: &'a Tensor,
    b: &'a Tensor,
    alpha: f64,
    accumulate: bool,
    dst_elems: usize,
    dst_dtype: DType,
}

impl Update for IntoProduct<'_> {
    fn name(&self) -> &'static str {
        "mo-gemm-into"
    }
    fn bytes(&self) -> u64 {
        nbytes(self.a.elem_count(), self.a.dtype())
            + nbytes(self.b.elem_count(), self.b.dtype())
            + nbytes(self.dst_elems, self.dst_dtype) * (1 + self.accumulate as u64)
    }
    fn cpu(&self, dst: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (ha, hb) = (hold(self.a), hold(self.b));
        let (av, bv, d) = (
            MatView::of(ha.layout)?,
            MatView::of(hb.layout)?,
            MatView::of(l)?,
        );
        let (batch, m, n, _) = product_dims(&av, &bv)?;
        if (batch, m, n) != (d.batch, d.rows, d.cols) {
            candle_core::bail!("mo-align gemm: destination {d:?} for a {batch}x{m}x{n} product");
        }
        crate::with_real!(self.a.dtype(), T => {
            let out = &mut T::slice_mut(dst)?[l.start_offset()..];
            cpu_gemm(out, &d, ha.cpu::<T>()?, &av, hb.cpu::<T>()?, &bv, T::of(self.alpha), self.accumulate, true);
            Ok(())
        })
    }
    #[cfg(feature = "cuda")]
    fn cuda(&self, dst: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        let (ha, hb) = (hold(self.a), hold(self.b));
        let (av, bv, d) = (
            MatView::of(ha.layout)?,
            MatView::of(hb.layout)?,
            MatView::of(l)?,
        );
        let (batch, m, n, _) = product_dims(&av, &bv)?;
        if (batch, m, n) != (d.batch, d.rows, d.cols) {
            candle_core::bail!("mo-align gemm: destination {d:?} for a {batch}x{m}x{n} product");
        }
        let dev = dst.device.clone();
        super::cuda::gemm(
            &dev,
            dst,
            l.start_offset(),
            &d,
            &ha,
            &av,
            &hb,
            &bv,
            self.alpha,
            self.accumulate,
        )
    }
}

fn out_shape(a: &Tensor, b: &Tensor) -> Result<Shape> {
    let (av, bv) = (MatView::of(a.layout())?, MatView::of(b.layout())?);
    let (batch, m, n, _) = product_dims(&av, &bv)?;
    Ok(if a.rank() == 3 || b.rank() == 3 {
        Shape::from((batch, m, n))
    } else {
        Shape::from((m, n))
    })
}

/// `a @ b` for 2-D or batched 3-D views of any strides (one of each view's two strides must be
/// 1 on CUDA), into a new contiguous tensor of a's dtype.
pub fn mm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    mm_scaled(a, b, 1.0, a.dtype())
}

/// `alpha * a @ b` into a new tensor of `out_dtype` (on the CPU: a's dtype).
pub fn mm_scaled(a: &Tensor, b: &Tensor, alpha: f64, out_dtype: DType) -> Result<Tensor> {
    let k = NewProduct {
        a,
        b,
        alpha,
        out_dtype,
        shape: out_shape(a, b)?,
    };
    produce(&k, a)
}

/// `dst += alpha * a @ b` where `dst` is a view (a column block, a slice of a flat buffer).
pub fn mm_acc(dst: &Tensor, a: &Tensor, b: &Tensor, alpha: f64) -> Result<()> {
    into(dst, a, b, alpha, true)
}

/// `dst = alpha * a @ b` into a view.
pub fn mm_into(dst: &Tensor, a: &Tensor, b: &Tensor, alpha: f64) -> Result<()> {
    into(dst, a, b, alpha, false)
}

fn into(dst: &Tensor, a: &Tensor, b: &Tensor, alpha: f64, accumulate: bool) -> Result<()> {
    let k = IntoProduct {
        a,
        b,
        alpha,
        accumulate,
        dst_elems: dst.elem_count(),
        dst_dtype: dst.dtype(),
    };
    update(&k, dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_diff;
    use candle_core::Device;

    #[test]
    fn products_of_strided_views_match_candle() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (7, 12), &dev)?;
        let w = Tensor::randn(0f64, 1.0, (5, 9), &dev)?;
        // A column block of x times a transposed row block of w.
        let a = x.narrow(1, 3, 9)?;
        let b = w.t()?;
        let want = a.contiguous()?.matmul(&b.contiguous()?)?;
        assert!(max_diff(&mm(&a, &b)?, &want) < 1e-12);
        // Scaled, and accumulated into a column block of a wider buffer.
        let dst = Tensor::ones((7, 8), DType::F64, &dev)?;
        mm_acc(&dst.narrow(1, 2, 5)?, &a, &b, -0.5)?;
        let got = dst.narrow(1, 2, 5)?;
        assert!(max_diff(&got, &(&want * -0.5)?.affine(1.0, 1.0)?) < 1e-12);
        assert!(
            max_diff(
                &dst.narrow(1, 0, 2)?,
                &Tensor::ones((7, 2), DType::F64, &dev)?
            ) < 1e-15
        );
        mm_into(&dst.narrow(1, 2, 5)?, &a, &b, 2.0)?;
        assert!(max_diff(&dst.narrow(1, 2, 5)?, &(&want * 2.0)?) < 1e-12);
        // Batched, with a shared right operand.
        let q = Tensor::randn(0f64, 1.0, (3, 4, 6), &dev)?;
        let r = Tensor::randn(0f64, 1.0, (6, 2), &dev)?;
        let want = q.broadcast_matmul(&r)?;
        assert!(max_diff(&mm(&q, &r)?, &want) < 1e-12);
        Ok(())
    }
}
