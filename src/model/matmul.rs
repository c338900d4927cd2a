//! The one matmul every model, LM-head, LoRA and fused-backward product goes through, and the
//! layout guard that makes CPU runs fail where the GPU would.
//!
//! Candle's CPU matmul (the `gemm` crate) accepts any strides; its CUDA matmul hands both
//! operands to cuBLAS as (transposed or not) matrices with a leading dimension equal to one of
//! their dims, and refuses everything else with `MatMulNonContiguous`
//! (`candle-core/src/cuda_backend/mod.rs`, `gemm_config`). A column slice of a row-major matrix
//! (`probs.narrow(1, ..)`) or a gradient arriving transposed is fine on the CPU and an error on
//! the first CUDA step. `check_cublas_layout` restates candle's rule; `matmul` applies it to
//! every product when the guard is on, so the CPU test suite (debug builds: always on) finds
//! such layouts without a GPU.

use candle_core::{Layout, Result, Tensor};

static GUARD: crate::util::switch::EnvSwitch =
    crate::util::switch::EnvSwitch::new("MO_ALIGN_LAYOUT_GUARD");

/// Whether `matmul` checks layouts on the CPU: on in debug builds (every `cargo test`), or with
/// `MO_ALIGN_LAYOUT_GUARD=1`, or after `set_layout_guard(true)`. CUDA tensors are always checked
/// (a clear error naming the call site instead of candle's).
pub fn layout_guard_enabled() -> bool {
    GUARD.get(cfg!(debug_assertions))
}

/// Turns the guard on or off for the whole process (tests built in release mode turn it on).
pub fn set_layout_guard(on: bool) {
    GUARD.set(on);
}

/// candle 0.11.1's cuBLAS rule for `lhs [.., m, k] @ rhs [.., k, n]`:
/// `Ok` exactly when its CUDA `gemm_config` accepts the two layouts.
pub fn check_cublas_layout(
    lhs: &Layout,
    rhs: &Layout,
    (m, n, k): (usize, usize, usize),
) -> std::result::Result<(), String> {
    let (ls, rs) = (lhs.stride(), rhs.stride());
    if ls.len() < 2 || rs.len() < 2 {
        return Err("operands need at least two dimensions".into());
    }
    let (rhs_m1, rhs_m2) = (rs[rs.len() - 1], rs[rs.len() - 2]);
    let (lhs_m1, lhs_m2) = (ls[ls.len() - 1], ls[ls.len() - 2]);
    // rhs [k, n]: row-major with row stride n, or column-major with column stride k.
    let rhs_ok = ((rhs_m1 == 1 || n == 1) && (rhs_m2 == n || k == 1))
        || ((rhs_m1 == k || n == 1) && (rhs_m2 == 1 || k == 1));
    // lhs [m, k]: row-major with row stride k, or column-major with column stride m.
    let lhs_ok = ((lhs_m1 == 1 || k == 1) && (lhs_m2 == k || m == 1))
        || ((lhs_m1 == m || k == 1) && (lhs_m2 == 1 || m == 1));
    // Batch axes: at most two, collapsible into one batch stride.
    let batch_ok = |l: &Layout| {
        let (s, d) = (l.stride(), l.dims());
        match &s[..s.len() - 2] {
            [s1, stride] => *s1 == stride * d[1] || d[0] == 1 || d[1] == 1,
            [_] | [] => true,
            _ => false,
        }
    };
    let mut problems = vec![];
    if !lhs_ok {
        problems.push(format!(
            "lhs dims {:?} strides {:?} is neither row- nor column-major",
            lhs.dims(),
            ls
        ));
    }
    if !rhs_ok {
        problems.push(format!(
            "rhs dims {:?} strides {:?} is neither row- nor column-major",
            rhs.dims(),
            rs
        ));
    }
    if !batch_ok(lhs) || !batch_ok(rhs) {
        problems.push(format!(
            "batch strides lhs {:?} / rhs {:?} are not one uniform batch stride",
            ls, rs
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// `a @ b` (same rank, same batch dims), with the layout check when the guard is on or the
/// operands live on a GPU. The error names the caller's file and line.
#[track_caller]
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if layout_guard_enabled() || a.device().is_cuda() {
        let site = std::panic::Location::caller();
        let (ad, bd) = (a.dims(), b.dims());
        if ad.len() >= 2 && ad.len() == bd.len() {
            let r = ad.len();
            let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
            let batch: usize = ad[..r - 2].iter().product();
            if batch * m * n > 0 && k > 0 {
                if let Err(why) = check_cublas_layout(a.layout(), b.layout(), (m, n, k)) {
                    candle_core::bail!(
                        "matmul at {}:{}: layout cuBLAS would refuse: {why}",
                        site.file(),
                        site.line()
                    );
                }
            }
        }
    }
    a.matmul(b)
}

/// `a @ b^T` for row-major `b` [.., n, k]: the transposed view is column-major, which cuBLAS
/// takes as is (no copy).
#[track_caller]
pub fn matmul_t(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul(a, &b.t()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn the_rule_accepts_plain_and_transposed_operands_and_refuses_column_slices() -> Result<()> {
        set_layout_guard(true);
        let dev = Device::Cpu;
        let a = Tensor::zeros((4, 6), candle_core::DType::F32, &dev)?;
        let w = Tensor::zeros((5, 6), candle_core::DType::F32, &dev)?;
        assert!(matmul_t(&a, &w).is_ok());
        assert!(matmul(&a.t()?, &a).is_ok());
        // A row slice keeps the row stride equal to the column count: fine.
        assert!(matmul(&a.narrow(0, 1, 2)?, &w.t()?).is_ok());
        // A column slice keeps the parent's row stride: cuBLAS (as candle calls it) refuses.
        let wide = Tensor::zeros((4, 12), candle_core::DType::F32, &dev)?;
        let err = matmul(&wide.narrow(1, 0, 6)?, &w.t()?).unwrap_err();
        assert!(err.to_string().contains("matmul.rs"), "{err}");
        assert!(matmul(&wide.narrow(1, 0, 6)?.contiguous()?, &w.t()?).is_ok());
        // Batched: a transposed batch axis has no single batch stride.
        let q = Tensor::zeros((2, 3, 4, 6), candle_core::DType::F32, &dev)?;
        let k = Tensor::zeros((3, 2, 6, 4), candle_core::DType::F32, &dev)?;
        assert!(matmul(&q, &k.transpose(0, 1)?).is_err());
        assert!(matmul(&q, &k.transpose(0, 1)?.contiguous()?).is_ok());
        Ok(())
    }
}
