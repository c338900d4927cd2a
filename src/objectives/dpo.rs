//! Direct Preference Optimization and its multi-objective forms.
//!
//! Per pair, with summed response log-probs and h = beta * [(pi_c - ref_c) - (pi_r - ref_r)]:
//!     logit = (h + offset) * scale
//! Plain DPO: offset 0, scale 1. Hybrid: offset = lambda * (s(r_c) - s(r_r)), a
//! constant from the frozen reward model. MODPO: offset = -w_rest . (r_c - r_r), scale = 1 / w_k.
//! Losses: sigmoid -log sig(logit) (with label smoothing eps: the cDPO form), robust (= the cDPO
//! form), ipo (logit / beta - 1 / (2 beta))^2, hinge max(0, 1 - logit).

use super::pair::pair_logprobs_gated;
use crate::data::preference::PreferencePair;
use crate::model::ctx::ForwardCtx;
use crate::model::Qwen;
use crate::train::{LossOutput, Objective};
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
}

/// The `[dpo]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    pub beta: f64,
    pub loss_type: DpoLoss,
    /// eps of the label-smoothed (cDPO) loss, used by `sigmoid` and `robust`.
    pub label_smoothing: f64,
    /// Weight of an NLL term on the chosen response (mean over its tokens); 0 disables it.
    pub nll_weight: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss_type: DpoLoss::Sigmoid,
            label_smoothing: 0.0,
            nll_weight: 0.0,
        }
    }
}

impl DpoConfig {
    /// Refuses values that would train toward the rejected answers or not train at all.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.beta.is_finite() && self.beta > 0.0,
            "dpo.beta must be a finite number > 0 (a negative beta trains toward the rejected answers, 0 learns nothing), got {}",
            self.beta
        );
        anyhow::ensure!(
            (0.0..0.5).contains(&self.label_smoothing),
            "dpo.label_smoothing must be in [0, 0.5) (0.5 and above reverse or erase the preference), got {}",
            self.label_smoothing
        );
        anyhow::ensure!(
            self.nll_weight.is_finite() && self.nll_weight >= 0.0,
            "dpo.nll_weight must be >= 0, got {}",
            self.nll_weight
        );
        Ok(())
    }
}

/// A pair with everything frozen about it precomputed.
#[derive(Debug, Clone)]
pub struct DpoExample {
    pub pair: PreferencePair,
    /// Reference (adapters off) summed log-probs.
    pub ref_chosen: f32,
    pub ref_rejected: f32,
    /// Constant added to h (hybrid: lambda * (s_c - s_r); MODPO: -w_rest . (r_c - r_r)).
    pub offset: f32,
    /// Factor applied to (h + offset) (MODPO: 1 / w_k).
    pub scale: f32,
    /// Gates of a weight-conditioned adapter's blocks for this pair (empty: none).
    pub gate: Vec<f32>,
}

/// log sigmoid(x), stable for large |x|: min(x, 0) - log(1 + exp(-|x|)).
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let abs = x.abs()?;
    let min0 = ((x - &abs)? * 0.5)?;
    min0 - (abs.neg()?.exp()? + 1.0)?.log()?
}

/// Per-pair losses [B] and the metric values of a batch, from summed log-probs.
pub struct DpoTerms {
    pub losses: Tensor,
    pub logits: Tensor,
    /// beta * (pi - ref) for chosen and rejected.
    pub reward_chosen: Tensor,
    pub reward_rejected: Tensor,
}

pub fn dpo_terms(
    cfg: &DpoConfig,
    pi_c: &Tensor,
    pi_r: &Tensor,
    ref_c: &Tensor,
    ref_r: &Tensor,
    offset: &Tensor,
    scale: &Tensor,
) -> Result<DpoTerms> {
    let reward_chosen = ((pi_c - ref_c)? * cfg.beta)?;
    let reward_rejected = ((pi_r - ref_r)? * cfg.beta)?;
    let h = (&reward_chosen - &reward_rejected)?;
    let logits = ((h + offset)? * scale)?;
    let eps = cfg.label_smoothing;
    let losses = match cfg.loss_type {
        DpoLoss::Sigmoid | DpoLoss::Robust => {
            let pos = (log_sigmoid(&logits)? * (-(1.0 - eps)))?;
            if eps == 0.0 {
                pos
            } else {
                (pos - (log_sigmoid(&logits.neg()?)? * eps)?)?
            }
        }
        DpoLoss::Ipo => ((&logits / cfg.beta)? - 1.0 / (2.0 * cfg.beta))?.sqr()?,
        DpoLoss::Hinge => (logits.neg()? + 1.0)?.relu()?,
    };
    Ok(DpoTerms {
        losses,
        logits,
        reward_chosen,
        reward_rejected,
    })
}

pub struct Dpo<'a> {
    pub model: &'a Qwen,
    pub cfg: DpoConfig,
    /// Log the explicit-reward metrics (hybrid / MODPO runs).
    pub explicit: bool,
}

impl Objective for Dpo<'_> {
    type Example = DpoExample;

    fn tokens(&self, ex: &DpoExample) -> usize {
        ex.pair.packed_len()
    }

    fn weight(&self, _ex: &DpoExample) -> f64 {
        1.0
    }

    fn loss(&self, batch: &[&DpoExample], ctx: ForwardCtx) -> Result<LossOutput> {
        let dev = &self.model.device;
        let ids: Vec<_> = batch.iter().map(|e| e.pair.ids()).collect();
        let gates: Vec<&[f32]> = batch.iter().map(|e| e.gate.as_slice()).collect();
        let lp = pair_logprobs_gated(self.model, &ids, &gates, ctx)?;
        let col = |f: &dyn Fn(&DpoExample) -> f32| {
            Tensor::from_vec(
                batch.iter().map(|e| f(e)).collect::<Vec<f32>>(),
                batch.len(),
                dev,
            )
        };
        let (ref_c, ref_r) = (col(&|e| e.ref_chosen)?, col(&|e| e.ref_rejected)?);
        let (offset, scale) = (col(&|e| e.offset)?, col(&|e| e.scale)?);
        let t = dpo_terms(
            &self.cfg,
            &lp.chosen,
            &lp.rejected,
            &ref_c,
            &ref_r,
            &offset,
            &scale,
        )?;
        let mut loss = t.losses.sum_all()?;
        if self.cfg.nll_weight > 0.0 {
            let n = Tensor::from_vec(
                lp.chosen_tokens
                    .iter()
                    .map(|&n| n as f32)
                    .collect::<Vec<_>>(),
                batch.len(),
                dev,
            )?;
            loss = (loss + ((&lp.chosen / n)?.sum_all()? * (-self.cfg.nll_weight))?)?;
        }
        let v = |t: &Tensor| t.to_vec1::<f32>();
        let (rc, rr, pc, pr, logits) = (
            v(&t.reward_chosen)?,
            v(&t.reward_rejected)?,
            v(&lp.chosen)?,
            v(&lp.rejected)?,
            v(&t.logits)?,
        );
        let sum = |xs: &[f32]| xs.iter().map(|&x| x as f64).sum::<f64>();
        let margins: Vec<f32> = rc.iter().zip(&rr).map(|(c, r)| c - r).collect();
        let mut metrics = vec![
            ("rewards/chosen".to_string(), sum(&rc)),
            ("rewards/rejected".to_string(), sum(&rr)),
            ("rewards/margins".to_string(), sum(&margins)),
            (
                "rewards/accuracies".to_string(),
                margins.iter().filter(|&&m| m > 0.0).count() as f64,
            ),
            ("logps/chosen".to_string(), sum(&pc)),
            ("logps/rejected".to_string(), sum(&pr)),
        ];
        if self.explicit {
            let (mut expl, mut share) = (0.0, 0.0);
            for (i, e) in batch.iter().enumerate() {
                let explicit = (e.offset * e.scale) as f64;
                let implicit = (margins[i] * e.scale) as f64;
                expl += explicit;
                let denom = explicit.abs() + implicit.abs();
                share += if denom > 0.0 {
                    explicit.abs() / denom
                } else {
                    0.0
                };
            }
            metrics.push(("explicit/margin".to_string(), expl));
            metrics.push(("explicit/share".to_string(), share));
            metrics.push(("logits".to_string(), sum(&logits)));
        }
        Ok(LossOutput {
            loss_sum: loss,
            metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    /// Hand-computed: pi_c=-10, pi_r=-12, ref_c=-11, ref_r=-11, beta=0.5 -> rewards 0.5, -0.5,
    /// h = 1.0; second pair: pi_c=-5, pi_r=-4, ref_c=-5, ref_r=-5 -> rewards 0, 0.5, h = -0.5.
    #[test]
    fn losses_match_hand_computed_values() {
        let (pc, pr, rc, rr) = (
            t(&[-10.0, -5.0]),
            t(&[-12.0, -4.0]),
            t(&[-11.0, -5.0]),
            t(&[-11.0, -5.0]),
        );
        let (zero, one) = (t(&[0.0, 0.0]), t(&[1.0, 1.0]));
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let h = [1.0f64, -0.5];
        let cases: Vec<(DpoLoss, f64, Vec<f64>)> = vec![
            (
                DpoLoss::Sigmoid,
                0.0,
                h.iter().map(|&x| -sig(x).ln()).collect(),
            ),
            (
                DpoLoss::Sigmoid,
                0.1,
                h.iter()
                    .map(|&x| -0.9 * sig(x).ln() - 0.1 * sig(-x).ln())
                    .collect(),
            ),
            (
                DpoLoss::Robust,
                0.2,
                h.iter()
                    .map(|&x| -0.8 * sig(x).ln() - 0.2 * sig(-x).ln())
                    .collect(),
            ),
            (
                DpoLoss::Ipo,
                0.0,
                h.iter().map(|&x| (x / 0.5 - 1.0).powi(2)).collect(),
            ),
            (
                DpoLoss::Hinge,
                0.0,
                h.iter().map(|&x| (1.0 - x).max(0.0)).collect(),
            ),
        ];
        for (loss_type, eps, want) in cases {
            let cfg = DpoConfig {
                beta: 0.5,
                loss_type,
                label_smoothing: eps,
                ..DpoConfig::default()
            };
            let terms = dpo_terms(&cfg, &pc, &pr, &rc, &rr, &zero, &one).unwrap();
            let got = terms.losses.to_vec1::<f32>().unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (*g as f64 - w).abs() < 1e-6,
                    "{loss_type:?} eps {eps}: {got:?} vs {want:?}"
                );
            }
            assert_eq!(
                terms.reward_chosen.to_vec1::<f32>().unwrap(),
                vec![0.5, 0.0]
            );
            assert_eq!(
                terms.reward_rejected.to_vec1::<f32>().unwrap(),
                vec![-0.5, 0.5]
            );
        }
        // Offset and scale: logit = (h + offset) * scale.
        let cfg = DpoConfig {
            beta: 0.5,
            ..DpoConfig::default()
        };
        let terms = dpo_terms(&cfg, &pc, &pr, &rc, &rr, &t(&[0.25, 1.0]), &t(&[2.0, 0.5])).unwrap();
        assert_eq!(terms.logits.to_vec1::<f32>().unwrap(), vec![2.5, 0.25]);
    }

    #[test]
    fn log_sigmoid_is_stable() {
        let x = t(&[-1000.0, -1.0, 0.0, 1.0, 1000.0]);
        let got = log_sigmoid(&x).unwrap().to_vec1::<f32>().unwrap();
        let want = [
            -1000.0f32,
            -1.313_261_7,
            -std::f32::consts::LN_2,
            -0.313_261_7,
            0.0,
        ];
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?}");
        }
    }
}
