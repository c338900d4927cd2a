//! `mo-align eval`: stage-agnostic evaluation over one model load. Modes combine freely:
//! perplexity of a text, held-out chat NLL, preference accuracy against the reference, reward
//! scores, and win rate against a baseline judged by a reward model.

use crate::data::chat::{parse_messages, sft_example};
use crate::data::preference::{preference_pair, PreferencePair};
use crate::data::source::read_records;
use crate::data::{load_splits, str_field, DataConfig, FieldError};
use crate::generate::{generate, SamplingConfig};
use crate::judge::{win_rate, Judge, Verdict, WinRate};
use crate::model::ctx::ForwardCtx;
use crate::model::loader::{apply_adapter, load_pretrained, Loaded};
use crate::objectives::nll::Nll;
use crate::objectives::pair::pair_logprobs;
use crate::recipes::train_rm::score_sequences;
use crate::reward::RewardHead;
use crate::tokenizer::Message;
use crate::train::trainer::evaluate;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// (prompt messages, response) of a record: `{prompt, response}` strings or `{messages}` whose
/// last message is the assistant's reply.
pub fn prompt_and_response(v: &serde_json::Value) -> Result<(Vec<Message>, String), FieldError> {
    if v.get("messages").is_some() {
        let mut msgs = parse_messages(v.get("messages"), "messages")?;
        let last = msgs.len() - 1;
        if msgs[last].role != "assistant" {
            return Err(FieldError::new(
                format!("messages[{last}].role"),
                "the last message must be the assistant's reply",
            ));
        }
        let reply = msgs.pop().map(|m| m.content).unwrap_or_default();
        return Ok((msgs, reply));
    }
    let prompt = str_field(v, "prompt", "")?;
    let response = str_field(v, "response", "")?;
    Ok((vec![Message::new("user", prompt)], response.to_string()))
}

/// The prompt of a record: `prompt` (string), or `messages` / `chosen` without a final
/// assistant reply.
pub fn prompt_of(v: &serde_json::Value) -> Result<Vec<Message>, FieldError> {
    if let Some(serde_json::Value::String(p)) = v.get("prompt") {
        return Ok(vec![Message::new("user", p)]);
    }
    let field = if v.get("messages").is_some() {
        "messages"
    } else {
        "chosen"
    };
    let mut msgs = parse_messages(v.get(field), field)?;
    if msgs.last().is_some_and(|m| m.role == "assistant") {
        msgs.pop();
    }
    if !msgs.iter().any(|m| m.role == "user") {
        return Err(FieldError::new(field, "no user message"));
    }
    Ok(msgs)
}

/// Reads prompts (see `prompt_of`) from a file spec (local, glob, or `hf://datasets/...`), at
/// most `max` of them.
pub fn read_prompts(spec: &str, max: Option<usize>) -> Result<Vec<Vec<Message>>> {
    let mut out = vec![];
    'files: for path in crate::data::source::resolve_files(spec)? {
        for rec in read_records(&path)? {
            let v = rec
                .value
                .map_err(|why| anyhow::anyhow!("{}: {why}", rec.loc))?;
            out.push(
                prompt_of(&v).map_err(|e| {
                    anyhow::anyhow!("{}: field `{}`: {}", rec.loc, e.field, e.problem)
                })?,
            );
            if max.is_some_and(|m| out.len() >= m) {
                break 'files;
            }
        }
    }
    if out.is_empty() {
        bail!("{spec}: no prompts");
    }
    Ok(out)
}

/// `PATH` or `PATH+ADAPTER`.
pub fn parse_model_spec(spec: &str) -> (String, Option<PathBuf>) {
    match spec.split_once('+') {
        Some((m, a)) => (m.to_string(), Some(PathBuf::from(a))),
        None => (spec.to_string(), None),
    }
}

/// Loads `path`, merges `base_adapter` into the weights (it is part of the reference), then
/// attaches `adapter` (switchable).
pub fn load_for_eval(
    path: &str,
    base_adapter: Option<&Path>,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<Loaded> {
    let mut loaded = load_pretrained(path, None, dtype, device)?;
    if let Some(a) = base_adapter {
        apply_adapter(&mut loaded.model, a)?;
        loaded.model.merge_lora()?;
    }
    if let Some(a) = adapter {
        loaded.adapter = Some(apply_adapter(&mut loaded.model, a)?);
    }
    Ok(loaded)
}

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

/// Held-out NLL on chat data (assistant tokens only), with the adapter on.
pub fn sft_nll(loaded: &Loaded, file: &Path, max_length: usize) -> Result<serde_json::Value> {
    let cfg = DataConfig {
        train_files: vec![file.display().to_string()],
        max_length,
        ..DataConfig::default()
    };
    let data = load_splits(&cfg, |v, r| sft_example(v, &loaded.tokenizer, &cfg, r))?;
    let m = evaluate(
        &Nll {
            model: &loaded.model,
        },
        &data.train,
        4,
    )?;
    Ok(
        serde_json::json!({"nll_per_token": m["eval_loss"], "examples": data.train.len(), "data": data.train_report}),
    )
}

/// Implicit-reward accuracy and margins of the adapter against the reference (adapter off),
/// and, with a reward model, its per-objective scores of chosen vs rejected.
pub fn preference_eval(
    loaded: &Loaded,
    file: &Path,
    beta: f64,
    max_length: usize,
    rm: Option<&Path>,
) -> Result<serde_json::Value> {
    let cfg = DataConfig {
        train_files: vec![file.display().to_string()],
        max_length,
        ..DataConfig::default()
    };
    let pairs: Vec<PreferencePair> =
        load_splits(&cfg, |v, r| preference_pair(v, &loaded.tokenizer, &cfg, r))?.train;
    let (mut acc, mut margin, mut rc, mut rr) = (0.0, 0.0, 0.0, 0.0);
    for p in &pairs {
        let ids = [p.ids()];
        let pol = pair_logprobs(&loaded.model, &ids, ForwardCtx::EVAL)?;
        let refp = pair_logprobs(&loaded.model, &ids, ForwardCtx::REFERENCE)?;
        let c = beta * (pol.chosen.to_vec1::<f32>()?[0] - refp.chosen.to_vec1::<f32>()?[0]) as f64;
        let r =
            beta * (pol.rejected.to_vec1::<f32>()?[0] - refp.rejected.to_vec1::<f32>()?[0]) as f64;
        acc += f64::from(u8::from(c > r));
        margin += c - r;
        rc += c;
        rr += r;
    }
    let n = pairs.len().max(1) as f64;
    let mut out = serde_json::json!({
        "pairs": pairs.len(), "beta": beta,
        "rewards/accuracies": acc / n, "rewards/margins": margin / n,
        "rewards/chosen": rc / n, "rewards/rejected": rr / n,
    });
    if let Some(rm) = rm {
        let head = RewardHead::load(rm, &loaded.model.device)?;
        let full = |p: &PreferencePair, r: &[u32]| [p.prompt.as_slice(), r].concat();
        let seqs: Vec<Vec<u32>> = pairs
            .iter()
            .flat_map(|p| [full(p, &p.chosen), full(p, &p.rejected)])
            .collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let scores = score_sequences(&loaded.model, &head, &refs, 8, ForwardCtx::REFERENCE)?;
        let mut per = serde_json::Map::new();
        for (k, name) in head.info.objectives.iter().enumerate() {
            let c: Vec<f64> = scores.iter().step_by(2).map(|s| s[k] as f64).collect();
            let r: Vec<f64> = scores
                .iter()
                .skip(1)
                .step_by(2)
                .map(|s| s[k] as f64)
                .collect();
            let right = c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64;
            per.insert(name.clone(), serde_json::json!({
                "chosen": c.iter().sum::<f64>() / n, "rejected": r.iter().sum::<f64>() / n, "accuracy": right / n,
            }));
        }
        out["reward_model"] = per.into();
    }
    Ok(out)
}

/// Scores every record of `input` with the reward model; writes JSONL (records with a `scores`
/// object per objective) to `output` atomically, or to stdout. Returns the number scored.
pub fn score_file(
    loaded: &Loaded,
    rm_dir: &Path,
    input: &Path,
    output: Option<&Path>,
) -> Result<usize> {
    let head = RewardHead::load(rm_dir, &loaded.model.device)?;
    if head.info.hidden_size != loaded.model.config.hidden_size {
        bail!(
            "{}: the head expects hidden size {}, --model has {}",
            rm_dir.display(),
            head.info.hidden_size,
            loaded.model.config.hidden_size
        );
    }
    let mut records = vec![];
    let mut seqs = vec![];
    for rec in read_records(input)? {
        let v = rec
            .value
            .map_err(|why| anyhow::anyhow!("{}: {why}", rec.loc))?;
        let (prompt, response) = prompt_and_response(&v)
            .map_err(|e| anyhow::anyhow!("{}: field `{}`: {}", rec.loc, e.field, e.problem))?;
        let mut ids = loaded.tokenizer.encode_prompt(&prompt)?;
        ids.extend(loaded.tokenizer.encode_response(&response)?);
        records.push(v);
        seqs.push(ids);
    }
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let scores = if refs.is_empty() {
        vec![]
    } else {
        score_sequences(&loaded.model, &head, &refs, 8, ForwardCtx::EVAL)?
    };
    let mut out = String::new();
    for (mut v, s) in records.into_iter().zip(&scores) {
        let obj: serde_json::Map<String, serde_json::Value> = head
            .info
            .objectives
            .iter()
            .zip(s)
            .map(|(k, x)| (k.clone(), (*x as f64).into()))
            .collect();
        v["scores"] = obj.into();
        out.push_str(&serde_json::to_string(&v)?);
        out.push('\n');
    }
    match output {
        Some(p) => crate::io::write_atomic(p, out.as_bytes())?,
        None => print!("{out}"),
    }
    Ok(scores.len())
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
