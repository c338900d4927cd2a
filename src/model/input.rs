//! The model's input: token ids, rotary positions and which keys each query may attend to
//! (causal + padding, or any visibility rule), for training batches, packed preference pairs
//! and decoding.

use crate::kernels::attention::RowSpan;
use candle_core::{Device, Result, Tensor};

/// Which keys each query may attend to.
#[derive(Clone)]
pub enum AttentionMask {
    /// [B, 1, T, T_keys] f32: 0 where a query may attend, the most negative f32 elsewhere
    /// (finite, so a fully masked padding row gives a uniform softmax instead of NaN). Only for
    /// visibility rules that are not spans.
    Bias(Tensor),
    /// Per batch row, the visible keys as spans (causal, padding, packed pairs; see
    /// `kernels::attention::RowSpan`), with the spans also on the device as [B, 4] u32 for the
    /// fused kernels: 16 bytes per row instead of a [T, T_keys] bias.
    Spans {
        rows: Vec<RowSpan>,
        /// Keys before the first query (a KV cache's length).
        past: usize,
        device_rows: Tensor,
        /// The expanded bias of every query row, made once when the unfused attention asks.
        bias: std::sync::Arc<std::sync::OnceLock<Tensor>>,
    },
}

impl AttentionMask {
    /// Spans of `rows` after `past` cached keys.
    pub fn spans(rows: Vec<RowSpan>, past: usize, device: &Device) -> Result<Self> {
        let device_rows = Tensor::from_vec(RowSpan::flatten(&rows), (rows.len(), 4), device)?;
        Ok(AttentionMask::Spans {
            rows,
            past,
            device_rows,
            bias: Default::default(),
        })
    }

    /// The bias of query rows `start..start + len` against `keys` keys: [B, 1, len, keys]
    /// (the unfused attention's mask; spans are expanded on the host).
    pub fn rows(&self, start: usize, len: usize, keys: usize, device: &Device) -> Result<Tensor> {
        match self {
            AttentionMask::Bias(b) => b.narrow(2, start, len),
            // Whole blocks of rows are expanded once per input (every layer asks for them);
            // a long window's blocks are expanded as asked, never all at once.
            AttentionMask::Spans {
                rows, past, bias, ..
            } if start == 0 && rows.len() * (keys - past) * keys <= 1 << 26 => {
                if let Some(b) = bias.get().filter(|b| b.dim(3).ok() == Some(keys)) {
                    return b.narrow(2, 0, len);
                }
                let made = Self::expand(rows, *past, 0, keys - past, keys, device)?;
                let _ = bias.set(made.clone());
                made.narrow(2, 0, len)
            }
            AttentionMask::Spans { rows, past, .. } => {
                Self::expand(rows, *past, start, len, keys, device)
            }
        }
    }

    fn expand(
        rows: &[RowSpan],
        past: usize,
        start: usize,
        len: usize,
        keys: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let mut bias = vec![f32::MIN; rows.len() * len * keys];
        for (b, span) in rows.iter().enumerate() {
            for i in 0..len {
                let qi = past + start + i;
                let row = &mut bias[(b * len + i) * keys..(b * len + i + 1) * keys];
                for (j, v) in row.iter_mut().enumerate() {
                    if span.visible(qi, j) {
                        *v = 0.0;
                    }
                }
            }
        }
        Tensor::from_vec(bias, (rows.len(), 1, len, keys), device)
    }
}

/// Token ids with their positions and the attention mask.
#[derive(Clone)]
pub struct ModelInput {
    /// [B, T] u32
    pub ids: Tensor,
    /// [B, T] u32 rotary positions
    pub positions: Tensor,
    pub mask: AttentionMask,
    /// The largest position (the fused kernels index rotary tables by it, so it is checked
    /// against the model's on the host).
    pub max_position: u32,
}

impl ModelInput {
    /// Builds the input for queries `ids` appended after `past` cached keys.
    /// `key_valid[b]` covers past + current keys; query i sits at key index past + i.
    pub fn new(
        ids: &[Vec<u32>],
        positions: &[Vec<u32>],
        key_valid: &[Vec<bool>],
        device: &Device,
    ) -> Result<Self> {
        let b = ids.len();
        let t = ids.first().map_or(0, Vec::len);
        let tk = key_valid.first().map_or(0, Vec::len);
        let past = tk - t;
        let flat_ids: Vec<u32> = ids.iter().flatten().copied().collect();
        let flat_pos: Vec<u32> = positions.iter().flatten().copied().collect();
        let spans: Option<Vec<RowSpan>> = key_valid.iter().map(|v| contiguous_span(v)).collect();
        let mask = match spans {
            Some(rows) => AttentionMask::spans(rows, past, device)?,
            None => {
                let mut bias = vec![f32::MIN; b * t * tk];
                for (bi, valid) in key_valid.iter().enumerate() {
                    for i in 0..t {
                        let row = &mut bias[(bi * t + i) * tk..(bi * t + i + 1) * tk];
                        for (j, v) in row.iter_mut().enumerate().take(past + i + 1) {
                            if valid[j] {
                                *v = 0.0;
                            }
                        }
                    }
                }
                AttentionMask::Bias(Tensor::from_vec(bias, (b, 1, t, tk), device)?)
            }
        };
        Ok(Self {
            ids: Tensor::from_vec(flat_ids, (b, t), device)?,
            max_position: flat_pos.iter().copied().max().unwrap_or(0),
            positions: Tensor::from_vec(flat_pos, (b, t), device)?,
            mask,
        })
    }

    /// One sequence with an arbitrary visibility rule: query i may attend to key j when
    /// `visible(i, j)`.
    pub fn single(
        ids: Vec<u32>,
        positions: Vec<u32>,
        visible: impl Fn(usize, usize) -> bool,
        device: &Device,
    ) -> Result<Self> {
        let t = ids.len();
        let mut bias = vec![f32::MIN; t * t];
        for i in 0..t {
            for j in 0..t {
                if visible(i, j) {
                    bias[i * t + j] = 0.0;
                }
            }
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (1, t), device)?,
            max_position: positions.iter().copied().max().unwrap_or(0),
            positions: Tensor::from_vec(positions, (1, t), device)?,
            mask: AttentionMask::Bias(Tensor::from_vec(bias, (1, 1, t, t), device)?),
        })
    }

    /// A preference pair packed as `[prompt | chosen | rejected]`: the prompt runs once, each
    /// response attends to the prompt and to its own earlier tokens, and both responses continue
    /// the prompt's positions, so each response sees exactly what it would see alone.
    pub fn packed_pair(
        prompt: &[u32],
        chosen: &[u32],
        rejected: &[u32],
        device: &Device,
    ) -> Result<Self> {
        let (p, c, r) = (
            prompt.len() as u32,
            chosen.len() as u32,
            rejected.len() as u32,
        );
        let ids: Vec<u32> = prompt
            .iter()
            .chain(chosen)
            .chain(rejected)
            .copied()
            .collect();
        let positions: Vec<u32> = (0..p + c).chain(p..p + r).collect();
        let (p, c) = (p as usize, c as usize);
        let t = ids.len();
        let span = RowSpan {
            start: 0,
            end: t as u32,
            seg1: p as u32,
            seg2: (p + c) as u32,
        };
        Ok(Self {
            ids: Tensor::from_vec(ids, (1, t), device)?,
            max_position: positions.iter().copied().max().unwrap_or(0),
            positions: Tensor::from_vec(positions, (1, t), device)?,
            mask: AttentionMask::spans(vec![span], 0, device)?,
        })
    }

    /// Right-padded batch of whole sequences (training, scoring): positions 0..len.
    pub fn right_padded(seqs: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let ids: Vec<u32> = seqs
            .iter()
            .flat_map(|s| s.iter().copied().chain(std::iter::repeat(pad_id)).take(t))
            .collect();
        let positions: Vec<u32> = seqs.iter().flat_map(|_| 0..t as u32).collect();
        let spans = seqs.iter().map(|s| RowSpan::causal(s.len())).collect();
        Ok(Self {
            ids: Tensor::from_vec(ids, (seqs.len(), t), device)?,
            max_position: t.saturating_sub(1) as u32,
            positions: Tensor::from_vec(positions, (seqs.len(), t), device)?,
            mask: AttentionMask::spans(spans, 0, device)?,
        })
    }
}

/// The span of a row whose valid keys are one contiguous run (padding before and after it);
/// `None` when they are not.
fn contiguous_span(valid: &[bool]) -> Option<RowSpan> {
    let start = valid.iter().position(|&v| v).unwrap_or(valid.len());
    let end = valid.iter().rposition(|&v| v).map_or(start, |i| i + 1);
    if valid[start..end].iter().all(|&v| v) {
        Some(RowSpan {
            start: start as u32,
            end: end as u32,
            seg1: u32::MAX,
            seg2: u32::MAX,
        })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Causal spans expanded on demand equal the rows of the explicit causal bias.
    #[test]
    fn causal_rows_equal_the_explicit_bias() -> Result<()> {
        let dev = Device::Cpu;
        let t = 9;
        let explicit = ModelInput::single(
            (0..t as u32).collect(),
            (0..t as u32).collect(),
            |i, j| j <= i,
            &dev,
        )?;
        for (start, len) in [(0, 9), (3, 4), (8, 1)] {
            let a = AttentionMask::spans(vec![RowSpan::causal(t)], 0, &dev)?
                .rows(start, len, t, &dev)?;
            let b = explicit.mask.rows(start, len, t, &dev)?;
            assert_eq!(
                a.flatten_all()?.to_vec1::<f32>()?,
                b.flatten_all()?.to_vec1::<f32>()?
            );
        }
        Ok(())
    }
}
