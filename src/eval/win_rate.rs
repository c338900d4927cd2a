//! Win rates: both models answer the same prompts with the same decoding settings (each prompt
//! has its own seeded stream, so batching does not change answers), a judge scores both answers,
//! and the verdicts are compared per prompt.

use crate::generate::{generate, SamplingConfig};
use crate::judge::{win_rate, Judge, Verdict, WinRate};
use crate::model::ctx::ForwardCtx;
use crate::model::loader::Loaded;
use crate::tokenizer::Message;
use anyhow::{Context, Result};
use serde::Serialize;
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

#[derive(Debug, Clone, Serialize)]
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

/// Generates with both models, judges both answers per prompt, and compares.
pub fn win_rate_eval(
    model: &Loaded,
    baseline: &Loaded,
    judge: &Judge,
    prompts: &[Vec<Message>],
    sampling: &SamplingConfig,
    batch: usize,
    tie_margin: f64,
) -> Result<(WinRateReport, Vec<Generation>)> {
    let ours = answer_prompts(model, prompts, sampling, batch)?;
    let theirs = answer_prompts(baseline, prompts, sampling, batch)?;
    let items: Vec<(Vec<Message>, String)> = prompts
        .iter()
        .zip(&ours)
        .chain(prompts.iter().zip(&theirs))
        .map(|(p, a)| (p.clone(), a.clone()))
        .collect();
    let verdicts = judge.score(&items, batch)?;
    let (mine, base): (&[Verdict], &[Verdict]) = verdicts.split_at(prompts.len());
    let totals = |v: &[Verdict]| v.iter().map(|x| x.total).collect::<Vec<_>>();
    let overall = win_rate(&totals(mine), &totals(base), tie_margin);
    let objectives = judge.objectives();
    let mut per_objective = serde_json::Map::new();
    let mean = |v: &[Verdict], k: usize| {
        v.iter().map(|x| x.objectives[k] as f64).sum::<f64>() / v.len().max(1) as f64
    };
    for (k, name) in objectives.iter().enumerate() {
        let a: Vec<f64> = mine.iter().map(|v| v.objectives[k] as f64).collect();
        let b: Vec<f64> = base.iter().map(|v| v.objectives[k] as f64).collect();
        per_objective.insert(
            name.clone(),
            serde_json::to_value(win_rate(&a, &b, tie_margin))?,
        );
    }
    let report = WinRateReport {
        judge: judge.describe(),
        overall,
        per_objective,
        mean_objectives_model: (0..objectives.len()).map(|k| mean(mine, k)).collect(),
        mean_objectives_baseline: (0..objectives.len()).map(|k| mean(base, k)).collect(),
        objectives,
        sampling: sampling.clone(),
    };
    let gens = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Generation {
            prompt: p.clone(),
            model_answer: ours[i].clone(),
            baseline_answer: theirs[i].clone(),
            model_score: mine[i].total,
            baseline_score: base[i].total,
            model_objectives: mine[i].objectives.clone(),
            baseline_objectives: base[i].objectives.clone(),
            decoding: sampling.clone(),
        })
        .collect();
    Ok((report, gens))
}

/// Writes generations as JSONL (the leaderboard submission), atomically.
pub fn write_generations(path: &Path, gens: &[Generation]) -> Result<()> {
    let mut out = String::new();
    for g in gens {
        out.push_str(&serde_json::to_string(g).context("serialising a generation")?);
        out.push('\n');
    }
    crate::io::write_atomic(path, out.as_bytes())
}
