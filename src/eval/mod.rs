//! Evaluation: held-out likelihoods (here), evaluations over data files, win rates, and the
//! inputs they read.

pub mod judge;
pub mod preferences;
pub mod prompts;
pub mod win_rate;

use crate::model::ctx::ForwardCtx;
use crate::model::loader::{apply_adapter, load_merged, warn_if_other_base, Loaded};
use crate::model::Qwen;
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
pub fn perplexity(model: &Qwen, ids: &[u32], context: usize, ctx: ForwardCtx) -> Result<NllSum> {
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
    model: &Qwen,
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

/// A policy ready to answer at a weighting: the model, and for a prompt-conditioned policy the
/// conditioning and the line its prompts must carry.
pub struct PolicyAt {
    pub loaded: Loaded,
    /// A conditioned policy's conditioning and the line stating its weights.
    pub conditioning: Option<(crate::objectives::conditioning::ConditioningInfo, String)>,
}

impl PolicyAt {
    /// The conditioning to place in prompts (`mode = "prompt"`; an adapter-conditioned policy
    /// has its weights merged and reads prompts as they are).
    pub fn prompt_conditioning(
        &self,
    ) -> Option<(&crate::objectives::conditioning::ConditioningInfo, &str)> {
        use crate::objectives::conditioning::ConditioningMode;
        match &self.conditioning {
            Some((info, line)) if info.mode() == ConditioningMode::Prompt => {
                Some((info, line.as_str()))
            }
            _ => None,
        }
    }

    /// `messages` as this policy reads them.
    pub fn prompt(&self, messages: &[crate::tokenizer::Message]) -> Vec<crate::tokenizer::Message> {
        match self.prompt_conditioning() {
            Some((info, line)) => info.place(messages, line),
            None => messages.to_vec(),
        }
    }
}

/// `load_for_eval`, except that a weight-conditioned adapter (it has conditioning.json) is
/// loaded at `weights` (equal weights when `None`): its blocks merged at w (`mode = "adapter"`),
/// or the adapter with the conditioning line to place in every prompt (`mode = "prompt"`).
pub fn load_policy_at(
    path: &str,
    base_adapter: Option<&Path>,
    adapter: Option<&Path>,
    weights: Option<&crate::objectives::weighting::Weighting>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<PolicyAt> {
    use crate::objectives::conditioning::{ConditioningInfo, ConditioningMode};
    use crate::objectives::weighting::Weighting;
    let info = match (adapter, weights) {
        (Some(a), Some(_)) => Some(ConditioningInfo::require(a)?),
        (Some(a), None) => ConditioningInfo::load(a)?,
        (None, Some(_)) => {
            anyhow::bail!("{path}: weights steer a conditioned adapter; name it with --adapter")
        }
        (None, None) => None,
    };
    let (Some(info), Some(dir)) = (info, adapter) else {
        return Ok(PolicyAt {
            loaded: load_for_eval(path, base_adapter, adapter, dtype, device)?,
            conditioning: None,
        });
    };
    let k = info.objectives.len();
    let w = match weights {
        Some(w) => w.clone(),
        None => Weighting::equal(k),
    };
    let line = info.line(&w)?;
    let loaded = match info.mode() {
        ConditioningMode::Adapter => {
            let blocks = info.block_dirs(dir)?;
            let blocks: Vec<&Path> = blocks.iter().map(|b| b.as_path()).collect();
            let w = w.quantised();
            crate::model::loader::load_soup(path, base_adapter, &blocks, w.values(), dtype, device)?
        }
        ConditioningMode::Prompt => load_for_eval(path, base_adapter, adapter, dtype, device)?,
    };
    Ok(PolicyAt {
        loaded,
        conditioning: Some((info, line)),
    })
}
