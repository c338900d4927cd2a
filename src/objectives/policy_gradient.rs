//! Online policy gradient (GRPO, RLOO) scored by a reward vector. Per prompt the policy samples
//! k completions; each gets a reward vector (reward-model heads and/or rule objectives), one
//! number by `Aggregation`, and an advantage relative to its group:
//!     GRPO: A_i = r_i - mean(r)            (optionally / (std(r) + 1e-4), TRL's default)
//!     RLOO: A_i = r_i - mean_{j != i} r_j  = k / (k - 1) * (r_i - mean(r))
//! The loss per completion is the mean over its tokens of
//!     -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps) A) + beta * KL_t,
//! rho_t = pi(y_t) / pi_old(y_t) (pi_old: the policy that sampled the batch; on the first step
//! over a batch pi_old = pi, so rho_t = 1 with the gradient of log pi), and
//! KL_t = exp(ref_t - lp_t) - (ref_t - lp_t) - 1 (the k3 estimator TRL uses; the reference is the
//! policy with its adapter off), then the mean over the group.

use super::labelled_logprobs;
use super::scalarize::{build as build_scalarizer, ScalarizerKind};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    Grpo,
    Rloo,
}

/// How a completion's reward vector becomes one reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    Linear,
    Chebyshev,
    SmoothChebyshev,
    /// Each objective z-scored within its group, then weighted and summed (TRL's GDPO): an
    /// objective every completion meets equally adds nothing, however large its scale.
    NormalizeThenSum,
}

/// One reward per completion of a group from its reward vectors (`vectors[i]` for completion
/// i), weights `w`.
pub fn aggregate(
    kind: Aggregation,
    vectors: &[Vec<f32>],
    w: &[f64],
    utopia: Option<&[f64]>,
    mu: f64,
) -> Result<Vec<f64>> {
    let k = w.len();
    if let Some(v) = vectors.iter().find(|v| v.len() != k) {
        bail!("a reward vector has {} entries for {k} weights", v.len());
    }
    let scalar = |s: ScalarizerKind| -> Result<Vec<f64>> {
        let s = build_scalarizer(s, w, utopia, mu, k)?;
        Ok(vectors.iter().map(|v| s.scalarize(v)).collect())
    };
    match kind {
        Aggregation::Linear => scalar(ScalarizerKind::Linear),
        Aggregation::Chebyshev => scalar(ScalarizerKind::Chebyshev),
        Aggregation::SmoothChebyshev => scalar(ScalarizerKind::SmoothChebyshev),
        Aggregation::NormalizeThenSum => {
            let n = vectors.len() as f64;
            let mut out = vec![0.0; vectors.len()];
            for (j, wj) in w.iter().enumerate() {
                let col: Vec<f64> = vectors.iter().map(|v| v[j] as f64).collect();
                let mean = col.iter().sum::<f64>() / n;
                let std = (col.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
                for (o, x) in out.iter_mut().zip(&col) {
                    if std > 0.0 {
                        *o += wj * (x - mean) / std;
                    }
                }
            }
            Ok(out)
        }
    }
}

/// Advantages of one group's rewards.
pub fn group_advantages(rewards: &[f64], algorithm: Algorithm, scale_by_std: bool) -> Vec<f64> {
    let n = rewards.len();
    if n == 0 {
        return vec![];
    }
    let mean = rewards.iter().sum::<f64>() / n as f64;
    match algorithm {
        Algorithm::Grpo => {
            // torch's default std (n - 1), as TRL computes it.
            let std = if n > 1 {
                (rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
            } else {
                0.0
            };
            rewards
                .iter()
                .map(|r| {
                    let a = r - mean;
                    if scale_by_std {
                        a / (std + 1e-4)
                    } else {
                        a
                    }
                })
                .collect()
        }
        Algorithm::Rloo => {
            if n == 1 {
                return vec![0.0];
            }
            let total: f64 = rewards.iter().sum();
            rewards
                .iter()
                .map(|r| r - (total - r) / (n - 1) as f64)
                .collect()
        }
    }
}

/// Population standard deviation (what `reward_std` reports per group).
pub fn std(xs: &[f64]) -> f64 {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt()
}

/// The loss terms of a set of completions, summed over completions (each the mean over its
/// tokens). `lp` [N] are the policy's token log-probs of every completion, consecutive;
/// `counts[i]` tokens belong to completion i; `advantages[i]` is its advantage; `reference`
/// (same layout, no gradient) enables the KL term; `old` (same layout) are the sampling
/// policy's log-probs when a batch is reused for a later step (`None`: this is the policy that
/// sampled it).
pub struct PgTerms {
    pub loss: candle_core::Tensor,
    /// Sum over completions of their mean per-token KL (0 without a reference).
    pub kl: f64,
    /// Fraction of tokens whose ratio was clipped, summed over completions (per-completion mean).
    pub clipped: f64,
}

pub fn pg_loss(
    lp: &candle_core::Tensor,
    counts: &[usize],
    advantages: &[f64],
    old: Option<&candle_core::Tensor>,
    reference: Option<&candle_core::Tensor>,
    beta: f64,
    epsilon: f64,
) -> candle_core::Result<PgTerms> {
    use candle_core::{DType, Tensor};
    let dev = lp.device();
    let dtype = lp.dtype();
    // Per token: the completion's advantage and 1 / its length (so each completion's tokens
    // average, then completions sum).
    let (mut adv, mut inv) = (vec![], vec![]);
    for (&c, &a) in counts.iter().zip(advantages) {
        for _ in 0..c {
            adv.push(a as f32);
            inv.push(1.0 / c as f32);
        }
    }
    let n = adv.len();
    let adv = Tensor::from_vec(adv, n, dev)?.to_dtype(dtype)?;
    let inv = Tensor::from_vec(inv, n, dev)?.to_dtype(dtype)?;
    // d rho / d lp = rho: on the sampling step rho = 1 and the gradient is that of log pi.
    let old = match old {
        Some(o) => o.to_dtype(dtype)?.detach(),
        None => lp.detach(),
    };
    let ratio = (lp - old)?.exp()?;
    let clipped_ratio = ratio.clamp(1.0 - epsilon, 1.0 + epsilon)?;
    let unclipped = (&ratio * &adv)?;
    let clipped = (&clipped_ratio * &adv)?;
    let per_token = unclipped.minimum(&clipped)?.neg()?;
    let was_clipped = unclipped
        .ne(&clipped)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let inv_host: Vec<f64> = inv.to_dtype(DType::F64)?.to_vec1()?;
    let clipped_frac: f64 = was_clipped.iter().zip(&inv_host).map(|(c, i)| c * i).sum();
    let (per_token, kl) = match reference {
        Some(r) => {
            let d = (r - lp)?;
            let k3 = ((d.exp()? - &d)? - 1.0)?;
            let kl: f64 = (&k3 * &inv)?
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            let per_token = if beta > 0.0 {
                (per_token + (k3 * beta)?)?
            } else {
                per_token
            };
            (per_token, kl)
        }
        None => (per_token, 0.0),
    };
    Ok(PgTerms {
        loss: (per_token * inv)?.sum_all()?,
        kl,
        clipped: clipped_frac,
    })
}

/// The token log-probs of completions after their prompts (see `labelled_logprobs`).
pub fn completion_logprobs(
    model: &crate::model::Qwen,
    prompts: &[&[u32]],
    completions: &[&[u32]],
    ctx: crate::model::ctx::ForwardCtx,
) -> candle_core::Result<super::LabelledLogprobs> {
    let seqs: Vec<(Vec<u32>, Vec<bool>)> = prompts
        .iter()
        .zip(completions)
        .map(|(p, c)| {
            let ids = [*p, *c].concat();
            let labelled = (0..ids.len()).map(|i| i >= p.len()).collect();
            (ids, labelled)
        })
        .collect();
    let refs: Vec<(&[u32], &[bool])> = seqs
        .iter()
        .map(|(i, l)| (i.as_slice(), l.as_slice()))
        .collect();
    labelled_logprobs(model, &refs, ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    #[test]
    fn advantages_of_a_hand_computed_group() {
        let r = [1.0, 2.0, 3.0, 6.0];
        // mean 3, sample std sqrt((4 + 1 + 0 + 9) / 3) = sqrt(14 / 3).
        let a = group_advantages(&r, Algorithm::Grpo, false);
        assert_eq!(a, vec![-2.0, -1.0, 0.0, 3.0]);
        let s = (14.0f64 / 3.0).sqrt() + 1e-4;
        let a = group_advantages(&r, Algorithm::Grpo, true);
        for (x, want) in a.iter().zip([-2.0 / s, -1.0 / s, 0.0, 3.0 / s]) {
            assert!((x - want).abs() < 1e-12);
        }
        // Leave one out: 1 - (2 + 3 + 6) / 3 = -8/3, ..., 6 - 2 = 4.
        let a = group_advantages(&r, Algorithm::Rloo, false);
        for (x, want) in a.iter().zip([-8.0 / 3.0, -4.0 / 3.0, 0.0, 4.0]) {
            assert!((x - want).abs() < 1e-12, "{a:?}");
        }
        assert_eq!(group_advantages(&[5.0], Algorithm::Grpo, true), [0.0]);
        assert_eq!(group_advantages(&[5.0], Algorithm::Rloo, false), [0.0]);
    }

    #[test]
    fn normalize_then_sum_by_hand() {
        // Objective 0: 0, 1 (mean 0.5, std 0.5 -> -1, 1). Objective 1 is the same for both:
        // it adds nothing, whatever its scale.
        let v = vec![vec![0.0, 7.0], vec![1.0, 7.0]];
        let r = aggregate(Aggregation::NormalizeThenSum, &v, &[0.5, 0.5], None, 0.05).unwrap();
        assert_eq!(r, vec![-0.5, 0.5]);
        let r = aggregate(Aggregation::Linear, &v, &[0.5, 0.5], None, 0.05).unwrap();
        assert_eq!(r, vec![3.5, 4.0]);
        assert!(aggregate(Aggregation::Linear, &v, &[1.0], None, 0.05).is_err());
    }

    #[test]
    fn the_loss_of_a_hand_computed_group() {
        // Two completions of 2 and 1 tokens, advantages 1 and -2. Loss = -(mean lp of the
        // first) * 1 + (lp of the second) * 2; its gradient is -1/2, -1/2 on the first's tokens
        // and +2 on the second's.
        let lp = Var::new(&[-0.5f64, -1.0, -2.0], &Device::Cpu).unwrap();
        let t = pg_loss(lp.as_tensor(), &[2, 1], &[1.0, -2.0], None, None, 0.0, 0.2).unwrap();
        let loss = t.loss.to_scalar::<f64>().unwrap();
        // The value: ratios are 1, so loss = -(1 * 1/2 + 1 * 1/2) * 1 - (1 * -2) = -1 + 2 = 1.
        assert!((loss - 1.0).abs() < 1e-12, "{loss}");
        let g = t.loss.backward().unwrap();
        let g = g.get(lp.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(g, vec![-0.5, -0.5, 2.0]);
        assert_eq!(t.clipped, 0.0);
        // KL to a reference equal to the policy is 0; a different one gives the k3 value.
        let same = lp.as_tensor().detach();
        let t = pg_loss(
            lp.as_tensor(),
            &[2, 1],
            &[0.0, 0.0],
            None,
            Some(&same),
            0.1,
            0.2,
        )
        .unwrap();
        assert!(t.kl.abs() < 1e-12);
        let other = Tensor::new(&[0.0f64, -1.0, -2.0], &Device::Cpu).unwrap();
        let t = pg_loss(
            lp.as_tensor(),
            &[2, 1],
            &[0.0, 0.0],
            None,
            Some(&other),
            0.1,
            0.2,
        )
        .unwrap();
        let d: f64 = 0.5;
        let want = (d.exp() - d - 1.0) / 2.0;
        assert!((t.kl - want).abs() < 1e-12, "{} vs {want}", t.kl);
    }

    #[test]
    fn a_reused_batch_clips_the_importance_ratio() {
        // The policy has moved since sampling: token 0's ratio is e^0.5 = 1.65 (clipped to 1.2
        // for a positive advantage), token 1's e^-0.1 = 0.905 (inside the range).
        let lp = Var::new(&[-0.5f64, -1.1], &Device::Cpu).unwrap();
        let old = Tensor::new(&[-1.0f64, -1.0], &Device::Cpu).unwrap();
        let t = pg_loss(lp.as_tensor(), &[2], &[2.0], Some(&old), None, 0.0, 0.2).unwrap();
        let r1 = (-0.1f64).exp();
        // Loss = -(1.2 * 2 + r1 * 2) / 2; the clipped token has no gradient, the other
        // -r1 * 2 / 2 (d rho / d lp = rho).
        let want = -(1.2 * 2.0 + r1 * 2.0) / 2.0;
        let loss = t.loss.to_scalar::<f64>().unwrap();
        assert!((loss - want).abs() < 1e-12, "{loss} vs {want}");
        let g = t.loss.backward().unwrap();
        let g = g.get(lp.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        assert!(g[0].abs() < 1e-12 && (g[1] + r1).abs() < 1e-12, "{g:?}");
        assert!((t.clipped - 0.5).abs() < 1e-12);
        // A negative advantage clips from below: ratio 0.905 is inside, 1.65 is kept (min).
        let t = pg_loss(lp.as_tensor(), &[2], &[-1.0], Some(&old), None, 0.0, 0.05).unwrap();
        let want = -(-(0.5f64.exp()) + -0.95) / 2.0;
        let loss = t.loss.to_scalar::<f64>().unwrap();
        assert!((loss - want).abs() < 1e-12, "{loss} vs {want}");
    }
}
