//! The plain descriptions the kernels take: the operands and the geometry of one launch. The
//! kernels' Rust side (the CPU twins, in each kernel's file) and their CUDA side (`cuda`) both
//! read them, so they sit below both.

use super::dropout::DropoutMask;
use candle_core::{Layout, Result, Tensor};

// ---- gemm ------------------------------------------------------------------------------------

/// A rank-2 or rank-3 (batched) strided matrix view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct MatView {
    pub batch: usize,
    pub rows: usize,
    pub cols: usize,
    /// Element strides (batch, row, column).
    pub bs: usize,
    pub rs: usize,
    pub cs: usize,
}

impl MatView {
    pub fn of(l: &Layout) -> Result<Self> {
        let (d, s) = (l.dims(), l.stride());
        Ok(match d.len() {
            2 => MatView {
                batch: 1,
                rows: d[0],
                cols: d[1],
                bs: 0,
                rs: s[0],
                cs: s[1],
            },
            3 => MatView {
                batch: d[0],
                rows: d[1],
                cols: d[2],
                bs: s[0],
                rs: s[1],
                cs: s[2],
            },
            n => candle_core::bail!("mo-align gemm: operands have rank 2 or 3, got {n}"),
        })
    }
}

// ---- LoRA groups -----------------------------------------------------------------------------

/// One adapter of a group.
#[derive(Clone, Copy)]
pub struct Adapter<'a> {
    /// [r, in], f32 (f64 for an f64 model).
    pub a: &'a Tensor,
    /// [out, r]
    pub b: &'a Tensor,
    pub scale: f64,
    /// Per-rank gates [r] (a weight-conditioned adapter), multiplied into the scale.
    pub gate: Option<&'a Tensor>,
    pub dropout: Option<DropoutMask>,
    /// This adapter's first column in the group's output (e.g. k_proj's after q_proj's).
    pub out_offset: usize,
    /// This adapter's first column in the group's [n, sum r] intermediate.
    pub u_offset: usize,
}

impl Adapter<'_> {
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
    pub fn in_features(&self) -> usize {
        self.a.dims()[1]
    }
    pub fn out_features(&self) -> usize {
        self.b.dims()[0]
    }
}

/// Where an adapter's gradients go in the flat gradient buffer (element offsets).
#[derive(Clone, Copy, Debug)]
pub struct GradSlots {
    pub a: usize,
    pub b: usize,
}

/// A group's intermediate (u or du) and its adapters, as the kernels take them.
pub type GroupRef<'a> = (&'a Tensor, &'a [Adapter<'a>]);

/// Total rank of a group.
pub(crate) fn total_rank(adapters: &[Adapter]) -> usize {
    adapters
        .iter()
        .map(|a| a.u_offset + a.rank())
        .max()
        .unwrap_or(0)
}

// ---- epilogues -------------------------------------------------------------------------------

/// What the residual epilogue adds to the stream: a projection's GEMM output, its bias, and its
/// adapters' up-projection `u B^T`.
#[derive(Clone, Copy)]
pub struct Projection<'a> {
    /// [n, H] GEMM output.
    pub y: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    /// The adapters' [n, sum r] intermediate and the adapters (empty when none).
    pub u: Option<&'a Tensor>,
    pub adapters: &'a [Adapter<'a>],
}

/// The MLP's gate|up output [n, 2I] and its adapters (gate at column 0, up at I).
#[derive(Clone, Copy)]
pub struct GateUp<'a> {
    pub y: &'a Tensor,
    pub lora: Option<(&'a Tensor, &'a [Adapter<'a>])>,
}

/// The attention geometry and the epilogue's parameters.
#[derive(Clone, Copy)]
pub struct QkvSpec<'a> {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub bias: Option<&'a Tensor>,
    /// The adapters' [n, sum r] intermediate and the adapters (out offsets 0, q, q + kv).
    pub lora: Option<(&'a Tensor, &'a [Adapter<'a>])>,
    /// Qwen3's per-head norms of queries and keys, with their epsilon.
    pub qk_norm: Option<(&'a Tensor, &'a Tensor, f64)>,
    /// cos / sin tables [max positions, head_dim / 2] in the compute dtype.
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    /// [B, T] u32 rotary positions.
    pub positions: &'a Tensor,
}

impl QkvSpec<'_> {
    /// Output features of the fused projection: queries, keys, values.
    pub fn width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }
}

// ---- attention -------------------------------------------------------------------------------

/// Shapes: q [B, nh, T, d], k/v [B, nkv, Tk, d] (contiguous), output [B, T, nh * d].
#[derive(Clone, Copy)]
pub struct AttnSpec<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    /// [B, 4] u32 (`RowSpan::flatten`).
    pub spans: &'a Tensor,
    /// Keys before the first query (a KV cache's length).
    pub past: usize,
}
