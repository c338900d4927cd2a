//! What a Pareto report evaluates, checked before its directory is claimed: the objectives the
//! weightings are over, the weightings, each policy's conditioning, the judge and its
//! reference point, and the held-out prompts.

use super::config::{ParetoConfig, ParetoSection, PolicySpec};
use crate::eval::judge::Judge;
use crate::eval::prompts::{prompts_that_fit, read_prompt_records, PromptRecord};
use crate::model::dtype::parse_dtype;
use crate::model::loader::select_device;
use crate::objectives::conditioning::{ConditioningInfo, ConditioningMode};
use crate::objectives::weighting::{quantise, Weighting};
use crate::pareto::simplex_grid;
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use std::path::Path;

pub struct Plan {
    pub device: Device,
    pub dtype: DType,
    /// Each conditioned policy's conditioning, read once (`None` for other policies).
    pub infos: Vec<Option<ConditioningInfo>>,
    /// The objectives weightings are over, in order.
    pub objectives: Vec<String>,
    /// The weightings (quantised) every policy evaluates that was not trained one adapter per
    /// weighting.
    pub grid: Vec<Vec<f64>>,
    pub judge: Judge,
    /// The objectives the judge scores.
    pub judged: Vec<String>,
    /// Hypervolume reference point, one value per judged objective.
    pub reference: Vec<f64>,
    pub prompts: Vec<PromptRecord>,
}

/// One (policy, weighting) to evaluate.
pub struct Job {
    /// Its index in `[[policy]]`.
    pub policy: usize,
    /// Quantised, as the conditioning line states it.
    pub weights: Weighting,
}

impl Plan {
    pub fn new(cfg: &ParetoConfig) -> Result<Plan> {
        let p = &cfg.pareto;
        for (k, v) in [
            ("model", &p.model),
            ("prompts", &p.prompts),
            ("judge", &p.judge),
        ] {
            if v.is_empty() {
                bail!("pareto.{k} is empty");
            }
        }
        if cfg.policy.is_empty() {
            bail!(
                "no [[policy]]: name a conditioned adapter, adapters with their weightings, or a soup"
            );
        }
        let device = select_device(&p.device)?;
        let dtype = parse_dtype(&p.dtype)?;
        for (i, pol) in cfg.policy.iter().enumerate() {
            for dir in std::iter::once(&pol.conditioned)
                .chain(&pol.adapters)
                .chain(&pol.soup)
                .filter(|d| !d.is_empty())
            {
                if !Path::new(dir).join("adapter_config.json").is_file() {
                    bail!(
                        "policy[{i}] ({}): {dir} is not an adapter directory (no adapter_config.json)",
                        pol.name
                    );
                }
            }
        }
        let infos: Vec<Option<ConditioningInfo>> = cfg
            .policy
            .iter()
            .map(|pol| {
                (!pol.conditioned.is_empty())
                    .then(|| ConditioningInfo::require(Path::new(&pol.conditioned)))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let objectives = weight_objectives(cfg, &infos)?;
        let k = objectives.len();
        for (i, pol) in cfg.policy.iter().enumerate() {
            check_policy(pol, i, k)?;
            // A gated adapter's blocks are checked here, before the report directory is claimed.
            if let Some(info) = infos[i]
                .as_ref()
                .filter(|info| info.mode() == ConditioningMode::Adapter)
            {
                info.block_dirs(Path::new(&pol.conditioned))?;
            }
        }
        check_weightings(cfg, &objectives)?;
        let grid = if p.weights.is_empty() {
            if p.grid == 0 {
                bail!("pareto.grid must be at least 1 (or give pareto.weights)");
            }
            // C(grid + k - 1, k - 1) weightings, each answered and judged: bounded before the
            // grid is built.
            let points = (1..k).fold(1.0f64, |c, j| c * (p.grid + j) as f64 / j as f64);
            if points > 10_000.0 {
                bail!(
                    "pareto.grid = {} gives {points:.0} weightings of {k} objectives; at most 10000 are evaluated",
                    p.grid
                );
            }
            simplex_grid(k, p.grid)
        } else {
            p.weights.clone()
        };
        let grid: Vec<Vec<f64>> = grid.iter().map(|w| quantise(w)).collect();
        let judge = Judge::load(&p.judge, &[], dtype, &device)?;
        let judged = judge.objectives();
        if judged.is_empty() {
            bail!("pareto.judge {} gives one score, not one per objective: use rules:FILE or a train-rm directory", p.judge);
        }
        let reference = reference_point(p, &judge, judged.len())?;
        let (prompts, _) = prompts_that_fit(
            read_prompt_records(&p.prompts, p.max_prompts)?,
            &[p.model.as_str()],
            crate::eval::prompts::ANSWER_ROOM,
        )?;
        Ok(Plan {
            device,
            dtype,
            infos,
            objectives,
            grid,
            judge,
            judged,
            reference,
            prompts,
        })
    }

    /// Every (policy, weighting) to evaluate, in order: a policy trained one adapter per
    /// weighting at its own weightings, any other at the grid.
    pub fn jobs(&self, cfg: &ParetoConfig) -> Result<Vec<Job>> {
        let mut jobs = vec![];
        for (i, pol) in cfg.policy.iter().enumerate() {
            let weightings: Vec<Vec<f64>> = if pol.adapters.is_empty() {
                self.grid.clone()
            } else {
                pol.adapter_weights.iter().map(|w| quantise(w)).collect()
            };
            for w in weightings {
                let weights = Weighting::new(w, &format!("policy[{i}] ({}) weights", pol.name))?;
                jobs.push(Job { policy: i, weights });
            }
        }
        Ok(jobs)
    }
}

fn check_policy(p: &PolicySpec, i: usize, k: usize) -> Result<()> {
    let here = format!("policy[{i}] ({})", p.name);
    if p.name.is_empty() || p.name.contains(['/', '\\']) || p.name.starts_with('.') {
        bail!("{here}: name must be a plain, non-empty name (it names a directory of generations)");
    }
    let given = [
        !p.conditioned.is_empty(),
        !p.adapters.is_empty(),
        !p.soup.is_empty(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        bail!("{here}: give exactly one of conditioned, adapters (with adapter_weights) or soup");
    }
    if !p.adapters.is_empty() && p.adapter_weights.len() != p.adapters.len() {
        bail!(
            "{here}: {} adapters but {} adapter_weights: give the weighting each was trained for",
            p.adapters.len(),
            p.adapter_weights.len()
        );
    }
    if !p.soup.is_empty() && p.soup.len() != k {
        bail!(
            "{here}: a soup takes one adapter per objective ({k}), got {}",
            p.soup.len()
        );
    }
    Ok(())
}

/// Every weighting the config gives, checked: `pareto.weights` (over `objectives`), and the
/// `adapter_weights` of each policy trained one adapter per weighting.
fn check_weightings(cfg: &ParetoConfig, objectives: &[String]) -> Result<()> {
    for (i, w) in cfg.pareto.weights.iter().enumerate() {
        Weighting::for_objectives(w.clone(), objectives, &format!("pareto.weights[{i}]"))?;
    }
    for (i, p) in cfg.policy.iter().enumerate() {
        if !p.adapters.is_empty() {
            let here = format!("policy[{i}] ({})", p.name);
            for (j, w) in p.adapter_weights.iter().enumerate() {
                let what = format!("{here}: adapter_weights[{j}]");
                Weighting::for_objectives(w.clone(), objectives, &what)?;
            }
        }
    }
    Ok(())
}

/// The objectives weightings are over (`infos`: each policy's conditioning, if any).
fn weight_objectives(
    cfg: &ParetoConfig,
    infos: &[Option<ConditioningInfo>],
) -> Result<Vec<String>> {
    let conditioned: Vec<(&ConditioningInfo, &PolicySpec)> = infos
        .iter()
        .zip(&cfg.policy)
        .filter_map(|(c, p)| c.as_ref().map(|c| (c, p)))
        .collect();
    let names = if !cfg.pareto.objectives.is_empty() {
        cfg.pareto.objectives.clone()
    } else if let Some((c, _)) = conditioned.first() {
        c.objectives.clone()
    } else {
        bail!("pareto.objectives is empty and no policy is conditioned: name the objectives the weightings are over");
    };
    for (c, p) in conditioned {
        if c.objectives != names {
            bail!(
                "{}: conditioned on {:?}, but the weightings are over {names:?}",
                p.conditioned,
                c.objectives
            );
        }
    }
    Ok(names)
}

fn reference_point(p: &ParetoSection, judge: &Judge, d: usize) -> Result<Vec<f64>> {
    if !p.reference_point.is_empty() {
        if p.reference_point.len() != d {
            bail!(
                "pareto.reference_point has {} values for {d} judged objectives {:?}",
                p.reference_point.len(),
                judge.objectives()
            );
        }
        return Ok(p.reference_point.clone());
    }
    Ok(match judge {
        Judge::Rules { rules, .. } => rules.ranges().into_iter().map(|(lo, _)| lo).collect(),
        _ => vec![0.0; d],
    })
}
