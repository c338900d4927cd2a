//! What every multi-objective stage (hybrid-dpo, reward-weighted, grpo) sets up around its
//! objective: the reward vector, the run (its LoRA widened to one block per objective under
//! `mode = "adapter"` conditioning), the configured weighting checked against the vector, the
//! conditioning record, the scored and weighted pairs; and after training the per-objective
//! adapters. The recipe picks the objective and trains it on `run`.

use super::conditioned::{self, Split, WeightedScoredPair};
use super::stage::{AdapterStage, StageRun};
use super::RunFlags;
use crate::data::preference::preference_pair;
use crate::data::Parsed;
use crate::model::lora::LoraConfig;
use crate::objectives::conditioning::{ConditioningConfig, ConditioningInfo};
use crate::objectives::weighting::Weighting;
use crate::reward::vector::{RewardVector, ScoredPair};
use anyhow::{Context, Result};
use serde::Serialize;

/// A multi-objective stage ready to score and train.
pub struct MultiObjectiveRun<'a> {
    pub run: StageRun,
    pub rewards: RewardVector,
    /// The configured weighting over `rewards` (equal weights when none was given).
    pub weights: Weighting,
    /// With `[conditioning] enabled`: how the policy is told its weights.
    pub conditioning: Option<ConditioningInfo>,
    cond: &'a ConditioningConfig,
    /// The configured LoRA: one block of a `mode = "adapter"` adapter.
    block: LoraConfig,
}

impl<'a> MultiObjectiveRun<'a> {
    /// Checks `weights` (`[section] weights`) and `cond` against `rewards`, then starts `stage`
    /// and records the conditioning (`conditioning.json`).
    pub fn start<R: Serialize + Default>(
        stage: &AdapterStage,
        cond: &'a ConditioningConfig,
        rewards: RewardVector,
        weights: Option<&Weighting>,
        section: &str,
        resolved: &R,
        flags: RunFlags,
    ) -> Result<Self> {
        let names = rewards.names();
        let what = format!("{section}.weights");
        let weights = Weighting::given_or_equal(weights, names.len(), &what)
            .with_context(|| format!("reward vector {names:?}"))?;
        if cond.enabled {
            cond.validate(&names)?;
        }
        let run = conditioned::stage_for(stage, cond, rewards.len())?.start(resolved, flags)?;
        let conditioning = conditioned::prepare(&run, cond, rewards.line_names())?;
        Ok(Self {
            run,
            rewards,
            weights,
            conditioning,
            cond,
            block: stage.lora.clone(),
        })
    }

    /// The run's preference pairs (train, validation) with the reward vectors of both
    /// responses; the reward model scores `batch_size` sequences per forward.
    pub fn scored_pairs(&self, batch_size: usize) -> Result<(Vec<ScoredPair>, Vec<ScoredPair>)> {
        let (run, rewards) = (&self.run, &self.rewards);
        let (tok, data) = (&run.loaded.tokenizer, &run.stage.data);
        let splits = run.load_data(|v, r| match preference_pair(v, tok, data, r) {
            Parsed::Ok(pair) => match rewards.rule_scored(pair, v) {
                Ok(scored) => Parsed::Ok(scored),
                Err(e) => Parsed::Bad(e),
            },
            Parsed::TooLong => Parsed::TooLong,
            Parsed::Identical => Parsed::Identical,
            Parsed::Bad(e) => Parsed::Bad(e),
        })?;
        let (mut train, mut val) = (splits.train, splits.val);
        if let Some(dir) = rewards.reward_model() {
            let (head, backbone) = run.reward_model(dir)?;
            for set in [&mut train, &mut val] {
                let cache = &run.cache_dir;
                rewards.score_pairs_with_head(&head, backbone.parts(), set, batch_size, cache)?;
            }
        }
        Ok((train, val))
    }

    /// Every pair of `split` with the weights its loss uses (see `conditioned::weighted_pairs`).
    pub fn weighted(&self, pairs: &[ScoredPair], split: Split) -> Result<Vec<WeightedScoredPair>> {
        let info = self.conditioning.as_ref();
        conditioned::weighted_pairs(&self.run, self.cond, info, &self.weights, pairs, split)
    }

    /// After training: a `mode = "adapter"` run's per-objective adapters.
    pub fn export_blocks(&self) -> Result<()> {
        match &self.conditioning {
            Some(info) => conditioned::export_blocks(&self.run, &self.block, info),
            None => Ok(()),
        }
    }
}
