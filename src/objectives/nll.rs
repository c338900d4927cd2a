//! Supervised fine-tuning: negative log-likelihood of the labelled (assistant) tokens, averaged
//! over all labelled tokens of an optimizer step.

use super::labelled_logprobs;
use crate::model::ctx::ForwardCtx;
use crate::model::Qwen;
use crate::tokenizer::LabelledIds;
use crate::train::{LossOutput, Objective};
use candle_core::Result;

pub struct Nll<'a> {
    pub model: &'a Qwen,
}

/// Labelled tokens that are predicted (a token at position 0 has nothing before it).
pub fn predicted_tokens(ex: &LabelledIds) -> usize {
    ex.labelled.iter().skip(1).filter(|&&l| l).count()
}

impl Objective for Nll<'_> {
    type Example = LabelledIds;

    fn tokens(&self, ex: &LabelledIds) -> usize {
        ex.ids.len()
    }

    fn weight(&self, ex: &LabelledIds) -> f64 {
        predicted_tokens(ex) as f64
    }

    fn loss(&self, batch: &[&LabelledIds], ctx: ForwardCtx) -> Result<LossOutput> {
        let seqs: Vec<(&[u32], &[bool])> = batch
            .iter()
            .map(|e| (e.ids.as_slice(), e.labelled.as_slice()))
            .collect();
        let lp = labelled_logprobs(self.model, &seqs, ctx)?;
        Ok(LossOutput {
            loss_sum: lp.logprobs.sum_all()?.neg()?,
            metrics: vec![],
        })
    }
}
