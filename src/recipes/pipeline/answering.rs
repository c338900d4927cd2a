//! The held-out prompts the pipeline's models answer, and how each model answers them.

use super::summary::Sample;
use crate::eval::load_policy_at;
use crate::eval::prompts::PromptRecord;
use crate::eval::win_rate::answer_prompts;
use crate::generate::SamplingConfig;
use crate::tokenizer::Message;
use anyhow::Result;
use candle_core::{DType, Device};
use std::path::Path;

/// The held-out prompts, and how every model answers them.
pub(super) struct Answering {
    pub prompts: Vec<PromptRecord>,
    pub messages: Vec<Vec<Message>>,
    pub sampling: SamplingConfig,
    pub batch: usize,
    pub dtype: DType,
    pub device: Device,
}

impl Answering {
    /// The answers of a model (base path, merged adapter, adapter); a weight-conditioned one
    /// answers at equal weights.
    pub fn answers_of(
        &self,
        model: &str,
        base_adapter: Option<&Path>,
        adapter: Option<&Path>,
    ) -> Result<Vec<String>> {
        let policy = load_policy_at(model, base_adapter, adapter, None, self.dtype, &self.device)?;
        let msgs: Vec<_> = self.messages.iter().map(|m| policy.prompt(m)).collect();
        answer_prompts(&policy.loaded, &msgs, &self.sampling, self.batch)
    }

    /// The first `n` prompts with their answers, shown in the summary.
    pub fn samples(&self, answers: &[String], n: usize) -> Vec<Sample> {
        self.prompts
            .iter()
            .zip(answers)
            .take(n)
            .map(|(p, a)| Sample {
                prompt: p
                    .messages
                    .last()
                    .map(|m| m.content.clone())
                    .unwrap_or_default(),
                answer: a.clone(),
            })
            .collect()
    }
}
