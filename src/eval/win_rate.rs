//! Win rates: both models answer the same prompts with the same decoding settings (each prompt
//! has its own seeded stream, so batching does not change answers), a judge scores both answers,
//! and the verdicts are compared per prompt.

use crate::eval::judge::{mean_objectives, win_rate, Judge, Verdict, WinRate};
use crate::eval::prompts::PromptRecord;
use crate::generate::{generate, SamplingConfig};
use crate::model::ctx::ForwardCtx;
use crate::model::loader::Loaded;
use crate::objectives::conditioning::ConditioningInfo;
use crate::tokenizer::Message;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Answers of `loaded` to each prompt (batched, seeded per prompt index), decoded text.
pub fn answer_prompts(
    loaded: &Loaded,
    prompts: &[Vec<Message>],
    sampling: &SamplingConfig,
    batch: usize,
) -> Result<Vec<String>> {
    let tok = &loaded.tokenizer;
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| tok.encode_prompt(p))
        .collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(prompts.len());
    for (chunk_idx, chunk) in ids.chunks(batch.max(1)).enumerate() {
        let streams: Vec<u64> = (0..chunk.len())
            .map(|i| (chunk_idx * batch.max(1) + i) as u64)
            .collect();
        let gen = generate(
            &loaded.model,
            chunk,
            &streams,
            sampling,
            &tok.stop_ids(),
            tok.pad_id,
            ForwardCtx::EVAL,
        )?;
        for g in gen {
            let end = g
                .iter()
                .position(|t| tok.stop_ids().contains(t))
                .unwrap_or(g.len());
            out.push(tok.decode(&g[..end], true)?);
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt: Vec<Message>,
    pub model_answer: String,
    pub baseline_answer: String,
    pub model_score: f64,
    pub baseline_score: f64,
    pub model_objectives: Vec<f32>,
    pub baseline_objectives: Vec<f32>,
    pub decoding: SamplingConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WinRateReport {
    pub judge: String,
    pub overall: WinRate,
    /// Per-objective win rates (our reward model as judge).
    pub per_objective: serde_json::Map<String, serde_json::Value>,
    /// Mean per-objective scores of the model and the baseline answers.
    pub mean_objectives_model: Vec<f64>,
    pub mean_objectives_baseline: Vec<f64>,
    pub objectives: Vec<String>,
    pub sampling: SamplingConfig,
}

/// Generates with both models, judges both answers per prompt, and compares. A conditioned
/// model reads `line` (its weights) where its conditioning places it; the baseline and the
/// judge see the prompts as they are.
#[allow(clippy::too_many_arguments)]
pub fn win_rate_eval(
    model: &Loaded,
    conditioning: Option<(&ConditioningInfo, &str)>,
    baseline: &Loaded,
    judge: &Judge,
    prompts: &[PromptRecord],
    sampling: &SamplingConfig,
    batch: usize,
    tie_margin: f64,
) -> Result<(WinRateReport, Vec<Generation>)> {
    let messages: Vec<Vec<Message>> = prompts.iter().map(|p| p.messages.clone()).collect();
    let conditioned: Vec<Vec<Message>> = match conditioning {
        Some((info, l)) => messages.iter().map(|m| info.place(m, l)).collect(),
        None => messages.clone(),
    };
    let ours = answer_prompts(model, &conditioned, sampling, batch)?;
    let theirs = answer_prompts(baseline, &messages, sampling, batch)?;
    let mine = judge_answers(judge, prompts, &ours, batch)?;
    let base = judge_answers(judge, prompts, &theirs, batch)?;
    Ok(compare(
        judge,
        prompts,
        (&ours, &mine),
        (&theirs, &base),
        sampling,
        tie_margin,
    ))
}

/// A judge's verdicts on one answer per prompt.
pub fn judge_answers(
    judge: &Judge,
    prompts: &[PromptRecord],
    answers: &[String],
    batch: usize,
) -> Result<Vec<Verdict>> {
    let p: Vec<&PromptRecord> = prompts.iter().collect();
    let a: Vec<&str> = answers.iter().map(String::as_str).collect();
    judge.score_records(&p, &a, batch)
}

/// Per-prompt comparison of two judged answer sets: the win rate overall and per objective,
/// and the generations with both verdicts.
pub fn compare(
    judge: &Judge,
    prompts: &[PromptRecord],
    (ours, mine): (&[String], &[Verdict]),
    (theirs, base): (&[String], &[Verdict]),
    sampling: &SamplingConfig,
    tie_margin: f64,
) -> (WinRateReport, Vec<Generation>) {
    let totals = |v: &[Verdict]| v.iter().map(|x| x.total).collect::<Vec<_>>();
    let overall = win_rate(&totals(mine), &totals(base), tie_margin);
    let objectives = judge.objectives();
    let mut per_objective = serde_json::Map::new();
    for (k, name) in objectives.iter().enumerate() {
        let a: Vec<f64> = mine.iter().map(|v| v.objectives[k] as f64).collect();
        let b: Vec<f64> = base.iter().map(|v| v.objectives[k] as f64).collect();
        let w = win_rate(&a, &b, tie_margin);
        per_objective.insert(
            name.clone(),
            serde_json::to_value(w).expect("a win rate serialises"),
        );
    }
    let report = WinRateReport {
        judge: judge.describe(),
        overall,
        per_objective,
        mean_objectives_model: mean_objectives(mine, objectives.len()),
        mean_objectives_baseline: mean_objectives(base, objectives.len()),
        objectives,
        sampling: sampling.clone(),
    };
    let gens = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Generation {
            prompt: p.messages.clone(),
            model_answer: ours[i].clone(),
            baseline_answer: theirs[i].clone(),
            model_score: mine[i].total,
            baseline_score: base[i].total,
            model_objectives: mine[i].objectives.clone(),
            baseline_objectives: base[i].objectives.clone(),
            decoding: sampling.clone(),
        })
        .collect();
    (report, gens)
}

/// Writes generations as JSONL (the leaderboard submission), atomically.
pub fn write_generations(path: &Path, gens: &[Generation]) -> Result<()> {
    let mut out = String::new();
    for g in gens {
        out.push_str(&serde_json::to_string(g).context("serialising a generation")?);
        out.push('\n');
    }
    crate::util::io::write_atomic(path, out.as_bytes())
}
