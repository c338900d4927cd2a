//! Reward-head regression on cached backbone features: masked MSE against normalised ratings;
//! and how good the trained head is: per-objective validation error and correlation against the
//! ratings, and how often it ranks the chosen response of a binarized pair above the rejected.

use super::scalarize::{build as build_scalarizer, ScalarizerKind};
use super::weighting::Weighting;
use crate::model::ctx::ForwardCtx;
use crate::plot::{write_chart, Chart};
use crate::reward::{masked_sq_error, pearson, RewardHead};
use crate::train::{LossOutput, Objective};
use crate::util::keyed::Keyed;
use anyhow::Context;
use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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

/// What `train-rm` writes as `rm_report.json`; the pipeline's summary and the charts read it
/// back as this type.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RewardModelReport {
    pub steps: u64,
    pub train_loss_first: Option<f64>,
    pub train_loss_last: Option<f64>,
    /// Per objective, on the held-out rated completions.
    pub validation: Keyed<HeadFit>,
    /// How often the head ranks the chosen response of a binarized pair first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranking: Option<RankingAccuracy>,
}

/// One objective's validation error and correlation with the ratings (null where undefined,
/// e.g. Pearson r of a constant).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadFit {
    pub mse: Option<f64>,
    pub pearson: Option<f64>,
    pub n: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RankingAccuracy {
    pub pairs: usize,
    /// The linear composite at `weights`.
    pub composite_accuracy: f64,
    pub weights: Vec<f64>,
    pub per_objective_accuracy: Keyed<f64>,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Per-objective validation MSE and Pearson r of the head.
pub fn head_report(
    head: &RewardHead,
    features: &Tensor,
    examples: &[RatedFeatures],
) -> anyhow::Result<Keyed<HeadFit>> {
    let mut out = Keyed::default();
    if examples.is_empty() {
        return Ok(out);
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
        let fit = HeadFit {
            mse: finite(mse),
            pearson: finite(pearson(&p, &t)),
            n: p.len(),
        };
        out.push(name.clone(), fit);
    }
    Ok(out)
}

/// Ranking accuracy over N pairs from their scores [2N][K] (chosen, rejected, chosen, ...):
/// the composite (linear, weights `w`) and each objective alone.
pub fn ranking_report(
    objectives: &[String],
    scores: &[Vec<f32>],
    w: &Weighting,
) -> anyhow::Result<RankingAccuracy> {
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
    let mut per_objective_accuracy = Keyed::default();
    for (j, name) in objectives.iter().enumerate() {
        per_objective_accuracy.push(name.clone(), share(&|c, r| c[j] > r[j]));
    }
    Ok(RankingAccuracy {
        pairs: n,
        composite_accuracy: share(&|c, r| s.scalarize(c) > s.scalarize(r)),
        weights: w.values().to_vec(),
        per_objective_accuracy,
    })
}

impl RewardModelReport {
    /// Reads `rm_report.json`.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a train-rm report", path.display()))
    }

    /// The report as a short table on stderr, a row per objective (NaN without validation data).
    pub fn print(&self, objectives: &[String]) {
        eprintln!("{:<24} {:>10} {:>10}", "objective", "val MSE", "Pearson r");
        for o in objectives {
            let fit = self.validation.get(o);
            eprintln!(
                "{:<24} {:>10.4} {:>10.4}",
                o,
                fit.and_then(|v| v.mse).unwrap_or(f64::NAN),
                fit.and_then(|v| v.pearson).unwrap_or(f64::NAN)
            );
        }
        if let Some(r) = &self.ranking {
            eprintln!(
                "composite reward ranks {:.1}% of {} binarized pairs correctly",
                100.0 * r.composite_accuracy,
                r.pairs
            );
        }
    }

    /// `rm_objectives.svg`: validation MSE and Pearson r per objective (none without a
    /// validation split).
    pub fn write_chart(&self, dir: &Path, png: bool) -> anyhow::Result<Vec<PathBuf>> {
        if self.validation.0.is_empty() {
            return Ok(vec![]);
        }
        let labels: Vec<String> = self.validation.0.iter().map(|(k, _)| k.clone()).collect();
        let get = |f: fn(&HeadFit) -> Option<f64>| -> Vec<f64> {
            self.validation
                .0
                .iter()
                .map(|(_, v)| f(v).unwrap_or(f64::NAN))
                .collect()
        };
        let chart = Chart::Bars {
            title: "reward model on validation",
            labels,
            series: vec![("MSE", get(|v| v.mse)), ("Pearson r", get(|v| v.pearson))],
        };
        write_chart(dir, "rm_objectives", &chart, png)
    }
}
