//! Summed response log-probs of preference pairs, one packed `[prompt | chosen | rejected]`
//! forward per pair: the prompt is computed once and both responses run on its keys/values
//! (gradients flow through the shared prefix). Each pair is computed the same way whatever
//! batch it is in, so precomputed reference log-probs equal an inline reference bit for bit,
//! and `cached_reference` keeps them on disk.

use crate::cache::load_or_compute;
use crate::data::preference::PreferencePair;
use crate::model::ctx::ForwardCtx;
use crate::model::input::ModelInput;
use crate::model::lm_head::gather_rows;
use crate::model::Qwen;
use crate::train::progress::Progress;
use crate::util::digest::Digest;
use candle_core::{DType, Result, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Per-pair sums of response-token log-probs, [B] f32 each, and token counts.
pub struct PairLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
    pub chosen_tokens: Vec<usize>,
    pub rejected_tokens: Vec<usize>,
}

/// (prompt, chosen, rejected) token ids.
pub type PairIds<'a> = (&'a [u32], &'a [u32], &'a [u32]);

pub fn pair_logprobs(model: &Qwen, pairs: &[PairIds], ctx: ForwardCtx) -> Result<PairLogps> {
    pair_logprobs_gated(model, pairs, &[], ctx)
}

/// `pair_logprobs` with pair i's LoRA blocks gated by `gates[i]` (a weight-conditioned
/// adapter's objective weights, one per rank; see `ForwardCtx::gate`). A pair without an entry,
/// or with an empty one, runs ungated.
pub fn pair_logprobs_gated(
    model: &Qwen,
    pairs: &[PairIds],
    gates: &[&[f32]],
    ctx: ForwardCtx,
) -> Result<PairLogps> {
    let (mut chosen, mut rejected) = (vec![], vec![]);
    for (i, &(prompt, c, r)) in pairs.iter().enumerate() {
        let gate = match gates.get(i).filter(|g| !g.is_empty()) {
            Some(g) => Some(Tensor::new(*g, &model.device)?),
            None => None,
        };
        let ctx = ctx.with_gate(gate.as_ref());
        if prompt.is_empty() || c.is_empty() || r.is_empty() {
            candle_core::bail!("a preference pair needs a prompt and two non-empty responses");
        }
        let input = ModelInput::packed_pair(prompt, c, r, &model.device)?;
        let hidden = model.forward(&input, ctx, None)?;
        let p = prompt.len();
        // Response token j is predicted by the hidden state just before it; for both
        // responses' first token that is the prompt's last position.
        let mut rows: Vec<u32> = (0..c.len()).map(|j| (p + j - 1) as u32).collect();
        rows.extend((0..r.len()).map(|j| if j == 0 { p - 1 } else { p + c.len() + j - 1 } as u32));
        let targets: Vec<u32> = c.iter().chain(r).copied().collect();
        let lp = model
            .token_logprobs(&gather_rows(&hidden, &rows)?, &targets, ctx.grad)?
            .to_dtype(DType::F32)?;
        chosen.push(lp.narrow(0, 0, c.len())?.sum_all()?);
        rejected.push(lp.narrow(0, c.len(), r.len())?.sum_all()?);
    }
    Ok(PairLogps {
        chosen: Tensor::stack(&chosen, 0)?,
        rejected: Tensor::stack(&rejected, 0)?,
        chosen_tokens: pairs.iter().map(|p| p.1.len()).collect(),
        rejected_tokens: pairs.iter().map(|p| p.2.len()).collect(),
    })
}

/// Reference log-probs of many pairs (adapters off, no gradient), as (chosen, rejected) f32.
pub fn reference_logprobs(
    model: &Qwen,
    pairs: &[PairIds],
    progress: &dyn Fn(usize),
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (mut c, mut r) = (vec![], vec![]);
    for (i, pair) in pairs.iter().enumerate() {
        let lp = pair_logprobs(model, std::slice::from_ref(pair), ForwardCtx::REFERENCE)?;
        c.push(lp.chosen.to_vec1::<f32>()?[0]);
        r.push(lp.rejected.to_vec1::<f32>()?[0]);
        progress(i + 1);
    }
    Ok((c, r))
}

/// Reference (adapters off) summed log-probs of every pair's chosen and rejected response, from
/// the cache or one no-grad pass (`model_key` identifies the frozen weights).
pub fn cached_reference(
    model: &Qwen,
    model_key: &Digest,
    pairs: &[PreferencePair],
    dir: &Path,
    quiet: bool,
) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let mut key = model_key.clone();
    key.str("dpo-reference-packed-v1");
    for p in pairs {
        key.ids(&p.prompt).ids(&p.chosen).ids(&p.rejected);
    }
    let (t, hit) = load_or_compute(dir, "reference", &key, &model.device, || {
        let bar = Progress::new(pairs.len() as u64, 0, quiet, "reference log-probs");
        let ids: Vec<PairIds<'_>> = pairs.iter().map(PreferencePair::ids).collect();
        let (c, r) = reference_logprobs(model, &ids, &|n| bar.set(n as u64, String::new()))?;
        bar.finish();
        let n = pairs.len();
        Ok(HashMap::from([
            ("chosen".to_string(), Tensor::from_vec(c, n, &model.device)?),
            (
                "rejected".to_string(),
                Tensor::from_vec(r, n, &model.device)?,
            ),
        ]))
    })?;
    if hit {
        eprintln!(
            "reference log-probs of {} pairs from the cache",
            pairs.len()
        );
    }
    Ok((t["chosen"].to_vec1()?, t["rejected"].to_vec1()?))
}
