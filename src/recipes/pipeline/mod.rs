//! `mo-align pipeline`: [base ->] sft -> train-rm -> dpo -> hybrid-dpo (one or several
//! weightings) -> eval from one config, each stage a recipe run with its own config file, then
//! the win rate of every stage against the base model and against the stage it started from,
//! judged by rule objectives (the ground truth, when the task has one) and by the trained reward
//! model, written as a summary (markdown + JSON) with plots. Re-running is cheap: a stage whose
//! output matches its config and whose inputs are unchanged is not trained again.

mod answering;
mod charts;
mod checks;
pub mod config;
pub mod evaluation;
mod markdown;
mod stages;
pub mod summary;

use super::output_dir::prepare_report;
use super::pareto::report::ParetoBrief;
use super::RunFlags;
use crate::objectives::reward_head::RewardModelReport;
use anyhow::{Context, Result};
use config::PipelineConfig;
use evaluation::judge_stages;
use std::path::Path;
use std::time::Instant;
use summary::{PipelineSummary, RewardModelSummary};

pub fn run(config: Option<&Path>, overrides: &[String], flags: RunFlags) -> Result<()> {
    // Every stage resumes: an interrupted stage continues, a finished one is skipped.
    let flags = RunFlags {
        resume: true,
        ..flags
    };
    let started = Instant::now();
    let cfg: PipelineConfig = crate::util::config::load(config, overrides)?;
    checks::check_config(&cfg)?;
    let p = &cfg.pipeline;
    let mut run_dir = prepare_report(&p.output_dir, &cfg, flags.force)?;
    let out = run_dir.path.clone();
    let trained = stages::train_stages(p, flags, &out)?;

    // Evaluation: every stage against the base model and the stage it started from, judged
    // by the rule objectives (when given) and the reward model.
    eprintln!("== eval");
    let e = &cfg.eval;
    let mut judges = vec![];
    if !e.rules.is_empty() {
        judges.push(("rules".to_string(), format!("rules:{}", e.rules)));
    }
    let rm_judge = if e.judge.is_empty() {
        trained.rm_out.display().to_string()
    } else {
        e.judge.clone()
    };
    judges.push(("reward_model".to_string(), rm_judge));
    // The stages ran: the pipeline's own directory starts being written.
    run_dir.commit()?;
    let sm = &trained.sft_model;
    let judged = judge_stages(
        e,
        (&sm.path, sm.adapter_path()),
        &judges,
        &trained.stages,
        &out,
    )?;
    let rm_seconds = trained
        .timings
        .iter()
        .find(|t| t.stage == "train-rm")
        .map(|t| t.seconds)
        .unwrap_or(0.0);
    let rm_report = RewardModelReport::read(&trained.rm_out.join("rm_report.json")).ok();
    let mut summary = PipelineSummary {
        baseline: sm.path.clone(),
        baseline_adapter: sm.adapter_path().map(Path::to_path_buf),
        prompts: judged.prompts,
        sampling: judged.sampling,
        judges: judged.judges,
        base_samples: judged.base_samples,
        stages: judged.rows,
        curves: judged.curves,
        stage_seconds: trained.timings,
        reward_model: RewardModelSummary {
            output_dir: trained.rm_out,
            train_seconds: rm_seconds,
            report: rm_report,
        },
        wall_seconds: started.elapsed().as_secs_f64(),
        pareto: None,
    };
    crate::util::io::write_json_atomic(&out.join("summary.json"), &summary)?;
    let mut md = summary.markdown();
    if !p.pareto.is_empty() {
        eprintln!("== pareto");
        let t = Instant::now();
        let sets = [
            format!("pareto.device={:?}", e.device),
            format!("pareto.dtype={:?}", e.dtype),
        ];
        let (dir, report) =
            super::pareto::run(Some(Path::new(&p.pareto)), &sets, flags.quiet, flags.force)?;
        md.push_str(&report.summary_section(&dir, &out));
        summary.pareto = Some(ParetoBrief::of(&report, dir, t.elapsed().as_secs_f64()));
        crate::util::io::write_json_atomic(&out.join("summary.json"), &summary)?;
    }
    crate::util::io::write_atomic(&out.join("summary.md"), md.as_bytes())?;
    summary
        .write_charts(&out, false)
        .context("drawing the summary plots")?;
    println!("{md}");
    Ok(())
}
