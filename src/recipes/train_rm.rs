//! `mo-align train-rm`: the multi-objective reward model. The backbone (base + optional SFT
//! adapter) is frozen, so its features are computed once and cached; the linear head is trained
//! on the cache by the shared trainer (epochs take milliseconds).

use super::output_dir::prepare_output;
use super::{load_base, ModelConfig, RunFlags};
use crate::cache::{cache_dir, model_digest};
use crate::data::preference::preference_pair;
use crate::data::ratings::{rated_responses, RatedResponse, DEFAULT_OBJECTIVES};
use crate::data::{load_splits, DataConfig, Splits};
use crate::objectives::reward_head::{
    head_report, ranking_report, RatedFeatures, RewardModelReport, RewardRegression,
};
use crate::objectives::weighting::Weighting;

use crate::reward::features::{cached_features, PairSequences, ScoredSequence};
use crate::reward::FeatureSet;
use crate::reward::{feature_stats, RewardHead, RewardModelInfo};
use crate::train::trainer::{train, TrainRun};
use crate::train::TrainConfig;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The `[rm]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RmConfig {
    /// Objectives (UltraFeedback aspects) the head predicts, in order.
    pub objectives: Vec<String>,
    /// Binarized preference files on which the composite reward's ranking accuracy is reported.
    pub ranking_files: Vec<String>,
    /// Weights of the composite (linear) reward for that accuracy; equal when empty.
    pub ranking_weights: Vec<f64>,
    /// Sequences per backbone forward when extracting features.
    pub feature_batch_size: usize,
    /// What the head reads: `last_token` (the final hidden state) or `last_mean_logprob`.
    pub features: FeatureSet,
}

impl Default for RmConfig {
    fn default() -> Self {
        Self {
            objectives: DEFAULT_OBJECTIVES.iter().map(|s| s.to_string()).collect(),
            ranking_files: vec![],
            ranking_weights: vec![],
            feature_batch_size: 8,
            features: FeatureSet::LastToken,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainRmConfig {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub rm: RmConfig,
    pub train: TrainConfig,
}

impl Default for TrainRmConfig {
    fn default() -> Self {
        Self {
            model: ModelConfig::default(),
            data: DataConfig {
                validation_fraction: 0.1,
                ..DataConfig::default()
            },
            rm: RmConfig::default(),
            train: TrainConfig {
                epochs: 20,
                batch_size: 64,
                lr: 1e-3,
                warmup_ratio: 0.05,
                max_grad_norm: 0.0,
                log_every: 20,
                ..TrainConfig::default()
            },
        }
    }
}

impl TrainRmConfig {
    /// Every value checked without loading a model or data; the ranking weights.
    pub fn check(&self) -> Result<Option<Weighting>> {
        anyhow::ensure!(
            self.train.finetune == crate::train::Finetune::Lora,
            "train.finetune: train-rm trains a linear head on a frozen backbone; leave it unset"
        );
        self.train.validate()?;
        anyhow::ensure!(!self.rm.objectives.is_empty(), "rm.objectives is empty");
        let ranking_weights =
            Weighting::configured(&self.rm.ranking_weights, "rm.ranking_weights")?;
        for o in &self.rm.objectives {
            crate::util::paths::safe_component(o, "rm.objectives:")?;
        }
        Ok(ranking_weights)
    }
}

pub fn run(config: Option<&Path>, overrides: &[String], flags: RunFlags) -> Result<()> {
    let RunFlags { resume, quiet, .. } = flags;
    let cfg: TrainRmConfig = crate::util::config::load(config, overrides)?;
    let ranking_weights = cfg.check()?;
    let mut run_dir = prepare_output(&cfg.train.output_dir, &cfg, Some(flags))?;
    let out = run_dir.path.clone();
    let loaded = load_base(&cfg.model, &cfg.train)?;
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    // Split by record (instruction), so completions of one prompt never straddle the split.
    let data: Splits<Vec<RatedResponse>> = load_splits(&cfg.data, |v, r| {
        rated_responses(v, tok, &cfg.rm.objectives, &cfg.data, r)
    })?;
    let (name, bytes) = data.report()?;
    run_dir.queue(name, bytes);
    let train_rows: Vec<RatedResponse> = data.train.into_iter().flatten().collect();
    let val_rows: Vec<RatedResponse> = data.val.into_iter().flatten().collect();
    anyhow::ensure!(!train_rows.is_empty(), "no rated responses to train on");
    eprintln!(
        "{} training / {} validation rated responses",
        train_rows.len(),
        val_rows.len()
    );

    let adapter = cfg.model.adapter_path();
    let model_key = model_digest(&loaded.files, adapter, &cfg.train.dtype)?;
    let dir = cache_dir(cfg.train.cache_dir.as_deref());
    let seqs: Vec<ScoredSequence> = train_rows
        .iter()
        .chain(&val_rows)
        .map(|r| ScoredSequence::new(&r.ids, r.prompt_len))
        .collect();
    let features = cached_features(
        (model, cfg.rm.features, &model_key),
        &seqs,
        cfg.rm.feature_batch_size,
        &dir,
        quiet,
        "reward features",
    )?;
    let examples = |rows: &[RatedResponse], offset: usize| -> Vec<RatedFeatures> {
        rows.iter()
            .enumerate()
            .map(|(i, r)| RatedFeatures {
                row: offset + i,
                targets: r.targets.clone(),
                mask: r.mask.clone(),
                tokens: r.ids.len(),
            })
            .collect()
    };
    let (train_ex, val_ex) = (
        examples(&train_rows, 0),
        examples(&val_rows, train_rows.len()),
    );

    let (mean, std) = feature_stats(&features.narrow(0, 0, train_rows.len())?)?;
    let k = cfg.rm.objectives.len();
    let initial: Vec<f32> = (0..k)
        .map(|j| {
            let (s, n) = train_rows.iter().fold((0.0, 0.0), |(s, n), r| {
                (s + r.targets[j] * r.mask[j], n + r.mask[j])
            });
            if n > 0.0 {
                s / n
            } else {
                0.5
            }
        })
        .collect();
    let info = RewardModelInfo {
        objectives: cfg.rm.objectives.clone(),
        rating_normalisation: "(rating - 1) / 4".to_string(),
        backbone_model: cfg.model.path.clone(),
        backbone_adapter: cfg.model.adapter_path().map(|p| p.display().to_string()),
        backbone_model_abs: crate::reward::absolute_if_local(&cfg.model.path),
        backbone_adapter_abs: cfg
            .model
            .adapter_path()
            .and_then(|p| crate::reward::absolute_if_local(&p.display().to_string())),
        backbone_fingerprint: Some(model.fingerprint(false)?),
        backbone_fingerprint_bf16: Some(model.fingerprint(true)?),
        backbone_dtype: Some(crate::model::dtype::dtype_name(model.dtype).to_string()),
        hidden_size: model.config.hidden_size,
        feature: cfg.rm.features.describe().to_string(),
        feature_set: cfg.rm.features,
    };
    let head = RewardHead::new(info, mean, std, &initial)?;
    let objective = RewardRegression {
        head: &head,
        features: &features,
    };
    run_dir.commit()?;
    let outcome = train(TrainRun {
        objective: &objective,
        trainable: &head,
        train: &train_ex,
        val: &val_ex,
        cfg: &cfg.train,
        device: &model.device,
        output_dir: &out,
        group_by_length: false,
        resume,
        quiet,
        label: "train-rm",
    })?;

    let mut report = RewardModelReport {
        steps: outcome.steps,
        train_loss_first: outcome.first_loss,
        train_loss_last: outcome.last_loss,
        validation: head_report(&head, &features, &val_ex)?,
        ranking: None,
    };
    if !cfg.rm.ranking_files.is_empty() {
        let rank_cfg = DataConfig {
            train_files: cfg.rm.ranking_files.clone(),
            validation_fraction: 0.0,
            max_samples: None,
            ..cfg.data.clone()
        };
        let pairs = load_splits(&rank_cfg, |v, r| preference_pair(v, tok, &rank_cfg, r))?.train;
        let seqs = PairSequences::new(&pairs);
        let f = cached_features(
            (model, cfg.rm.features, &model_key),
            &seqs.scored(),
            cfg.rm.feature_batch_size,
            &dir,
            quiet,
            "ranking features",
        )?;
        let scores = head.predict(&f)?.to_vec2::<f32>()?;
        let what = "rm.ranking_weights";
        let w = Weighting::given_or_equal(ranking_weights.as_ref(), k, what)?;
        report.ranking = Some(ranking_report(&head.info.objectives, &scores, &w)?);
    }
    crate::util::io::write_json_atomic(&out.join("rm_report.json"), &report)?;
    let drawn = crate::plot::plot_run(&out, false).and_then(|_| report.write_chart(&out, false));
    if let Err(e) = drawn {
        eprintln!("warning: plots not drawn: {e:#}");
    }
    report.print(&cfg.rm.objectives);
    eprintln!("reward model in {}", out.display());
    Ok(())
}
