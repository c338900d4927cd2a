//! `mo-align eval`'s flags, and the checks made on them before anything is loaded.

use super::report::chart_path;
use crate::generate::SamplingArgs;
use crate::recipes::ModelOptions;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EvalOptions {
    #[command(flatten)]
    pub model: ModelOptions,
    /// An adapter merged into the base before --adapter (e.g. the SFT adapter under a DPO
    /// adapter); it is part of the reference.
    #[arg(long)]
    pub base_adapter: Option<PathBuf>,
    /// Plain-text file: mean negative log-likelihood per predicted token (no template, no BOS).
    #[arg(long)]
    pub perplexity: Option<PathBuf>,
    /// Tokens per window for --perplexity (non-overlapping windows); default: the model's
    /// context length, so a text that fits is one window, as transformers' labels=input_ids.
    #[arg(long)]
    pub context: Option<usize>,
    /// Chat data (`messages`): held-out NLL of the assistant tokens.
    #[arg(long)]
    pub sft_data: Option<PathBuf>,
    /// Preference pairs: implicit-reward accuracy and margins against the reference
    /// (--adapter off), and the reward model's scores with --reward-model.
    #[arg(long)]
    pub preferences: Option<PathBuf>,
    /// beta of the implicit reward for --preferences.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// Token limit for --sft-data and --preferences examples.
    #[arg(long, default_value_t = 2048)]
    pub max_length: usize,
    /// Reward model directory (written by train-rm) for --score and --preferences.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// JSONL of {prompt, response} (or {messages} ending with the assistant's reply) to score
    /// with --reward-model; writes each record with its per-objective scores.
    #[arg(long)]
    pub score: Option<PathBuf>,
    /// Where --score writes its JSONL (stdout when omitted).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Win rate against --baseline on --prompts, judged by --judge.
    #[arg(long)]
    pub win_rate: bool,
    /// Prompts (`prompt`, `messages` or `chosen` records) for --win-rate.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    #[arg(long)]
    pub max_prompts: Option<usize>,
    /// The baseline model: PATH or PATH+ADAPTER.
    #[arg(long)]
    pub baseline: Option<String>,
    /// A train-rm directory, an HF Qwen2/Qwen3ForSequenceClassification checkpoint, or
    /// `rules:FILE` (rule objectives scored from each prompt record's fields).
    #[arg(long)]
    pub judge: Option<String>,
    /// Objective weights w for our reward model or rules as judge (equal when omitted).
    #[arg(long, value_delimiter = ',')]
    pub judge_weights: Vec<f64>,
    /// Score differences within this margin count as ties.
    #[arg(long, default_value_t = 0.0)]
    pub tie_margin: f64,
    /// Decoding for --win-rate (both models alike); unset flags come from --model's
    /// generation_config.json.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 8)]
    pub gen_batch_size: usize,
    /// Every prompt with both answers, judge scores and decoding settings (JSONL).
    #[arg(long)]
    pub generations_out: Option<PathBuf>,
    /// Objective weights for a conditioned --model/--adapter in --win-rate, e.g. 0.7,0.1,0.1,0.1
    /// (the order of its conditioning.json): the model answers with them as its system prompt.
    #[arg(long)]
    pub weights: Option<String>,
    /// Write the JSON report here (atomically).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print the JSON report on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Replace existing --output, --generations-out and --report files (never a file the
    /// evaluation reads).
    #[arg(long)]
    pub force: bool,
}

impl EvalOptions {
    /// Refuses values that would evaluate nothing or report a meaningless number, before
    /// anything is loaded.
    pub(super) fn validate(&self) -> Result<()> {
        let any = self.perplexity.is_some()
            || self.sft_data.is_some()
            || self.preferences.is_some()
            || self.score.is_some()
            || self.win_rate;
        if self.weights.is_some() && !self.win_rate {
            bail!("eval: --weights steers the answers of --win-rate; give --win-rate too");
        }
        if !any {
            bail!("eval: nothing to evaluate (give --perplexity, --sft-data, --preferences, --score or --win-rate)");
        }
        if self.preferences.is_some() && !(self.beta.is_finite() && self.beta > 0.0) {
            bail!(
                "eval: --beta must be a finite number > 0 (the implicit reward is beta times a log-ratio), got {}",
                self.beta
            );
        }
        for (flag, v) in [
            ("--max-prompts", self.max_prompts),
            ("--context", self.context),
            ("--max-length", Some(self.max_length)),
            ("--gen-batch-size", Some(self.gen_batch_size)),
        ] {
            if v == Some(0) {
                bail!("eval: {flag} must be at least 1");
            }
        }
        // A window of one token predicts nothing (each window's first token has no context).
        if self.context == Some(1) {
            bail!("eval: --context must be at least 2");
        }
        if !(self.tie_margin.is_finite() && self.tie_margin >= 0.0) {
            bail!(
                "eval: --tie-margin must be a finite number >= 0, got {}",
                self.tie_margin
            );
        }
        Ok(())
    }

    /// `--score` alone, with no model named: it scores with the reward model's own backbone.
    pub(super) fn scores_only(&self) -> bool {
        let other = self.perplexity.is_some()
            || self.sft_data.is_some()
            || self.preferences.is_some()
            || self.win_rate;
        let model_named = self.model.model.is_some()
            || self.base_adapter.is_some()
            || self.model.adapter.is_some();
        !other && !model_named
    }

    /// What the evaluation reads: the models and adapters, data and prompt files, the reward
    /// model and the judge.
    fn inputs(&self) -> crate::outputs::Inputs {
        let mut i = crate::outputs::Inputs::new();
        i.add("model", self.model.spec());
        for (what, p) in [
            ("base adapter", &self.base_adapter),
            ("adapter", &self.model.adapter),
            ("perplexity text", &self.perplexity),
            ("chat data", &self.sft_data),
            ("preference data", &self.preferences),
            ("reward model", &self.reward_model),
            ("records to score", &self.score),
            ("prompts", &self.prompts),
        ] {
            if let Some(p) = p {
                i.add(what, p);
            }
        }
        if let Some(b) = &self.baseline {
            let (m, a) = parse_model_spec(b);
            i.add("baseline", m);
            if let Some(a) = a {
                i.add("baseline adapter", a);
            }
        }
        if let Some(j) = &self.judge {
            i.add("judge", j.strip_prefix("rules:").unwrap_or(j));
        }
        // A reward model (scorer or judge) may load its own recorded backbone.
        for rm in [
            self.reward_model.clone(),
            self.judge.clone().map(PathBuf::from),
        ]
        .into_iter()
        .flatten()
        {
            let backbone = std::fs::read_to_string(rm.join(crate::reward::INFO_FILE))
                .ok()
                .and_then(|t| serde_json::from_str::<crate::reward::RewardModelInfo>(&t).ok())
                .and_then(|info| info.backbone_paths(&rm).ok());
            if let Some((model, adapter)) = backbone {
                i.add("reward model's backbone", model);
                if let Some(a) = adapter {
                    i.add("reward model's backbone adapter", a);
                }
            }
        }
        i
    }

    /// Checks every output file against the inputs and, without --force, against existing
    /// files (`outputs::check`), before anything is loaded.
    pub(super) fn check_outputs(&self) -> Result<()> {
        let inputs = self.inputs();
        let outs = [
            ("--output", &self.output),
            ("--generations-out", &self.generations_out),
            ("--report", &self.report),
        ];
        for (flag, p) in outs {
            if let Some(p) = p {
                crate::outputs::check(
                    p,
                    flag,
                    crate::outputs::Existing::File,
                    &inputs,
                    self.force,
                )?;
            }
        }
        // The bar chart written next to a win-rate report is an output too.
        if let (Some(report), true) = (&self.report, self.win_rate) {
            crate::outputs::check(
                &chart_path(report),
                "--report's chart",
                crate::outputs::Existing::File,
                &inputs,
                self.force,
            )?;
        }
        let named: Vec<&PathBuf> = outs.iter().filter_map(|(_, p)| p.as_ref()).collect();
        for (i, a) in named.iter().enumerate() {
            if named[i + 1..].contains(a) {
                bail!("eval: {} is named for two outputs", a.display());
            }
        }
        Ok(())
    }
}

/// `PATH` or `PATH+ADAPTER`.
pub fn parse_model_spec(spec: &str) -> (String, Option<PathBuf>) {
    match spec.split_once('+') {
        Some((m, a)) => (m.to_string(), Some(PathBuf::from(a))),
        None => (spec.to_string(), None),
    }
}
