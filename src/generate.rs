//! Batched KV-cache decoding with transformers' sampling pipeline:
//! repetition penalty -> temperature -> top-k -> top-p -> sample (temperature 0 = greedy).
//!
//! Prompts are left-padded; rotary positions count real tokens only, so a prompt decodes the
//! same whether it is alone or in a batch. Each prompt draws from its own seeded stream.

use crate::model::lora::LoraCtx;
use crate::model::qwen2::{KvCache, ModelInput};
use crate::model::Qwen2;
use crate::rng::stream_rng;
use candle_core::Result;
use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    model: &Qwen2,
    prompts: &[Vec<u32>],
    stream_ids: &[u64],
    cfg: &SamplingConfig,
    stop_ids: &[u32],
    pad_id: u32,
    ctx: LoraCtx,
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    if b == 0 {
        return Ok(vec![]);
    }
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
        let logits = model.logits(&last)?.to_vec2::<f32>()?;
        let mut step_ids = vec![];
        for i in 0..b {
            let tok = if done[i] {
                pad_id
            } else {
                let tok = pick_token(&logits[i], &history[i], cfg, &mut rngs[i]);
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
        for p in next_pos.iter_mut() {
            *p += 1;
        }
        let step: Vec<Vec<u32>> = step_ids.iter().map(|&t| vec![t]).collect();
        input = ModelInput::new(&step, &pos, &key_valid, &model.device)?;
    }
    Ok(outputs)
}

/// One decoding decision from f32 logits.
pub fn pick_token(
    logits: &[f32],
    history: &[u32],
    cfg: &SamplingConfig,
    rng: &mut impl Rng,
) -> u32 {
    let mut logits = logits.to_vec();
    if cfg.repetition_penalty != 1.0 {
        let p = cfg.repetition_penalty as f32;
        let mut seen = std::collections::HashSet::new();
        for &t in history {
            if seen.insert(t) {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l < 0.0 { *l * p } else { *l / p };
                }
            }
        }
    }
    if cfg.temperature <= 0.0 {
        return argmax(&logits);
    }
    let inv_t = 1.0 / cfg.temperature as f32;
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l * inv_t))
        .collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if cfg.top_k > 0 && cfg.top_k < cand.len() {
        cand.truncate(cfg.top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand
        .iter()
        .map(|&(_, l)| ((l - max) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
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
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u: f64 = rng.random();
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

/// Greedy decoding that recomputes the whole prefix every step (no cache). Slow; the reference
/// the KV-cache path is tested against.
pub fn greedy_no_cache(
    model: &Qwen2,
    prompt: &[u32],
    max_new_tokens: usize,
    ctx: LoraCtx,
) -> Result<Vec<u32>> {
    let mut seq = prompt.to_vec();
    let mut out = vec![];
    for _ in 0..max_new_tokens {
        let input = ModelInput::right_padded(std::slice::from_ref(&seq), 0, &model.device)?;
        let hidden = model.forward(&input, ctx, None)?;
        let last = hidden.narrow(1, seq.len() - 1, 1)?.squeeze(1)?;
        let tok = argmax(&model.logits(&last)?.squeeze(0)?.to_vec1::<f32>()?);
        seq.push(tok);
        out.push(tok);
    }
    Ok(out)
}
