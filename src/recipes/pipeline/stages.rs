//! Training the pipeline's stages in order: a stage whose output holds a finished run of its
//! config on unchanged inputs is skipped (its earlier training time is reported), any other
//! trains (resuming when interrupted).

use super::config::StagesConfig;
use super::summary::StageSeconds;
use crate::recipes::reuse::{sft_artifact, stage_state, train_recorded, StageState};
use crate::recipes::stage::AdapterStage;
use crate::recipes::{dpo, grpo, sft, train_rm, ModelConfig, RunFlags};
use crate::train::Finetune;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

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
        if done {
            eprintln!("== {name}: up to date in {}", out_dir.display());
        } else {
            eprintln!("== {name}");
        }
        let seconds = train_recorded(done, resolved, out_dir, train)?;
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
        .map(parts)
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
    )
    .map(parts)?;
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
    for sweep in &p.sweep {
        stages.extend(sweep_stages(
            Path::new(sweep),
            ov,
            flags,
            &mut runner.timings,
        )?);
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
    )
    .map(parts)?;
    Ok((stage(&c).model.clone(), out, done, resolved))
}

/// A `StageState` as the tuple the pipeline destructures: (config, output, done, resolved).
fn parts<T>(s: StageState<T>) -> (T, PathBuf, bool, String) {
    (s.config, s.out, s.done, s.resolved)
}

/// The stage names of a sweep's points: `SWEEP.POINT`, SWEEP its directory's name, so points
/// of two sweeps with the same axes stay apart (and name files: `generations-NAME.jsonl`).
pub(super) fn sweep_stage_names(plan: &crate::recipes::sweep::plan::Plan) -> Vec<String> {
    let sweep = crate::recipes::sweep::plan::safe_name(&stage_name(&plan.dir, "sweep"));
    plan.points
        .iter()
        .map(|p| format!("{sweep}.{}", p.name))
        .collect()
}

/// Runs the sweep `config` (each point with the pipeline's overrides) and returns its points
/// as stages started from SFT; a point that did not finish fails the pipeline.
fn sweep_stages(
    config: &Path,
    ov: &[String],
    flags: RunFlags,
    timings: &mut Vec<StageSeconds>,
) -> Result<Vec<TrainedStage>> {
    eprintln!("== sweep {}", config.display());
    let (plan, summary) = crate::recipes::sweep::run_sweep(config, &[], ov, flags.quiet)?;
    let mut stages = vec![];
    let names = sweep_stage_names(&plan);
    for ((p, row), name) in plan.points.iter().zip(&summary.points).zip(names) {
        if row.state != crate::recipes::sweep::point::PointState::Done {
            anyhow::bail!(
                "sweep {}: point {} did not finish; see {}",
                config.display(),
                p.name,
                row.log.display()
            );
        }
        let record = p.out.join(crate::outputs::RUN_RECORD);
        let model: ModelConfig = std::fs::read_to_string(&record)
            .map_err(anyhow::Error::from)
            .and_then(|text| Ok(toml::from_str::<toml::Table>(&text)?))
            .and_then(|t| {
                Ok(t.get("model")
                    .cloned()
                    .map(|m| m.try_into())
                    .transpose()?
                    .unwrap_or_default())
            })
            .with_context(|| format!("{}: the point's config record", record.display()))?;
        let seconds = row.metrics.train_seconds.unwrap_or(f64::NAN);
        timings.push(StageSeconds {
            stage: name.clone(),
            seconds,
            cached: !row.ran,
        });
        stages.push(TrainedStage {
            name,
            model: model.path.clone(),
            base_adapter: model.adapter_path().map(Path::to_path_buf),
            adapter: Some(p.out.clone()),
            previous: Some("sft".into()),
            output_dir: p.out.clone(),
            train_seconds: seconds,
            skipped: !row.ran,
        });
    }
    Ok(stages)
}
