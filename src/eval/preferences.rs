//! Evaluations over data files: held-out chat NLL, preference accuracy against the reference,
//! and reward-model scores of (prompt, response) records.

use super::prompts::prompt_and_response;
use crate::data::chat::sft_example;
use crate::data::preference::{preference_pair, PreferencePair};
use crate::data::source::read_records;
use crate::data::{load_splits, DataConfig, DataReport};
use crate::model::ctx::ForwardCtx;
use crate::model::loader::Loaded;
use crate::objectives::nll::Nll;
use crate::objectives::pair::pair_logprobs;
use crate::reward::features::{score_sequences, PairSequences, ScoredSequence};
use crate::reward::RewardHead;
use crate::train::trainer::evaluate;
use crate::util::keyed::Keyed;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Held-out NLL on chat data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatNll {
    pub nll_per_token: f64,
    pub examples: usize,
    /// What happened to the file's records.
    pub data: DataReport,
}

/// Implicit rewards (beta times the log-ratio against the reference) over preference pairs,
/// and the policy's summed response log-probs (TRL's `logps/chosen` and `logps/rejected`);
/// means per pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreferenceEval {
    pub pairs: usize,
    pub beta: f64,
    #[serde(rename = "rewards/accuracies")]
    pub accuracy: f64,
    #[serde(rename = "rewards/margins")]
    pub margin: f64,
    #[serde(rename = "rewards/chosen")]
    pub reward_chosen: f64,
    #[serde(rename = "rewards/rejected")]
    pub reward_rejected: f64,
    #[serde(rename = "logps/chosen")]
    pub logps_chosen: f64,
    #[serde(rename = "logps/rejected")]
    pub logps_rejected: f64,
    /// A reward model's scores, per objective.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_model: Option<Keyed<ObjectiveRanking>>,
}

/// A reward-model objective's mean score of the chosen and rejected responses, and how often
/// it scores the chosen one higher.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObjectiveRanking {
    pub chosen: f64,
    pub rejected: f64,
    pub accuracy: f64,
}

/// Held-out NLL on chat data (assistant tokens only), with the adapter on.
pub fn sft_nll(loaded: &Loaded, file: &Path, max_length: usize) -> Result<ChatNll> {
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
    Ok(ChatNll {
        nll_per_token: m["eval_loss"],
        examples: data.train.len(),
        data: data.train_report,
    })
}

/// Implicit-reward accuracy and margins of the adapter against the reference (adapter off),
/// and, with a reward model, its per-objective scores of chosen vs rejected.
pub fn preference_eval(
    loaded: &Loaded,
    file: &Path,
    beta: f64,
    max_length: usize,
    rm: Option<&Path>,
) -> Result<PreferenceEval> {
    let cfg = DataConfig {
        train_files: vec![file.display().to_string()],
        max_length,
        ..DataConfig::default()
    };
    let pairs: Vec<PreferencePair> =
        load_splits(&cfg, |v, r| preference_pair(v, &loaded.tokenizer, &cfg, r))?.train;
    let (mut acc, mut margin, mut rc, mut rr) = (0.0, 0.0, 0.0, 0.0);
    // The policy's summed response log-probs (TRL's logps/chosen and logps/rejected).
    let (mut lc, mut lr) = (0.0, 0.0);
    for p in &pairs {
        let ids = [p.ids()];
        let pol = pair_logprobs(&loaded.model, &ids, ForwardCtx::EVAL)?;
        let refp = pair_logprobs(&loaded.model, &ids, ForwardCtx::REFERENCE)?;
        let (pc, pr) = (
            pol.chosen.to_vec1::<f32>()?[0] as f64,
            pol.rejected.to_vec1::<f32>()?[0] as f64,
        );
        let c = beta * (pc - refp.chosen.to_vec1::<f32>()?[0] as f64);
        let r = beta * (pr - refp.rejected.to_vec1::<f32>()?[0] as f64);
        lc += pc;
        lr += pr;
        acc += f64::from(u8::from(c > r));
        margin += c - r;
        rc += c;
        rr += r;
    }
    let n = pairs.len().max(1) as f64;
    let mut out = PreferenceEval {
        pairs: pairs.len(),
        beta,
        accuracy: acc / n,
        margin: margin / n,
        reward_chosen: rc / n,
        reward_rejected: rr / n,
        logps_chosen: lc / n,
        logps_rejected: lr / n,
        reward_model: None,
    };
    if let Some(rm) = rm {
        let head = RewardHead::load(rm, &loaded.model.device)?;
        // The reference (adapter off) must be the head's backbone.
        head.check_backbone(rm, &loaded.model, "--model (with --base-adapter merged)")?;
        let seqs = PairSequences::new(&pairs);
        let scores = score_sequences(
            &loaded.model,
            &head,
            &seqs.scored(),
            8,
            ForwardCtx::REFERENCE,
        )?;
        let mut per = Keyed::default();
        for (k, name) in head.info.objectives.iter().enumerate() {
            let c: Vec<f64> = scores.iter().step_by(2).map(|s| s[k] as f64).collect();
            let r: Vec<f64> = scores
                .iter()
                .skip(1)
                .step_by(2)
                .map(|s| s[k] as f64)
                .collect();
            let right = c.iter().zip(&r).filter(|(a, b)| a > b).count() as f64;
            per.push(
                name.clone(),
                ObjectiveRanking {
                    chosen: c.iter().sum::<f64>() / n,
                    rejected: r.iter().sum::<f64>() / n,
                    accuracy: right / n,
                },
            );
        }
        out.reward_model = Some(per);
    }
    Ok(out)
}

/// Scores every record of `input` with the reward model; writes JSONL (records with a `scores`
/// object per objective) to `output` atomically, or to stdout. Returns the number scored.
/// `backbone` (run with `ctx`) must be the head's own backbone; the caller checks.
pub fn score_file(
    head: &RewardHead,
    (backbone, ctx): (&Loaded, ForwardCtx),
    input: &Path,
    output: Option<&Path>,
) -> Result<usize> {
    let loaded = backbone;
    let mut records = vec![];
    let mut seqs = vec![];
    for rec in read_records(input)? {
        let v = rec
            .value
            .map_err(|why| anyhow::anyhow!("{}: {why}", rec.loc))?;
        let (prompt, response) =
            prompt_and_response(&v).map_err(|e| anyhow::anyhow!("{}: {e}", rec.loc))?;
        let mut ids = loaded.tokenizer.encode_prompt(&prompt)?;
        let start = ids.len();
        ids.extend(loaded.tokenizer.encode_response(&response)?);
        records.push(v);
        seqs.push((ids, start));
    }
    let refs: Vec<ScoredSequence> = seqs
        .iter()
        .map(|(ids, start)| ScoredSequence::new(ids, *start))
        .collect();
    let scores = if refs.is_empty() {
        vec![]
    } else {
        score_sequences(&loaded.model, head, &refs, 8, ctx)?
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
        Some(p) => crate::util::io::write_atomic(p, out.as_bytes())?,
        None => print!("{out}"),
    }
    Ok(scores.len())
}
