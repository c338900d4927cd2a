//! The pipeline's evaluation and summary: every trained stage answers the held-out prompts
//! against the base model, the judge scores both, and one row per stage goes into the JSON and
//! markdown summary.

use super::pipeline::PipelineEvalConfig;
use crate::eval::load_for_eval;
use crate::eval::prompts::read_prompts;
use crate::eval::win_rate::{win_rate_eval, write_generations};
use crate::judge::Judge;
use crate::model::loader::select_device;
use crate::model::parse_dtype;
use anyhow::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A trained stage to judge: its adapter, what is merged under it, and how long it trained.
pub struct TrainedStage {
    pub name: String,
    pub base_adapter: Option<PathBuf>,
    pub adapter: PathBuf,
    pub train_seconds: f64,
    pub skipped: bool,
}

/// Every stage judged against the base model.
pub struct Judged {
    pub rows: Vec<StageRow>,
    /// The decoding settings every stage and the base used.
    pub sampling: crate::generate::SamplingConfig,
    pub objectives: Vec<String>,
    pub judge: String,
    pub prompts: usize,
}

/// Each stage's win rate against the base model `base_path` under `[eval]`'s judge and
/// decoding settings; each stage's generations are written into `out`.
pub fn judge_stages(
    e: &PipelineEvalConfig,
    base_path: &str,
    judge_spec: &str,
    stages: &[TrainedStage],
    out: &Path,
) -> Result<Judged> {
    let device = select_device(&e.device)?;
    let dtype = parse_dtype(&e.dtype)?;
    let judge = Judge::load(judge_spec, &e.judge_weights, dtype, &device)?;
    let baseline = load_for_eval(base_path, None, None, dtype, &device)?;
    let prompts = read_prompts(&e.prompts, e.max_prompts)?;
    let sampling = e.sampling.resolve(baseline.generation_config().as_ref());
    sampling.validate()?;
    let (mut rows, mut objectives) = (vec![], vec![]);
    for st in stages {
        let t = Instant::now();
        let adapter = Some(st.adapter.as_path());
        let model = load_for_eval(
            base_path,
            st.base_adapter.as_deref(),
            adapter,
            dtype,
            &device,
        )?;
        let batch = e.gen_batch_size;
        let (wr, gens) = win_rate_eval(
            &model,
            &baseline,
            &judge,
            &prompts,
            &sampling,
            batch,
            e.tie_margin,
        )?;
        write_generations(&out.join(format!("generations-{}.jsonl", st.name)), &gens)?;
        let o = &wr.overall;
        eprintln!(
            "{}: win rate {:.1}% ({:.1}s to evaluate)",
            st.name,
            100.0 * o.win_rate,
            t.elapsed().as_secs_f64()
        );
        objectives = wr.objectives.clone();
        rows.push(StageRow {
            stage: st.name.clone(),
            output_dir: st.adapter.display().to_string(),
            train_seconds: st.train_seconds,
            skipped: st.skipped,
            win_rate: o.win_rate,
            ci95: o.ci95,
            wins: o.wins,
            ties: o.ties,
            losses: o.losses,
            mean_reward_diff: o.mean_reward_diff,
            model_objectives: wr.mean_objectives_model.clone(),
            baseline_objectives: wr.mean_objectives_baseline.clone(),
        });
    }
    Ok(Judged {
        rows,
        sampling,
        objectives,
        judge: judge.describe(),
        prompts: prompts.len(),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct StageRow {
    pub stage: String,
    pub output_dir: String,
    pub train_seconds: f64,
    pub skipped: bool,
    pub win_rate: f64,
    pub ci95: (f64, f64),
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    pub mean_reward_diff: f64,
    pub model_objectives: Vec<f64>,
    pub baseline_objectives: Vec<f64>,
}

pub fn markdown(summary: &serde_json::Value, rows: &[StageRow], objectives: &[String]) -> String {
    let mut s = String::from("# mo-align pipeline summary\n\n");
    s.push_str(&format!(
        "Win rate of each stage against the base model `{}` on {} held-out prompts, judged by {}. Ties count half.\n\n",
        summary["baseline"].as_str().unwrap_or("?"),
        summary["prompts"],
        summary["judge"].as_str().unwrap_or("?")
    ));
    s.push_str("| stage | win rate | 95% CI | W/T/L | mean reward diff |");
    for o in objectives {
        s.push_str(&format!(" {o} |"));
    }
    s.push_str(" train time (s) |\n|---|---|---|---|---|");
    s.push_str(&"---|".repeat(objectives.len()));
    s.push_str("---|\n");
    if let Some(first) = rows.first() {
        s.push_str("| base | | | | |");
        for v in &first.baseline_objectives {
            s.push_str(&format!(" {v:.3} |"));
        }
        s.push_str(" |\n");
    }
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.1}% | {:.1}-{:.1}% | {}/{}/{} | {:+.4} |",
            r.stage,
            100.0 * r.win_rate,
            100.0 * r.ci95.0,
            100.0 * r.ci95.1,
            r.wins,
            r.ties,
            r.losses,
            r.mean_reward_diff
        ));
        for v in &r.model_objectives {
            s.push_str(&format!(" {v:.3} |"));
        }
        s.push_str(&format!(
            " {:.1}{} |\n",
            r.train_seconds,
            if r.skipped { " (cached)" } else { "" }
        ));
    }
    s.push_str(&format!(
        "\nReward model trained in {:.1}s; whole pipeline {:.1}s.\n",
        summary["reward_model"]["train_seconds"]
            .as_f64()
            .unwrap_or(0.0),
        summary["wall_seconds"].as_f64().unwrap_or(0.0)
    ));
    if let Some(acc) = summary["reward_model"]["report"]["ranking"]["composite_accuracy"].as_f64() {
        s.push_str(&format!(
            "Reward model ranks {:.1}% of held-out binarized pairs correctly.\n",
            100.0 * acc
        ));
    }
    s
}
