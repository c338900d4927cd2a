//! `mo-align pareto`: the trade-off a policy offers, measured. For every weighting (a simplex
//! grid or a list), each policy answers the same held-out prompts, the judge scores every
//! answer on every objective, and the report gives per weighting each objective's mean with a
//! 95% interval, and per policy its Pareto front, hypervolume, sparsity and spacing, and how
//! each objective's mean follows its weight (Spearman's rho). Policies: one conditioned adapter
//! (every weighting stated in its system prompt), adapters trained one per weighting, or a
//! Rewarded soup of per-objective adapters. Generations are cached per (policy, weighting) on
//! what they depend on, so a re-run only scores.

use super::prepare_report;
use crate::cache::Digest;
use crate::eval::load_for_eval;
use crate::eval::prompts::{prompts_that_fit, read_prompt_records, PromptRecord};
use crate::eval::win_rate::{answer_prompts, judge_answers};
use crate::generate::{SamplingArgs, SamplingConfig};
use crate::judge::Judge;
use crate::model::loader::{load_soup, select_device, Loaded};
use crate::model::parse_dtype;
use crate::objectives::conditioning::{ConditioningInfo, ConditioningMode};
use crate::objectives::weighting::{format_line, quantise, Weighting, PREFIX};
use crate::pareto::{hypervolume, non_dominated, simplex_grid, spacing, sparsity, spearman};
use crate::plot::{write_pareto_plots, ParetoPoint};
use crate::tokenizer::Message;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The `[pareto]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParetoSection {
    pub output_dir: String,
    /// The checkpoint every policy's adapters apply to.
    pub model: String,
    /// An adapter merged into `model` first (e.g. a LoRA SFT adapter).
    pub base_adapter: Option<String>,
    /// Held-out prompts (`prompt`, `messages` or `chosen` records).
    pub prompts: String,
    pub max_prompts: Option<usize>,
    /// `rules:FILE` (rule objectives) or a train-rm directory.
    pub judge: String,
    /// The objectives weightings are over, in order (default: the first conditioned policy's,
    /// else the judge's).
    pub objectives: Vec<String>,
    /// Simplex grid resolution: weights in steps of 1/grid.
    pub grid: usize,
    /// Weightings to evaluate instead of the grid.
    pub weights: Vec<Vec<f64>>,
    /// Hypervolume reference point, one value per judged objective (default: each objective's
    /// lowest possible score for rules, 0 for a reward model).
    pub reference_point: Vec<f64>,
    pub gen_batch_size: usize,
    pub dtype: String,
    pub device: String,
}

impl Default for ParetoSection {
    fn default() -> Self {
        Self {
            output_dir: "runs/pareto".into(),
            model: String::new(),
            base_adapter: None,
            prompts: String::new(),
            max_prompts: Some(200),
            judge: String::new(),
            objectives: vec![],
            grid: 4,
            weights: vec![],
            reference_point: vec![],
            gen_batch_size: 8,
            dtype: "f32".into(),
            device: "auto".into(),
        }
    }
}

/// One `[[policy]]`: exactly one of `conditioned`, `adapters` or `soup`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySpec {
    pub name: String,
    /// A weight-conditioned adapter (it has conditioning.json): one model, every weighting.
    pub conditioned: String,
    /// Adapters trained one per weighting ...
    pub adapters: Vec<String>,
    /// ... and the weighting each was trained for (same order).
    pub adapter_weights: Vec<Vec<f64>>,
    /// One adapter per objective (in the objectives' order), mixed by each weighting.
    pub soup: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ParetoConfig {
    pub pareto: ParetoSection,
    /// Decoding; unset keys come from the model's generation_config.json.
    pub sampling: SamplingArgs,
    pub policy: Vec<PolicySpec>,
}

/// How a policy answers at one weighting.
enum Variant<'a> {
    /// The conditioned adapter, reading `line`.
    Conditioned {
        adapter: &'a str,
        info: &'a ConditioningInfo,
        line: String,
    },
    /// An adapter trained for this weighting.
    Adapter(&'a str),
    /// The soup at these weights (a Rewarded soup, or an adapter-conditioned policy's blocks).
    Soup(Vec<String>),
}

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

#[derive(Debug, Clone, Serialize)]
pub struct PolicyReport {
    pub name: String,
    pub kind: String,
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

/// Runs the report; returns its directory and `pareto.json`'s content.
pub fn run(
    config: Option<&Path>,
    overrides: &[String],
    quiet: bool,
    force: bool,
) -> Result<(PathBuf, serde_json::Value)> {
    let started = Instant::now();
    let cfg: ParetoConfig = crate::config::load(config, overrides)?;
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
    // Each conditioned policy's conditioning, read once (`None` for other policies).
    let infos: Vec<Option<ConditioningInfo>> = cfg
        .policy
        .iter()
        .map(|pol| {
            (!pol.conditioned.is_empty())
                .then(|| ConditioningInfo::require(Path::new(&pol.conditioned)))
                .transpose()
        })
        .collect::<Result<_>>()?;
    let objectives = weight_objectives(&cfg, &infos)?;
    let k = objectives.len();
    for (i, pol) in cfg.policy.iter().enumerate() {
        check_policy(pol, i, &objectives)?;
        // A gated adapter's blocks are checked here, before the report directory is claimed.
        if let Some(info) = infos[i]
            .as_ref()
            .filter(|info| info.mode() == ConditioningMode::Adapter)
        {
            info.block_dirs(Path::new(&pol.conditioned))?;
        }
    }
    let grid = if p.weights.is_empty() {
        if p.grid == 0 {
            bail!("pareto.grid must be at least 1 (or give pareto.weights)");
        }
        // C(grid + k - 1, k - 1) weightings, each answered and judged: bounded before the grid
        // is built.
        let points = (1..k).fold(1.0f64, |c, j| c * (p.grid + j) as f64 / j as f64);
        if points > 10_000.0 {
            bail!(
                "pareto.grid = {} gives {points:.0} weightings of {k} objectives; at most 10000 are evaluated",
                p.grid
            );
        }
        simplex_grid(k, p.grid)
    } else {
        for (i, w) in p.weights.iter().enumerate() {
            Weighting::for_objectives(w.clone(), &objectives, &format!("pareto.weights[{i}]"))?;
        }
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
    let mut run_dir = prepare_report(&p.output_dir, &cfg, force)?;
    // Everything is validated: the report starts writing (cached generations, then results).
    run_dir.commit()?;
    let out = run_dir.path.clone();

    // Every (policy, weighting) to evaluate, in order.
    let mut jobs: Vec<(usize, Vec<f64>)> = vec![];
    for (i, pol) in cfg.policy.iter().enumerate() {
        if pol.adapters.is_empty() {
            jobs.extend(grid.iter().map(|w| (i, w.clone())));
        } else {
            jobs.extend(pol.adapter_weights.iter().map(|w| (i, quantise(w))));
        }
    }
    // Decoding: the flags over the base model's own defaults, one setting for every policy.
    let sampling = {
        let files = crate::model::loader::resolve(&p.model)?;
        let defaults = std::fs::read_to_string(files.dir().join("generation_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let s = cfg.sampling.resolve(defaults.as_ref());
        s.validate()?;
        s
    };
    let progress = crate::train::progress::Progress::new(jobs.len() as u64, 0, quiet, "pareto");
    let base_key = base_digest(p)?;
    let mut conditioned_model: Option<(usize, Loaded)> = None;
    let mut results: Vec<Vec<WeightingResult>> = vec![vec![]; cfg.policy.len()];
    let mut seconds = vec![0.0; cfg.policy.len()];
    for (n, (i, w)) in jobs.iter().enumerate() {
        let t = Instant::now();
        let pol = &cfg.policy[*i];
        let variant = if let Some(info) = &infos[*i] {
            if info.mode() == ConditioningMode::Adapter {
                let blocks = info.block_dirs(Path::new(&pol.conditioned))?;
                Variant::Soup(blocks.iter().map(|b| b.display().to_string()).collect())
            } else {
                Variant::Conditioned {
                    adapter: &pol.conditioned,
                    line: info.line(&Weighting::new(w.clone(), "weights")?)?,
                    info,
                }
            }
        } else if !pol.adapters.is_empty() {
            let j = pol
                .adapter_weights
                .iter()
                .position(|x| quantise(x) == *w)
                .expect("jobs come from adapter_weights");
            Variant::Adapter(&pol.adapters[j])
        } else {
            Variant::Soup(pol.soup.clone())
        };
        let tag = weights_tag(w);
        let gen_path = out
            .join("generations")
            .join(&pol.name)
            .join(format!("{tag}.json"));
        let key = job_key(&base_key, &variant, w, &prompts, &sampling, p)?;
        let answers = match cached_answers(&gen_path, &key) {
            Some(a) => a,
            None => {
                let answers = match &variant {
                    Variant::Conditioned {
                        adapter,
                        info,
                        line,
                    } => {
                        if conditioned_model.as_ref().is_none_or(|(j, _)| j != i) {
                            // Free the previous policy before loading the next.
                            drop(conditioned_model.take());
                            let m = load_for_eval(
                                &p.model,
                                p.base_adapter.as_deref().map(Path::new),
                                Some(Path::new(adapter)),
                                dtype,
                                &device,
                            )?;
                            conditioned_model = Some((*i, m));
                        }
                        let (_, m) = conditioned_model.as_ref().expect("loaded above");
                        let msgs: Vec<Vec<Message>> = prompts
                            .iter()
                            .map(|r| info.place(&r.messages, line))
                            .collect();
                        answer_prompts(m, &msgs, &sampling, p.gen_batch_size)?
                    }
                    Variant::Adapter(a) => {
                        let m = load_for_eval(
                            &p.model,
                            p.base_adapter.as_deref().map(Path::new),
                            Some(Path::new(a)),
                            dtype,
                            &device,
                        )?;
                        answer_prompts(&m, &plain(&prompts), &sampling, p.gen_batch_size)?
                    }
                    Variant::Soup(adapters) => {
                        let dirs: Vec<&Path> = adapters.iter().map(Path::new).collect();
                        let m = load_soup(
                            &p.model,
                            p.base_adapter.as_deref().map(Path::new),
                            &dirs,
                            w,
                            dtype,
                            &device,
                        )?;
                        answer_prompts(&m, &plain(&prompts), &sampling, p.gen_batch_size)?
                    }
                };
                let line = match &variant {
                    Variant::Conditioned { line, .. } => Some(line.clone()),
                    _ => None,
                };
                let record = serde_json::json!({
                    "key": key,
                    "policy": pol.name,
                    "weights": w,
                    "conditioning": line,
                    "sampling": sampling,
                    "answers": prompts.iter().zip(&answers).map(|(r, a)| serde_json::json!({
                        "prompt": r.messages, "answer": a, "source": r.loc,
                    })).collect::<Vec<_>>(),
                });
                crate::io::write_json_atomic(&gen_path, &record)?;
                answers
            }
        };
        let verdicts = judge_answers(&judge, &prompts, &answers, p.gen_batch_size)?;
        let (means, ci95) = means_and_intervals(&verdicts, judged.len());
        results[*i].push(WeightingResult {
            weights: w.clone(),
            means,
            ci95,
            on_front: false,
            generations: gen_path.display().to_string(),
        });
        seconds[*i] += t.elapsed().as_secs_f64();
        progress.set(n as u64 + 1, format!("{} {tag}", pol.name));
    }
    progress.finish();

    let shared: Vec<Vec<f64>> = grid
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
    let mut reports = vec![];
    for ((pol, mut rs), secs) in cfg.policy.iter().zip(results).zip(seconds) {
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
        let rho = objectives
            .iter()
            .enumerate()
            .map(|(j, name)| {
                let col = judged.iter().position(|o| o == name)?;
                let x: Vec<f64> = rs.iter().map(|r| r.weights[j]).collect();
                let y: Vec<f64> = rs.iter().map(|r| r.means[col]).collect();
                spearman(&x, &y)
            })
            .collect();
        reports.push(PolicyReport {
            name: pol.name.clone(),
            kind: kind(pol).into(),
            hypervolume: hypervolume(&points, &reference),
            hypervolume_shared: hypervolume(&shared_points, &reference),
            front_size: front.len(),
            sparsity: sparsity(&front_points),
            spacing: spacing(&front_points),
            spearman: rho,
            seconds: secs,
            weightings: rs,
        });
    }
    let report = serde_json::json!({
        "objectives": objectives,
        "judged_objectives": judged,
        "judge": judge.describe(),
        "reference_point": reference,
        "prompts": p.prompts,
        "n_prompts": prompts.len(),
        "shared_weightings": shared,
        "sampling": sampling,
        "policies": reports,
        "seconds": started.elapsed().as_secs_f64(),
    });
    crate::io::write_json_atomic(&out.join("pareto.json"), &report)?;
    let points: Vec<ParetoPoint> = reports
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
        .collect();
    let plots = write_pareto_plots(&out, &judged, &points, false)?;
    let md = markdown(
        &objectives,
        &judged,
        &reference,
        &reports,
        &shared,
        &plots,
        prompts.len(),
    );
    crate::io::write_atomic(&out.join("pareto.md"), md.as_bytes())?;
    eprintln!(
        "pareto done in {:.1}s: pareto.md and pareto.json in {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    for r in &reports {
        eprintln!(
            "  {:<16} hypervolume {:.4} (shared weightings {:.4}), front {} of {}, rho {}",
            r.name,
            r.hypervolume,
            r.hypervolume_shared,
            r.front_size,
            r.weightings.len(),
            fmt_rho(&r.spearman)
        );
    }
    Ok((out, report))
}

fn kind(p: &PolicySpec) -> &'static str {
    if !p.conditioned.is_empty() {
        "conditioned"
    } else if !p.adapters.is_empty() {
        "adapters"
    } else {
        "soup"
    }
}

fn check_policy(p: &PolicySpec, i: usize, objectives: &[String]) -> Result<()> {
    let k = objectives.len();
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
    if !p.adapters.is_empty() {
        if p.adapter_weights.len() != p.adapters.len() {
            bail!(
                "{here}: {} adapters but {} adapter_weights: give the weighting each was trained for",
                p.adapters.len(),
                p.adapter_weights.len()
            );
        }
        for (j, w) in p.adapter_weights.iter().enumerate() {
            let what = format!("{here}: adapter_weights[{j}]");
            Weighting::for_objectives(w.clone(), objectives, &what)?;
        }
    }
    if !p.soup.is_empty() && p.soup.len() != k {
        bail!(
            "{here}: a soup takes one adapter per objective ({k}), got {}",
            p.soup.len()
        );
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

fn plain(prompts: &[PromptRecord]) -> Vec<Vec<Message>> {
    prompts.iter().map(|r| r.messages.clone()).collect()
}

/// `w=0.50-0.25-0.25-0.00`: a weighting as a file name.
fn weights_tag(w: &[f64]) -> String {
    let parts: Vec<String> = w.iter().map(|x| format!("{x:.2}")).collect();
    format!("w={}", parts.join("-"))
}

/// What every generation depends on besides the policy: the base checkpoint's files.
fn base_digest(p: &ParetoSection) -> Result<Digest> {
    let files = crate::model::loader::resolve(&p.model)?;
    let adapter = p.base_adapter.as_deref().map(Path::new);
    crate::cache::model_digest(&files, adapter, &p.dtype)
}

fn adapter_digest(d: &mut Digest, dir: &str) -> Result<()> {
    d.file(&Path::new(dir).join("adapter_model.safetensors"))?;
    d.file(&Path::new(dir).join("adapter_config.json"))?;
    Ok(())
}

fn job_key(
    base: &Digest,
    variant: &Variant,
    w: &[f64],
    prompts: &[PromptRecord],
    sampling: &SamplingConfig,
    p: &ParetoSection,
) -> Result<String> {
    let mut d = Digest::default();
    d.str(&base.hex());
    match variant {
        Variant::Conditioned {
            adapter,
            info,
            line,
        } => {
            d.str("conditioned")
                .str(line)
                .str(&format!("{:?}", info.placement));
            adapter_digest(&mut d, adapter)?;
        }
        Variant::Adapter(a) => {
            d.str("adapter");
            adapter_digest(&mut d, a)?;
        }
        Variant::Soup(adapters) => {
            d.str("soup").str(&format!("{w:?}"));
            for a in adapters.iter() {
                adapter_digest(&mut d, a)?;
            }
        }
    }
    for r in prompts {
        d.str(&serde_json::to_string(&r.messages)?);
    }
    d.str(&serde_json::to_string(sampling)?)
        .str(&p.gen_batch_size.to_string())
        .str(&p.device);
    Ok(d.hex())
}

/// The answers cached at `path` when they were generated under `key`.
fn cached_answers(path: &Path, key: &str) -> Option<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    if v["key"].as_str()? != key {
        return None;
    }
    v["answers"]
        .as_array()?
        .iter()
        .map(|a| a["answer"].as_str().map(String::from))
        .collect()
}

/// Per objective: the mean and the half-width of its 95% interval (normal approximation).
fn means_and_intervals(verdicts: &[crate::judge::Verdict], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = verdicts.len() as f64;
    (0..d)
        .map(|j| {
            let xs: Vec<f64> = verdicts.iter().map(|v| v.objectives[j] as f64).collect();
            let mean = xs.iter().sum::<f64>() / n;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
            (mean, 1.96 * (var / n).sqrt())
        })
        .unzip()
}

fn fmt_rho(r: &[Option<f64>]) -> String {
    let parts: Vec<String> = r
        .iter()
        .map(|x| x.map_or("-".into(), |x| format!("{x:.2}")))
        .collect();
    format!("[{}]", parts.join(", "))
}

fn markdown(
    objectives: &[String],
    judged: &[String],
    reference: &[f64],
    reports: &[PolicyReport],
    shared: &[Vec<f64>],
    plots: &[PathBuf],
    n_prompts: usize,
) -> String {
    let mut md = String::from("# Pareto report\n\n");
    md.push_str(&format!(
        "Each policy answers the same {n_prompts} held-out prompts at each weighting; every answer is scored on every objective. Weightings are over {objectives:?}. Hypervolume is measured above the reference point {reference:?}; \"shared\" counts only the {} weightings every policy was evaluated at. Spearman's rho: how each objective's mean score follows its weight.\n\n",
        shared.len()
    ));
    for p in plots {
        if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
            md.push_str(&format!("![{name}]({name})\n\n"));
        }
    }
    md.push_str("| policy | kind | weightings | hypervolume | hypervolume (shared) | front | sparsity | spacing | rho per objective | seconds |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for r in reports {
        md.push_str(&format!(
            "| {} | {} | {} | {:.4} | {:.4} | {} | {:.4} | {:.4} | {} | {:.1} |\n",
            r.name,
            r.kind,
            r.weightings.len(),
            r.hypervolume,
            r.hypervolume_shared,
            r.front_size,
            r.sparsity,
            r.spacing,
            fmt_rho(&r.spearman),
            r.seconds
        ));
    }
    for r in reports {
        md.push_str(&format!(
            "\n## {}\n\n| weights | {} | front |\n|---|{}---|\n",
            r.name,
            judged.join(" | "),
            "---|".repeat(judged.len())
        ));
        for w in &r.weightings {
            let cells: Vec<String> = w
                .means
                .iter()
                .zip(&w.ci95)
                .map(|(m, c)| format!("{m:.3} ± {c:.3}"))
                .collect();
            md.push_str(&format!(
                "| {} | {} | {} |\n",
                format_line(objectives, &w.weights).trim_start_matches(PREFIX),
                cells.join(" | "),
                if w.on_front { "yes" } else { "" }
            ));
        }
    }
    md
}

/// The pipeline summary's section on a Pareto report: each policy's hypervolume and rho, the
/// plots, and a link to the whole report (paths relative to the summary's directory).
pub fn summary_section(report: &serde_json::Value, dir: &Path, summary_dir: &Path) -> String {
    let rel = relative_to(dir, summary_dir);
    let mut md = format!(
        "\n## Pareto front\n\nEvery policy answered the held-out prompts at each weighting of {} (full report: [{}/pareto.md]({}/pareto.md)). Hypervolume above {}; rho: Spearman's correlation of each objective's weight with its judged mean (1 = the score rises with every increase of its weight).\n\n| policy | kind | weightings | hypervolume | hypervolume (shared) | rho per objective |\n|---|---|---|---|---|---|\n",
        report["objectives"], rel, rel, report["reference_point"]
    );
    for p in report["policies"].as_array().into_iter().flatten() {
        let rho: Vec<Option<f64>> = p["spearman"]
            .as_array()
            .map(|a| a.iter().map(serde_json::Value::as_f64).collect())
            .unwrap_or_default();
        md.push_str(&format!(
            "| {} | {} | {} | {:.3} | {:.3} | {} |\n",
            p["name"].as_str().unwrap_or("?"),
            p["kind"].as_str().unwrap_or("?"),
            p["weightings"].as_array().map_or(0, Vec::len),
            p["hypervolume"].as_f64().unwrap_or(f64::NAN),
            p["hypervolume_shared"].as_f64().unwrap_or(f64::NAN),
            fmt_rho(&rho),
        ));
    }
    // The trade-off a user steers: each policy at all weight on one objective (and at equal
    // weights), every objective's judged mean.
    let judged: Vec<&str> = report["judged_objectives"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    for p in report["policies"].as_array().into_iter().flatten() {
        let rows: Vec<String> = p["weightings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| {
                let ws: Vec<f64> = w["weights"]
                    .as_array()?
                    .iter()
                    .filter_map(|x| x.as_f64())
                    .collect();
                let k = ws.len() as f64;
                let vertex = ws.contains(&1.0);
                let equal = ws.iter().all(|x| (x - 1.0 / k).abs() < 0.011);
                if !(vertex || equal) {
                    return None;
                }
                let means: Vec<String> = w["means"]
                    .as_array()?
                    .iter()
                    .map(|m| format!("{:.3}", m.as_f64().unwrap_or(f64::NAN)))
                    .collect();
                let label = match ws.iter().position(|x| *x == 1.0) {
                    Some(i) => {
                        format!("all on {}", report["objectives"][i].as_str().unwrap_or("?"))
                    }
                    None => "equal".to_string(),
                };
                Some(format!("| {label} | {} |\n", means.join(" | ")))
            })
            .collect();
        if !rows.is_empty() {
            md.push_str(&format!(
                "\n{} at single-objective weightings (judged means):\n\n| weights | {} |\n|---|{}\n{}",
                p["name"].as_str().unwrap_or("?"),
                judged.join(" | "),
                "---|".repeat(judged.len()),
                rows.concat()
            ));
        }
    }
    md.push_str(&format!(
        "\n![front, objective pairs]({rel}/pareto_pairs.svg)\n\n![front, parallel coordinates]({rel}/pareto_parallel.svg)\n"
    ));
    md
}

/// `path` relative to `base` when it lies below it, else as given.
fn relative_to(path: &Path, base: &Path) -> String {
    let (p, b) = (
        crate::io::resolved_path(path),
        crate::io::resolved_path(base),
    );
    if let Ok(r) = p.strip_prefix(&b) {
        return r.display().to_string();
    }
    // Siblings (runs/demo/pareto next to runs/demo/pipeline): one level up.
    match (p.parent(), b.parent(), p.file_name()) {
        (Some(pp), Some(bp), Some(name)) if pp == bp => format!("../{}", name.to_string_lossy()),
        _ => p.display().to_string(),
    }
}
