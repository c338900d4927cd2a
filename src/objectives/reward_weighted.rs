//! Reward-weighted likelihood: each response's mean token log-likelihood weighted by
//! an advantage A from the reward model, loss = -A * mean log p(y | x).
//!
//! The reward is r = -sum_i w_i |s_i - target_i|. With `advantage = "raw"`, A = r (the
//! literal form): r <= 0, so every response is pushed down, the worst hardest, and nothing is pulled up.
//! With `advantage = "mean_baseline"` (the default), A = r minus the mean reward of the responses
//! to the same prompt: better-than-average responses are made likelier and worse ones less
//! likely - REINFORCE with a baseline (RLOO with the pair as the group).

use super::pair::pair_logprobs_gated;
use crate::data::preference::PreferencePair;
use crate::model::ctx::ForwardCtx;
use crate::model::Qwen;
use crate::train::{LossOutput, Objective};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Advantage {
    Raw,
    MeanBaseline,
}

#[derive(Debug, Clone)]
pub struct WeightedPair {
    pub pair: PreferencePair,
    pub reward_chosen: f32,
    pub reward_rejected: f32,
    pub adv_chosen: f32,
    pub adv_rejected: f32,
    /// Gates of a weight-conditioned adapter's blocks for this pair (empty: none).
    pub gate: Vec<f32>,
}

/// r = -sum_i w_i |s_i - target_i|
pub fn target_gap_reward(scores: &[f32], weights: &[f64], targets: &[f64]) -> f32 {
    -scores
        .iter()
        .zip(weights)
        .zip(targets)
        .map(|((s, w), t)| w * (*s as f64 - t).abs())
        .sum::<f64>() as f32
}

/// Advantages of the two responses to one prompt.
pub fn advantages(r_chosen: f32, r_rejected: f32, mode: Advantage) -> (f32, f32) {
    match mode {
        Advantage::Raw => (r_chosen, r_rejected),
        Advantage::MeanBaseline => {
            let mean = (r_chosen + r_rejected) / 2.0;
            (r_chosen - mean, r_rejected - mean)
        }
    }
}

pub struct RewardWeighted<'a> {
    pub model: &'a Qwen,
}

impl Objective for RewardWeighted<'_> {
    type Example = WeightedPair;

    fn tokens(&self, ex: &WeightedPair) -> usize {
        ex.pair.packed_len()
    }

    /// Two responses per pair; the loss is a mean over responses.
    fn weight(&self, _ex: &WeightedPair) -> f64 {
        2.0
    }

    fn loss(&self, batch: &[&WeightedPair], ctx: ForwardCtx) -> Result<LossOutput> {
        let dev = &self.model.device;
        let ids: Vec<_> = batch.iter().map(|e| e.pair.ids()).collect();
        let gates: Vec<&[f32]> = batch.iter().map(|e| e.gate.as_slice()).collect();
        let lp = pair_logprobs_gated(self.model, &ids, &gates, ctx)?;
        let col = |xs: Vec<f32>| Tensor::from_vec(xs, batch.len(), dev);
        let mean_c = (&lp.chosen / col(lp.chosen_tokens.iter().map(|&n| n as f32).collect())?)?;
        let mean_r = (&lp.rejected / col(lp.rejected_tokens.iter().map(|&n| n as f32).collect())?)?;
        let a_c = col(batch.iter().map(|e| e.adv_chosen).collect())?;
        let a_r = col(batch.iter().map(|e| e.adv_rejected).collect())?;
        let loss = ((&mean_c * &a_c)? + (&mean_r * &a_r)?)?.sum_all()?.neg()?;
        let sum =
            |t: &Tensor| -> Result<f64> { Ok(t.to_vec1::<f32>()?.iter().map(|&x| x as f64).sum()) };
        let rewards: f64 = batch
            .iter()
            .map(|e| (e.reward_chosen + e.reward_rejected) as f64)
            .sum();
        let metrics = vec![
            ("logps_mean/chosen".to_string(), 2.0 * sum(&mean_c)?),
            ("logps_mean/rejected".to_string(), 2.0 * sum(&mean_r)?),
            ("reward/mean".to_string(), rewards),
        ];
        Ok(LossOutput {
            loss_sum: loss,
            metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewards_and_advantages() {
        let r = target_gap_reward(
            &[0.5, 1.0, 0.0, 0.75],
            &[1.0, 0.5, 2.0, 1.0],
            &[1.0, 1.0, 0.5, 0.75],
        );
        assert!((r - -(0.5 + 0.0 + 1.0 + 0.0)).abs() < 1e-6);
        assert_eq!(advantages(-0.5, -1.5, Advantage::Raw), (-0.5, -1.5));
        assert_eq!(advantages(-0.5, -1.5, Advantage::MeanBaseline), (0.5, -0.5));
    }
}
