//! The weights each preference pair's loss uses. Without conditioning that is the config's one
//! weighting for every pair. With `[conditioning]`, each pair appears `draws` times per epoch,
//! each time with its own weights, stated to the policy in its system prompt
//! (`objectives::conditioning`), and `conditioning.json` is written beside the adapter.

use super::rewards::ScoredPair;
use super::StageRun;
use crate::objectives::conditioning::{
    line_names, ConditioningConfig, ConditioningInfo, INFO_FILE,
};
use crate::rng::mix_seed;
use anyhow::Result;

/// A pair and the objective weights its loss uses.
#[derive(Debug, Clone)]
pub struct WeightedScoredPair {
    pub scored: ScoredPair,
    pub weights: Vec<f64>,
}

/// Which split's draws: validation pairs draw from their own stream, once each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
}

/// Checks `[conditioning]` against the reward vector and, when it is on, records how to state
/// weights to the policy (`conditioning.json` in the run's output directory).
pub fn prepare(
    run: &StageRun,
    cond: &ConditioningConfig,
    objectives: &[String],
) -> Result<Option<ConditioningInfo>> {
    if !cond.enabled {
        return Ok(None);
    }
    cond.validate(objectives.len())?;
    let info = ConditioningInfo::new(line_names(objectives), cond);
    crate::io::write_json_atomic(&run.out.join(INFO_FILE), &info)?;
    Ok(Some(info))
}

/// Every pair with its weights: `fixed` for all without conditioning, else per-draw weights
/// and a prompt re-encoded with the conditioning line (responses truncated to
/// `data.max_length` as the data loader truncates them; a prompt that no longer fits is left
/// out and counted).
pub fn weighted_pairs(
    run: &StageRun,
    cond: &ConditioningConfig,
    info: Option<&ConditioningInfo>,
    fixed: &[f64],
    pairs: &[ScoredPair],
    split: Split,
) -> Result<Vec<WeightedScoredPair>> {
    let Some(info) = info else {
        return Ok(pairs
            .iter()
            .map(|p| WeightedScoredPair {
                scored: p.clone(),
                weights: fixed.to_vec(),
            })
            .collect());
    };
    let (seed, draws) = match split {
        Split::Train => (run.stage.train.seed, cond.draws),
        Split::Validation => (mix_seed(run.stage.train.seed, u64::MAX, 1), 1),
    };
    let (tok, max_length) = (&run.loaded.tokenizer, run.stage.data.max_length);
    let k = info.objectives.len();
    let (mut out, mut dropped) = (vec![], 0usize);
    for draw in 0..draws as u64 {
        for (i, p) in pairs.iter().enumerate() {
            let weights = cond.draw(seed, draw, i as u64, k);
            let line = info.line(&weights)?;
            let mut scored = p.clone();
            let pair = &mut scored.pair;
            pair.prompt_messages = info.place(&pair.prompt_messages, &line);
            pair.prompt = tok.encode_prompt(&pair.prompt_messages)?;
            if pair.prompt.len() >= max_length {
                dropped += 1;
                continue;
            }
            let room = max_length - pair.prompt.len();
            pair.chosen.truncate(room);
            pair.rejected.truncate(room);
            out.push(WeightedScoredPair { scored, weights });
        }
    }
    if dropped > 0 {
        eprintln!(
            "conditioning: {dropped} {split:?} pairs left out: with the conditioning line their prompt exceeds data.max_length = {max_length}"
        );
    }
    Ok(out)
}
