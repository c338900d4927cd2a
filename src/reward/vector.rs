//! The reward vector a multi-objective stage trains on: the reward model's heads first, then
//! rule objectives, every entry on [0, 1]. Hybrid DPO, MODPO, reward-weighted training and
//! GRPO read the same vector, so a rule objective can stand beside (or instead of) a learned
//! one.

use super::features::{cached_pair_scores, reward_features, ScoredSequence};
use super::rules::RuleObjectives;
use super::{RewardHead, RewardModelInfo};
use crate::data::preference::{pair_texts, PreferencePair};
use crate::data::FieldError;
use crate::model::ctx::ForwardCtx;
use crate::model::Qwen;
use crate::tokenizer::ChatTokenizer;
use crate::util::digest::Digest;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// How a rule objective is named in the vector beside the reward model's own.
const RULES_SUFFIX: &str = " (rules)";

/// The objectives of a reward vector, and the rules that score its rule entries.
pub struct RewardVector {
    /// The reward model's directory and its objectives (the first entries).
    reward_model: Option<(PathBuf, Vec<String>)>,
    rules: Option<RuleObjectives>,
}

impl RewardVector {
    /// The vector of `reward_model` (a train-rm directory) and `rules` (a rule-objectives file),
    /// known before any model is loaded; either may be empty, not both. `section` names the
    /// config section in errors.
    pub fn open(reward_model: &str, rules: &str, section: &str) -> Result<Self> {
        if reward_model.is_empty() && rules.is_empty() {
            bail!(
                "{section}.reward_model and {section}.rules are both empty: give a directory written by train-rm, a rule-objectives file, or both"
            );
        }
        let reward_model = if reward_model.is_empty() {
            None
        } else {
            let info = RewardModelInfo::load(Path::new(reward_model))?;
            Some((PathBuf::from(reward_model), info.objectives))
        };
        let rules = (!rules.is_empty())
            .then(|| RuleObjectives::load(Path::new(rules)))
            .transpose()?;
        Ok(Self {
            reward_model,
            rules,
        })
    }

    pub fn len(&self) -> usize {
        self.names().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One name per entry: `helpfulness`, ..., `truthfulness (rules)`.
    pub fn names(&self) -> Vec<String> {
        let rules = self.rule_names().into_iter();
        self.head_names()
            .iter()
            .cloned()
            .chain(rules.map(|n| format!("{n}{RULES_SUFFIX}")))
            .collect()
    }

    /// The names a conditioning line and the metrics use: a rule objective by its own name,
    /// `helpfulness_rules` where the reward model has a `helpfulness` too.
    pub fn line_names(&self) -> Vec<String> {
        let heads = self.head_names();
        let rules = self.rule_names().into_iter().map(|n| {
            if heads.contains(&n) {
                format!("{n}_rules")
            } else {
                n
            }
        });
        heads.iter().cloned().chain(rules).collect()
    }

    fn head_names(&self) -> &[String] {
        self.reward_model.as_ref().map_or(&[], |(_, names)| names)
    }

    fn rule_names(&self) -> Vec<String> {
        self.rules.as_ref().map_or(vec![], RuleObjectives::names)
    }

    /// The reward model's directory, when the vector has one.
    pub fn reward_model(&self) -> Option<&Path> {
        self.reward_model.as_ref().map(|(dir, _)| dir.as_path())
    }

    pub fn rules(&self) -> Option<&RuleObjectives> {
        self.rules.as_ref()
    }

    /// Refuses records that lack what the rules read (before any step is taken).
    pub fn check_records<'r>(
        &self,
        records: impl Iterator<Item = &'r serde_json::Value>,
    ) -> Result<()> {
        if let Some(rules) = &self.rules {
            for (i, record) in records.enumerate() {
                rules
                    .score(record, "")
                    .map_err(|e| anyhow::anyhow!("{}: prompt {i}: {e}", rules.path()))?;
            }
        }
        Ok(())
    }

    /// `pair` (read from `record`) with its rule entries; the reward model's go in front with
    /// `score_pairs_with_head`. Rule scores need the record (reference answers, length
    /// budgets), so they are taken while it is at hand.
    pub fn rule_scored(
        &self,
        pair: PreferencePair,
        record: &serde_json::Value,
    ) -> Result<ScoredPair, FieldError> {
        let (chosen, rejected) = match &self.rules {
            None => (vec![], vec![]),
            Some(rules) => {
                let (c, r) = pair_texts(record)?;
                (
                    rules.score_normalized(record, &c)?,
                    rules.score_normalized(record, &r)?,
                )
            }
        };
        Ok(ScoredPair {
            pair,
            chosen,
            rejected,
        })
    }

    /// Puts `head`'s scores of every pair (cached in `cache_dir`, computed with `backbone`) in
    /// front of its rule scores.
    pub fn score_pairs_with_head(
        &self,
        head: &RewardHead,
        backbone: (&Qwen, ForwardCtx, &Digest),
        pairs: &mut [ScoredPair],
        batch_size: usize,
        cache_dir: &Path,
    ) -> Result<()> {
        let dir = self
            .reward_model()
            .context("the reward vector has no reward model")?;
        let plain: Vec<PreferencePair> = pairs.iter().map(|p| p.pair.clone()).collect();
        let s = cached_pair_scores(head, dir, backbone, &plain, batch_size, cache_dir)?;
        for (p, (c, r)) in pairs.iter_mut().zip(s.chosen.into_iter().zip(s.rejected)) {
            p.chosen.splice(0..0, c);
            p.rejected.splice(0..0, r);
        }
        Ok(())
    }

    /// What scores completions sampled during training: `head` (with the model it reads and
    /// that model's context) when the vector has a reward model, and the vector's rules.
    pub fn scorer<'a>(
        &'a self,
        head: Option<(&'a RewardHead, &'a Qwen, ForwardCtx<'static>)>,
        tokenizer: &'a ChatTokenizer,
        batch_size: usize,
    ) -> CompletionScorer<'a> {
        CompletionScorer {
            head,
            rules: self.rules.as_ref().map(|r| (r, tokenizer)),
            batch_size,
        }
    }
}

/// A pair and the reward vectors of its two responses.
#[derive(Debug, Clone)]
pub struct ScoredPair {
    pub pair: PreferencePair,
    pub chosen: Vec<f32>,
    pub rejected: Vec<f32>,
}

/// Where completions' reward vectors come from: a reward head with the model it reads features
/// from (and that model's context: the policy with its adapter off, or a backbone of its own),
/// and/or rule objectives over the decoded text.
pub struct CompletionScorer<'a> {
    pub head: Option<(&'a RewardHead, &'a Qwen, ForwardCtx<'static>)>,
    pub rules: Option<(&'a RuleObjectives, &'a ChatTokenizer)>,
    /// Sequences per reward-model forward.
    pub batch_size: usize,
}

/// A completion to score: the prompt ids it answers, the prompt's record (what the rules read),
/// and its ids.
pub struct Completion<'a> {
    pub prompt: &'a [u32],
    pub record: &'a serde_json::Value,
    pub ids: &'a [u32],
}

impl CompletionScorer<'_> {
    /// The reward vector of every completion (head entries first, then rules).
    pub fn score(&self, completions: &[Completion]) -> Result<Vec<Vec<f32>>> {
        let mut out: Vec<Vec<f32>> = vec![vec![]; completions.len()];
        if let Some((head, model, ctx)) = &self.head {
            let seqs: Vec<Vec<u32>> = completions
                .iter()
                .map(|c| [c.prompt, c.ids].concat())
                .collect();
            let scored: Vec<ScoredSequence> = seqs
                .iter()
                .zip(completions)
                .map(|(s, c)| ScoredSequence::new(s, c.prompt.len()))
                .collect();
            let f = reward_features(
                model,
                head.info.feature_set,
                &scored,
                self.batch_size,
                *ctx,
                &|_| {},
            )?;
            for (o, s) in out.iter_mut().zip(head.predict(&f)?.to_vec2::<f32>()?) {
                o.extend(s);
            }
        }
        if let Some((rules, tokenizer)) = &self.rules {
            for (o, c) in out.iter_mut().zip(completions) {
                let text = tokenizer.decode(c.ids, true)?;
                let s = rules
                    .score_normalized(c.record, &text)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                o.extend(s);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_file(dir: &Path) -> String {
        let path = dir.join("rules.toml");
        std::fs::copy("configs/demo/rules.toml", &path).unwrap();
        path.display().to_string()
    }

    fn reward_model_dir(dir: &Path, objectives: &[&str]) -> String {
        let rm = dir.join("rm");
        std::fs::create_dir_all(&rm).unwrap();
        let info = serde_json::json!({
            "objectives": objectives,
            "rating_normalisation": "",
            "backbone_model": "",
            "hidden_size": 8,
            "feature": "",
        });
        std::fs::write(
            rm.join(super::super::INFO_FILE),
            serde_json::to_string(&info).unwrap(),
        )
        .unwrap();
        rm.display().to_string()
    }

    #[test]
    fn reward_model_heads_come_first_then_rules() {
        let dir = std::env::temp_dir().join(format!("mo-align-vector-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rules = rules_file(&dir);
        let rule_names = RuleObjectives::load(Path::new(&rules)).unwrap().names();
        let clash = rule_names[0].clone();
        let rm = reward_model_dir(&dir, &["style", &clash]);
        let v = RewardVector::open(&rm, &rules, "hybrid").unwrap();
        assert_eq!(v.len(), 2 + rule_names.len());
        let names = v.names();
        assert_eq!(names[..2], ["style".to_string(), clash.clone()]);
        assert_eq!(names[2], format!("{clash} (rules)"));
        let line = v.line_names();
        assert_eq!(
            line[..3],
            ["style".to_string(), clash.clone(), format!("{clash}_rules")]
        );
        assert_eq!(line[3..], rule_names[1..]);
        // Rules alone: their own names.
        let alone = RewardVector::open("", &rules, "grpo").unwrap();
        assert_eq!(alone.line_names(), rule_names);
        assert!(alone.reward_model().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_vector_needs_a_reward_model_or_rules() {
        let e = RewardVector::open("", "", "reward")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("reward.reward_model and reward.rules are both empty"),
            "{e}"
        );
        let e = RewardVector::open("/nonexistent/rm", "", "reward")
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("cannot read"), "{e:#}");
    }
}
