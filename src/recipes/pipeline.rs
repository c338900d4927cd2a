//! `mo-align pipeline`: sft -> train-rm -> dpo -> hybrid-dpo -> eval from one config, each
//! stage a recipe run with its own config file, then the win rate of every stage against the
//! base model judged by the trained reward model, written as a summary (markdown + JSON) with
//! plots. Re-running is cheap: a stage whose output matches its config is not trained again.

use super::summary::{judge_stages, markdown, TrainedStage};
use super::{dpo, sft, train_rm, RunFlags};
use crate::generate::SamplingArgs;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The `[pipeline]` section: where each stage's config lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StagesConfig {
    pub output_dir: String,
    pub sft: String,
    pub train_rm: String,
    pub dpo: String,
    pub hybrid_dpo: String,
    /// `--set` overrides applied to every stage (e.g. `train.device="cuda"`).
    pub overrides: Vec<String>,
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
    pub judge_weights: Vec<f64>,
    /// Decoding; unset keys come from the base model's generation_config.json.
    #[serde(flatten)]
    pub sampling: SamplingArgs,
    pub gen_batch_size: usize,
    pub tie_margin: f64,
    pub dtype: String,
    pub device: String,
}

impl Default for PipelineEvalConfig {
    fn default() -> Self {
        Self {
            prompts: String::new(),
            max_prompts: Some(200),
            judge: String::new(),
            judge_weights: vec![],
            sampling: SamplingArgs::default(),
            gen_batch_size: 8,
            tie_margin: 0.0,
            dtype: "f32".into(),
            device: "auto".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    pub pipeline: StagesConfig,
    pub eval: PipelineEvalConfig,
}

/// The resolved config a stage would write, and whether its output already holds a finished
/// run of exactly that config.
fn stage_state<T: Serialize + serde::de::DeserializeOwned + Default>(
    config: &Path,
    overrides: &[String],
    output_dir: impl Fn(&T) -> String,
    artifact: &str,
) -> Result<(T, PathBuf, bool)> {
    let cfg: T = crate::config::load(Some(config), overrides)?;
    let out = PathBuf::from(output_dir(&cfg));
    let resolved = crate::config::to_toml(&cfg)?;
    let existing = std::fs::read_to_string(out.join("config.resolved.toml")).ok();
    if let Some(old) = &existing {
        if *old != resolved {
            bail!(
                "{}: holds a run of a different config than {}; remove it or change train.output_dir",
                out.display(),
                config.display()
            );
        }
    }
    let done = existing.is_some() && out.join(artifact).is_file();
    Ok((cfg, out, done))
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
        ("hybrid_dpo", &p.hybrid_dpo),
        ("output_dir", &p.output_dir),
    ] {
        if v.is_empty() {
            bail!("pipeline.{k} is empty");
        }
    }
    if cfg.eval.prompts.is_empty() {
        bail!("eval.prompts is empty: name a file of held-out prompts");
    }
    let run_dir = super::prepare_output(&p.output_dir, &cfg, None)?;
    let out = run_dir.path.clone();
    let ov = &p.overrides;
    let mut timings: Vec<(String, PathBuf, f64, bool)> = vec![];
    let mut stage = |name: &str,
                     done: bool,
                     out_dir: PathBuf,
                     f: &mut dyn FnMut() -> Result<()>|
     -> Result<()> {
        let t = Instant::now();
        if done {
            eprintln!("== {name}: up to date in {}", out_dir.display());
        } else {
            eprintln!("== {name}");
            f()?;
        }
        timings.push((name.to_string(), out_dir, t.elapsed().as_secs_f64(), done));
        Ok(())
    };

    let (sft_cfg, sft_out, done) = stage_state(
        Path::new(&p.sft),
        ov,
        |c: &sft::SftConfig| c.stage.train.output_dir.clone(),
        "adapter_model.safetensors",
    )?;
    stage("sft", done, sft_out.clone(), &mut || {
        sft::run(Some(Path::new(&p.sft)), ov, flags).map(drop)
    })?;
    let (_, rm_out, done) = stage_state(
        Path::new(&p.train_rm),
        ov,
        |c: &train_rm::TrainRmConfig| c.train.output_dir.clone(),
        crate::reward::HEAD_FILE,
    )?;
    stage("train-rm", done, rm_out.clone(), &mut || {
        train_rm::run(Some(Path::new(&p.train_rm)), ov, flags)
    })?;
    let (dpo_cfg, dpo_out, done) = stage_state(
        Path::new(&p.dpo),
        ov,
        |c: &dpo::DpoRunConfig| c.stage.train.output_dir.clone(),
        "adapter_model.safetensors",
    )?;
    stage("dpo", done, dpo_out.clone(), &mut || {
        dpo::run_dpo(Some(Path::new(&p.dpo)), ov, flags).map(drop)
    })?;
    let (hyb_cfg, hyb_out, done) = stage_state(
        Path::new(&p.hybrid_dpo),
        ov,
        |c: &dpo::HybridRunConfig| c.stage.train.output_dir.clone(),
        "adapter_model.safetensors",
    )?;
    stage("hybrid-dpo", done, hyb_out.clone(), &mut || {
        dpo::run_hybrid(Some(Path::new(&p.hybrid_dpo)), ov, flags).map(drop)
    })?;

    // Evaluation: every stage against the base model, judged by the reward model.
    eprintln!("== eval");
    let e = &cfg.eval;
    let judge_spec = if e.judge.is_empty() {
        rm_out.display().to_string()
    } else {
        e.judge.clone()
    };
    let trained = |name: &str, base_adapter: Option<&Path>, adapter: &Path| {
        let (train_seconds, skipped) = timings
            .iter()
            .find(|t| t.0 == name)
            .map(|t| (t.2, t.3))
            .unwrap_or((0.0, false));
        TrainedStage {
            name: name.to_string(),
            base_adapter: base_adapter.map(Path::to_path_buf),
            adapter: adapter.to_path_buf(),
            train_seconds,
            skipped,
        }
    };
    let stages = [
        trained("sft", None, &sft_out),
        trained("dpo", dpo_cfg.stage.model.adapter_path(), &dpo_out),
        trained("hybrid-dpo", hyb_cfg.stage.model.adapter_path(), &hyb_out),
    ];
    let base_path = sft_cfg.stage.model.path.clone();
    let judged = judge_stages(e, &base_path, &judge_spec, &stages, &out)?;
    let rm_seconds = timings
        .iter()
        .find(|t| t.0 == "train-rm")
        .map(|t| t.2)
        .unwrap_or(0.0);
    let rm_report: serde_json::Value = std::fs::read_to_string(rm_out.join("rm_report.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    let (rows, objectives) = (&judged.rows, &judged.objectives);
    let summary = serde_json::json!({
        "judge": judged.judge,
        "baseline": base_path,
        "prompts": judged.prompts,
        "sampling": judged.sampling,
        "objectives": objectives,
        "stages": rows,
        "reward_model": {"output_dir": rm_out, "train_seconds": rm_seconds, "report": rm_report},
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    crate::io::write_json_atomic(&out.join("summary.json"), &summary)?;
    let md = markdown(&summary, rows, objectives);
    crate::io::write_atomic(&out.join("summary.md"), md.as_bytes())?;
    crate::plot::plot_run(&out, false).context("drawing the summary plots")?;
    println!("{md}");
    Ok(())
}
