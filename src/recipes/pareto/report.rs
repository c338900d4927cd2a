//! The Pareto report's measures, as typed values: per weighting each objective's judged mean
//! with its 95% interval, and per policy its front, hypervolume, sparsity, spacing and how
//! each objective's mean follows its weight (Spearman's rho).

use super::answers::weights_tag;
use super::config::{ParetoConfig, PolicySpec};
use super::plan::Plan;
use crate::eval::judge::{mean_objectives, Verdict};
use crate::generate::SamplingConfig;
use crate::objectives::weighting::quantise;
use crate::pareto::{hypervolume, non_dominated, spacing, sparsity, spearman};
use crate::plot::ParetoPoint;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One evaluated weighting of one policy.
#[derive(Debug, Clone, Serialize)]
pub struct WeightingResult {
    pub weights: Vec<f64>,
    /// Mean judged score per objective, and the half-width of its 95% interval.
    pub means: Vec<f64>,
    pub ci95: Vec<f64>,
    pub on_front: bool,
    /// Where its generations are.
    pub generations: String,
}

impl WeightingResult {
    /// A weighting's result from the judge's verdicts on its answers (`d` judged objectives);
    /// whether it is on the front is known once the policy's every weighting is.
    pub fn new(weights: Vec<f64>, verdicts: &[Verdict], d: usize, generations: String) -> Self {
        let means = mean_objectives(verdicts, d);
        let ci95 = intervals(verdicts, &means);
        Self {
            weights,
            means,
            ci95,
            on_front: false,
            generations,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyReport {
    pub name: String,
    pub kind: String,
    /// The sweep directory its adapters came from (`[[policy]] sweep`), and the adapters
    /// evaluated: what a report on a sweep read, as it stood then.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sweep: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<String>,
    pub weightings: Vec<WeightingResult>,
    pub hypervolume: f64,
    /// Hypervolume of its points at the weightings every policy was evaluated at.
    pub hypervolume_shared: f64,
    pub front_size: usize,
    pub sparsity: f64,
    pub spacing: f64,
    /// Per weight objective: Spearman's rho of its weight and its judged mean (null when the
    /// judge has no objective of that name or the policy was evaluated at one weighting).
    pub spearman: Vec<Option<f64>>,
    pub seconds: f64,
}

/// `pareto.json`.
#[derive(Debug, Clone, Serialize)]
pub struct ParetoReport {
    /// The objectives weightings are over.
    pub objectives: Vec<String>,
    pub judged_objectives: Vec<String>,
    pub judge: String,
    pub reference_point: Vec<f64>,
    pub prompts: String,
    pub n_prompts: usize,
    pub shared_weightings: Vec<Vec<f64>>,
    pub sampling: SamplingConfig,
    pub policies: Vec<PolicyReport>,
    pub seconds: f64,
}

/// Each policy's evaluated weightings and the seconds it took, in `[[policy]]` order.
pub struct Evaluated {
    pub results: Vec<Vec<WeightingResult>>,
    pub seconds: Vec<f64>,
}

impl ParetoReport {
    pub fn new(
        cfg: &ParetoConfig,
        plan: &Plan,
        evaluated: Evaluated,
        sampling: SamplingConfig,
        seconds: f64,
    ) -> Self {
        let Evaluated {
            results,
            seconds: policy_seconds,
        } = evaluated;
        // The weightings every policy was evaluated at, in order of first mention.
        let shared: Vec<Vec<f64>> = plan
            .grid
            .iter()
            .chain(cfg.policy.iter().flat_map(|q| q.adapter_weights.iter()))
            .map(|w| quantise(w))
            .filter(|w| results.iter().all(|r| r.iter().any(|x| x.weights == *w)))
            .fold(vec![], |mut acc, w| {
                if !acc.contains(&w) {
                    acc.push(w);
                }
                acc
            });
        let policies = cfg
            .policy
            .iter()
            .zip(results)
            .zip(policy_seconds)
            .map(|((pol, rs), secs)| policy_report(plan, &shared, pol, rs, secs))
            .collect();
        ParetoReport {
            objectives: plan.objectives.clone(),
            judged_objectives: plan.judged.clone(),
            judge: plan.judge.describe(),
            reference_point: plan.reference.clone(),
            prompts: cfg.pareto.prompts.clone(),
            n_prompts: plan.prompts.len(),
            shared_weightings: shared,
            sampling,
            policies,
            seconds,
        }
    }

    /// Every policy's weightings as points in judged-objective space, for the plots.
    pub fn points(&self) -> Vec<ParetoPoint> {
        self.policies
            .iter()
            .flat_map(|r| {
                r.weightings.iter().map(|w| ParetoPoint {
                    label: weights_tag(&w.weights),
                    policy: r.name.clone(),
                    means: w.means.clone(),
                    half_widths: w.ci95.clone(),
                    on_front: w.on_front,
                })
            })
            .collect()
    }
}

/// A policy's front and measures over its evaluated weightings `rs`.
fn policy_report(
    plan: &Plan,
    shared: &[Vec<f64>],
    policy: &PolicySpec,
    mut rs: Vec<WeightingResult>,
    seconds: f64,
) -> PolicyReport {
    let points: Vec<Vec<f64>> = rs.iter().map(|r| r.means.clone()).collect();
    let front = non_dominated(&points);
    for &f in &front {
        rs[f].on_front = true;
    }
    let front_points: Vec<Vec<f64>> = front.iter().map(|&f| points[f].clone()).collect();
    let shared_points: Vec<Vec<f64>> = rs
        .iter()
        .filter(|r| shared.contains(&r.weights))
        .map(|r| r.means.clone())
        .collect();
    let rho = plan
        .objectives
        .iter()
        .enumerate()
        .map(|(j, name)| {
            let col = plan.judged.iter().position(|o| o == name)?;
            let x: Vec<f64> = rs.iter().map(|r| r.weights[j]).collect();
            let y: Vec<f64> = rs.iter().map(|r| r.means[col]).collect();
            spearman(&x, &y)
        })
        .collect();
    PolicyReport {
        name: policy.name.clone(),
        kind: policy.kind().into(),
        sweep: policy.sweep.clone(),
        adapters: policy.adapters.clone(),
        hypervolume: hypervolume(&points, &plan.reference),
        hypervolume_shared: hypervolume(&shared_points, &plan.reference),
        front_size: front.len(),
        sparsity: sparsity(&front_points),
        spacing: spacing(&front_points),
        spearman: rho,
        seconds,
        weightings: rs,
    }
}

/// Per objective, the half-width of the 95% interval of its mean (normal approximation).
fn intervals(verdicts: &[Verdict], means: &[f64]) -> Vec<f64> {
    let n = verdicts.len() as f64;
    means
        .iter()
        .enumerate()
        .map(|(j, mean)| {
            let var = verdicts
                .iter()
                .map(|v| (v.objectives[j] as f64 - mean).powi(2))
                .sum::<f64>()
                / (n - 1.0).max(1.0);
            1.96 * (var / n).sqrt()
        })
        .collect()
}

/// `[0.93, -, 0.50]`: each objective's rho (`-` where there is none).
pub fn fmt_rho(r: &[Option<f64>]) -> String {
    let parts: Vec<String> = r
        .iter()
        .map(|x| x.map_or("-".into(), |x| format!("{x:.2}")))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// What the pipeline's summary keeps of a Pareto report: each policy's hypervolume and rho.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParetoBrief {
    pub output_dir: PathBuf,
    pub seconds: f64,
    pub policies: Vec<ParetoPolicyBrief>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParetoPolicyBrief {
    pub name: String,
    pub hypervolume: f64,
    pub spearman: Vec<Option<f64>>,
}

impl ParetoBrief {
    /// The brief of `report`, written to `output_dir` in `seconds`.
    pub fn of(report: &ParetoReport, output_dir: PathBuf, seconds: f64) -> Self {
        Self {
            output_dir,
            seconds,
            policies: report
                .policies
                .iter()
                .map(|p| ParetoPolicyBrief {
                    name: p.name.clone(),
                    hypervolume: p.hypervolume,
                    spearman: p.spearman.clone(),
                })
                .collect(),
        }
    }
}
