//! The explicit multi-objective term of hybrid DPO and MODPO: per pair, a constant computed
//! from the frozen reward model's scores of both responses, entering the DPO logit as
//! `logit = (h + offset) * scale` (see `dpo.rs`).

use super::scalarize::{build as build_scalarizer, ScalarizerKind};
use super::weighting::Weighting;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Formulation {
    /// logit = beta * h_margin -/+ lambda * (s(r_c) - s(r_r)) (see `Direction`).
    Hybrid,
    /// MODPO: logit = (beta * h_margin - w . (r_c - r_r)) / w_k.
    Modpo,
}

/// Which way the explicit term enters the hybrid logit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// logit = h - lambda * (s(r_c) - s(r_r)): the policy's implicit reward has to cover the
    /// explicit reward as well as the preference, so training moves the policy toward what the
    /// weights favour (the same direction as MODPO). What a user weighting an objective expects.
    Steer,
    /// logit = h + lambda * (s(r_c) - s(r_r)): the hybrid formula read literally. The explicit
    /// reward explains part of each preference, so the policy learns only the rest and moves
    /// away from what the weights favour. Kept to reproduce that reading.
    Offset,
}

/// Which response of a pair the DPO term prefers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreferenceLabel {
    /// The data's `chosen`.
    Data,
    /// The response the weighted reward s_w scores higher (the data's order on a tie), as
    /// MO-ODPO labels pairs: what is preferred follows the weights, so a weighting that favours
    /// detail prefers the detailed answer even where the data chose the concise one.
    Weighted,
}

/// The `[hybrid]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HybridConfig {
    /// Directory written by `train-rm` (may be empty when `rules` is given).
    pub reward_model: String,
    /// Rule-objectives file whose objectives follow the reward model's in the reward vector.
    pub rules: String,
    pub formulation: Formulation,
    /// Hybrid only: `steer` (default) or `offset` (the hybrid formula's literal sign).
    pub direction: Direction,
    pub scalarizer: ScalarizerKind,
    /// Objective weights w (equal when empty).
    pub weights: Vec<f64>,
    /// Strength of the explicit term (hybrid).
    pub lambda: f64,
    /// Chebyshev utopia point z* (1.0 per objective when empty: scores are in [0, 1]).
    pub utopia: Vec<f64>,
    /// Temperature of the smooth Chebyshev scalariser.
    pub mu: f64,
    /// MODPO: w_k, the weight of the objective the preference data itself expresses.
    pub preference_weight: f64,
    /// Hybrid only: `data` (default) or `weighted` (pairs relabelled by s_w).
    pub preference: PreferenceLabel,
    pub score_batch_size: usize,
}

impl Default for HybridConfig {
    fn default() -> Self {
        Self {
            reward_model: String::new(),
            rules: String::new(),
            formulation: Formulation::Hybrid,
            direction: Direction::Steer,
            scalarizer: ScalarizerKind::Linear,
            weights: vec![],
            lambda: 1.0,
            utopia: vec![],
            mu: 0.05,
            preference_weight: 1.0,
            preference: PreferenceLabel::Data,
            score_batch_size: 8,
        }
    }
}

impl HybridConfig {
    /// Refuses values that would silently drop or reverse the explicit term, checked at
    /// config load (before any score is computed); returns the weighting `weights` gives.
    pub fn validate(&self) -> Result<Option<Weighting>> {
        let weights = Weighting::configured(&self.weights, "hybrid.weights")?;
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            bail!(
                "hybrid.lambda must be a finite number >= 0, got {}",
                self.lambda
            );
        }
        if let Some(z) = self.utopia.iter().find(|z| !z.is_finite()) {
            bail!("hybrid.utopia must be finite, got {z}");
        }
        if !(self.mu.is_finite() && self.mu > 0.0) {
            bail!("hybrid.mu must be a finite number > 0, got {}", self.mu);
        }
        if !(self.preference_weight.is_finite() && self.preference_weight > 0.0) {
            bail!(
                "hybrid.preference_weight (MODPO's w_k) must be a finite number > 0, got {}",
                self.preference_weight
            );
        }
        if self.preference == PreferenceLabel::Weighted && self.formulation == Formulation::Modpo {
            bail!("hybrid.preference = \"weighted\" is for formulation = \"hybrid\": MODPO's preference data stands for one objective of its own");
        }
        if self.score_batch_size == 0 {
            bail!("hybrid.score_batch_size must be at least 1");
        }
        Ok(weights)
    }
}

/// s_w of both reward vectors under `h`'s scalariser with weights `w`.
pub fn scalarized_pair(
    h: &HybridConfig,
    w: &[f64],
    chosen: &[f32],
    rejected: &[f32],
) -> Result<(f64, f64)> {
    let utopia = (!h.utopia.is_empty()).then_some(h.utopia.as_slice());
    let s = build_scalarizer(h.scalarizer, w, utopia, h.mu, chosen.len())?;
    Ok((s.scalarize(chosen), s.scalarize(rejected)))
}

/// The constant part of a pair's logit, `(offset, scale)` of `logit = (h + offset) * scale`,
/// from the reward vectors of its chosen and rejected responses.
pub fn explicit_terms(h: &HybridConfig, chosen: &[f32], rejected: &[f32]) -> Result<(f32, f32)> {
    let what = "hybrid.weights";
    let given = Weighting::configured(&h.weights, what)?;
    let w = Weighting::given_or_equal(given.as_ref(), chosen.len(), what)?;
    explicit_terms_with(h, w.values(), chosen, rejected)
}

/// `explicit_terms` with the weights given (a conditioned example's own `w`).
pub fn explicit_terms_with(
    h: &HybridConfig,
    w: &[f64],
    chosen: &[f32],
    rejected: &[f32],
) -> Result<(f32, f32)> {
    match h.formulation {
        Formulation::Hybrid => {
            let (sc, sr) = scalarized_pair(h, w, chosen, rejected)?;
            let sign = match h.direction {
                Direction::Steer => -1.0,
                Direction::Offset => 1.0,
            };
            Ok(((sign * h.lambda * (sc - sr)) as f32, 1.0))
        }
        Formulation::Modpo => {
            let margin: f64 = w
                .iter()
                .zip(chosen.iter().zip(rejected))
                .map(|(w, (c, r))| w * (*c as f64 - *r as f64))
                .sum();
            Ok((-margin as f32, (1.0 / h.preference_weight) as f32))
        }
    }
}
