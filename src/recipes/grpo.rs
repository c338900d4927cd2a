//! `mo-align grpo`: online multi-objective policy optimisation (GRPO or RLOO) with the
//! objective of `objectives::online`. Prompts are the examples; each step samples and scores
//! completions of them, and the shared trainer takes the policy-gradient step.

use super::multi_objective::MultiObjectiveRun;
use super::stage::AdapterStage;
use super::RunFlags;
use crate::data::{json_kind, FieldError, Parsed};
use crate::eval::prompts::prompt_of;
use crate::objectives::conditioning::ConditioningConfig;
use crate::objectives::online::{
    GrpoConfig, OnlineConditioning, OnlinePolicyGradient, OnlineTiming, PromptExample, StopTokens,
};
use crate::objectives::policy_gradient::Algorithm;
use crate::reward::vector::RewardVector;
use crate::tokenizer::ChatTokenizer;
use crate::train::trainer::TrainOutcome;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GrpoRunConfig {
    #[serde(flatten)]
    pub stage: AdapterStage,
    pub grpo: GrpoConfig,
    /// One policy for every weighting (`objectives::conditioning`): each micro-batch draws its
    /// own weights, its rewards are aggregated with them, and the policy is told them (in the
    /// prompt, or by gating the adapter's per-objective blocks).
    pub conditioning: ConditioningConfig,
}

impl Default for GrpoRunConfig {
    fn default() -> Self {
        Self {
            stage: AdapterStage {
                train: crate::train::TrainConfig {
                    lr: 1e-5,
                    batch_size: 4,
                    ..Default::default()
                },
                ..AdapterStage::default()
            },
            grpo: GrpoConfig::default(),
            conditioning: ConditioningConfig::default(),
        }
    }
}

/// A prompt record (`prompt`, `messages` or `chosen`) as a prompt to sample from.
fn prompt_example(
    v: &serde_json::Value,
    tok: &ChatTokenizer,
    max_length: usize,
) -> Parsed<PromptExample> {
    if !v.is_object() {
        return Parsed::Bad(FieldError::new(
            "(record)",
            format!("expected an object, found {}", json_kind(v)),
        ));
    }
    let messages = match prompt_of(v) {
        Ok(m) => m,
        Err(e) => return Parsed::Bad(e),
    };
    match tok.encode_prompt(&messages) {
        Ok(ids) if ids.len() >= max_length => Parsed::TooLong,
        Ok(prompt) => Parsed::Ok(PromptExample {
            prompt,
            messages,
            record: v.clone(),
        }),
        Err(e) => Parsed::Bad(FieldError::new("(record)", e.to_string())),
    }
}

impl GrpoRunConfig {
    /// Every value checked without loading a model or data; the configured weights.
    pub fn check(&self) -> Result<Option<crate::objectives::weighting::Weighting>> {
        let weights = self.grpo.validate()?;
        self.stage.require_lora("grpo")?;
        let cond = &self.conditioning;
        if cond.enabled && cond.draws != 1 {
            bail!("conditioning.draws = {}: grpo draws fresh weights for every micro-batch of every step; leave draws at 1", cond.draws);
        }
        self.stage.check()?;
        Ok(weights)
    }
}

pub fn run(config: Option<&Path>, overrides: &[String], flags: RunFlags) -> Result<TrainOutcome> {
    let cfg: GrpoRunConfig = crate::util::config::load(config, overrides)?;
    let g = &cfg.grpo;
    let weights = cfg.check()?;
    let cond = &cfg.conditioning;
    let rewards = RewardVector::open(&g.reward_model, &g.rules, "grpo")?;
    let mo = MultiObjectiveRun::start(
        &cfg.stage,
        cond,
        rewards,
        weights.as_ref(),
        "grpo",
        &cfg,
        flags,
    )?;
    let run = &mo.run;
    let (tok, max_length) = (&run.loaded.tokenizer, run.stage.data.max_length);
    let splits = run.load_data(|v, _| prompt_example(v, tok, max_length))?;
    let context = run.loaded.model.config.max_position_embeddings;
    if g.max_new_tokens >= context {
        bail!(
            "grpo.max_new_tokens = {} leaves no room for a prompt in the model's {context} positions",
            g.max_new_tokens
        );
    }
    let records = splits.train.iter().chain(&splits.val).map(|ex| &ex.record);
    mo.rewards.check_records(records)?;
    let head = match mo.rewards.reward_model() {
        Some(dir) => Some(run.reward_model(dir)?),
        None => None,
    };
    let head = head.as_ref().map(|(h, backbone)| {
        let (model, ctx, _) = backbone.parts();
        (h, model, ctx)
    });
    let conditioning = mo.conditioning.clone().map(|info| OnlineConditioning {
        sampling: cond.clone(),
        info,
        block_rank: cfg.stage.lora.r,
        tokenizer: tok,
    });
    let objective = OnlinePolicyGradient::new(
        &run.loaded.model,
        g,
        mo.rewards.scorer(head, tok, g.score_batch_size),
        mo.weights.clone(),
        // Metric names: `helpfulness`, or `helpfulness_rules` beside the reward model's own.
        mo.rewards.line_names(),
        cfg.stage.train.seed,
        StopTokens {
            stop_ids: tok.stop_ids(),
            pad_id: tok.pad_id,
        },
    )
    .conditioned(conditioning);
    let outcome = run.train(&objective, &splits.train, &splits.val, g_label(g))?;
    write_timing(&run.out, &objective.timing(), &outcome)?;
    mo.export_blocks()?;
    Ok(outcome)
}

/// `timing.json`: how a run's training time divides between sampling, scoring and the
/// policy update (forward, backward, optimizer), and the two throughputs.
fn write_timing(out: &Path, t: &OnlineTiming, outcome: &TrainOutcome) -> Result<()> {
    let train_s = outcome.train_s;
    let update_s = (train_s - t.generation_s - t.scoring_s).max(0.0);
    let v = serde_json::json!({
        "train_s": train_s,
        "generation_s": t.generation_s,
        "scoring_s": t.scoring_s,
        "update_s": update_s,
        "generation_share": t.generation_s / train_s.max(1e-9),
        "scoring_share": t.scoring_s / train_s.max(1e-9),
        "generated_tokens": t.generated_tokens,
        "generation_tokens_per_s": t.generated_tokens as f64 / t.generation_s.max(1e-9),
    });
    crate::util::io::write_json_atomic(&out.join("timing.json"), &v)?;
    eprintln!(
        "grpo: generation {:.0}% and scoring {:.0}% of {:.1}s of training steps ({:.0} sampled tokens/s)",
        100.0 * v["generation_share"].as_f64().unwrap_or(0.0),
        100.0 * v["scoring_share"].as_f64().unwrap_or(0.0),
        train_s,
        v["generation_tokens_per_s"].as_f64().unwrap_or(0.0)
    );
    Ok(())
}

fn g_label(g: &GrpoConfig) -> &'static str {
    match g.algorithm {
        Algorithm::Grpo => "grpo",
        Algorithm::Rloo => "rloo",
    }
}
