//! `mo-align grpo`: online multi-objective policy optimisation (GRPO or RLOO). Each step the
//! policy samples `num_generations` completions per prompt (batched KV-cache decoding, one
//! seeded stream per completion, reseeded every step), every completion gets a reward vector
//! from the reward model's heads (one backbone forward for all objectives) and/or rule
//! objectives, and the shared trainer takes the policy-gradient step
//! (`objectives::policy_gradient`). Prompts are the examples; a step's samples depend only on
//! (seed, step, micro-batch), so a resumed run samples what an uninterrupted one would.

use super::{AdapterStage, RewardBackbone, RunFlags};
use crate::data::{json_kind, FieldError, Parsed};
use crate::eval::prompts::prompt_of;
use crate::generate::{generate, SamplingConfig};
use crate::model::ctx::ForwardCtx;
use crate::model::Qwen2;
use crate::objectives::conditioning::line_names;
use crate::objectives::policy_gradient::{
    aggregate, completion_logprobs, group_advantages, pg_loss, std, Aggregation, Algorithm,
};
use crate::objectives::scalarize::{check_weights, equal_weights_or};
use crate::reward::rules::RuleObjectives;
use crate::reward::{reward_features, RewardHead, ScoredSequence};
use crate::rng::mix_seed;
use crate::tokenizer::ChatTokenizer;
use crate::train::trainer::TrainOutcome;
use crate::train::{LossOutput, Objective};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The `[grpo]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    pub algorithm: Algorithm,
    /// Completions sampled per prompt (the group).
    pub num_generations: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    /// A train-rm directory (may be empty when `rules` is given).
    pub reward_model: String,
    /// Rule objectives following the reward model's in the reward vector.
    pub rules: String,
    pub aggregation: Aggregation,
    /// Objective weights (equal when empty).
    pub weights: Vec<f64>,
    /// Chebyshev utopia point (1.0 per objective when empty).
    pub utopia: Vec<f64>,
    pub mu: f64,
    /// GRPO: divide advantages by the group's reward std (TRL's `scale_rewards`).
    pub scale_rewards: bool,
    /// Weight of the KL to the reference (the adapter off); 0 as TRL.
    pub beta: f64,
    /// PPO clip range of the importance ratio.
    pub epsilon: f64,
    pub score_batch_size: usize,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Grpo,
            num_generations: 4,
            max_new_tokens: 64,
            temperature: 1.0,
            top_p: 1.0,
            reward_model: String::new(),
            rules: String::new(),
            aggregation: Aggregation::Linear,
            weights: vec![],
            utopia: vec![],
            mu: 0.05,
            scale_rewards: true,
            beta: 0.0,
            epsilon: 0.2,
            score_batch_size: 16,
        }
    }
}

impl GrpoConfig {
    fn validate(&self) -> Result<()> {
        if self.reward_model.is_empty() && self.rules.is_empty() {
            bail!("grpo.reward_model and grpo.rules are both empty: give a directory written by train-rm, a rule-objectives file, or both");
        }
        if self.num_generations == 0 {
            bail!("grpo.num_generations must be at least 1");
        }
        if self.max_new_tokens == 0 {
            bail!("grpo.max_new_tokens must be at least 1");
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!(
                "grpo.temperature must be > 0 (online training samples), got {}",
                self.temperature
            );
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            bail!("grpo.beta must be >= 0, got {}", self.beta);
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            bail!("grpo.epsilon must be > 0, got {}", self.epsilon);
        }
        check_weights(&self.weights, "grpo.weights")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GrpoRunConfig {
    #[serde(flatten)]
    pub stage: AdapterStage,
    pub grpo: GrpoConfig,
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
        }
    }
}

/// A prompt and the record its rule objectives read.
#[derive(Debug, Clone)]
pub struct PromptExample {
    pub prompt: Vec<u32>,
    pub record: serde_json::Value,
}

/// Where completions' reward vectors come from.
struct RewardSources<'a> {
    rules: Option<RuleObjectives>,
    head: Option<(RewardHead, RewardBackbone<'a>)>,
}

struct OnlinePolicyGradient<'a> {
    model: &'a Qwen2,
    tokenizer: &'a ChatTokenizer,
    cfg: &'a GrpoConfig,
    sources: RewardSources<'a>,
    weights: Vec<f64>,
    objectives: Vec<String>,
    seed: u64,
}

impl OnlinePolicyGradient<'_> {
    /// Reward vectors of completions (RM heads first, then rules on [0, 1]).
    fn reward_vectors(
        &self,
        prompts: &[&PromptExample],
        completions: &[Vec<u32>],
    ) -> Result<Vec<Vec<f32>>> {
        let k = self.cfg.num_generations;
        let mut out: Vec<Vec<f32>> = vec![vec![]; completions.len()];
        if let Some((head, backbone)) = &self.sources.head {
            let (model, ctx, _) = backbone.parts();
            let seqs: Vec<Vec<u32>> = completions
                .iter()
                .enumerate()
                .map(|(i, c)| [prompts[i / k].prompt.as_slice(), c].concat())
                .collect();
            let scored: Vec<ScoredSequence> = seqs
                .iter()
                .enumerate()
                .map(|(i, s)| ScoredSequence::new(s, prompts[i / k].prompt.len()))
                .collect();
            let f = reward_features(
                model,
                head.info.feature_set,
                &scored,
                self.cfg.score_batch_size,
                ctx,
                &|_| {},
            )?;
            for (o, s) in out.iter_mut().zip(head.predict(&f)?.to_vec2::<f32>()?) {
                o.extend(s);
            }
        }
        if let Some(rules) = &self.sources.rules {
            for (i, (o, c)) in out.iter_mut().zip(completions).enumerate() {
                let text = self.tokenizer.decode(c, true)?;
                let s = rules
                    .score_normalized(&prompts[i / k].record, &text)
                    .map_err(|e| anyhow::anyhow!("field `{}`: {}", e.field, e.problem))?;
                o.extend(s);
            }
        }
        Ok(out)
    }

    fn sampling(&self, seed: u64) -> SamplingConfig {
        SamplingConfig {
            max_new_tokens: self.cfg.max_new_tokens,
            temperature: self.cfg.temperature,
            top_p: self.cfg.top_p,
            top_k: 0,
            repetition_penalty: 1.0,
            seed,
        }
    }
}

impl Objective for OnlinePolicyGradient<'_> {
    type Example = PromptExample;

    fn tokens(&self, ex: &PromptExample) -> usize {
        (ex.prompt.len() + self.cfg.max_new_tokens) * self.cfg.num_generations
    }

    fn weight(&self, _ex: &PromptExample) -> f64 {
        1.0
    }

    fn loss(&self, batch: &[&PromptExample], ctx: ForwardCtx) -> candle_core::Result<LossOutput> {
        let to_candle = |e: anyhow::Error| candle_core::Error::Msg(format!("{e:#}"));
        let k = self.cfg.num_generations;
        // Training steps reseed from the step's dropout stream; evaluation samples the same
        // completions every time.
        let seed = mix_seed(self.seed, ctx.dropout.map_or(u64::MAX, |d| d.seed()), 0);
        let prompts: Vec<Vec<u32>> = batch
            .iter()
            .flat_map(|e| std::iter::repeat_n(e.prompt.clone(), k))
            .collect();
        let streams: Vec<u64> = (0..prompts.len() as u64).collect();
        let stop = self.tokenizer.stop_ids();
        let completions = generate(
            self.model,
            &prompts,
            &streams,
            &self.sampling(seed),
            &stop,
            self.tokenizer.pad_id,
            ForwardCtx::EVAL,
        )?;
        let vectors = self
            .reward_vectors(batch, &completions)
            .map_err(to_candle)?;
        let utopia = (!self.cfg.utopia.is_empty()).then_some(self.cfg.utopia.as_slice());
        let (mut rewards, mut advantages) = (vec![], vec![]);
        let (mut reward_std_sum, mut zero_std) = (0.0, 0.0);
        for g in vectors.chunks(k) {
            let r = aggregate(self.cfg.aggregation, g, &self.weights, utopia, self.cfg.mu)
                .map_err(to_candle)?;
            let s = std(&r);
            reward_std_sum += s;
            if s == 0.0 {
                zero_std += 1.0;
            }
            advantages.extend(group_advantages(
                &r,
                self.cfg.algorithm,
                self.cfg.scale_rewards,
            ));
            rewards.extend(r);
        }
        // An empty completion (a stop token first is still one token) cannot be scored as text
        // tokens; every completion here has at least one token.
        let prompt_refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let comp_refs: Vec<&[u32]> = completions.iter().map(Vec::as_slice).collect();
        let lp = completion_logprobs(self.model, &prompt_refs, &comp_refs, ctx)?;
        let reference = if self.cfg.beta > 0.0 {
            Some(
                completion_logprobs(self.model, &prompt_refs, &comp_refs, ForwardCtx::REFERENCE)?
                    .logprobs,
            )
        } else {
            None
        };
        let lp_t = lp.logprobs.to_dtype(candle_core::DType::F32)?;
        let reference = reference
            .map(|r| r.to_dtype(candle_core::DType::F32))
            .transpose()?;
        let terms = pg_loss(
            &lp_t,
            &lp.counts,
            &advantages,
            reference.as_ref(),
            self.cfg.beta,
            self.cfg.epsilon,
        )?;
        // Per prompt: the mean over its group (the trainer divides sums by prompts).
        let loss = (terms.loss / k as f64)?;
        let per_prompt = |x: f64| x / k as f64;
        let mut metrics = vec![
            ("reward".to_string(), per_prompt(rewards.iter().sum())),
            ("reward_std".to_string(), reward_std_sum),
            ("frac_reward_zero_std".to_string(), zero_std),
            ("kl".to_string(), per_prompt(terms.kl)),
            ("clip_ratio".to_string(), per_prompt(terms.clipped)),
            (
                "completions/mean_length".to_string(),
                per_prompt(lp.counts.iter().sum::<usize>() as f64),
            ),
        ];
        for (j, name) in self.objectives.iter().enumerate() {
            let total: f64 = vectors.iter().map(|v| v[j] as f64).sum();
            metrics.push((format!("rewards/{name}/mean"), per_prompt(total)));
        }
        Ok(LossOutput {
            loss_sum: loss,
            metrics,
        })
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
            record: v.clone(),
        }),
        Err(e) => Parsed::Bad(FieldError::new("(record)", e.to_string())),
    }
}

pub fn run(config: Option<&Path>, overrides: &[String], flags: RunFlags) -> Result<TrainOutcome> {
    let cfg: GrpoRunConfig = crate::config::load(config, overrides)?;
    let g = &cfg.grpo;
    g.validate()?;
    cfg.stage.require_lora("grpo")?;
    let run = cfg.stage.start(&cfg, flags)?;
    let (tok, max_length) = (&run.loaded.tokenizer, run.stage.data.max_length);
    let splits = run.load_data(|v, _| prompt_example(v, tok, max_length))?;
    let rules = (!g.rules.is_empty())
        .then(|| RuleObjectives::load(Path::new(&g.rules)))
        .transpose()?;
    if let Some(rules) = &rules {
        // Every prompt record must carry what the rules read, before any step is taken.
        for (i, ex) in splits.train.iter().chain(&splits.val).enumerate() {
            rules.score(&ex.record, "").map_err(|e| {
                anyhow::anyhow!(
                    "{}: prompt {i}: field `{}`: {}",
                    g.rules,
                    e.field,
                    e.problem
                )
            })?;
        }
    }
    let head = if g.reward_model.is_empty() {
        None
    } else {
        Some(run.reward_model(Path::new(&g.reward_model))?)
    };
    let mut objectives: Vec<String> = vec![];
    if let Some((h, _)) = &head {
        objectives.extend(h.info.objectives.iter().cloned());
    }
    if let Some(r) = &rules {
        objectives.extend(r.names().into_iter().map(|n| format!("{n} (rules)")));
    }
    // Metric names: `helpfulness`, or `helpfulness_rules` beside the reward model's own.
    let objectives = line_names(&objectives);
    let weights = equal_weights_or(&g.weights, objectives.len(), "grpo.weights")
        .with_context(|| format!("reward vector {objectives:?}"))?;
    let objective = OnlinePolicyGradient {
        model: &run.loaded.model,
        tokenizer: tok,
        cfg: g,
        sources: RewardSources { rules, head },
        weights,
        objectives,
        seed: cfg.stage.train.seed,
    };
    run.train(&objective, &splits.train, &splits.val, g_label(g))
}

fn g_label(g: &GrpoConfig) -> &'static str {
    match g.algorithm {
        Algorithm::Grpo => "grpo",
        Algorithm::Rloo => "rloo",
    }
}
