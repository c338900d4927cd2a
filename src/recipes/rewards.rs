//! A preference stage's reward vectors: per pair, the scores of its chosen and rejected
//! responses from the reward model's heads, from rule objectives, or from both (heads first,
//! then rules), every entry on [0, 1]. Hybrid DPO, MODPO and reward-weighted training read
//! the same vectors, so a rule objective can stand beside (or instead of) a learned one.

use super::StageRun;
use crate::data::preference::{pair_texts, preference_pair, PreferencePair};
use crate::data::{Parsed, Splits};
use crate::reward::cached_pair_scores;
use crate::reward::rules::RuleObjectives;
use anyhow::{bail, Result};
use std::path::Path;

/// A pair and the reward vectors of its two responses.
#[derive(Debug, Clone)]
pub struct ScoredPair {
    pub pair: PreferencePair,
    pub chosen: Vec<f32>,
    pub rejected: Vec<f32>,
}

pub struct ScoredPairs {
    pub train: Vec<ScoredPair>,
    pub val: Vec<ScoredPair>,
    /// One name per vector entry (`helpfulness`, ..., `truthfulness (rules)`).
    pub objectives: Vec<String>,
}

/// The run's pairs with their reward vectors from `reward_model` (a train-rm directory) and
/// `rules` (a rule-objectives file); either may be empty, not both. `section` names the config
/// section in errors.
pub fn scored_pairs(
    run: &StageRun,
    reward_model: &str,
    rules: &str,
    score_batch_size: usize,
    section: &str,
) -> Result<ScoredPairs> {
    if reward_model.is_empty() && rules.is_empty() {
        bail!(
            "{section}.reward_model and {section}.rules are both empty: give a directory written by train-rm, a rule-objectives file, or both"
        );
    }
    let rules = (!rules.is_empty())
        .then(|| RuleObjectives::load(Path::new(rules)))
        .transpose()?;
    let (tok, data) = (&run.loaded.tokenizer, &run.stage.data);
    // Rule scores need the record (reference answers, length budgets), so they are taken
    // while the record is at hand.
    let splits: Splits<(PreferencePair, Vec<f32>, Vec<f32>)> = run.load_data(|v, r| {
        let pair = match preference_pair(v, tok, data, r) {
            Parsed::Ok(p) => p,
            Parsed::TooLong => return Parsed::TooLong,
            Parsed::Identical => return Parsed::Identical,
            Parsed::Bad(e) => return Parsed::Bad(e),
        };
        let Some(rules) = &rules else {
            return Parsed::Ok((pair, vec![], vec![]));
        };
        let scored = pair_texts(v).and_then(|(c, r)| {
            Ok((
                rules.score_normalized(v, &c)?,
                rules.score_normalized(v, &r)?,
            ))
        });
        match scored {
            Ok((c, r)) => Parsed::Ok((pair, c, r)),
            Err(e) => Parsed::Bad(e),
        }
    })?;
    let mut objectives = vec![];
    let mut train: Vec<ScoredPair> = splits.train.into_iter().map(joined).collect();
    let mut val: Vec<ScoredPair> = splits.val.into_iter().map(joined).collect();
    if !reward_model.is_empty() {
        let rm_dir = Path::new(reward_model);
        let (head, backbone) = run.reward_model(rm_dir)?;
        for set in [&mut train, &mut val] {
            let pairs: Vec<PreferencePair> = set.iter().map(|p| p.pair.clone()).collect();
            let s = cached_pair_scores(
                &head,
                rm_dir,
                backbone.parts(),
                &pairs,
                score_batch_size,
                &run.cache_dir,
            )?;
            for (p, (c, r)) in set.iter_mut().zip(s.chosen.into_iter().zip(s.rejected)) {
                p.chosen.splice(0..0, c);
                p.rejected.splice(0..0, r);
            }
        }
        objectives.extend(head.info.objectives.iter().cloned());
    }
    if let Some(rules) = &rules {
        objectives.extend(rules.names().into_iter().map(|n| format!("{n} (rules)")));
    }
    Ok(ScoredPairs {
        train,
        val,
        objectives,
    })
}

fn joined((pair, chosen, rejected): (PreferencePair, Vec<f32>, Vec<f32>)) -> ScoredPair {
    ScoredPair {
        pair,
        chosen,
        rejected,
    }
}
