//! What the reward model computes from a frozen backbone: last-token features, per-objective
//! scores of token sequences, and the on-disk caches of both (they depend on frozen weights
//! only, so a rerun or a later stage reads them back instead of recomputing).

use super::{FeatureSet, RewardHead};
use crate::cache::load_or_compute;
use crate::data::preference::PreferencePair;
use crate::model::ctx::ForwardCtx;
use crate::model::input::ModelInput;
use crate::model::lm_head::gather_rows;
use crate::model::Qwen;
use crate::train::progress::Progress;
use crate::util::digest::Digest;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A sequence to score: ChatML prompt + response ids, and where the response starts.
#[derive(Debug, Clone, Copy)]
pub struct ScoredSequence<'a> {
    pub ids: &'a [u32],
    pub response_start: usize,
}

impl<'a> ScoredSequence<'a> {
    pub fn new(ids: &'a [u32], response_start: usize) -> Self {
        Self {
            ids,
            response_start,
        }
    }
}

/// The chosen and rejected sequences of pairs (chosen, rejected, chosen, ...), each whole
/// (prompt + response) with where its response starts: what a reward model scores.
pub struct PairSequences(Vec<(Vec<u32>, usize)>);

impl PairSequences {
    pub fn new(pairs: &[PreferencePair]) -> Self {
        let whole = |p: &PreferencePair| p.full_sequences().map(|s| (s, p.prompt.len()));
        Self(pairs.iter().flat_map(whole).collect())
    }

    pub fn scored(&self) -> Vec<ScoredSequence<'_>> {
        self.0
            .iter()
            .map(|(ids, start)| ScoredSequence::new(ids, *start))
            .collect()
    }
}

/// Final hidden states (f32, [N, H]) at the last token of each sequence (no gradient); the
/// features of an HF sequence classifier.
pub fn last_token_features(
    model: &Qwen,
    seqs: &[&[u32]],
    batch_size: usize,
    ctx: ForwardCtx,
    progress: &dyn Fn(usize),
) -> Result<Tensor> {
    let seqs: Vec<ScoredSequence> = seqs
        .iter()
        .map(|s| ScoredSequence::new(s, s.len().saturating_sub(1)))
        .collect();
    reward_features(
        model,
        FeatureSet::LastToken,
        &seqs,
        batch_size,
        ctx,
        progress,
    )
}

/// `set`'s features (f32, [N, set.dim(H)]) of each sequence, computed in length-sorted batches
/// of `batch_size` (no gradient).
pub fn reward_features(
    model: &Qwen,
    set: FeatureSet,
    seqs: &[ScoredSequence],
    batch_size: usize,
    ctx: ForwardCtx,
    progress: &dyn Fn(usize),
) -> Result<Tensor> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].ids.len()));
    let mut rows: Vec<Option<Tensor>> = vec![None; seqs.len()];
    let mut done = 0;
    for chunk in order.chunks(batch_size.max(1)) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| seqs[i].ids.to_vec()).collect();
        if batch.iter().any(Vec::is_empty) {
            bail!("cannot take features of an empty sequence");
        }
        let input = ModelInput::right_padded(&batch, 0, &model.device)?;
        let t = input.ids.dim(1)?;
        let hidden = model.forward(&input, ctx, None)?;
        let last: Vec<u32> = batch
            .iter()
            .enumerate()
            .map(|(b, s)| (b * t + s.len() - 1) as u32)
            .collect();
        let feats = gather_rows(&hidden, &last)?.to_dtype(DType::F32)?;
        for (j, &i) in chunk.iter().enumerate() {
            let last = feats.get(j)?;
            rows[i] = Some(match set {
                FeatureSet::LastToken => last,
                FeatureSet::LastMeanLogprob => {
                    let s = &seqs[i];
                    // The response is at least one token and never the first one.
                    let start = s.response_start.clamp(1, s.ids.len() - 1);
                    let at: Vec<u32> = (start - 1..s.ids.len())
                        .map(|p| (j * t + p) as u32)
                        .collect();
                    let h = gather_rows(&hidden, &at)?;
                    let n = at.len() - 1;
                    let mean = h.narrow(0, 1, n)?.to_dtype(DType::F32)?.mean(0)?;
                    let lp = model
                        .token_logprobs(&h.narrow(0, 0, n)?, &s.ids[start..], false)?
                        .to_dtype(DType::F32)?;
                    let sum = lp.sum_all()?;
                    let stats = Tensor::stack(&[(&sum / n as f64)?, lp.min(0)?, sum], 0)?;
                    Tensor::cat(&[last, mean, stats], 0)?
                }
            });
        }
        done += chunk.len();
        progress(done);
    }
    let rows: Vec<Tensor> = rows
        .into_iter()
        .map(|r| r.expect("every row computed"))
        .collect();
    if rows.is_empty() {
        return Ok(Tensor::zeros(
            (0, set.dim(model.config.hidden_size)),
            DType::F32,
            &model.device,
        )?);
    }
    Ok(Tensor::stack(&rows, 0)?)
}

/// Scores [N, K] of token sequences under a reward head, with `model` (run with `ctx`) as the
/// backbone.
pub fn score_sequences(
    model: &Qwen,
    head: &RewardHead,
    seqs: &[ScoredSequence],
    batch: usize,
    ctx: ForwardCtx,
) -> Result<Vec<Vec<f32>>> {
    let f = reward_features(model, head.info.feature_set, seqs, batch, ctx, &|_| {})?;
    Ok(head.predict(&f)?.to_vec2::<f32>()?)
}

/// Features of `seqs` from the frozen backbone, cached under a digest of model + ids.
pub fn cached_features(
    (model, set, model_key): (&Qwen, FeatureSet, &Digest),
    seqs: &[ScoredSequence],
    batch: usize,
    dir: &Path,
    quiet: bool,
    label: &str,
) -> Result<Tensor> {
    let mut key = model_key.clone();
    key.str(
        match set {
            FeatureSet::LastToken => "last-token-final-hidden-v1".to_string(),
            other => format!("{other:?}-v1"),
        }
        .as_str(),
    );
    for s in seqs {
        key.ids(s.ids);
        if set != FeatureSet::LastToken {
            key.ids(&[s.response_start as u32]);
        }
    }
    let (t, hit) = load_or_compute(dir, "features", &key, &model.device, || {
        let bar = Progress::new(seqs.len() as u64, 0, quiet, label);
        let f = reward_features(model, set, seqs, batch, ForwardCtx::EVAL, &|n| {
            bar.set(n as u64, String::new())
        })?;
        bar.finish();
        Ok(HashMap::from([("features".to_string(), f)]))
    })?;
    if hit {
        eprintln!("{label}: {} feature rows from the cache", seqs.len());
    }
    Ok(t["features"].clone())
}

/// Reward-model scores of the chosen and rejected responses of N pairs.
pub struct PairScores {
    /// [N][K]
    pub chosen: Vec<Vec<f32>>,
    pub rejected: Vec<Vec<f32>>,
    pub objectives: Vec<String>,
}

/// The head's scores of every pair's chosen and rejected sequences, from the cache or computed
/// with `backbone` run with `ctx` (`backbone_key` identifies its frozen weights).
pub fn cached_pair_scores(
    head: &RewardHead,
    head_dir: &Path,
    (backbone, ctx, backbone_key): (&Qwen, ForwardCtx, &Digest),
    pairs: &[PreferencePair],
    batch: usize,
    dir: &Path,
) -> Result<PairScores> {
    if backbone.config.hidden_size != head.info.hidden_size {
        bail!(
            "{}: the head expects hidden size {}, its backbone has {}",
            head_dir.display(),
            head.info.hidden_size,
            backbone.config.hidden_size
        );
    }
    let mut key = RewardHead::digest(head_dir)?;
    key.str(&backbone_key.hex()).str("rm-scores-v2");
    for p in pairs {
        key.ids(&p.prompt).ids(&p.chosen).ids(&p.rejected);
    }
    let k = head.info.objectives.len();
    let (t, hit) = load_or_compute(dir, "rm-scores", &key, &backbone.device, || {
        let seqs = PairSequences::new(pairs);
        let scores = score_sequences(backbone, head, &seqs.scored(), batch, ctx)?;
        let flat: Vec<f32> = scores.into_iter().flatten().collect();
        Ok(HashMap::from([(
            "scores".to_string(),
            Tensor::from_vec(flat, (2 * pairs.len(), k), &backbone.device)?,
        )]))
    })?;
    if hit {
        eprintln!(
            "reward-model scores of {} pairs from the cache",
            pairs.len()
        );
    }
    let rows = if pairs.is_empty() {
        vec![]
    } else {
        t["scores"].to_vec2::<f32>()?
    };
    let (mut chosen, mut rejected) = (vec![], vec![]);
    for (i, row) in rows.into_iter().enumerate() {
        if i % 2 == 0 {
            chosen.push(row)
        } else {
            rejected.push(row)
        }
    }
    Ok(PairScores {
        chosen,
        rejected,
        objectives: head.info.objectives.clone(),
    })
}
