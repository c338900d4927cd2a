//! `mo-align dpo`, `hybrid-dpo` and `reward-weighted`: preference stages over the same pieces.
//!
//! Policy = base (+ `model.adapter`, e.g. the SFT adapter, merged) + a fresh LoRA; reference =
//! the same weights with the fresh LoRA disabled (never a second copy). Reference log-probs and
//! reward-model scores depend only on frozen weights, so they are computed once, before
//! training, and cached on disk.

use super::train_rm::score_sequences;
use super::{load_base, load_policy, prepare_output, train_adapter, AdapterRun, ModelConfig};
use crate::cache::{cache_dir, load_or_compute, model_digest, Digest};
use crate::data::preference::{preference_pair, PreferencePair};
use crate::data::{load_splits, DataConfig};
use crate::model::ctx::ForwardCtx;
use crate::model::loader::Loaded;
use crate::model::lora::LoraConfig;
use crate::model::Qwen2;
use crate::objectives::dpo::{Dpo, DpoConfig, DpoExample};
use crate::objectives::pair::{reference_logprobs, PairIds};
use crate::objectives::reward_weighted::{
    advantages, target_gap_reward, Advantage, RewardWeighted, WeightedPair,
};
use crate::objectives::scalarize::{build as build_scalarizer, ScalarizerKind};
use crate::reward::RewardHead;
use crate::train::progress::Progress;
use crate::train::trainer::TrainOutcome;
use crate::train::{Objective, TrainConfig};
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Formulation {
    /// Report 1: logit = beta * h_margin + lambda * (s(r_c) - s(r_r)).
    Hybrid,
    /// MODPO: logit = (beta * h_margin - w . (r_c - r_r)) / w_k.
    Modpo,
}

/// The `[hybrid]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HybridConfig {
    /// Directory written by `train-rm`.
    pub reward_model: String,
    pub formulation: Formulation,
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
    pub score_batch_size: usize,
}

impl Default for HybridConfig {
    fn default() -> Self {
        Self {
            reward_model: String::new(),
            formulation: Formulation::Hybrid,
            scalarizer: ScalarizerKind::Linear,
            weights: vec![],
            lambda: 1.0,
            utopia: vec![],
            mu: 0.05,
            preference_weight: 1.0,
            score_batch_size: 8,
        }
    }
}

/// The `[reward]` section of `reward-weighted`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    pub reward_model: String,
    /// w_i (equal when empty).
    pub weights: Vec<f64>,
    /// target_i (1.0 when empty: the best normalised rating).
    pub targets: Vec<f64>,
    pub advantage: Advantage,
    pub score_batch_size: usize,
    pub cache_dir: Option<String>,
}

impl Default for RewardConfig {
    fn default() -> Self {
        Self {
            reward_model: String::new(),
            weights: vec![],
            targets: vec![],
            advantage: Advantage::MeanBaseline,
            score_batch_size: 8,
            cache_dir: None,
        }
    }
}

fn dpo_train_defaults() -> TrainConfig {
    TrainConfig {
        lr: 1e-6,
        batch_size: 2,
        grad_accum: 16,
        max_grad_norm: 0.3,
        ..TrainConfig::default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoRunConfig {
    pub model: ModelConfig,
    pub lora: LoraConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub dpo: DpoConfig,
}

impl Default for DpoRunConfig {
    fn default() -> Self {
        Self {
            model: ModelConfig::default(),
            lora: LoraConfig::default(),
            data: DataConfig::default(),
            train: dpo_train_defaults(),
            dpo: DpoConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HybridRunConfig {
    pub model: ModelConfig,
    pub lora: LoraConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub dpo: DpoConfig,
    pub hybrid: HybridConfig,
}

impl Default for HybridRunConfig {
    fn default() -> Self {
        let d = DpoRunConfig::default();
        Self {
            model: d.model,
            lora: d.lora,
            data: d.data,
            train: d.train,
            dpo: d.dpo,
            hybrid: HybridConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardWeightedRunConfig {
    pub model: ModelConfig,
    pub lora: LoraConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub reward: RewardConfig,
}

impl Default for RewardWeightedRunConfig {
    fn default() -> Self {
        Self {
            model: ModelConfig::default(),
            lora: LoraConfig::default(),
            data: DataConfig::default(),
            train: dpo_train_defaults(),
            reward: RewardConfig::default(),
        }
    }
}

fn pair_ids(pairs: &[PreferencePair]) -> Vec<PairIds<'_>> {
    pairs.iter().map(|p| p.ids()).collect()
}

fn ids_digest(base: &Digest, tag: &str, pairs: &[PreferencePair]) -> Digest {
    let mut d = base.clone();
    d.str(tag);
    for p in pairs {
        d.ids(&p.prompt).ids(&p.chosen).ids(&p.rejected);
    }
    d
}

/// Reference (adapters off) summed log-probs of every pair, from the cache or one no-grad pass.
pub fn cached_reference(
    model: &Qwen2,
    model_key: &Digest,
    pairs: &[PreferencePair],
    dir: &Path,
    quiet: bool,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let key = ids_digest(model_key, "dpo-reference-packed-v1", pairs);
    let (t, hit) = load_or_compute(dir, "reference", &key, &model.device, || {
        let bar = Progress::new(pairs.len() as u64, 0, quiet, "reference log-probs");
        let (c, r) = reference_logprobs(model, &pair_ids(pairs), &|n| {
            bar.set(n as u64, String::new())
        })?;
        bar.finish();
        let n = pairs.len();
        Ok(HashMap::from([
            ("chosen".to_string(), Tensor::from_vec(c, n, &model.device)?),
            (
                "rejected".to_string(),
                Tensor::from_vec(r, n, &model.device)?,
            ),
        ]))
    })?;
    if hit {
        eprintln!(
            "reference log-probs of {} pairs from the cache",
            pairs.len()
        );
    }
    Ok((t["chosen"].to_vec1()?, t["rejected"].to_vec1()?))
}

/// Reward-model scores of the chosen and rejected responses of N pairs.
pub struct PairScores {
    /// [N][K]
    pub chosen: Vec<Vec<f32>>,
    pub rejected: Vec<Vec<f32>>,
    pub objectives: Vec<String>,
}

/// Reward-model scores of chosen and rejected ([N][K] each), from the cache or computed with
/// the head's backbone (the policy's frozen weights when they are the same checkpoint).
pub fn cached_rm_scores(
    rm_dir: &Path,
    policy: &Loaded,
    model_cfg: &ModelConfig,
    train_cfg: &TrainConfig,
    pairs: &[PreferencePair],
    batch: usize,
    dir: &Path,
) -> Result<PairScores> {
    let head = RewardHead::load(rm_dir, &policy.model.device)?;
    let same_backbone = head.info.backbone_model == model_cfg.path
        && head.info.backbone_adapter.as_deref().map(Path::new) == model_cfg.adapter_path();
    let backbone_cfg = ModelConfig {
        path: head.info.backbone_model.clone(),
        adapter: head.info.backbone_adapter.clone(),
        ..model_cfg.clone()
    };
    let other;
    let (backbone, ctx) = if same_backbone {
        (policy, ForwardCtx::REFERENCE)
    } else {
        other = load_base(&backbone_cfg, train_cfg)?;
        (&other, ForwardCtx::EVAL)
    };
    if backbone.model.config.hidden_size != head.info.hidden_size {
        bail!(
            "{}: the head expects hidden size {}, its backbone has {}",
            rm_dir.display(),
            head.info.hidden_size,
            backbone.model.config.hidden_size
        );
    }
    let mut key = RewardHead::digest(rm_dir)?;
    let bk = model_digest(
        &backbone.files,
        backbone_cfg.adapter_path(),
        &train_cfg.dtype,
    )?;
    key.str(&bk.hex());
    let key = ids_digest(&key, "rm-scores-v1", pairs);
    let k = head.info.objectives.len();
    let (t, hit) = load_or_compute(dir, "rm-scores", &key, &policy.model.device, || {
        let full = |p: &PreferencePair, r: &[u32]| [p.prompt.as_slice(), r].concat();
        let seqs: Vec<Vec<u32>> = pairs
            .iter()
            .flat_map(|p| [full(p, &p.chosen), full(p, &p.rejected)])
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let scores = score_sequences(&backbone.model, &head, &refs, batch, ctx)?;
        let flat: Vec<f32> = scores.into_iter().flatten().collect();
        Ok(HashMap::from([(
            "scores".to_string(),
            Tensor::from_vec(flat, (2 * pairs.len(), k), &policy.model.device)?,
        )]))
    })?;
    if hit {
        eprintln!(
            "reward-model scores of {} pairs from the cache",
            pairs.len()
        );
    }
    let rows = if pairs.is_empty() {
        vec![]
    } else {
        t["scores"].to_vec2::<f32>()?
    };
    let (mut c, mut r) = (vec![], vec![]);
    for (i, row) in rows.into_iter().enumerate() {
        if i % 2 == 0 {
            c.push(row)
        } else {
            r.push(row)
        }
    }
    Ok(PairScores {
        chosen: c,
        rejected: r,
        objectives: head.info.objectives.clone(),
    })
}

/// Everything a preference stage loads before training.
struct Prepared {
    loaded: Loaded,
    train: Vec<PreferencePair>,
    val: Vec<PreferencePair>,
    out: std::path::PathBuf,
    model_key: Digest,
}

fn prepare(
    model: &ModelConfig,
    lora: &LoraConfig,
    data: &DataConfig,
    train_cfg: &TrainConfig,
    resolved: &impl Serialize,
) -> Result<Prepared> {
    train_cfg.validate()?;
    let out = prepare_output(&train_cfg.output_dir, resolved)?;
    let loaded = load_policy(model, lora, train_cfg)?;
    let splits = load_splits(data, |v, r| preference_pair(v, &loaded.tokenizer, data, r))?;
    splits.report(&out)?;
    let model_key = model_digest(&loaded.files, model.adapter_path(), &train_cfg.dtype)?;
    Ok(Prepared {
        loaded,
        train: splits.train,
        val: splits.val,
        out,
        model_key,
    })
}

/// The trainer run of a preference stage over its prepared model and data.
fn run_training<O: Objective>(
    objective: &O,
    p: &Prepared,
    cfg: (&LoraConfig, &ModelConfig, &TrainConfig, &DataConfig),
    sets: (&[O::Example], &[O::Example]),
    flags: (bool, bool),
    label: &str,
) -> Result<TrainOutcome> {
    let (lora, model, train, data) = cfg;
    let run = AdapterRun {
        loaded: &p.loaded,
        lora,
        model,
        train,
        out: &p.out,
        group_by_length: data.group_by_length,
        resume: flags.0,
        quiet: flags.1,
        label,
    };
    train_adapter(run, objective, sets.0, sets.1)
}

impl Prepared {
    /// Training and validation examples built from the frozen reward model's scores of each
    /// split's pairs (computed once and cached in `dir`).
    fn rm_scored_sets<E>(
        &self,
        rm: &Path,
        (model_cfg, train_cfg): (&ModelConfig, &TrainConfig),
        batch: usize,
        dir: &Path,
        mut build: impl FnMut(&[PreferencePair], PairScores) -> Result<Vec<E>>,
    ) -> Result<[Vec<E>; 2]> {
        let mut score = |pairs: &[PreferencePair]| {
            let scores =
                cached_rm_scores(rm, &self.loaded, model_cfg, train_cfg, pairs, batch, dir)?;
            build(pairs, scores)
        };
        Ok([score(&self.train)?, score(&self.val)?])
    }
}

fn with_reference(
    p: &Prepared,
    pairs: &[PreferencePair],
    dir: &Path,
    quiet: bool,
) -> Result<Vec<DpoExample>> {
    let (c, r) = cached_reference(&p.loaded.model, &p.model_key, pairs, dir, quiet)?;
    Ok(pairs
        .iter()
        .zip(c.into_iter().zip(r))
        .map(|(pair, (ref_chosen, ref_rejected))| DpoExample {
            pair: pair.clone(),
            ref_chosen,
            ref_rejected,
            offset: 0.0,
            scale: 1.0,
        })
        .collect())
}

pub fn run_dpo(
    config: Option<&Path>,
    overrides: &[String],
    resume: bool,
    quiet: bool,
) -> Result<TrainOutcome> {
    let cfg: DpoRunConfig = crate::config::load(config, overrides)?;
    let p = prepare(&cfg.model, &cfg.lora, &cfg.data, &cfg.train, &cfg)?;
    let dir = cache_dir(cfg.dpo.cache_dir.as_deref());
    let train_ex = with_reference(&p, &p.train, &dir, quiet)?;
    let val_ex = with_reference(&p, &p.val, &dir, quiet)?;
    let objective = Dpo {
        model: &p.loaded.model,
        cfg: cfg.dpo.clone(),
        explicit: false,
    };
    run_training(
        &objective,
        &p,
        (&cfg.lora, &cfg.model, &cfg.train, &cfg.data),
        (&train_ex, &val_ex),
        (resume, quiet),
        "dpo",
    )
}

/// The constant part of each pair's logit: (offset, scale) of logit = (h + offset) * scale.
pub fn explicit_terms(h: &HybridConfig, chosen: &[f32], rejected: &[f32]) -> Result<(f32, f32)> {
    let k = chosen.len();
    let w = if h.weights.is_empty() {
        vec![1.0 / k as f64; k]
    } else {
        h.weights.clone()
    };
    match h.formulation {
        Formulation::Hybrid => {
            let utopia = (!h.utopia.is_empty()).then_some(h.utopia.as_slice());
            let s = build_scalarizer(h.scalarizer, &w, utopia, h.mu, k)?;
            Ok((
                (h.lambda * (s.scalarize(chosen) - s.scalarize(rejected))) as f32,
                1.0,
            ))
        }
        Formulation::Modpo => {
            if w.len() != k {
                bail!("hybrid.weights has {} entries for {k} objectives", w.len());
            }
            if h.preference_weight <= 0.0 {
                bail!("hybrid.preference_weight (w_k) must be positive for MODPO");
            }
            let margin: f64 = w
                .iter()
                .zip(chosen.iter().zip(rejected))
                .map(|(w, (c, r))| w * (*c as f64 - *r as f64))
                .sum();
            Ok((-margin as f32, (1.0 / h.preference_weight) as f32))
        }
    }
}

pub fn run_hybrid(
    config: Option<&Path>,
    overrides: &[String],
    resume: bool,
    quiet: bool,
) -> Result<TrainOutcome> {
    let cfg: HybridRunConfig = crate::config::load(config, overrides)?;
    if cfg.hybrid.reward_model.is_empty() {
        bail!("hybrid.reward_model is empty: give the directory written by train-rm");
    }
    let p = prepare(&cfg.model, &cfg.lora, &cfg.data, &cfg.train, &cfg)?;
    let dir = cache_dir(cfg.dpo.cache_dir.as_deref());
    let rm = Path::new(&cfg.hybrid.reward_model);
    let sets = p.rm_scored_sets(
        rm,
        (&cfg.model, &cfg.train),
        cfg.hybrid.score_batch_size,
        &dir,
        |pairs, scores| {
            let mut ex = with_reference(&p, pairs, &dir, quiet)?;
            for (e, (sc, sr)) in ex
                .iter_mut()
                .zip(scores.chosen.iter().zip(&scores.rejected))
            {
                (e.offset, e.scale) = explicit_terms(&cfg.hybrid, sc, sr)?;
            }
            Ok(ex)
        },
    )?;
    let objective = Dpo {
        model: &p.loaded.model,
        cfg: cfg.dpo.clone(),
        explicit: true,
    };
    run_training(
        &objective,
        &p,
        (&cfg.lora, &cfg.model, &cfg.train, &cfg.data),
        (&sets[0], &sets[1]),
        (resume, quiet),
        "hybrid-dpo",
    )
}

pub fn run_reward_weighted(
    config: Option<&Path>,
    overrides: &[String],
    resume: bool,
    quiet: bool,
) -> Result<TrainOutcome> {
    let cfg: RewardWeightedRunConfig = crate::config::load(config, overrides)?;
    if cfg.reward.reward_model.is_empty() {
        bail!("reward.reward_model is empty: give the directory written by train-rm");
    }
    let p = prepare(&cfg.model, &cfg.lora, &cfg.data, &cfg.train, &cfg)?;
    let dir = cache_dir(cfg.reward.cache_dir.as_deref());
    let rm = Path::new(&cfg.reward.reward_model);
    let sets = p.rm_scored_sets(
        rm,
        (&cfg.model, &cfg.train),
        cfg.reward.score_batch_size,
        &dir,
        |pairs, scores| {
            let PairScores {
                chosen: c,
                rejected: r,
                objectives,
            } = scores;
            let k = objectives.len();
            let w = if cfg.reward.weights.is_empty() {
                vec![1.0 / k as f64; k]
            } else {
                cfg.reward.weights.clone()
            };
            let t = if cfg.reward.targets.is_empty() {
                vec![1.0; k]
            } else {
                cfg.reward.targets.clone()
            };
            if w.len() != k || t.len() != k {
                bail!("reward.weights and reward.targets need {k} entries ({objectives:?})");
            }
            let ex: Vec<WeightedPair> = pairs
                .iter()
                .zip(c.iter().zip(&r))
                .map(|(pair, (sc, sr))| {
                    let (rc, rr) = (target_gap_reward(sc, &w, &t), target_gap_reward(sr, &w, &t));
                    let (ac, ar) = advantages(rc, rr, cfg.reward.advantage);
                    WeightedPair {
                        pair: pair.clone(),
                        reward_chosen: rc,
                        reward_rejected: rr,
                        adv_chosen: ac,
                        adv_rejected: ar,
                    }
                })
                .collect();
            Ok(ex)
        },
    )?;
    let objective = RewardWeighted {
        model: &p.loaded.model,
    };
    run_training(
        &objective,
        &p,
        (&cfg.lora, &cfg.model, &cfg.train, &cfg.data),
        (&sets[0], &sets[1]),
        (resume, quiet),
        "reward-weighted",
    )
}
