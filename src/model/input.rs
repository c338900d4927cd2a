//! The model's input: token ids, rotary positions and which keys each query may attend to
//! (causal + padding, or any visibility rule), for training batches, packed preference pairs
//! and decoding.

use candle_core::{DType, Device, Result, Tensor};

/// Which keys each query may attend to.
#[derive(Clone)]
pub enum AttentionMask {
    /// [B, 1, T, T_keys] f32: 0 where a query may attend, the most negative f32 elsewhere
    /// (finite, so a fully masked padding row gives a uniform softmax instead of NaN).
    Bias(Tensor),
    /// One unpadded sequence without a cache, causal: query i sees keys 0..=i. Rows of the bias
    /// are made only when attention needs them, so a whole-context window (32,768 tokens: a
    /// 4 GiB [T, T] bias) never holds the full mask.
    Causal,
}

impl AttentionMask {
    /// The bias of query rows `start..start + len` against `keys` keys: [B, 1, len, keys].
    pub fn rows(&self, start: usize, len: usize, keys: usize, device: &Device) -> Result<Tensor> {
        match self {
            AttentionMask::Bias(b) => b.narrow(2, start, len),
            AttentionMask::Causal => {
                let k = Tensor::arange(0u32, keys as u32, device)?.reshape((1, keys))?;
                let q = Tensor::arange(start as u32, (start + len) as u32, device)?
                    .reshape((len, 1))?;
                let visible = k.broadcast_le(&q)?;
                let zeros = Tensor::zeros((len, keys), DType::F32, device)?;
                let blocked = Tensor::full(f32::MIN, (len, keys), device)?;
                visible
                    .where_cond(&zeros, &blocked)?
                    .reshape((1, 1, len, keys))
            }
        }
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
            mask: AttentionMask::Bias(Tensor::from_vec(bias, (b, 1, t, tk), device)?),
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
        let segment = |i: usize| usize::from(i >= p) + usize::from(i >= p + c);
        let visible = |i: usize, j: usize| j <= i && (j < p || segment(j) == segment(i));
        Self::single(ids, positions, visible, device)
    }

    /// Right-padded batch of whole sequences (training, scoring): positions 0..len.
    pub fn right_padded(seqs: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if let [seq] = seqs {
            // One sequence has no padding: plain causal, built row block by row block.
            return Ok(Self {
                ids: Tensor::from_vec(seq.clone(), (1, t), device)?,
                positions: Tensor::arange(0u32, t as u32, device)?.reshape((1, t))?,
                mask: AttentionMask::Causal,
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Causal rows made on demand equal the rows of the explicit causal bias.
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
            let a = AttentionMask::Causal.rows(start, len, t, &dev)?;
            let b = explicit.mask.rows(start, len, t, &dev)?;
            assert_eq!(
                a.flatten_all()?.to_vec1::<f32>()?,
                b.flatten_all()?.to_vec1::<f32>()?
            );
        }
        Ok(())
    }
}
