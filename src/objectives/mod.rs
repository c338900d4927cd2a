//! Training objectives: each turns a batch into a summed loss for the shared trainer.

pub mod conditioning;
pub mod dpo;
pub mod hybrid;
pub mod nll;
pub mod online;
pub mod pair;
pub mod policy_gradient;
pub mod reward_head;
pub mod reward_weighted;
pub mod scalarize;
pub mod weighting;

use crate::model::ctx::ForwardCtx;
use crate::model::input::ModelInput;
use crate::model::lm_head::gather_rows;
use crate::model::Qwen;
use candle_core::{Result, Tensor};

/// Log-probs of the labelled tokens of right-padded sequences, in one forward pass.
pub struct LabelledLogprobs {
    /// [N] log-probs of every labelled token (f32; f64 for an f64 model), in sequence order.
    pub logprobs: Tensor,
    /// Number of labelled tokens of each sequence (they are consecutive in `logprobs`).
    pub counts: Vec<usize>,
}

impl LabelledLogprobs {
    /// Per-sequence sums [B] (differentiable): a [B, N] 0/1 matrix times the token log-probs.
    pub fn sums(&self) -> Result<Tensor> {
        let n: usize = self.counts.iter().sum();
        let mut sel = vec![0f32; self.counts.len() * n];
        let mut start = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            for j in start..start + c {
                sel[b * n + j] = 1.0;
            }
            start += c;
        }
        let sel = Tensor::from_vec(sel, (self.counts.len(), n), self.logprobs.device())?
            .to_dtype(self.logprobs.dtype())?;
        crate::model::matmul::matmul(&sel, &self.logprobs.unsqueeze(1)?)?.squeeze(1)
    }
}

/// Runs `seqs` (ids, labelled flags) through the model and returns the labelled tokens'
/// log-probs; position i-1 predicts a labelled token i.
pub fn labelled_logprobs(
    model: &Qwen,
    seqs: &[(&[u32], &[bool])],
    ctx: ForwardCtx,
) -> Result<LabelledLogprobs> {
    let ids: Vec<Vec<u32>> = seqs.iter().map(|(i, _)| i.to_vec()).collect();
    let input = ModelInput::right_padded(&ids, 0, &model.device)?;
    let t = input.ids.dim(1)?;
    let hidden = model.forward(&input, ctx, None)?;
    let (mut rows, mut targets, mut counts) = (vec![], vec![], vec![]);
    for (b, (ids, labelled)) in seqs.iter().enumerate() {
        let before = rows.len();
        for i in 1..ids.len() {
            if labelled[i] {
                rows.push((b * t + i - 1) as u32);
                targets.push(ids[i]);
            }
        }
        counts.push(rows.len() - before);
    }
    let h = gather_rows(&hidden, &rows)?;
    // f32 (f64 for an f64 model, so golden tests keep their precision).
    let logprobs = model.token_logprobs(&h, &targets, ctx.grad)?;
    Ok(LabelledLogprobs { logprobs, counts })
}
