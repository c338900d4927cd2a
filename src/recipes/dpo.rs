//! `mo-align dpo` and `hybrid-dpo`: DPO, and DPO with the explicit multi-objective term.
//!
//! Policy = base (+ `model.adapter`, e.g. the SFT adapter, merged) + a fresh LoRA; reference =
//! the same weights with the fresh LoRA disabled (never a second copy). Reference log-probs and
//! reward-model scores depend only on frozen weights, so they are computed once, before
//! training, and cached on disk.

use super::conditioned::{self, Split, WeightedScoredPair};
use super::rewards::scored_pairs;
use super::{AdapterStage, RunFlags, StageRun};
use crate::data::preference::{preference_pair, PreferencePair};
use crate::objectives::conditioning::ConditioningConfig;
use crate::objectives::dpo::{Dpo, DpoConfig, DpoExample};
use crate::objectives::hybrid::{
    explicit_terms_with, scalarized_pair, HybridConfig, PreferenceLabel,
};
use crate::objectives::pair::cached_reference;
use crate::objectives::scalarize::equal_weights_or;
use crate::train::trainer::TrainOutcome;
use crate::train::TrainConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The DPO settings of `configs/dpo.toml`: the defaults of every preference stage's `[train]`.
pub fn preference_stage_defaults() -> AdapterStage {
    AdapterStage {
        train: TrainConfig {
            lr: 1e-6,
            batch_size: 2,
            grad_accum: 16,
            max_grad_norm: 0.3,
            ..TrainConfig::default()
        },
        ..AdapterStage::default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DpoRunConfig {
    #[serde(flatten)]
    pub stage: AdapterStage,
    pub dpo: DpoConfig,
}

impl Default for DpoRunConfig {
    fn default() -> Self {
        Self {
            stage: preference_stage_defaults(),
            dpo: DpoConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HybridRunConfig {
    #[serde(flatten)]
    pub stage: AdapterStage,
    pub dpo: DpoConfig,
    pub hybrid: HybridConfig,
    pub conditioning: ConditioningConfig,
}

impl Default for HybridRunConfig {
    fn default() -> Self {
        Self {
            stage: preference_stage_defaults(),
            dpo: DpoConfig::default(),
            hybrid: HybridConfig::default(),
            conditioning: ConditioningConfig::default(),
        }
    }
}

/// The run's preference pairs: (train, validation).
fn load_pairs(run: &StageRun) -> Result<(Vec<PreferencePair>, Vec<PreferencePair>)> {
    let (tok, data) = (&run.loaded.tokenizer, &run.stage.data);
    let splits = run.load_data(|v, r| preference_pair(v, tok, data, r))?;
    Ok((splits.train, splits.val))
}

/// DPO examples of `pairs`: each pair with its cached reference log-probs.
fn with_reference(run: &StageRun, pairs: &[PreferencePair]) -> Result<Vec<DpoExample>> {
    let (c, r) = cached_reference(
        &run.loaded.model,
        &run.model_key,
        pairs,
        &run.cache_dir,
        run.flags.quiet,
    )?;
    Ok(pairs
        .iter()
        .zip(c.into_iter().zip(r))
        .map(|(pair, (ref_chosen, ref_rejected))| DpoExample {
            pair: pair.clone(),
            ref_chosen,
            ref_rejected,
            offset: 0.0,
            scale: 1.0,
            gate: vec![],
        })
        .collect())
}

pub fn run_dpo(
    config: Option<&Path>,
    overrides: &[String],
    flags: RunFlags,
) -> Result<TrainOutcome> {
    let cfg: DpoRunConfig = crate::config::load(config, overrides)?;
    cfg.stage.require_lora("dpo")?;
    cfg.dpo.validate()?;
    let run = cfg.stage.start(&cfg, flags)?;
    let (train, val) = load_pairs(&run)?;
    let (train, val) = (with_reference(&run, &train)?, with_reference(&run, &val)?);
    let objective = Dpo {
        model: &run.loaded.model,
        cfg: cfg.dpo.clone(),
        explicit: false,
    };
    run.train(&objective, &train, &val, "dpo")
}

pub fn run_hybrid(
    config: Option<&Path>,
    overrides: &[String],
    flags: RunFlags,
) -> Result<TrainOutcome> {
    let cfg: HybridRunConfig = crate::config::load(config, overrides)?;
    let h = &cfg.hybrid;
    if h.reward_model.is_empty() && h.rules.is_empty() {
        bail!("hybrid.reward_model and hybrid.rules are both empty: give the directory written by train-rm, a rule-objectives file, or both");
    }
    cfg.stage.require_lora("hybrid-dpo")?;
    cfg.dpo.validate()?;
    h.validate()?;
    let k = conditioned::reward_vector_len(&h.reward_model, &h.rules)?;
    let stage = conditioned::stage_for(&cfg.stage, &cfg.conditioning, k)?;
    let run = stage.start(&cfg, flags)?;
    let scored = scored_pairs(
        &run,
        &h.reward_model,
        &h.rules,
        h.score_batch_size,
        "hybrid",
    )?;
    // Refuse a wrong weight count before any reference log-prob is computed.
    let fixed = equal_weights_or(&h.weights, scored.objectives.len(), "hybrid.weights")
        .with_context(|| format!("reward vector {:?}", scored.objectives))?;
    let info = conditioned::prepare(&run, &cfg.conditioning, &scored.objectives)?;
    // Each pair's logit gets the constant (offset, scale) of its reward vectors under its own
    // weights; with `preference = "weighted"` the pair is first oriented by those weights.
    let examples = |pairs: &[WeightedScoredPair]| -> Result<Vec<DpoExample>> {
        let mut pairs = pairs.to_vec();
        if h.preference == PreferenceLabel::Weighted {
            for p in &mut pairs {
                let s = &mut p.scored;
                let (sc, sr) = scalarized_pair(h, &p.weights, &s.chosen, &s.rejected)?;
                if sr > sc {
                    std::mem::swap(&mut s.chosen, &mut s.rejected);
                    std::mem::swap(&mut s.pair.chosen, &mut s.pair.rejected);
                }
            }
        }
        let plain: Vec<PreferencePair> = pairs.iter().map(|p| p.scored.pair.clone()).collect();
        let mut ex = with_reference(&run, &plain)?;
        for (e, p) in ex.iter_mut().zip(&pairs) {
            let s = &p.scored;
            (e.offset, e.scale) = explicit_terms_with(h, &p.weights, &s.chosen, &s.rejected)?;
            e.gate = p.gate.clone();
        }
        Ok(ex)
    };
    let weighted = |pairs, split| {
        conditioned::weighted_pairs(&run, &cfg.conditioning, info.as_ref(), &fixed, pairs, split)
    };
    let train = examples(&weighted(&scored.train, Split::Train)?)?;
    let val = examples(&weighted(&scored.val, Split::Validation)?)?;
    let objective = Dpo {
        model: &run.loaded.model,
        cfg: cfg.dpo.clone(),
        explicit: true,
    };
    let outcome = run.train(&objective, &train, &val, "hybrid-dpo")?;
    if let Some(info) = &info {
        conditioned::export_blocks(&run, &cfg.stage.lora, info)?;
    }
    Ok(outcome)
}
