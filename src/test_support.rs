//! Helpers shared by the unit tests.

use candle_core::{DType, Tensor};

/// The largest absolute difference between two tensors of one shape, as f64.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64))
        .and_then(|d| d.to_scalar::<f64>())
        .expect("same shapes")
}
