//! Reward-head regression on cached backbone features: masked MSE against normalised ratings;
//! and how good the trained head is: per-objective validation error and correlation against the
//! ratings, and how often it ranks the chosen response of a binarized pair above the rejected.

use super::scalarize::{build as build_scalarizer, ScalarizerKind};
use super::weighting::Weighting;
use crate::model::ctx::ForwardCtx;
use crate::reward::{masked_sq_error, pearson, RewardHead};
use crate::train::{LossOutput, Objective};
use candle_core::{Result, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct RatedFeatures {
    /// Row of the feature table.
    pub row: usize,
    pub targets: Vec<f32>,
    pub mask: Vec<f32>,
    /// Tokens the backbone ran over (throughput figures only).
    pub tokens: usize,
}

pub struct RewardRegression<'a> {
    pub head: &'a RewardHead,
    /// [N, H] features, one row per response.
    pub features: &'a Tensor,
}

impl Objective for RewardRegression<'_> {
    type Example = RatedFeatures;

    fn tokens(&self, ex: &RatedFeatures) -> usize {
        ex.tokens
    }

    /// One unit per observed rating, so the loss is the MSE over ratings that exist.
    fn weight(&self, ex: &RatedFeatures) -> f64 {
        ex.mask.iter().map(|&m| m as f64).sum()
    }

    fn loss(&self, batch: &[&RatedFeatures], _ctx: ForwardCtx) -> Result<LossOutput> {
        let dev = self.features.device();
        let rows: Vec<u32> = batch.iter().map(|e| e.row as u32).collect();
        let x = self
            .features
            .index_select(&Tensor::new(rows.as_slice(), dev)?, 0)?;
        let k = batch[0].targets.len();
        let flat = |f: &dyn Fn(&RatedFeatures) -> &Vec<f32>| -> Result<Tensor> {
            Tensor::from_vec(
                batch
                    .iter()
                    .flat_map(|e| f(e).iter().copied())
                    .collect::<Vec<f32>>(),
                (batch.len(), k),
                dev,
            )
        };
        let (targets, mask) = (flat(&|e| &e.targets)?, flat(&|e| &e.mask)?);
        let pred = self
            .head
            .predict(&x)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let err = masked_sq_error(&pred, &targets, &mask)
            .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        Ok(LossOutput {
            loss_sum: err.sum_all()?,
            metrics: vec![],
        })
    }
}

/// Per-objective validation MSE and Pearson r of the head.
pub fn head_report(
    head: &RewardHead,
    features: &Tensor,
    examples: &[RatedFeatures],
) -> anyhow::Result<serde_json::Value> {
    let mut out = serde_json::Map::new();
    if examples.is_empty() {
        return Ok(out.into());
    }
    let rows: Vec<u32> = examples.iter().map(|e| e.row as u32).collect();
    let x = features.index_select(&Tensor::new(rows.as_slice(), features.device())?, 0)?;
    let pred = head.predict(&x)?.to_vec2::<f32>()?;
    for (k, name) in head.info.objectives.iter().enumerate() {
        let (mut p, mut t) = (vec![], vec![]);
        for (i, e) in examples.iter().enumerate() {
            if e.mask[k] > 0.0 {
                p.push(pred[i][k] as f64);
                t.push(e.targets[k] as f64);
            }
        }
        let mse =
            p.iter().zip(&t).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / p.len().max(1) as f64;
        out.insert(
            name.clone(),
            serde_json::json!({"mse": mse, "pearson": pearson(&p, &t), "n": p.len()}),
        );
    }
    Ok(out.into())
}

/// Ranking accuracy over N pairs from their scores [2N][K] (chosen, rejected, chosen, ...):
/// the composite (linear, weights `w`) and each objective alone.
pub fn ranking_report(
    objectives: &[String],
    scores: &[Vec<f32>],
    w: &Weighting,
) -> anyhow::Result<serde_json::Value> {
    let n = scores.len() / 2;
    let s = build_scalarizer(
        ScalarizerKind::Linear,
        w.values(),
        None,
        1.0,
        objectives.len(),
    )?;
    let share = |better: &dyn Fn(&[f32], &[f32]) -> bool| {
        let c = (0..n)
            .filter(|&i| better(&scores[2 * i], &scores[2 * i + 1]))
            .count();
        c as f64 / n.max(1) as f64
    };
    let mut per_objective = serde_json::Map::new();
    for (j, name) in objectives.iter().enumerate() {
        per_objective.insert(name.clone(), share(&|c, r| c[j] > r[j]).into());
    }
    Ok(serde_json::json!({
        "pairs": n,
        "composite_accuracy": share(&|c, r| s.scalarize(c) > s.scalarize(r)),
        "weights": w.values(),
        "per_objective_accuracy": per_objective,
    }))
}

/// The report as a short table on stderr.
pub fn print_report(report: &serde_json::Value, objectives: &[String]) {
    eprintln!("{:<24} {:>10} {:>10}", "objective", "val MSE", "Pearson r");
    for o in objectives {
        let v = &report["validation"][o];
        eprintln!(
            "{:<24} {:>10.4} {:>10.4}",
            o,
            v["mse"].as_f64().unwrap_or(f64::NAN),
            v["pearson"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(acc) = report["ranking"]["composite_accuracy"].as_f64() {
        eprintln!(
            "composite reward ranks {:.1}% of {} binarized pairs correctly",
            100.0 * acc,
            report["ranking"]["pairs"]
        );
    }
}
