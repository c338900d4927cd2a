//! `mo-align pipeline`: [base ->] sft -> train-rm -> dpo -> hybrid-dpo (one or several
//! weightings) -> eval from one config, each stage a recipe run with its own config file, then
//! the win rate of every stage against the base model and against the stage it started from,
//! judged by rule objectives (the ground truth, when the task has one) and by the trained reward
//! model, written as a summary (markdown + JSON) with plots. Re-running is cheap: a stage whose
//! output matches its config and whose inputs are unchanged is not trained again.

use super::summary::{judge_stages, markdown, TrainedStage};
use super::{dpo, sft, train_rm, RunFlags};
use crate::generate::SamplingArgs;
use crate::train::Finetune;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The `[pipeline]` section: where each stage's config lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StagesConfig {
    pub output_dir: String,
    /// Optional first stage building the base model (an sft config, usually full fine-tuning
    /// of a `[model.tiny]` model): the demo's base is made, not downloaded.
    pub base: String,
    pub sft: String,
    pub train_rm: String,
    pub dpo: String,
    /// One hybrid-DPO config, or a list (one stage per weighting).
    #[serde(deserialize_with = "one_or_many")]
    pub hybrid_dpo: Vec<String>,
    /// Online stages (`mo-align grpo` configs), trained from the SFT model after the
    /// preference stages and judged like them.
    #[serde(deserialize_with = "one_or_many")]
    pub grpo: Vec<String>,
    /// A `mo-align pareto` config run last (its device and dtype are `[eval]`'s); the summary
    /// links its front.
    pub pareto: String,
    /// `--set` overrides applied to every stage (e.g. `train.device="cuda"`).
    pub overrides: Vec<String>,
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// The `[eval]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PipelineEvalConfig {
    /// Held-out prompts (`prompt`, `messages` or `chosen` records).
    pub prompts: String,
    pub max_prompts: Option<usize>,
    /// Judge: a train-rm directory or an HF sequence classifier; empty = this pipeline's RM.
    pub judge: String,
    /// Rule objectives (`reward::rules`) judging beside it: the ground truth, when known.
    pub rules: String,
    /// Sample generations per stage shown in the summary.
    pub samples: usize,
    pub judge_weights: Vec<f64>,
    /// Decoding; unset keys come from the base model's generation_config.json.
    #[serde(flatten)]
    pub sampling: SamplingArgs,
    pub gen_batch_size: usize,
    pub tie_margin: f64,
    pub dtype: String,
    pub device: String,
    /// Stages (by name) whose checkpoints are judged by the ground truth against the seconds
    /// they had trained: wall-time curves, and each stage's score at equal training time.
    pub curves: Vec<String>,
}

impl Default for PipelineEvalConfig {
    fn default() -> Self {
        Self {
            prompts: String::new(),
            max_prompts: Some(200),
            judge: String::new(),
            rules: String::new(),
            samples: 3,
            judge_weights: vec![],
            sampling: SamplingArgs::default(),
            gen_batch_size: 8,
            tie_margin: 0.0,
            dtype: "f32".into(),
            device: "auto".into(),
            curves: vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    pub pipeline: StagesConfig,
    pub eval: PipelineEvalConfig,
}

/// Where the pipeline records the digest of a stage's inputs, in the stage's output directory.
const INPUTS_FILE: &str = "pipeline_inputs.digest";

/// Where a stage's training time is kept, so a later run that finds it up to date reports
/// the time it took rather than the time it took to skip.
const SECONDS_FILE: &str = "pipeline_train_seconds";

/// A digest of what a stage reads: every file or directory its resolved config names (data
/// files with globs expanded, the model, adapters, reward model, rules), except its own
/// outputs and caches (`outputs::inputs_digest`).
fn inputs_digest(resolved: &str) -> Result<String> {
    crate::outputs::inputs_digest(resolved)
}

/// The resolved config a stage would write (returned), and whether its output already holds a
/// finished run of exactly that config on the same inputs. A finished run on other inputs is
/// refused, never reused or removed.
fn stage_state<T: Serialize + serde::de::DeserializeOwned + Default>(
    config: &Path,
    overrides: &[String],
    output_dir: impl Fn(&T) -> String,
    artifact: impl Fn(&T) -> &'static str,
) -> Result<(T, PathBuf, bool, String)> {
    let cfg: T = crate::config::load(Some(config), overrides)?;
    let out = PathBuf::from(output_dir(&cfg));
    let resolved = crate::config::to_toml(&cfg)?;
    let existing = std::fs::read_to_string(out.join("config.resolved.toml")).ok();
    if let Some(old) = &existing {
        // A run written before a setting existed reads back with that setting's default: it
        // is the same run if it resolves to the same config now.
        let same = *old == resolved
            || toml::from_str::<T>(old)
                .ok()
                .and_then(|c| crate::config::to_toml(&c).ok())
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
fn stage_name(out: &Path, fallback: &str) -> String {
    out.file_name()
        .and_then(|n| n.to_str())
        .map(String::from)
        .unwrap_or_else(|| fallback.to_string())
}

/// The stages trained from the SFT model, in order: (kind, config).
fn preference_stages(p: &StagesConfig) -> Vec<(&'static str, &str)> {
    std::iter::once(("dpo", p.dpo.as_str()))
        .chain(p.hybrid_dpo.iter().map(|c| ("hybrid-dpo", c.as_str())))
        .chain(p.grpo.iter().map(|c| ("grpo", c.as_str())))
        .collect()
}

/// The pipeline's own directory may not be, hold or lie inside a stage's output (trained yet
/// or not) or what a stage reads: checked from the stage configs (with the pipeline's
/// overrides) before any stage trains.
fn check_stage_overlap(p: &StagesConfig) -> Result<()> {
    let out = Path::new(&p.output_dir);
    let configs = [&p.base, &p.sft, &p.train_rm, &p.dpo, &p.pareto]
        .into_iter()
        .chain(&p.hybrid_dpo)
        .chain(&p.grpo)
        .filter(|c| !c.is_empty());
    for config in configs {
        let Ok(text) = std::fs::read_to_string(config) else {
            continue; // a missing stage config is reported when its stage loads
        };
        let Ok(mut table) = toml::from_str::<toml::Table>(&text) else {
            continue;
        };
        for o in &p.overrides {
            crate::config::apply_override(&mut table, o)?;
        }
        let stage_out = ["train", "pareto"].iter().find_map(|s| {
            table
                .get(*s)
                .and_then(|t| t.get("output_dir"))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        });
        if let Some(s) = stage_out.filter(|s| !s.is_empty()) {
            if let Some(how) = crate::outputs::overlap(out, Path::new(&s)) {
                bail!(
                    "pipeline.output_dir {}: {how} the output {s} of the stage {config}; choose a directory of its own",
                    p.output_dir
                );
            }
        }
        let reads = crate::outputs::Inputs::from_config(&toml::to_string(&table)?)?;
        crate::outputs::check(
            out,
            "pipeline.output_dir",
            crate::outputs::Existing::RunDir,
            &reads,
            false,
        )
        .with_context(|| format!("stage {config}"))?;
    }
    Ok(())
}

/// `eval.curves` must name stages of this pipeline; checked before anything trains, since the
/// curves are drawn only after every stage has.
fn check_curves(cfg: &PipelineConfig, ov: &[String]) -> Result<()> {
    if cfg.eval.curves.is_empty() {
        return Ok(());
    }
    let mut names = vec!["sft".to_string()];
    for (kind, config) in preference_stages(&cfg.pipeline) {
        let path = Path::new(config);
        let out = match kind {
            "dpo" => {
                crate::config::load::<dpo::DpoRunConfig>(Some(path), ov)?
                    .stage
                    .train
                    .output_dir
            }
            "grpo" => {
                crate::config::load::<super::grpo::GrpoRunConfig>(Some(path), ov)?
                    .stage
                    .train
                    .output_dir
            }
            _ => {
                crate::config::load::<dpo::HybridRunConfig>(Some(path), ov)?
                    .stage
                    .train
                    .output_dir
            }
        };
        names.push(stage_name(Path::new(&out), kind));
    }
    for name in &cfg.eval.curves {
        if !names.contains(name) {
            bail!(
                "eval.curves names `{name}`, which is not a stage of this pipeline (its stages: {})",
                names.join(", ")
            );
        }
    }
    Ok(())
}

pub fn run(config: Option<&Path>, overrides: &[String], flags: RunFlags) -> Result<()> {
    // Every stage resumes: an interrupted stage continues, a finished one is skipped.
    let flags = RunFlags {
        resume: true,
        ..flags
    };
    let started = Instant::now();
    let cfg: PipelineConfig = crate::config::load(config, overrides)?;
    let p = &cfg.pipeline;
    for (k, v) in [
        ("sft", &p.sft),
        ("train_rm", &p.train_rm),
        ("dpo", &p.dpo),
        ("output_dir", &p.output_dir),
    ] {
        if v.is_empty() {
            bail!("pipeline.{k} is empty");
        }
    }
    if p.hybrid_dpo.is_empty() || p.hybrid_dpo.iter().any(String::is_empty) {
        bail!("pipeline.hybrid_dpo: name one config or a list of them");
    }
    if cfg.eval.prompts.is_empty() {
        bail!("eval.prompts is empty: name a file of held-out prompts");
    }
    if !p.pareto.is_empty() && !Path::new(&p.pareto).is_file() {
        bail!("pipeline.pareto: {} is not a file", p.pareto);
    }
    let ov = &p.overrides;
    check_curves(&cfg, ov)?;
    check_stage_overlap(p)?;
    let mut run_dir = super::prepare_report(&p.output_dir, &cfg, flags.force)?;
    let out = run_dir.path.clone();
    let mut timings: Vec<(String, f64, bool)> = vec![];
    let mut stage = |name: &str,
                     (done, resolved): (bool, &str),
                     out_dir: &Path,
                     f: &mut dyn FnMut() -> Result<()>|
     -> Result<(f64, bool)> {
        // The pipeline's own directory may not be, hold or lie inside what a stage reads or
        // writes (a stage's run, the model it starts from).
        let mut reads = crate::outputs::Inputs::from_config(resolved)?;
        reads.add(&format!("{name} stage's output"), out_dir);
        crate::outputs::check(
            &out,
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
            f()?;
            let seconds = t.elapsed().as_secs_f64();
            // Taken after the run: a stage may create its own input (`create_tiny_if_missing`).
            let digest = inputs_digest(resolved)?;
            crate::io::write_atomic(&seconds_file, format!("{seconds:.3}\n").as_bytes())?;
            crate::io::write_atomic(&out_dir.join(INPUTS_FILE), digest.as_bytes())?;
            seconds
        };
        let took = (seconds, done);
        timings.push((name.to_string(), took.0, took.1));
        Ok(took)
    };

    if !p.base.is_empty() {
        let (_, base_out, done, digest) = stage_state(
            Path::new(&p.base),
            ov,
            |c: &sft::SftConfig| c.stage.train.output_dir.clone(),
            sft_artifact,
        )?;
        stage("base", (done, &digest), &base_out, &mut || {
            sft::run(Some(Path::new(&p.base)), ov, flags).map(drop)
        })?;
    }
    let (sft_cfg, sft_out, done, digest) = stage_state(
        Path::new(&p.sft),
        ov,
        |c: &sft::SftConfig| c.stage.train.output_dir.clone(),
        sft_artifact,
    )?;
    let sft_took = stage("sft", (done, &digest), &sft_out, &mut || {
        sft::run(Some(Path::new(&p.sft)), ov, flags).map(drop)
    })?;
    let (_, rm_out, done, digest) = stage_state(
        Path::new(&p.train_rm),
        ov,
        |c: &train_rm::TrainRmConfig| c.train.output_dir.clone(),
        |_| crate::reward::HEAD_FILE,
    )?;
    stage("train-rm", (done, &digest), &rm_out, &mut || {
        train_rm::run(Some(Path::new(&p.train_rm)), ov, flags)
    })?;

    let mut stages = vec![];
    let sm = &sft_cfg.stage.model;
    stages.push(match sft_cfg.stage.train.finetune {
        Finetune::Full => TrainedStage {
            name: "sft".into(),
            model: sft_out.display().to_string(),
            base_adapter: None,
            adapter: None,
            previous: None,
            output_dir: sft_out.clone(),
            train_seconds: sft_took.0,
            skipped: sft_took.1,
        },
        Finetune::Lora => TrainedStage {
            name: "sft".into(),
            model: sm.path.clone(),
            base_adapter: sm.adapter_path().map(Path::to_path_buf),
            adapter: Some(sft_out.clone()),
            previous: None,
            output_dir: sft_out.clone(),
            train_seconds: sft_took.0,
            skipped: sft_took.1,
        },
    });
    for (kind, config) in preference_stages(p) {
        let (model, out_dir, done, digest) = if kind == "dpo" {
            let (c, o, d, g) = stage_state(
                Path::new(config),
                ov,
                |c: &dpo::DpoRunConfig| c.stage.train.output_dir.clone(),
                |_| "adapter_model.safetensors",
            )?;
            (c.stage.model, o, d, g)
        } else if kind == "grpo" {
            let (c, o, d, g) = stage_state(
                Path::new(config),
                ov,
                |c: &super::grpo::GrpoRunConfig| c.stage.train.output_dir.clone(),
                |_| "adapter_model.safetensors",
            )?;
            (c.stage.model, o, d, g)
        } else {
            let (c, o, d, g) = stage_state(
                Path::new(config),
                ov,
                |c: &dpo::HybridRunConfig| c.stage.train.output_dir.clone(),
                |_| "adapter_model.safetensors",
            )?;
            (c.stage.model, o, d, g)
        };
        let name = stage_name(&out_dir, kind);
        let took = stage(&name, (done, &digest), &out_dir, &mut || {
            if kind == "dpo" {
                dpo::run_dpo(Some(Path::new(config)), ov, flags).map(drop)
            } else if kind == "grpo" {
                super::grpo::run(Some(Path::new(config)), ov, flags).map(drop)
            } else {
                dpo::run_hybrid(Some(Path::new(config)), ov, flags).map(drop)
            }
        })?;
        stages.push(TrainedStage {
            name,
            model: model.path.clone(),
            base_adapter: model.adapter_path().map(Path::to_path_buf),
            adapter: Some(out_dir.clone()),
            previous: Some("sft".into()),
            output_dir: out_dir,
            train_seconds: took.0,
            skipped: took.1,
        });
    }

    // Evaluation: every stage against the base model and the stage it started from, judged
    // by the rule objectives (when given) and the reward model.
    eprintln!("== eval");
    let e = &cfg.eval;
    let mut judges = vec![];
    if !e.rules.is_empty() {
        judges.push(("rules".to_string(), format!("rules:{}", e.rules)));
    }
    let rm_judge = if e.judge.is_empty() {
        rm_out.display().to_string()
    } else {
        e.judge.clone()
    };
    judges.push(("reward_model".to_string(), rm_judge));
    // The stages ran: the pipeline's own directory starts being written.
    run_dir.commit()?;
    let judged = judge_stages(e, (&sm.path, sm.adapter_path()), &judges, &stages, &out)?;
    let rm_seconds = timings
        .iter()
        .find(|t| t.0 == "train-rm")
        .map(|t| t.1)
        .unwrap_or(0.0);
    let rm_report: serde_json::Value = std::fs::read_to_string(rm_out.join("rm_report.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    let summary = serde_json::json!({
        "baseline": sm.path,
        "baseline_adapter": sm.adapter_path(),
        "prompts": judged.prompts,
        "sampling": judged.sampling,
        "judges": judged.judges,
        "base_samples": judged.base_samples,
        "stages": judged.rows,
        "curves": judged.curves,
        "stage_seconds": timings.iter().map(|t| serde_json::json!({"stage": t.0, "seconds": t.1, "cached": t.2})).collect::<Vec<_>>(),
        "reward_model": {"output_dir": rm_out, "train_seconds": rm_seconds, "report": rm_report},
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    crate::io::write_json_atomic(&out.join("summary.json"), &summary)?;
    let mut summary = summary;
    let mut md = markdown(&summary, &judged);
    if !p.pareto.is_empty() {
        eprintln!("== pareto");
        let t = Instant::now();
        let sets = [
            format!("pareto.device={:?}", e.device),
            format!("pareto.dtype={:?}", e.dtype),
        ];
        let (dir, report) =
            super::pareto::run(Some(Path::new(&p.pareto)), &sets, flags.quiet, flags.force)?;
        md.push_str(&super::pareto::summary_section(&report, &dir, &out));
        summary["pareto"] = serde_json::json!({
            "output_dir": dir,
            "seconds": t.elapsed().as_secs_f64(),
            "policies": report["policies"].as_array().map(|ps| ps.iter().map(|p| serde_json::json!({
                "name": p["name"], "hypervolume": p["hypervolume"], "spearman": p["spearman"],
            })).collect::<Vec<_>>()),
        });
        crate::io::write_json_atomic(&out.join("summary.json"), &summary)?;
    }
    crate::io::write_atomic(&out.join("summary.md"), md.as_bytes())?;
    crate::plot::plot_run(&out, false).context("drawing the summary plots")?;
    println!("{md}");
    Ok(())
}
