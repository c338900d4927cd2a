//! Checks made on the pipeline's config before any stage trains.

use super::config::{PipelineConfig, StagesConfig};
use super::stages::{preference_stages, stage_name, sweep_stage_names};
use crate::recipes::reuse::StageKind;
use crate::recipes::sweep::config::SweepConfig;
use crate::recipes::sweep::plan::Plan;
use crate::recipes::{dpo, grpo};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Every stage and the held-out prompts named, `eval.curves` naming stages, and the
/// pipeline's own directory apart from every stage's.
pub(super) fn check_config(cfg: &PipelineConfig) -> Result<()> {
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
    if let Some(s) = p.sweep.iter().find(|s| !Path::new(s).is_file()) {
        bail!("pipeline.sweep: {s} is not a file");
    }
    check_stage_names(cfg, &p.overrides)?;
    check_stage_overlap(p)
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
            crate::util::config::apply_override(&mut table, o)?;
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

/// The names of the stages judged, in order: sft, the preference and online stages, each
/// sweep's points (every sweep checked to train policy adapters from the SFT model).
fn stage_names(cfg: &PipelineConfig, ov: &[String]) -> Result<Vec<String>> {
    let mut names = vec!["sft".to_string()];
    for (kind, config) in preference_stages(&cfg.pipeline) {
        let path = Path::new(config);
        let out = match kind {
            "dpo" => {
                crate::util::config::load::<dpo::DpoRunConfig>(Some(path), ov)?
                    .stage
                    .train
                    .output_dir
            }
            "grpo" => {
                crate::util::config::load::<grpo::GrpoRunConfig>(Some(path), ov)?
                    .stage
                    .train
                    .output_dir
            }
            _ => {
                crate::util::config::load::<dpo::HybridRunConfig>(Some(path), ov)?
                    .stage
                    .train
                    .output_dir
            }
        };
        names.push(stage_name(Path::new(&out), kind));
    }
    for sweep in &cfg.pipeline.sweep {
        let path = Path::new(sweep);
        let sc: SweepConfig = crate::util::config::load(Some(path), &[])?;
        let plan = Plan::new(&sc, path)?;
        // A sweep's points are judged as policies trained from the SFT model: an adapter on
        // it. A reward model or an SFT run is not one.
        if matches!(plan.kind, StageKind::Sft | StageKind::TrainRm) {
            bail!(
                "pipeline.sweep: {sweep} sweeps {}, which does not train a policy from the SFT model; the pipeline's sweeps run dpo, hybrid-dpo, reward-weighted or grpo",
                plan.kind.name()
            );
        }
        names.extend(sweep_stage_names(&plan));
    }
    Ok(names)
}

/// Stage names must be unique (they name the report's rows and files), and `eval.curves`
/// must name stages of this pipeline; checked before anything trains, since the curves are
/// drawn only after every stage has.
fn check_stage_names(cfg: &PipelineConfig, ov: &[String]) -> Result<()> {
    let names = stage_names(cfg, ov)?;
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            bail!(
                "pipeline: two stages are named `{name}` (a stage is named by its train.output_dir's last component, a sweep's point by SWEEP.POINT); give them directories of different names"
            );
        }
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
