//! Held-out likelihoods.

use crate::model::ctx::ForwardCtx;
use crate::model::input::ModelInput;
use crate::model::lm_head::gather_rows;
use crate::model::Qwen2;
use candle_core::{DType, Result};

/// Sum of -log p and the number of predicted tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NllSum {
    pub nll: f64,
    pub tokens: usize,
}

impl NllSum {
    pub fn add(&mut self, other: NllSum) {
        self.nll += other.nll;
        self.tokens += other.tokens;
    }

    pub fn mean(&self) -> f64 {
        if self.tokens == 0 {
            f64::NAN
        } else {
            self.nll / self.tokens as f64
        }
    }
}

/// NLL of a plain token stream, in non-overlapping windows of `context` tokens; each window
/// predicts all its tokens but the first (for a text that fits one window this is exactly
/// transformers' `model(ids, labels=ids).loss`).
pub fn perplexity(model: &Qwen2, ids: &[u32], context: usize, ctx: ForwardCtx) -> Result<NllSum> {
    let mut total = NllSum::default();
    for window in ids.chunks(context.max(2)) {
        if window.len() < 2 {
            continue;
        }
        let labelled: Vec<bool> = (0..window.len()).map(|i| i > 0).collect();
        total.add(sequence_nll(model, &[(window.to_vec(), labelled)], ctx)?);
    }
    Ok(total)
}

/// NLL of the labelled tokens of right-padded sequences (no gradient).
pub fn sequence_nll(
    model: &Qwen2,
    seqs: &[(Vec<u32>, Vec<bool>)],
    ctx: ForwardCtx,
) -> Result<NllSum> {
    let ids: Vec<Vec<u32>> = seqs.iter().map(|(i, _)| i.clone()).collect();
    let input = ModelInput::right_padded(&ids, 0, &model.device)?;
    let t = input.ids.dim(1)?;
    let hidden = model.forward(&input, ctx, None)?;
    let mut rows = vec![];
    let mut targets = vec![];
    for (b, (ids, labelled)) in seqs.iter().enumerate() {
        for i in 1..ids.len() {
            if labelled[i] {
                rows.push((b * t + i - 1) as u32);
                targets.push(ids[i]);
            }
        }
    }
    let h = gather_rows(&hidden, &rows)?;
    let lp = model.token_logprobs(&h, &targets, false)?;
    let nll = -lp.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    Ok(NllSum {
        nll,
        tokens: targets.len(),
    })
}
