//! Judges for win rates: our multi-objective reward model (scalarised with weights w), any
//! Hugging Face Qwen2 / Qwen3 sequence-classification reward model (a `score` head on the last
//! token, e.g. the Skywork-Reward-V2 series),
//! so a stronger external judge can be plugged in, or rule objectives (`rules:FILE`), the
//! ground truth of a task whose right answers are known.

use crate::eval::prompts::PromptRecord;
use crate::model::config::QwenConfig;
use crate::model::ctx::ForwardCtx;
use crate::model::loader::{load_with_config, resolve, Loaded};
use crate::model::Qwen;
use crate::objectives::weighting::Weighting;
use crate::reward::features::{last_token_features, reward_features, ScoredSequence};
use crate::reward::rules::RuleObjectives;
use crate::reward::RewardHead;
use crate::tokenizer::{ChatTokenizer, Message};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub enum Judge {
    /// Our reward model: backbone (base + adapter merged) and head; total = w . scores.
    Ours {
        backbone: Box<Loaded>,
        head: Box<RewardHead>,
        weights: Vec<f64>,
    },
    /// An HF `Qwen2ForSequenceClassification` or `Qwen3ForSequenceClassification` directory:
    /// total = the first label's score on the conversation as its own chat template renders it.
    SequenceClassifier {
        model: Box<Qwen>,
        tokenizer: Box<ChatTokenizer>,
        score: Tensor,
        name: String,
    },
    /// Rule objectives read from a file (`reward::rules`); total = w . raw scores.
    Rules {
        rules: RuleObjectives,
        weights: Vec<f64>,
    },
}

/// A judge's verdict on one (prompt, response).
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub total: f64,
    /// Per-objective scores (our reward model only).
    pub objectives: Vec<f32>,
}

/// The mean total score of `verdicts`.
pub fn mean_total(verdicts: &[Verdict]) -> f64 {
    verdicts.iter().map(|v| v.total).sum::<f64>() / verdicts.len().max(1) as f64
}

/// Per objective (the first `count`), the mean score of `verdicts`.
pub fn mean_objectives(verdicts: &[Verdict], count: usize) -> Vec<f64> {
    (0..count)
        .map(|k| {
            verdicts.iter().map(|v| v.objectives[k] as f64).sum::<f64>()
                / verdicts.len().max(1) as f64
        })
        .collect()
}

impl Judge {
    /// `spec` is a reward-model directory written by train-rm (it has reward_model.json), or an
    /// HF sequence-classification checkpoint (local directory or Hub id).
    /// `rules:FILE` is a rule-objectives file.
    pub fn load(spec: &str, weights: &[f64], dtype: DType, device: &Device) -> Result<Self> {
        if let Some(file) = spec.strip_prefix("rules:") {
            let rules = RuleObjectives::load(Path::new(file))?;
            let weights = judge_weights(weights, rules.names().len())
                .with_context(|| format!("rule objectives {:?}", rules.names()))?;
            return Ok(Judge::Rules { rules, weights });
        }
        let dir = Path::new(spec);
        if dir.join(crate::reward::INFO_FILE).is_file() {
            let head = RewardHead::load(dir, device)?;
            let backbone = head.load_backbone(dir, dtype, device)?;
            let weights = judge_weights(weights, head.info.objectives.len())
                .with_context(|| format!("judge objectives {:?}", head.info.objectives))?;
            return Ok(Judge::Ours {
                backbone: Box::new(backbone),
                head: Box::new(head),
                weights,
            });
        }
        let files = resolve(spec)?;
        let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&files.config)?)
            .with_context(|| format!("{}: not valid JSON", files.config.display()))?;
        let archs = raw["architectures"].as_array().cloned().unwrap_or_default();
        let classifiers = [
            "Qwen2ForSequenceClassification",
            "Qwen3ForSequenceClassification",
        ];
        if !archs
            .iter()
            .any(|a| a.as_str().is_some_and(|a| classifiers.contains(&a)))
        {
            bail!(
                "{spec}: not a reward model directory (no {}) nor a {} checkpoint (architectures: {archs:?})",
                crate::reward::INFO_FILE,
                classifiers.join(" / ")
            );
        }
        // A classifier has no LM head; treat embeddings as tied so none is looked for.
        let mut cfg =
            QwenConfig::from_json(&raw).with_context(|| files.config.display().to_string())?;
        cfg.tie_word_embeddings = true;
        let model = load_with_config(&files, cfg.clone(), dtype, device)?;
        let weights_file = crate::model::loader::WeightFiles::open(&files.weights)?;
        let labels = raw["num_labels"]
            .as_u64()
            .or_else(|| raw["id2label"].as_object().map(|m| m.len() as u64))
            .unwrap_or(1) as usize;
        let score = weights_file.load(
            "score.weight",
            &[labels, cfg.hidden_size],
            DType::F32,
            device,
        )?;
        let tokenizer = ChatTokenizer::from_file(&files.tokenizer)?;
        Ok(Judge::SequenceClassifier {
            model: Box::new(model),
            tokenizer: Box::new(tokenizer),
            score,
            name: spec.to_string(),
        })
    }

    /// The tokenizer a model judge scores with (rule judges read text).
    pub fn tokenizer(&self) -> Option<&ChatTokenizer> {
        match self {
            Judge::Ours { backbone, .. } => Some(&backbone.tokenizer),
            Judge::SequenceClassifier { tokenizer, .. } => Some(tokenizer),
            Judge::Rules { .. } => None,
        }
    }

    pub fn objectives(&self) -> Vec<String> {
        match self {
            Judge::Ours { head, .. } => head.info.objectives.clone(),
            Judge::SequenceClassifier { .. } => vec![],
            Judge::Rules { rules, .. } => rules.names(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Judge::Ours { head, weights, .. } => format!(
                "mo-align reward model {:?} weights {:?}",
                head.info.objectives, weights
            ),
            Judge::SequenceClassifier { name, .. } => format!("sequence classifier {name}"),
            Judge::Rules { rules, weights } => format!(
                "rule objectives {} {:?} weights {:?}",
                rules.path(),
                rules.names(),
                weights
            ),
        }
    }

    /// Whether verdicts need each prompt's record (`score_records`).
    pub fn reads_records(&self) -> bool {
        matches!(self, Judge::Rules { .. })
    }

    /// Verdicts for (prompt, response) items where `prompts[i]` is item i's prompt record.
    pub fn score_records(
        &self,
        prompts: &[&PromptRecord],
        responses: &[&str],
        batch: usize,
    ) -> Result<Vec<Verdict>> {
        let Judge::Rules { rules, weights } = self else {
            let items: Vec<(Vec<Message>, String)> = prompts
                .iter()
                .zip(responses)
                .map(|(p, r)| (p.messages.clone(), r.to_string()))
                .collect();
            return self.score(&items, batch);
        };
        prompts
            .iter()
            .zip(responses)
            .map(|(p, r)| {
                let raw = rules
                    .score(&p.record, r)
                    .map_err(|e| anyhow::anyhow!("{}: {e} ({})", p.loc, rules.path()))?;
                Ok(Verdict {
                    total: weights.iter().zip(&raw).map(|(w, x)| w * x).sum(),
                    objectives: raw.iter().map(|&x| x as f32).collect(),
                })
            })
            .collect()
    }

    /// Verdicts for (prompt messages, response) items. Each distinct token sequence is scored
    /// once, so identical answers get identical verdicts whatever batch they fall in.
    pub fn score(&self, items: &[(Vec<Message>, String)], batch: usize) -> Result<Vec<Verdict>> {
        let tok = match self {
            Judge::Rules { rules, .. } => bail!(
                "the rule judge {} reads each prompt's record; it cannot score bare messages",
                rules.path()
            ),
            _ => self.tokenizer().expect("model judges have a tokenizer"),
        };
        let mut unique: HashMap<(Vec<u32>, usize), usize> = HashMap::new();
        let mut seqs: Vec<(Vec<u32>, usize)> = vec![];
        let mut index = vec![];
        for (prompt, response) in items {
            let seq = match self {
                // Our head was trained on prompt and response segments ending at <|im_end|>.
                Judge::Ours { .. } => {
                    let mut ids = tok.encode_prompt(prompt)?;
                    let start = ids.len();
                    ids.extend(tok.encode_response(response)?);
                    (ids, start)
                }
                // An external reward model scores what its chat template renders.
                _ => (tok.encode_conversation(prompt, response)?, 0),
            };
            let next = seqs.len();
            let i = *unique.entry(seq.clone()).or_insert_with(|| {
                seqs.push(seq);
                next
            });
            index.push(i);
        }
        let refs: Vec<&[u32]> = seqs.iter().map(|s| s.0.as_slice()).collect();
        let scored: Vec<ScoredSequence> = seqs
            .iter()
            .map(|(ids, start)| ScoredSequence::new(ids, *start))
            .collect();
        let verdicts: Vec<Verdict> = match self {
            Judge::Ours {
                backbone,
                head,
                weights,
            } => {
                let f = reward_features(
                    &backbone.model,
                    head.info.feature_set,
                    &scored,
                    batch,
                    ForwardCtx::EVAL,
                    &|_| {},
                )?;
                let scores = head.predict(&f)?.to_vec2::<f32>()?;
                scores
                    .into_iter()
                    .map(|s| Verdict {
                        total: weights.iter().zip(&s).map(|(w, x)| w * *x as f64).sum(),
                        objectives: s,
                    })
                    .collect()
            }
            Judge::SequenceClassifier { model, score, .. } => {
                let f = last_token_features(model, &refs, batch, ForwardCtx::EVAL, &|_| {})?;
                let logits =
                    crate::model::matmul::matmul_t(&f.contiguous()?, score)?.to_vec2::<f32>()?;
                logits
                    .into_iter()
                    .map(|l| Verdict {
                        total: l[0] as f64,
                        objectives: vec![],
                    })
                    .collect()
            }
            Judge::Rules { .. } => unreachable!("refused above"),
        };
        Ok(index.into_iter().map(|i| verdicts[i].clone()).collect())
    }
}

/// Win / tie / loss counts of model vs baseline totals; a tie is an exact draw or a difference
/// within `tie_margin`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WinRate {
    pub n: usize,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    /// (wins + ties / 2) / n.
    pub win_rate: f64,
    /// 95% Wilson score interval of the win rate.
    pub ci95: (f64, f64),
    /// Mean of model total minus baseline total.
    pub mean_reward_diff: f64,
}

pub fn win_rate(model: &[f64], baseline: &[f64], tie_margin: f64) -> WinRate {
    let n = model.len();
    let (mut wins, mut ties, mut losses) = (0, 0, 0);
    for (m, b) in model.iter().zip(baseline) {
        let d = m - b;
        if d.abs() <= tie_margin {
            ties += 1;
        } else if d > 0.0 {
            wins += 1;
        } else {
            losses += 1;
        }
    }
    let nf = n.max(1) as f64;
    let p = (wins as f64 + 0.5 * ties as f64) / nf;
    let z = 1.959_963_984_540_054f64;
    let denom = 1.0 + z * z / nf;
    let center = (p + z * z / (2.0 * nf)) / denom;
    let half = z * (p * (1.0 - p) / nf + z * z / (4.0 * nf * nf)).sqrt() / denom;
    let mean_reward_diff = model.iter().zip(baseline).map(|(m, b)| m - b).sum::<f64>() / nf;
    WinRate {
        n,
        wins,
        ties,
        losses,
        win_rate: p,
        ci95: ((center - half).max(0.0), (center + half).min(1.0)),
        mean_reward_diff,
    }
}

/// `--judge-weights` over the judge's `k` objectives (equal when none are given).
fn judge_weights(weights: &[f64], k: usize) -> Result<Vec<f64>> {
    let what = "--judge-weights";
    let given = Weighting::configured(weights, what)?;
    Ok(Weighting::given_or_equal(given.as_ref(), k, what)?
        .values()
        .to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn win_rate_arithmetic() {
        let w = win_rate(&[1.0, 2.0, 3.0, 0.5], &[0.5, 2.0, 1.0, 1.0], 0.0);
        assert_eq!((w.wins, w.ties, w.losses), (2, 1, 1));
        assert!((w.win_rate - 0.625).abs() < 1e-12);
        assert!((w.mean_reward_diff - (0.5 + 0.0 + 2.0 - 0.5) / 4.0).abs() < 1e-12);
        // Wilson interval for p = 0.625, n = 4, z = 1.96: center 0.56376, half-width 0.34434.
        assert!(
            (w.ci95.0 - 0.219_427).abs() < 1e-5 && (w.ci95.1 - 0.908_101).abs() < 1e-5,
            "{:?}",
            w.ci95
        );
        let ties = win_rate(&[0.3; 10], &[0.3; 10], 0.0);
        assert_eq!(
            (ties.wins, ties.ties, ties.losses, ties.win_rate),
            (0, 10, 0, 0.5)
        );
        let margin = win_rate(&[1.0, 1.05], &[1.0, 1.0], 0.1);
        assert_eq!(margin.ties, 2);
    }
}
