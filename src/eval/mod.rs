//! Evaluation: held-out likelihoods (here), evaluations over data files, win rates, and the
//! inputs they read.

pub mod preferences;
pub mod prompts;
pub mod win_rate;

use crate::model::ctx::ForwardCtx;
use crate::model::loader::{apply_adapter, load_merged, warn_if_other_base, Loaded};
use crate::model::Qwen2;
use crate::objectives::labelled_logprobs;
use candle_core::{DType, Device, Result};
use std::path::Path;

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

/// NLL of the labelled tokens of right-padded sequences (no gradient): the same log-probs the
/// NLL training objective sums (`objectives::labelled_logprobs`).
pub fn sequence_nll(
    model: &Qwen2,
    seqs: &[(Vec<u32>, Vec<bool>)],
    ctx: ForwardCtx,
) -> Result<NllSum> {
    let refs: Vec<(&[u32], &[bool])> = seqs
        .iter()
        .map(|(i, l)| (i.as_slice(), l.as_slice()))
        .collect();
    let lp = labelled_logprobs(model, &refs, ctx)?;
    let nll = -lp
        .logprobs
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?;
    Ok(NllSum {
        nll,
        tokens: lp.counts.iter().sum(),
    })
}

/// Loads `path`, merges `base_adapter` into the weights (it is part of the reference), then
/// attaches `adapter` (switchable).
pub fn load_for_eval(
    path: &str,
    base_adapter: Option<&Path>,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Loaded> {
    let mut loaded = load_merged(path, base_adapter, dtype, device)?;
    if let Some(a) = adapter {
        warn_if_other_base(path, a);
        loaded.adapter = Some(apply_adapter(&mut loaded.model, a)?);
    }
    Ok(loaded)
}
