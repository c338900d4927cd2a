//! The online multi-objective policy-gradient objective (GRPO or RLOO). Each step the policy
//! samples `num_generations` completions per prompt (batched KV-cache decoding, one seeded
//! stream per completion, reseeded every step), every completion gets a reward vector from the
//! reward model's heads (one backbone forward for all objectives) and/or rule objectives, and
//! the loss is the policy-gradient loss of `policy_gradient`. A step's samples depend only on
//! (seed, step, micro-batch), so a resumed run samples what an uninterrupted one would.

use crate::generate::{generate, SamplingConfig};
use crate::model::ctx::ForwardCtx;
use crate::model::Qwen;
use crate::objectives::conditioning::{ConditioningConfig, ConditioningInfo, ConditioningMode};
use crate::objectives::policy_gradient::{
    aggregate, completion_logprobs, group_advantages, pg_loss, std, Aggregation, Algorithm,
};
use crate::objectives::weighting::Weighting;
use crate::reward::vector::{Completion, CompletionScorer};
use crate::tokenizer::{ChatTokenizer, Message};
use crate::train::{LossOutput, Objective};
use crate::util::rng::mix_seed;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::time::Instant;

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
    /// Optimizer steps over each batch of samples (TRL's `num_iterations`); from the second on,
    /// the ratio to the sampling policy is clipped to 1 +- epsilon.
    pub num_iterations: usize,
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
            num_iterations: 1,
            score_batch_size: 16,
        }
    }
}

impl GrpoConfig {
    /// Refuses settings that would sample or train nothing; returns the weighting `weights`
    /// gives.
    pub fn validate(&self) -> Result<Option<Weighting>> {
        // Both estimators score a completion against the others of its group: a group of one
        // has advantage 0 and trains nothing.
        if self.num_generations > 1024 {
            bail!(
                "grpo.num_generations must be at most 1024 (completions per prompt held at once), got {}",
                self.num_generations
            );
        }
        if self.num_generations < 2 {
            bail!(
                "grpo.num_generations must be at least 2 (the advantage compares completions of one prompt), got {}",
                self.num_generations
            );
        }
        if self.num_iterations == 0 {
            bail!("grpo.num_iterations must be at least 1");
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
        Weighting::configured(&self.weights, "grpo.weights")
    }
}

/// A prompt: its ids, its messages (a conditioned run restates them with its weights) and the
/// record its rule objectives read.
#[derive(Debug, Clone)]
pub struct PromptExample {
    pub prompt: Vec<u32>,
    pub messages: Vec<Message>,
    pub record: serde_json::Value,
}

/// One micro-batch's samples, kept while the batch is reused for `num_iterations` steps.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SampledBatch {
    /// The weights the batch's rewards were aggregated with (drawn, when conditioned); a
    /// block-conditioned adapter is gated by them whenever the batch is used.
    #[serde(default)]
    weights: Vec<f64>,
    prompts: Vec<Vec<u32>>,
    completions: Vec<Vec<u32>>,
    advantages: Vec<f64>,
    /// The sampling policy's token log-probs (consecutive per completion).
    old_logprobs: Vec<f32>,
    reference: Option<Vec<f32>>,
    /// Reward metrics, reported at every step that uses the batch.
    metrics: Vec<(String, f64)>,
}

/// Where the trainer is in a reuse cycle, the samples of the cycle, and time spent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct OnlineState {
    step: u64,
    micro: usize,
    batches: Vec<SampledBatch>,
    /// Seconds of training steps spent sampling, and scoring the samples; tokens sampled.
    generation_s: f64,
    scoring_s: f64,
    generated_tokens: u64,
}

/// The online policy-gradient objective: samples, scores and updates, one batch of prompts.
pub struct OnlinePolicyGradient<'a> {
    pub model: &'a Qwen,
    pub cfg: &'a GrpoConfig,
    pub scorer: CompletionScorer<'a>,
    pub weights: Weighting,
    pub objectives: Vec<String>,
    pub seed: u64,
    pub stops: StopTokens,
    /// Weight conditioning (`[conditioning] enabled = true`).
    pub conditioning: Option<OnlineConditioning<'a>>,
    state: std::cell::RefCell<OnlineState>,
}

/// How a conditioned run tells the policy a micro-batch's weights.
pub struct OnlineConditioning<'a> {
    pub sampling: ConditioningConfig,
    pub info: ConditioningInfo,
    /// Rank of one block of a `mode = "adapter"` adapter.
    pub block_rank: usize,
    pub tokenizer: &'a ChatTokenizer,
}

impl OnlineConditioning<'_> {
    /// The prompt of `ex` stating `weights` (`mode = "prompt"`), or as it is.
    fn prompt(&self, ex: &PromptExample, weights: &Weighting) -> Result<Vec<u32>> {
        if self.info.mode() != ConditioningMode::Prompt {
            return Ok(ex.prompt.clone());
        }
        let line = self.info.line(weights)?;
        self.tokenizer
            .encode_prompt(&self.info.place(&ex.messages, &line))
    }
}

/// What ends a sampled completion, and what pads the batch.
pub struct StopTokens {
    pub stop_ids: Vec<u32>,
    pub pad_id: u32,
}

/// Timing of an online run's training steps.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OnlineTiming {
    pub generation_s: f64,
    pub scoring_s: f64,
    pub generated_tokens: u64,
}

impl<'a> OnlinePolicyGradient<'a> {
    pub fn new(
        model: &'a Qwen,
        cfg: &'a GrpoConfig,
        scorer: CompletionScorer<'a>,
        weights: Weighting,
        objectives: Vec<String>,
        seed: u64,
        stops: StopTokens,
    ) -> Self {
        Self {
            model,
            cfg,
            scorer,
            weights,
            objectives,
            seed,
            stops,
            conditioning: None,
            state: Default::default(),
        }
    }

    /// The same objective training one policy for every weighting.
    pub fn conditioned(self, conditioning: Option<OnlineConditioning<'a>>) -> Self {
        Self {
            conditioning,
            ..self
        }
    }

    pub fn timing(&self) -> OnlineTiming {
        let s = self.state.borrow();
        OnlineTiming {
            generation_s: s.generation_s,
            scoring_s: s.scoring_s,
            generated_tokens: s.generated_tokens,
        }
    }

    /// Reward vectors of completions (RM heads first, then rules on [0, 1]); completion i
    /// answers prompt i / k of `batch`.
    fn reward_vectors(
        &self,
        batch: &[&PromptExample],
        completions: &[Vec<u32>],
    ) -> Result<Vec<Vec<f32>>> {
        let k = self.cfg.num_generations;
        let completions: Vec<Completion> = completions
            .iter()
            .enumerate()
            .map(|(i, ids)| Completion {
                prompt: &batch[i / k].prompt,
                record: &batch[i / k].record,
                ids,
            })
            .collect();
        self.scorer.score(&completions)
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

    /// A block-conditioned adapter's gates for `weights` on the model's device (none for an
    /// unconditioned or prompt-conditioned run).
    fn gate_tensor(&self, weights: &[f64]) -> candle_core::Result<Option<Tensor>> {
        match &self.conditioning {
            Some(c) if c.info.mode() == ConditioningMode::Adapter => Ok(Some(Tensor::new(
                ConditioningInfo::gate(weights, c.block_rank).as_slice(),
                &self.model.device,
            )?)),
            _ => Ok(None),
        }
    }

    /// The weights a micro-batch's rewards are aggregated with: the configured ones, or, for a
    /// conditioned run's training step, a draw that depends only on (seed, step, micro-batch),
    /// so a resumed run draws what an uninterrupted one would. One draw per micro-batch keeps
    /// sampling and the update batched (a gated adapter takes one gate per forward).
    fn batch_weights(&self, step: u64, micro: usize, training: bool) -> Result<Weighting> {
        match &self.conditioning {
            Some(c) if training => {
                c.sampling
                    .draw(self.seed, step, micro as u64, &c.info.objectives)
            }
            Some(_) => Ok(self.weights.quantised()),
            None => Ok(self.weights.clone()),
        }
    }

    /// Samples k completions per prompt, scores them, and computes advantages (rewards
    /// aggregated with `weights`) and the reward metrics; log-probs are left to the caller.
    /// `count_time`: a training step's sampling, added to the run's timing (evaluation's is
    /// not).
    fn sample(
        &self,
        batch: &[&PromptExample],
        weights: Weighting,
        seed: u64,
        count_time: bool,
    ) -> candle_core::Result<SampledBatch> {
        let k = self.cfg.num_generations;
        let mut prompts: Vec<Vec<u32>> = Vec::with_capacity(batch.len() * k);
        for e in batch {
            let p = match &self.conditioning {
                Some(c) => c.prompt(e, &weights).map_err(to_candle)?,
                None => e.prompt.clone(),
            };
            prompts.extend(std::iter::repeat_n(p, k));
        }
        let gate_t = self.gate_tensor(weights.values())?;
        let streams: Vec<u64> = (0..prompts.len() as u64).collect();
        let t0 = Instant::now();
        let completions = generate(
            self.model,
            &prompts,
            &streams,
            &self.sampling(seed),
            &self.stops.stop_ids,
            self.stops.pad_id,
            ForwardCtx::EVAL.with_gate(gate_t.as_ref()),
        )?;
        let t1 = Instant::now();
        let vectors = self
            .reward_vectors(batch, &completions)
            .map_err(to_candle)?;
        let utopia = (!self.cfg.utopia.is_empty()).then_some(self.cfg.utopia.as_slice());
        let (mut rewards, mut advantages) = (vec![], vec![]);
        let (mut reward_std_sum, mut zero_std) = (0.0, 0.0);
        for g in vectors.chunks(k) {
            let r = aggregate(
                self.cfg.aggregation,
                g,
                weights.values(),
                utopia,
                self.cfg.mu,
            )
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
        if count_time {
            let mut st = self.state.borrow_mut();
            st.generation_s += (t1 - t0).as_secs_f64();
            st.scoring_s += t1.elapsed().as_secs_f64();
            st.generated_tokens += completions.iter().map(Vec::len).sum::<usize>() as u64;
        }
        // Metrics are sums over the batch's prompts (the trainer divides by prompts).
        let per_prompt = |x: f64| x / k as f64;
        let mut metrics = vec![
            ("reward".to_string(), per_prompt(rewards.iter().sum())),
            ("reward_std".to_string(), reward_std_sum),
            ("frac_reward_zero_std".to_string(), zero_std),
            (
                "completions/mean_length".to_string(),
                per_prompt(completions.iter().map(Vec::len).sum::<usize>() as f64),
            ),
        ];
        for (j, name) in self.objectives.iter().enumerate() {
            let total: f64 = vectors.iter().map(|v| v[j] as f64).sum();
            metrics.push((format!("rewards/{name}/mean"), per_prompt(total)));
        }
        Ok(SampledBatch {
            weights: weights.values().to_vec(),
            prompts,
            completions,
            advantages,
            old_logprobs: vec![],
            reference: None,
            metrics,
        })
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

    fn steps_per_batch(&self) -> u64 {
        self.cfg.num_iterations as u64
    }

    fn begin_step(&self, step: u64) {
        let mut st = self.state.borrow_mut();
        st.step = step;
        st.micro = 0;
    }

    fn state(&self) -> Option<serde_json::Value> {
        let st = self.state.borrow();
        let mut keep = st.clone();
        // Samples only matter when the next step reuses them.
        if (st.step + 1).is_multiple_of(self.cfg.num_iterations as u64) {
            keep.batches.clear();
        }
        serde_json::to_value(keep).ok()
    }

    fn restore(&self, state: Option<&serde_json::Value>) -> Result<()> {
        if let Some(v) = state {
            *self.state.borrow_mut() = serde_json::from_value(v.clone())
                .context("the checkpoint's online-sampling state is unreadable")?;
        }
        Ok(())
    }

    fn loss(&self, batch: &[&PromptExample], ctx: ForwardCtx) -> candle_core::Result<LossOutput> {
        let k = self.cfg.num_generations;
        // A training step's position in its reuse cycle; evaluation always samples afresh.
        let (micro, first) = if ctx.grad {
            let mut st = self.state.borrow_mut();
            st.micro += 1;
            let first = st.step.is_multiple_of(self.cfg.num_iterations as u64);
            (st.micro - 1, first)
        } else {
            (0, true)
        };
        let sampled = if first {
            // Training steps reseed from the step's dropout stream; evaluation samples the
            // same completions every time.
            let seed = mix_seed(self.seed, ctx.dropout.map_or(u64::MAX, |d| d.seed()), 0);
            let step = self.state.borrow().step;
            let weights = self
                .batch_weights(step, micro, ctx.grad)
                .map_err(to_candle)?;
            self.sample(batch, weights, seed, ctx.grad)?
        } else {
            let st = self.state.borrow();
            st.batches.get(micro).cloned().ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "step {}: no samples kept for micro-batch {micro} to reuse",
                    st.step
                ))
            })?
        };
        let gate_t = self.gate_tensor(&sampled.weights)?;
        let ctx = ctx.with_gate(gate_t.as_ref());
        // Every completion has at least one token (a stop token first is still one).
        let prompt_refs: Vec<&[u32]> = sampled.prompts.iter().map(Vec::as_slice).collect();
        let comp_refs: Vec<&[u32]> = sampled.completions.iter().map(Vec::as_slice).collect();
        let lp = completion_logprobs(self.model, &prompt_refs, &comp_refs, ctx)?;
        let lp_t = lp.logprobs.to_dtype(DType::F32)?;
        let dev = lp_t.device();
        let n = lp_t.dim(0)?;
        let reference = match (&sampled.reference, self.cfg.beta > 0.0) {
            (Some(r), _) => Some(Tensor::from_slice(r, n, dev)?),
            (None, true) => Some(
                completion_logprobs(self.model, &prompt_refs, &comp_refs, ForwardCtx::REFERENCE)?
                    .logprobs
                    .to_dtype(DType::F32)?,
            ),
            (None, false) => None,
        };
        let old = if first {
            None
        } else {
            Some(Tensor::from_slice(&sampled.old_logprobs, n, dev)?)
        };
        let terms = pg_loss(
            &lp_t,
            &lp.counts,
            &sampled.advantages,
            old.as_ref(),
            reference.as_ref(),
            self.cfg.beta,
            self.cfg.epsilon,
        )?;
        if first && ctx.grad && self.cfg.num_iterations > 1 {
            let kept = SampledBatch {
                old_logprobs: lp_t.detach().to_vec1()?,
                reference: reference.as_ref().map(|r| r.to_vec1()).transpose()?,
                ..sampled.clone()
            };
            let mut st = self.state.borrow_mut();
            st.batches.truncate(micro);
            st.batches.push(kept);
        }
        // Per prompt: the mean over its group (the trainer divides sums by prompts).
        let loss = (terms.loss / k as f64)?;
        let per_prompt = |x: f64| x / k as f64;
        let mut metrics = sampled.metrics;
        metrics.push(("kl".to_string(), per_prompt(terms.kl)));
        metrics.push(("clip_ratio".to_string(), per_prompt(terms.clipped)));
        Ok(LossOutput {
            loss_sum: loss,
            metrics,
        })
    }
}

/// An error of the sampling or scoring inside a loss, as the trainer's error type.
fn to_candle(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}
