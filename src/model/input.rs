//! The model's input: token ids, rotary positions and the additive attention bias (causal +
//! padding, or any visibility rule), for training batches, packed preference pairs and decoding.

use candle_core::{Device, Result, Tensor};

/// Token ids with their positions and the additive attention bias (causal + padding).
#[derive(Clone)]
pub struct ModelInput {
    /// [B, T] u32
    pub ids: Tensor,
    /// [B, T] u32 rotary positions
    pub positions: Tensor,
    /// [B, 1, T, T_keys] f32: 0 where a query may attend, the most negative f32 elsewhere
    /// (finite, so a fully masked padding row gives a uniform softmax instead of NaN).
    pub bias: Tensor,
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
        let flat_ids: Vec<u32> = ids.iter().flatten().copied().collect();
        let flat_pos: Vec<u32> = positions.iter().flatten().copied().collect();
        Ok(Self {
            ids: Tensor::from_vec(flat_ids, (b, t), device)?,
            positions: Tensor::from_vec(flat_pos, (b, t), device)?,
            bias: Tensor::from_vec(bias, (b, 1, t, tk), device)?,
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
            positions: Tensor::from_vec(positions, (1, t), device)?,
            bias: Tensor::from_vec(bias, (1, 1, t, t), device)?,
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
        let segment = |i: usize| usize::from(i >= p) + usize::from(i >= p + c);
        let visible = |i: usize, j: usize| j <= i && (j < p || segment(j) == segment(i));
        Self::single(ids, positions, visible, device)
    }

    /// Right-padded batch of whole sequences (training, scoring): positions 0..len.
    pub fn right_padded(seqs: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let ids: Vec<Vec<u32>> = seqs
            .iter()
            .map(|s| {
                s.iter()
                    .copied()
                    .chain(std::iter::repeat(pad_id))
                    .take(t)
                    .collect()
            })
            .collect();
        let valid: Vec<Vec<bool>> = seqs
            .iter()
            .map(|s| (0..t).map(|i| i < s.len()).collect())
            .collect();
        let positions: Vec<Vec<u32>> = seqs.iter().map(|_| (0..t as u32).collect()).collect();
        Self::new(&ids, &positions, &valid, device)
    }
}
