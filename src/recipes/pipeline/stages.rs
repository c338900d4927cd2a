//! Training the pipeline's stages in order: a stage whose output holds a finished run of its
//! config on unchanged inputs is skipped (its earlier training time is reported), any other
//! trains (resuming when interrupted).

use super::config::StagesConfig;
use super::summary::StageSeconds;
use crate::outputs::inputs_digest;
use crate::recipes::stage::AdapterStage;
use crate::recipes::{dpo, grpo, sft, train_rm, ModelConfig, RunFlags};
use crate::train::Finetune;
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A trained stage to judge: the model it is (base path, adapters), what it started from, and
/// how long it trained.
pub struct TrainedStage {
    pub name: String,
    pub model: String,
    pub base_adapter: Option<PathBuf>,
    pub adapter: Option<PathBuf>,
    /// The stage this one started from (`None`: the base model).
    pub previous: Option<String>,
    pub output_dir: PathBuf,
    pub train_seconds: f64,
    pub skipped: bool,
}

/// Where the pipeline records the digest of a stage's inputs, in the stage's output directory.
const INPUTS_FILE: &str = "pipeline_inputs.digest";

/// Where a stage's training time is kept, so a later run that finds it up to date reports
/// the time it took rather than the time it took to skip.
const SECONDS_FILE: &str = "pipeline_train_seconds";

/// The resolved config a stage would write (returned), and whether its output already holds a
/// finished run of exactly that config on the same inputs. A finished run on other inputs is
/// refused, never reused or removed.
fn stage_state<T: Serialize + serde::de::DeserializeOwned + Default>(
    config: &Path,
    overrides: &[String],
    output_dir: impl Fn(&T) -> String,
    artifact: impl Fn(&T) -> &'static str,
) -> Result<(T, PathBuf, bool, String)> {
    let cfg: T = crate::util::config::load(Some(config), overrides)?;
    let out = PathBuf::from(output_dir(&cfg));
    let resolved = crate::util::config::to_toml(&cfg)?;
    let existing = std::fs::read_to_string(out.join("config.resolved.toml")).ok();
    if let Some(old) = &existing {
        // A run written before a setting existed reads back with that setting's default: it
        // is the same run if it resolves to the same config now.
        let same = *old == resolved
            || toml::from_str::<T>(old)
                .ok()
                .and_then(|c| crate::util::config::to_toml(&c).ok())
                .is_some_and(|now| now == resolved);
        if !same {
            bail!(
                "{}: holds a run of a different config than {}; remove it or change train.output_dir",
                out.display(),
                config.display()
            );
        }
    }
    let done = existing.is_some() && out.join(artifact(&cfg)).is_file();
    if done {
        if let Ok(old) = std::fs::read_to_string(out.join(INPUTS_FILE)) {
            if old.trim() != inputs_digest(&resolved)? {
                bail!(
                    "{}: was trained on inputs that have changed since (a data file, model, adapter or reward model named in {}); remove it or change train.output_dir",
                    out.display(),
                    config.display()
                );
            }
        }
    }
    Ok((cfg, out, done, resolved))
}

/// What a finished sft run leaves: a full checkpoint or an adapter.
fn sft_artifact(c: &sft::SftConfig) -> &'static str {
    match c.stage.train.finetune {
        Finetune::Full => "model.safetensors",
        Finetune::Lora => "adapter_model.safetensors",
    }
}

/// A stage's name: its output directory's last component (`hybrid-dpo-honesty`).
pub(super) fn stage_name(out: &Path, fallback: &str) -> String {
    out.file_name()
        .and_then(|n| n.to_str())
        .map(String::from)
        .unwrap_or_else(|| fallback.to_string())
}

/// The stages trained from the SFT model, in order: (kind, config).
pub(super) fn preference_stages(p: &StagesConfig) -> Vec<(&'static str, &str)> {
    std::iter::once(("dpo", p.dpo.as_str()))
        .chain(p.hybrid_dpo.iter().map(|c| ("hybrid-dpo", c.as_str())))
        .chain(p.grpo.iter().map(|c| ("grpo", c.as_str())))
        .collect()
}

/// Runs stages one after another, each checked against the pipeline's own directory, and
/// records how long each took.
struct StageRunner<'a> {
    /// The pipeline's own directory.
    out: &'a Path,
    timings: Vec<StageSeconds>,
}

impl StageRunner<'_> {
    /// Trains the stage `name` with `train` unless it is `done`; returns its training seconds
    /// (NaN when an up-to-date stage's time is not known) and whether it was up to date.
    fn run(
        &mut self,
        name: &str,
        (done, resolved): (bool, &str),
        out_dir: &Path,
        train: impl FnOnce() -> Result<()>,
    ) -> Result<(f64, bool)> {
        // The pipeline's own directory may not be, hold or lie inside what a stage reads or
        // writes (a stage's run, the model it starts from).
        let mut reads = crate::outputs::Inputs::from_config(resolved)?;
        reads.add(&format!("{name} stage's output"), out_dir);
        crate::outputs::check(
            self.out,
            "output_dir",
            crate::outputs::Existing::RunDir,
            &reads,
            false,
        )?;
        let t = Instant::now();
        let seconds_file = out_dir.join(SECONDS_FILE);
        let seconds = if done {
            eprintln!("== {name}: up to date in {}", out_dir.display());
            // The time it took when it trained (a stage from before this file: none known).
            std::fs::read_to_string(&seconds_file)
                .ok()
                .and_then(|s| s.trim().parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        } else {
            eprintln!("== {name}");
            train()?;
            let seconds = t.elapsed().as_secs_f64();
            // Taken after the run: a stage may create its own input (`create_tiny_if_missing`).
            let digest = inputs_digest(resolved)?;
            crate::util::io::write_atomic(&seconds_file, format!("{seconds:.3}\n").as_bytes())?;
            crate::util::io::write_atomic(&out_dir.join(INPUTS_FILE), digest.as_bytes())?;
            seconds
        };
        self.timings.push(StageSeconds {
            stage: name.to_string(),
            seconds,
            cached: done,
        });
        Ok((seconds, done))
    }
}

/// What the stages left.
pub(super) struct Trained {
    /// The stages to judge: sft, then the preference and online stages.
    pub stages: Vec<TrainedStage>,
    pub timings: Vec<StageSeconds>,
    pub rm_out: PathBuf,
    /// The model the SFT stage started from: the base every stage is judged against.
    pub sft_model: ModelConfig,
}

/// Trains [base ->] sft -> train-rm -> the preference and online stages.
pub(super) fn train_stages(p: &StagesConfig, flags: RunFlags, out: &Path) -> Result<Trained> {
    let ov = &p.overrides;
    let mut runner = StageRunner {
        out,
        timings: vec![],
    };
    let sft_state = |config: &str| {
        stage_state(
            Path::new(config),
            ov,
            |c: &sft::SftConfig| c.stage.train.output_dir.clone(),
            sft_artifact,
        )
    };
    if !p.base.is_empty() {
        let (_, base_out, done, digest) = sft_state(&p.base)?;
        runner.run("base", (done, &digest), &base_out, || {
            sft::run(Some(Path::new(&p.base)), ov, flags).map(drop)
        })?;
    }
    let (sft_cfg, sft_out, done, digest) = sft_state(&p.sft)?;
    let (sft_seconds, sft_skipped) = runner.run("sft", (done, &digest), &sft_out, || {
        sft::run(Some(Path::new(&p.sft)), ov, flags).map(drop)
    })?;
    let (_, rm_out, done, digest) = stage_state(
        Path::new(&p.train_rm),
        ov,
        |c: &train_rm::TrainRmConfig| c.train.output_dir.clone(),
        |_| crate::reward::HEAD_FILE,
    )?;
    runner.run("train-rm", (done, &digest), &rm_out, || {
        train_rm::run(Some(Path::new(&p.train_rm)), ov, flags)
    })?;

    let sm = sft_cfg.stage.model;
    let (model, base_adapter, adapter) = match sft_cfg.stage.train.finetune {
        Finetune::Full => (sft_out.display().to_string(), None, None),
        Finetune::Lora => (
            sm.path.clone(),
            sm.adapter_path().map(Path::to_path_buf),
            Some(sft_out.clone()),
        ),
    };
    let mut stages = vec![TrainedStage {
        name: "sft".into(),
        model,
        base_adapter,
        adapter,
        previous: None,
        output_dir: sft_out,
        train_seconds: sft_seconds,
        skipped: sft_skipped,
    }];
    for (kind, config) in preference_stages(p) {
        let (model, out_dir, done, digest) = preference_state(kind, config, ov)?;
        let name = stage_name(&out_dir, kind);
        let (seconds, skipped) = runner.run(&name, (done, &digest), &out_dir, || {
            let config = Some(Path::new(config));
            match kind {
                "dpo" => dpo::run_dpo(config, ov, flags).map(drop),
                "grpo" => grpo::run(config, ov, flags).map(drop),
                _ => dpo::run_hybrid(config, ov, flags).map(drop),
            }
        })?;
        stages.push(TrainedStage {
            name,
            model: model.path.clone(),
            base_adapter: model.adapter_path().map(Path::to_path_buf),
            adapter: Some(out_dir.clone()),
            previous: Some("sft".into()),
            output_dir: out_dir,
            train_seconds: seconds,
            skipped,
        });
    }
    Ok(Trained {
        stages,
        timings: runner.timings,
        rm_out,
        sft_model: sm,
    })
}

/// `stage_state` of a preference or online stage (`kind` as `preference_stages` names it),
/// with the model it starts from.
fn preference_state(
    kind: &str,
    config: &str,
    ov: &[String],
) -> Result<(ModelConfig, PathBuf, bool, String)> {
    match kind {
        "dpo" => adapter_state(config, ov, |c: &dpo::DpoRunConfig| &c.stage),
        "grpo" => adapter_state(config, ov, |c: &grpo::GrpoRunConfig| &c.stage),
        _ => adapter_state(config, ov, |c: &dpo::HybridRunConfig| &c.stage),
    }
}

/// `stage_state` of a stage training an adapter (`stage`: its config's adapter stage).
fn adapter_state<T: Serialize + serde::de::DeserializeOwned + Default>(
    config: &str,
    ov: &[String],
    stage: fn(&T) -> &AdapterStage,
) -> Result<(ModelConfig, PathBuf, bool, String)> {
    let (c, out, done, resolved) = stage_state(
        Path::new(config),
        ov,
        |c: &T| stage(c).train.output_dir.clone(),
        |_| "adapter_model.safetensors",
    )?;
    Ok((stage(&c).model.clone(), out, done, resolved))
}
