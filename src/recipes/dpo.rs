//! `mo-align dpo` and `hybrid-dpo`: DPO, and DPO with the explicit multi-objective term.
//!
//! Policy = base (+ `model.adapter`, e.g. the SFT adapter, merged) + a fresh LoRA; reference =
//! the same weights with the fresh LoRA disabled (never a second copy). Reference log-probs and
//! reward-model scores depend only on frozen weights, so they are computed once, before
//! training, and cached on disk.

use super::conditioned::{Split, WeightedScoredPair};
use super::multi_objective::MultiObjectiveRun;
use super::stage::{AdapterStage, StageRun};
use super::RunFlags;
use crate::data::preference::{preference_pair, PreferencePair};
use crate::objectives::conditioning::ConditioningConfig;
use crate::objectives::dpo::{Dpo, DpoConfig, DpoExample};
use crate::objectives::hybrid::{
    explicit_terms_with, scalarized_pair, HybridConfig, PreferenceLabel,
};
use crate::objectives::pair::cached_reference;
use crate::reward::vector::RewardVector;
use crate::train::trainer::TrainOutcome;
use crate::train::TrainConfig;
use anyhow::Result;
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

impl DpoRunConfig {
    /// Every value checked without loading a model or data (a sweep checks each point so).
    pub fn check(&self) -> Result<()> {
        self.stage.require_lora("dpo")?;
        self.dpo.validate()?;
        self.stage.check()
    }
}

impl HybridRunConfig {
    /// Every value checked without loading a model or data; the configured weights.
    pub fn check(&self) -> Result<Option<crate::objectives::weighting::Weighting>> {
        self.stage.require_lora("hybrid-dpo")?;
        self.dpo.validate()?;
        self.stage.check()?;
        self.hybrid.validate()
    }
}

pub fn run_dpo(
    config: Option<&Path>,
    overrides: &[String],
    flags: RunFlags,
) -> Result<TrainOutcome> {
    let cfg: DpoRunConfig = crate::util::config::load(config, overrides)?;
    cfg.check()?;
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
    let cfg: HybridRunConfig = crate::util::config::load(config, overrides)?;
    let h = &cfg.hybrid;
    let weights = cfg.check()?;
    let rewards = RewardVector::open(&h.reward_model, &h.rules, "hybrid")?;
    let mo = MultiObjectiveRun::start(
        &cfg.stage,
        &cfg.conditioning,
        rewards,
        weights.as_ref(),
        "hybrid",
        &cfg,
        flags,
    )?;
    let (train, val) = mo.scored_pairs(h.score_batch_size)?;
    // Each pair's logit gets the constant (offset, scale) of its reward vectors under its own
    // weights; with `preference = "weighted"` the pair is first oriented by those weights.
    let examples = |pairs: &[WeightedScoredPair]| -> Result<Vec<DpoExample>> {
        let mut pairs = pairs.to_vec();
        if h.preference == PreferenceLabel::Weighted {
            for p in &mut pairs {
                let s = &mut p.scored;
                let (sc, sr) = scalarized_pair(h, p.weights.values(), &s.chosen, &s.rejected)?;
                if sr > sc {
                    std::mem::swap(&mut s.chosen, &mut s.rejected);
                    std::mem::swap(&mut s.pair.chosen, &mut s.pair.rejected);
                }
            }
        }
        let plain: Vec<PreferencePair> = pairs.iter().map(|p| p.scored.pair.clone()).collect();
        let mut ex = with_reference(&mo.run, &plain)?;
        for (e, p) in ex.iter_mut().zip(&pairs) {
            let s = &p.scored;
            let w = p.weights.values();
            (e.offset, e.scale) = explicit_terms_with(h, w, &s.chosen, &s.rejected)?;
            e.gate = p.gate.clone();
        }
        Ok(ex)
    };
    let train = examples(&mo.weighted(&train, Split::Train)?)?;
    let val = examples(&mo.weighted(&val, Split::Validation)?)?;
    let objective = Dpo {
        model: &mo.run.loaded.model,
        cfg: cfg.dpo.clone(),
        explicit: true,
    };
    let outcome = mo.run.train(&objective, &train, &val, "hybrid-dpo")?;
    mo.export_blocks()?;
    Ok(outcome)
}
