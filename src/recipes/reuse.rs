//! When a stage run is reused rather than trained again: the rules the pipeline's stages and
//! a sweep's points share. A run directory holding a finished run of exactly this config, on
//! unchanged inputs, is up to date; one holding a run of another config, or a finished run
//! on inputs that changed since, is refused (never reused, never removed); anything else
//! trains, resuming when interrupted. A stage that trains records its training time and the
//! digest of its inputs beside its outputs.

use super::{dpo, grpo, reward_weighted, sft, train_rm, RunFlags};
use crate::outputs::inputs_digest;
use crate::train::Finetune;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where a trained stage records the digest of its inputs, in its output directory.
pub const INPUTS_FILE: &str = "pipeline_inputs.digest";

/// Where a trained stage keeps its training time, so a later run that finds it up to date
/// reports the time it took rather than the time it took to skip.
pub const SECONDS_FILE: &str = "pipeline_train_seconds";

/// A stage run as its config resolves now.
pub struct StageState<T> {
    pub config: T,
    /// `train.output_dir`.
    pub out: PathBuf,
    /// The output holds a finished run of this config on the same inputs.
    pub done: bool,
    /// The resolved config (TOML).
    pub resolved: String,
}

/// The state of the run `config` + `overrides` would make. A run of another config there is
/// refused, naming the keys that differ.
pub fn stage_state<T: Serialize + serde::de::DeserializeOwned + Default>(
    config: &Path,
    overrides: &[String],
    output_dir: impl Fn(&T) -> String,
    artifact: impl Fn(&T) -> &'static str,
) -> Result<StageState<T>> {
    let cfg: T = crate::util::config::load(Some(config), overrides)?;
    let out = PathBuf::from(output_dir(&cfg));
    let resolved = crate::util::config::to_toml(&cfg)?;
    let existing = std::fs::read_to_string(out.join(crate::outputs::RUN_RECORD)).ok();
    if let Some(old) = &existing {
        // A run written before a setting existed reads back with that setting's default: it
        // is the same run if it resolves to the same config now.
        let same = *old == resolved
            || toml::from_str::<T>(old)
                .ok()
                .and_then(|c| crate::util::config::to_toml(&c).ok())
                .is_some_and(|now| now == resolved);
        if !same {
            let defaults = crate::util::config::to_toml(&T::default())?;
            let changes = crate::util::config::changed_keys(old, &resolved, Some(&defaults))
                .with_context(|| {
                    format!(
                        "{}: not a readable config record; remove the run or change train.output_dir",
                        out.join(crate::outputs::RUN_RECORD).display()
                    )
                })?;
            bail!(
                "{}: holds a run of a different config than {} ({}); remove it or change train.output_dir",
                out.display(),
                config.display(),
                crate::util::config::describe_changes(&changes)
            );
        }
    }
    let done = existing.is_some() && finished(&out, artifact(&cfg), &resolved, config)?;
    Ok(StageState {
        config: cfg,
        out,
        done,
        resolved,
    })
}

/// Whether `out` holds a finished run of `resolved` (its `artifact`); a finished run on
/// inputs that changed since it trained (named in `config`) is refused.
pub fn finished(out: &Path, artifact: &str, resolved: &str, config: &Path) -> Result<bool> {
    if !out.join(artifact).is_file() {
        return Ok(false);
    }
    if let Ok(old) = std::fs::read_to_string(out.join(INPUTS_FILE)) {
        if old.trim() != inputs_digest(resolved)? {
            bail!(
                "{}: was trained on inputs that have changed since (a data file, model, adapter or reward model named in {}); remove it or change train.output_dir",
                out.display(),
                config.display()
            );
        }
    }
    Ok(true)
}

/// Trains with `train` unless the stage is `done`, and records the training time and the
/// inputs' digest in `out_dir`; returns the training seconds (for an up-to-date stage, those
/// recorded when it trained: NaN when none were). A stage resumed from a checkpoint counts
/// the time its earlier segments had spent up to that checkpoint: a sweep point preempted on
/// a cluster reports what it cost, not only its last segment.
pub fn train_recorded(
    done: bool,
    resolved: &str,
    out_dir: &Path,
    train: impl FnOnce() -> Result<()>,
) -> Result<f64> {
    if done {
        return Ok(recorded_seconds(out_dir).unwrap_or(f64::NAN));
    }
    // Stages always resume, from the newest checkpoint (read before training prunes it).
    let before = crate::train::checkpoint::latest(out_dir)
        .ok()
        .flatten()
        .and_then(|c| crate::train::checkpoint::read_state(&c).ok())
        .map_or(0.0, |s| s.wall_s);
    let t = Instant::now();
    train()?;
    let seconds = before + t.elapsed().as_secs_f64();
    // Taken after the run: a stage may create its own input (`create_tiny_if_missing`).
    let digest = inputs_digest(resolved)?;
    crate::util::io::write_atomic(
        &out_dir.join(SECONDS_FILE),
        format!("{seconds:.3}\n").as_bytes(),
    )?;
    crate::util::io::write_atomic(&out_dir.join(INPUTS_FILE), digest.as_bytes())?;
    Ok(seconds)
}

/// The training seconds a stage recorded when it trained.
pub fn recorded_seconds(out_dir: &Path) -> Option<f64> {
    std::fs::read_to_string(out_dir.join(SECONDS_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
}

/// The training subcommands, by the name they have on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageKind {
    Sft,
    TrainRm,
    Dpo,
    HybridDpo,
    RewardWeighted,
    Grpo,
}

impl StageKind {
    pub const ALL: [StageKind; 6] = [
        StageKind::Sft,
        StageKind::TrainRm,
        StageKind::Dpo,
        StageKind::HybridDpo,
        StageKind::RewardWeighted,
        StageKind::Grpo,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StageKind::Sft => "sft",
            StageKind::TrainRm => "train-rm",
            StageKind::Dpo => "dpo",
            StageKind::HybridDpo => "hybrid-dpo",
            StageKind::RewardWeighted => "reward-weighted",
            StageKind::Grpo => "grpo",
        }
    }

    pub fn parse(name: &str) -> Option<StageKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The config key holding the objective weights the stage trains for, if it has one.
    pub fn weights_key(self) -> Option<&'static str> {
        match self {
            StageKind::HybridDpo => Some("hybrid.weights"),
            StageKind::RewardWeighted => Some("reward.weights"),
            StageKind::Grpo => Some("grpo.weights"),
            _ => None,
        }
    }

    /// `stage_state` for this kind of stage; `T` aside, what it returns.
    pub fn state(self, config: &Path, overrides: &[String]) -> Result<StageState<()>> {
        fn plain<T>(s: StageState<T>) -> StageState<()> {
            StageState {
                config: (),
                out: s.out,
                done: s.done,
                resolved: s.resolved,
            }
        }
        Ok(match self {
            StageKind::Sft => plain(stage_state(
                config,
                overrides,
                |c: &sft::SftConfig| c.stage.train.output_dir.clone(),
                sft_artifact,
            )?),
            StageKind::TrainRm => plain(stage_state(
                config,
                overrides,
                |c: &train_rm::TrainRmConfig| c.train.output_dir.clone(),
                |_| crate::reward::HEAD_FILE,
            )?),
            StageKind::Dpo => plain(stage_state(
                config,
                overrides,
                |c: &dpo::DpoRunConfig| c.stage.train.output_dir.clone(),
                adapter_artifact,
            )?),
            StageKind::HybridDpo => plain(stage_state(
                config,
                overrides,
                |c: &dpo::HybridRunConfig| c.stage.train.output_dir.clone(),
                adapter_artifact,
            )?),
            StageKind::RewardWeighted => plain(stage_state(
                config,
                overrides,
                |c: &reward_weighted::RewardWeightedRunConfig| c.stage.train.output_dir.clone(),
                adapter_artifact,
            )?),
            StageKind::Grpo => plain(stage_state(
                config,
                overrides,
                |c: &grpo::GrpoRunConfig| c.stage.train.output_dir.clone(),
                adapter_artifact,
            )?),
        })
    }

    /// Every value of the stage's config checked without loading a model or data, so a sweep
    /// refuses a bad point before it runs any (on a cluster: before it queues any).
    pub fn check(self, config: &Path, overrides: &[String]) -> Result<()> {
        let config = Some(config);
        match self {
            StageKind::Sft => crate::util::config::load::<sft::SftConfig>(config, overrides)?
                .stage
                .check(),
            StageKind::TrainRm => {
                crate::util::config::load::<train_rm::TrainRmConfig>(config, overrides)?
                    .check()
                    .map(drop)
            }
            StageKind::Dpo => {
                crate::util::config::load::<dpo::DpoRunConfig>(config, overrides)?.check()
            }
            StageKind::HybridDpo => {
                let c: dpo::HybridRunConfig = crate::util::config::load(config, overrides)?;
                let h = &c.hybrid;
                weights_fit(c.check()?, &h.reward_model, &h.rules, "hybrid")
            }
            StageKind::RewardWeighted => {
                let c: reward_weighted::RewardWeightedRunConfig =
                    crate::util::config::load(config, overrides)?;
                let r = &c.reward;
                weights_fit(c.check()?, &r.reward_model, &r.rules, "reward")
            }
            StageKind::Grpo => {
                let c: grpo::GrpoRunConfig = crate::util::config::load(config, overrides)?;
                let g = &c.grpo;
                weights_fit(c.check()?, &g.reward_model, &g.rules, "grpo")
            }
        }
    }

    /// What a finished run of this stage leaves, by its resolved config (`resolved`, TOML).
    pub fn artifact(self, resolved: &str) -> Result<&'static str> {
        Ok(match self {
            StageKind::Sft => sft_artifact(&toml::from_str(resolved)?),
            StageKind::TrainRm => crate::reward::HEAD_FILE,
            _ => "adapter_model.safetensors",
        })
    }

    /// Runs the stage's recipe in this process.
    pub fn train(self, config: &Path, overrides: &[String], flags: RunFlags) -> Result<()> {
        let config = Some(config);
        match self {
            StageKind::Sft => sft::run(config, overrides, flags).map(drop),
            StageKind::TrainRm => train_rm::run(config, overrides, flags),
            StageKind::Dpo => dpo::run_dpo(config, overrides, flags).map(drop),
            StageKind::HybridDpo => dpo::run_hybrid(config, overrides, flags).map(drop),
            StageKind::RewardWeighted => reward_weighted::run(config, overrides, flags).map(drop),
            StageKind::Grpo => grpo::run(config, overrides, flags).map(drop),
        }
    }
}

/// Whether `weights` has one value per objective of the reward vector, where that vector can
/// be read already (a reward model a sweep's own pipeline has yet to train is checked when the
/// point runs).
fn weights_fit(
    weights: Option<crate::objectives::weighting::Weighting>,
    reward_model: &str,
    rules: &str,
    section: &str,
) -> Result<()> {
    let (Some(w), Ok(rewards)) = (
        weights,
        crate::reward::vector::RewardVector::open(reward_model, rules, section),
    ) else {
        return Ok(());
    };
    crate::objectives::weighting::Weighting::for_objectives(
        w.values().to_vec(),
        &rewards.names(),
        &format!("{section}.weights"),
    )
    .map(drop)
}

/// What a finished adapter-training run leaves.
fn adapter_artifact<T>(_: &T) -> &'static str {
    "adapter_model.safetensors"
}

/// What a finished sft run leaves: a full checkpoint or an adapter.
pub fn sft_artifact(c: &sft::SftConfig) -> &'static str {
    match c.stage.train.finetune {
        Finetune::Full => "model.safetensors",
        Finetune::Lora => "adapter_model.safetensors",
    }
}
