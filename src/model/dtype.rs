//! The dtypes a model computes in, and the names users write for them.

use anyhow::{bail, Result};
use candle_core::DType;

/// The dtype reductions (norms, softmax, log-softmax) run in: f32, or f64 for an f64 model
/// (finite-difference tests).
pub fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The dtype of the residual stream between blocks: the model dtype, except f32 under f16.
/// Qwen2.5 carries a few activation channels in the thousands; added up layer after layer in
/// f16 (max 65504) they overflow to inf. bf16 has f32's range, so bf16 keeps its residual in
/// bf16 as transformers does.
pub fn residual_dtype(dtype: DType) -> DType {
    if dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    }
}

/// Parses the `--dtype` / `train.dtype` names users write.
pub fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        "f64" | "float64" => DType::F64,
        other => bail!("unknown dtype `{other}` (expected f32, bf16 or f16)"),
    })
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "other",
    }
}
