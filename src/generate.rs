//! Batched KV-cache decoding with transformers' sampling pipeline:
//! repetition penalty -> temperature -> top-k -> top-p -> sample (temperature 0 = greedy).
//!
//! Prompts are left-padded; rotary positions count real tokens only, so a prompt decodes the
//! same whether it is alone or in a batch. Each prompt draws from its own seeded stream.

use crate::model::ctx::ForwardCtx;
use crate::model::input::ModelInput;
use crate::model::qwen::KvCache;
use crate::model::Qwen;
use crate::util::rng::stream_rng;
use candle_core::{Result, Tensor, D};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Decoding settings as resolved for a run (what every generation record states).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingConfig {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1.0 means none.
    pub repetition_penalty: f64,
    pub seed: u64,
}

/// Decoding settings as a user gives them (command-line flags, `[eval]` keys): each one unset
/// falls back to the model's `generation_config.json`, then to mo-align's defaults (greedy,
/// 256 new tokens), the order transformers' `generate()` and vLLM use. A second struct beside
/// `SamplingConfig` because "not given" must be told apart from "given the default value".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct SamplingArgs {
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    /// 0 means greedy.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// 0 means no top-k cut.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// 1.0 means none.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// The settings used: these arguments over the model's generation defaults (`None` when
    /// the checkpoint has no generation_config.json) over mo-align's.
    pub fn resolve(&self, model_defaults: Option<&serde_json::Value>) -> SamplingConfig {
        let mut s = SamplingConfig::default();
        if let Some(gc) = model_defaults {
            let f = |k: &str| gc.get(k).and_then(serde_json::Value::as_f64);
            let u = |k: &str| gc.get(k).and_then(serde_json::Value::as_u64);
            // transformers samples only with do_sample; its unset top_k is 50, temperature 1.
            if gc.get("do_sample").and_then(serde_json::Value::as_bool) == Some(true) {
                s.temperature = f("temperature").unwrap_or(1.0);
                s.top_p = f("top_p").unwrap_or(1.0);
                s.top_k = u("top_k").unwrap_or(50) as usize;
            }
            if let Some(r) = f("repetition_penalty") {
                s.repetition_penalty = r;
            }
            if let Some(n) = u("max_new_tokens") {
                s.max_new_tokens = n as usize;
            }
        }
        SamplingConfig {
            max_new_tokens: self.max_new_tokens.unwrap_or(s.max_new_tokens),
            temperature: self.temperature.unwrap_or(s.temperature),
            top_p: self.top_p.unwrap_or(s.top_p),
            top_k: self.top_k.unwrap_or(s.top_k),
            repetition_penalty: self.repetition_penalty.unwrap_or(s.repetition_penalty),
            seed: self.seed.unwrap_or(s.seed),
        }
    }
}

impl SamplingConfig {
    /// Refuses settings no decoder can honour, naming the flag and its valid range.
    pub fn validate(&self) -> anyhow::Result<()> {
        let t = self.temperature;
        anyhow::ensure!(
            t.is_finite() && t >= 0.0,
            "--temperature must be a finite number >= 0 (0 = greedy), got {t}"
        );
        let p = self.top_p;
        anyhow::ensure!(
            p.is_finite() && p > 0.0 && p <= 1.0,
            "--top-p must be in (0, 1], got {p}"
        );
        let r = self.repetition_penalty;
        anyhow::ensure!(
            r.is_finite() && r > 0.0,
            "--repetition-penalty must be a finite number > 0 (1 = none), got {r}"
        );
        Ok(())
    }
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

/// Generates a continuation for each prompt; a continuation ends with (and includes) the first
/// stop id it produces, or stops at `max_new_tokens`. `stream_ids[i]` names prompt i's random
/// stream (e.g. its index in the whole prompt file) so sampling does not depend on batching.
pub fn generate(
    model: &Qwen,
    prompts: &[Vec<u32>],
    stream_ids: &[u64],
    cfg: &SamplingConfig,
    stop_ids: &[u32],
    pad_id: u32,
    ctx: ForwardCtx,
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
    cfg.validate()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    if prompts.iter().any(Vec::is_empty) {
        candle_core::bail!("generate: empty prompt");
    }
    let mut key_valid: Vec<Vec<bool>> = vec![];
    let mut ids: Vec<Vec<u32>> = vec![];
    let mut positions: Vec<Vec<u32>> = vec![];
    let mut next_pos: Vec<u32> = vec![];
    for p in prompts {
        let pad = max_len - p.len();
        ids.push(
            std::iter::repeat_n(pad_id, pad)
                .chain(p.iter().copied())
                .collect(),
        );
        key_valid.push((0..max_len).map(|i| i >= pad).collect());
        positions.push((0..max_len).map(|i| i.saturating_sub(pad) as u32).collect());
        next_pos.push(p.len() as u32);
    }
    let mut rngs: Vec<_> = stream_ids
        .iter()
        .map(|&s| stream_rng(cfg.seed, s))
        .collect();
    let mut history: Vec<Vec<u32>> = prompts.to_vec();
    let mut outputs: Vec<Vec<u32>> = vec![vec![]; b];
    let mut done = vec![false; b];
    let mut cache = KvCache::new(model, b)?;
    let max_pos = model.config.max_position_embeddings as u32;

    let mut input = ModelInput::new(&ids, &positions, &key_valid, &model.device)?;
    for _step in 0..cfg.max_new_tokens {
        let hidden = model.forward(&input, ctx, Some(&mut cache))?;
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        let logits = model.logits(&last)?;
        // Greedy decoding keeps the [B, V] logits on the device and reads back B ids; sampling
        // reads the rows and selects on the host.
        let choice = if cfg.temperature <= 0.0 {
            Choice::Greedy(greedy_ids(&logits, &history, cfg.repetition_penalty)?)
        } else {
            Choice::Rows(logits.to_vec2::<f32>()?)
        };
        let picked: Vec<u32> = match choice {
            Choice::Greedy(ids) => ids,
            Choice::Rows(rows) => pick_tokens(&rows, &history, &done, cfg, &mut rngs, pad_id),
        };
        let mut step_ids = vec![];
        for i in 0..b {
            let tok = if done[i] {
                pad_id
            } else {
                let tok = picked[i];
                history[i].push(tok);
                outputs[i].push(tok);
                if stop_ids.contains(&tok) || next_pos[i] + 1 >= max_pos {
                    done[i] = true;
                }
                tok
            };
            step_ids.push(tok);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        for (valid, &d) in key_valid.iter_mut().zip(&done) {
            // A finished row keeps decoding padding that nothing reads.
            valid.push(!d);
        }
        let pos: Vec<Vec<u32>> = next_pos.iter().map(|&p| vec![p]).collect();
        // A finished row stays where it stopped: its padding must not walk past the model's
        // last position while longer rows go on.
        for (p, &d) in next_pos.iter_mut().zip(&done) {
            if !d {
                *p += 1;
            }
        }
        let step: Vec<Vec<u32>> = step_ids.iter().map(|&t| vec![t]).collect();
        input = ModelInput::new(&step, &pos, &key_valid, &model.device)?;
    }
    Ok(outputs)
}

enum Choice {
    Greedy(Vec<u32>),
    Rows(Vec<Vec<f32>>),
}

/// Greedy ids of `logits` [B, V] (f32, on the model's device) after transformers' repetition
/// penalty, computed where the logits are: the seen tokens' logits are gathered, penalised and
/// scattered back, then the argmax (first maximum, as torch.argmax) is taken on the device.
fn greedy_ids(logits: &Tensor, history: &[Vec<u32>], penalty: f64) -> Result<Vec<u32>> {
    let logits = if penalty != 1.0 {
        let seen: Vec<Vec<u32>> = history
            .iter()
            .map(|h| {
                let mut s = h.clone();
                s.sort_unstable();
                s.dedup();
                s
            })
            .collect();
        let width = seen.iter().map(Vec::len).max().unwrap_or(0);
        // Rows are padded by repeating their first token: a duplicate index writes the same value.
        let flat: Vec<u32> = seen
            .iter()
            .flat_map(|s| {
                let first = s.first().copied().unwrap_or(0);
                s.iter()
                    .copied()
                    .chain(std::iter::repeat(first))
                    .take(width)
            })
            .collect();
        let idx = Tensor::from_vec(flat, (seen.len(), width), logits.device())?;
        let picked = logits.gather(&idx, 1)?;
        // A true division, as on the host (`x / p`, not `x * (1 / p)`).
        let p = Tensor::new(penalty as f32, logits.device())?;
        let penalised = picked
            .lt(0f32)?
            .where_cond(&picked.broadcast_mul(&p)?, &picked.broadcast_div(&p)?)?;
        logits.scatter(&idx, &penalised, 1)?
    } else {
        logits.clone()
    };
    logits.argmax(D::Minus1)?.to_vec1::<u32>()
}

/// One decoding step's choices for every row (`pad_id` for finished rows), the rows in
/// parallel. Each row draws from its own stream, so the result does not depend on the thread
/// count; with a 152k vocabulary the host's softmax and sampling for one row cost about as much
/// as a GPU's whole decode step, so serial picking would dominate there.
pub fn pick_tokens<R: Rng + Send>(
    rows: &[Vec<f32>],
    history: &[Vec<u32>],
    done: &[bool],
    cfg: &SamplingConfig,
    rngs: &mut [R],
    pad_id: u32,
) -> Vec<u32> {
    use rayon::prelude::*;
    rows.par_iter()
        .zip(rngs.par_iter_mut())
        .zip(history.par_iter())
        .zip(done.par_iter())
        .map(|(((row, rng), hist), &d)| {
            if d {
                pad_id
            } else {
                pick_token(row, hist, cfg, rng)
            }
        })
        .collect()
}

/// transformers' repetition penalty on host logits: seen tokens' logits are divided by the
/// penalty when positive and multiplied when negative.
fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let p = penalty as f32;
    let mut seen = std::collections::HashSet::new();
    for &t in history {
        if seen.insert(t) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l < 0.0 { *l * p } else { *l / p };
            }
        }
    }
}

/// One decoding decision from f32 logits: penalty -> temperature -> top-k -> top-p -> sample.
/// Candidates are found by partial selection (`select_nth_unstable`), never a full sort of the
/// vocabulary: top-k selects k; top-p alone selects a growing prefix until it holds the mass.
pub fn pick_token(
    logits: &[f32],
    history: &[u32],
    cfg: &SamplingConfig,
    rng: &mut impl Rng,
) -> u32 {
    let mut logits = logits.to_vec();
    apply_repetition_penalty(&mut logits, history, cfg.repetition_penalty);
    if cfg.temperature <= 0.0 {
        return argmax(&logits);
    }
    let inv_t = 1.0 / cfg.temperature as f32;
    logits.iter_mut().for_each(|l| *l *= inv_t);
    let v = logits.len();
    // Descending logit, then ascending id: a total order, so truncation is deterministic.
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let top = |k: usize| -> Vec<(u32, f32)> {
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, order);
            cand.truncate(k);
        }
        cand.sort_by(order);
        cand
    };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weight = |l: f32| ((l - max) as f64).exp();
    let top_k = if cfg.top_k > 0 && cfg.top_k < v {
        Some(cfg.top_k)
    } else {
        None
    };
    if top_k.is_none() && cfg.top_p >= 1.0 {
        // No truncation: sample from the whole distribution in id order (each weight computed
        // once: the exponentials are most of the cost).
        let weights: Vec<f64> = logits.iter().map(|&l| weight(l)).collect();
        let total: f64 = weights.iter().sum();
        let mut u = rng.random::<f64>() * total;
        for (i, w) in weights.iter().enumerate() {
            u -= w;
            if u < 0.0 {
                return i as u32;
            }
        }
        return argmax(&logits);
    }
    // The candidates (sorted) and the mass they are normalised against.
    let (cand, total) = match top_k {
        Some(k) => {
            let cand = top(k);
            let total = cand.iter().map(|&(_, l)| weight(l)).sum::<f64>();
            (cand, total)
        }
        None => {
            let total: f64 = logits.iter().map(|&l| weight(l)).sum();
            let mut k = 64.min(v);
            loop {
                let cand = top(k);
                let mass: f64 = cand.iter().map(|&(_, l)| weight(l)).sum::<f64>() / total;
                if mass >= cfg.top_p || k == v {
                    break (cand, total);
                }
                k = (k * 8).min(v);
            }
        }
    };
    let mut probs: Vec<f64> = cand.iter().map(|&(_, l)| weight(l) / total).collect();
    if cfg.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= cfg.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let u: f64 = rng.random::<f64>() * total;
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return cand[i].0;
        }
    }
    cand[probs.len() - 1].0
}

/// Index of the first maximum (torch.argmax's tie rule).
pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}
