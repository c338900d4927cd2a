//! `mo-align reward-weighted`: reward-weighted likelihood. Each response of a pair is
//! weighted by its advantage under the frozen reward model (scores computed once and cached).

use super::conditioned::{Split, WeightedScoredPair};
use super::dpo::preference_stage_defaults;
use super::multi_objective::MultiObjectiveRun;
use super::stage::AdapterStage;
use super::RunFlags;
use crate::objectives::conditioning::ConditioningConfig;
use crate::objectives::reward_weighted::{
    advantages, target_gap_reward, Advantage, RewardWeighted, WeightedPair,
};
use crate::objectives::weighting::Weighting;
use crate::reward::vector::RewardVector;
use crate::train::trainer::TrainOutcome;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The `[reward]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// Directory written by `train-rm` (may be empty when `rules` is given).
    pub reward_model: String,
    /// Rule-objectives file whose objectives follow the reward model's in the reward vector.
    pub rules: String,
    /// w_i (equal when empty).
    pub weights: Vec<f64>,
    /// target_i (1.0 when empty: the best normalised rating).
    pub targets: Vec<f64>,
    pub advantage: Advantage,
    pub score_batch_size: usize,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            reward_model: String::new(),
            rules: String::new(),
            weights: vec![],
            targets: vec![],
            advantage: Advantage::MeanBaseline,
            score_batch_size: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RewardWeightedRunConfig {
    #[serde(flatten)]
    pub stage: AdapterStage,
    pub reward: RewardConfig,
    pub conditioning: ConditioningConfig,
}

impl Default for RewardWeightedRunConfig {
    fn default() -> Self {
        Self {
            stage: preference_stage_defaults(),
            reward: RewardConfig::default(),
            conditioning: ConditioningConfig::default(),
        }
    }
}

impl RewardWeightedRunConfig {
    /// Every value checked without loading a model or data; the configured weights.
    pub fn check(&self) -> Result<Option<Weighting>> {
        self.stage.require_lora("reward-weighted")?;
        let weights = Weighting::configured(&self.reward.weights, "reward.weights")?;
        if let Some(t) = self.reward.targets.iter().find(|t| !t.is_finite()) {
            bail!("reward.targets must be finite, got {t}");
        }
        self.stage.check()?;
        Ok(weights)
    }
}

pub fn run(config: Option<&Path>, overrides: &[String], flags: RunFlags) -> Result<TrainOutcome> {
    let cfg: RewardWeightedRunConfig = crate::util::config::load(config, overrides)?;
    let rw = &cfg.reward;
    let weights = cfg.check()?;
    let rewards = RewardVector::open(&rw.reward_model, &rw.rules, "reward")?;
    let k = rewards.len();
    let t = if rw.targets.is_empty() {
        vec![1.0; k]
    } else {
        rw.targets.clone()
    };
    if t.len() != k {
        bail!(
            "reward.targets has {} values for {k} objectives {:?}",
            t.len(),
            rewards.names()
        );
    }
    let mo = MultiObjectiveRun::start(
        &cfg.stage,
        &cfg.conditioning,
        rewards,
        weights.as_ref(),
        "reward",
        &cfg,
        flags,
    )?;
    let (train, val) = mo.scored_pairs(rw.score_batch_size)?;
    let examples = |pairs: &[WeightedScoredPair]| -> Vec<WeightedPair> {
        pairs
            .iter()
            .map(|p| {
                let (w, s) = (p.weights.values(), &p.scored);
                let (rc, rr) = (
                    target_gap_reward(&s.chosen, w, &t),
                    target_gap_reward(&s.rejected, w, &t),
                );
                let (ac, ar) = advantages(rc, rr, rw.advantage);
                WeightedPair {
                    pair: s.pair.clone(),
                    reward_chosen: rc,
                    reward_rejected: rr,
                    adv_chosen: ac,
                    adv_rejected: ar,
                    gate: p.gate.clone(),
                }
            })
            .collect()
    };
    let train = examples(&mo.weighted(&train, Split::Train)?);
    let val = examples(&mo.weighted(&val, Split::Validation)?);
    let objective = RewardWeighted {
        model: &mo.run.loaded.model,
    };
    let outcome = mo.run.train(&objective, &train, &val, "reward-weighted")?;
    mo.export_blocks()?;
    Ok(outcome)
}
