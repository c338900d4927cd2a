//! `mo-align eval`: stage-agnostic evaluation over one model load. Modes combine freely:
//! perplexity of a text, held-out chat NLL, preference accuracy against the reference, reward
//! scores, and win rate against a baseline judged by a reward model. The evaluations
//! themselves live in `crate::eval`; this recipe loads, dispatches and reports.

use super::ModelOptions;
use crate::eval::load_policy_at;
use crate::eval::preferences::{preference_eval, score_file, sft_nll};
use crate::eval::prompts::{prompts_that_fit, read_prompt_records};
use crate::eval::win_rate::{win_rate_eval, write_generations};
use crate::eval::{load_for_eval, perplexity};
use crate::generate::SamplingArgs;
use crate::model::ctx::ForwardCtx;
use crate::model::loader::select_device;
use crate::model::parse_dtype;
use crate::objectives::weighting::parse_weights;
use crate::reward::RewardHead;
use anyhow::{bail, Context, Result};
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
    fn validate(&self) -> Result<()> {
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
    fn check_outputs(&self) -> Result<()> {
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
                &report_chart(report),
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

/// The per-objective bar chart `plot_objective_scores` draws next to a win-rate report.
fn report_chart(report: &std::path::Path) -> PathBuf {
    report
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .join(format!(
            "{}.svg",
            crate::plot::objectives_chart_name(report)
        ))
}

/// `PATH` or `PATH+ADAPTER`.
pub fn parse_model_spec(spec: &str) -> (String, Option<PathBuf>) {
    match spec.split_once('+') {
        Some((m, a)) => (m.to_string(), Some(PathBuf::from(a))),
        None => (spec.to_string(), None),
    }
}

pub fn run(args: EvalOptions) -> Result<()> {
    let any = args.perplexity.is_some()
        || args.sft_data.is_some()
        || args.preferences.is_some()
        || args.score.is_some()
        || args.win_rate;
    if args.weights.is_some() && !args.win_rate {
        bail!("eval: --weights steers the answers of --win-rate; give --win-rate too");
    }
    if !any {
        bail!("eval: nothing to evaluate (give --perplexity, --sft-data, --preferences, --score or --win-rate)");
    }
    args.validate()?;
    args.check_outputs()?;
    let device = select_device(&args.model.device)?;
    let dtype = parse_dtype(&args.model.dtype)?;
    // `--score` alone with no model named scores with the reward model's own backbone.
    let score_only = !(args.perplexity.is_some()
        || args.sft_data.is_some()
        || args.preferences.is_some()
        || args.win_rate);
    let model_named =
        args.model.model.is_some() || args.base_adapter.is_some() || args.model.adapter.is_some();
    let loaded = if score_only && !model_named {
        None
    } else {
        Some(load_for_eval(
            args.model.spec(),
            args.base_adapter.as_deref(),
            args.model.adapter.as_deref(),
            dtype,
            &device,
        )?)
    };
    let mut report = serde_json::Map::new();
    report.insert("model".into(), args.model.spec().into());
    report.insert("base_adapter".into(), serde_json::json!(args.base_adapter));
    report.insert("adapter".into(), serde_json::json!(args.model.adapter));
    let mut table: Vec<(String, String)> = vec![];
    let main = || loaded.as_ref().context("no model loaded");
    if let Some(path) = &args.perplexity {
        let loaded = main()?;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let ids = loaded.tokenizer.encode(&text)?;
        if ids.len() < 2 {
            bail!(
                "{}: needs at least 2 tokens, has {}",
                path.display(),
                ids.len()
            );
        }
        let context = args
            .context
            .unwrap_or(loaded.model.config.max_position_embeddings);
        let nll = perplexity(&loaded.model, &ids, context, ForwardCtx::EVAL)?;
        let mean = nll.mean();
        report.insert("nll_per_token".into(), mean.into());
        report.insert("tokens".into(), nll.tokens.into());
        report.insert("perplexity".into(), mean.exp().into());
        table.push((
            "perplexity".into(),
            format!(
                "nll/token {mean:.6}, perplexity {:.4} ({} tokens)",
                mean.exp(),
                nll.tokens
            ),
        ));
    }
    if let Some(path) = &args.sft_data {
        let r = sft_nll(main()?, path, args.max_length)?;
        table.push((
            "chat NLL".into(),
            format!(
                "{:.6} per assistant token over {} examples",
                r["nll_per_token"].as_f64().unwrap_or(f64::NAN),
                r["examples"]
            ),
        ));
        report.insert("sft_data".into(), r);
    }
    if let Some(path) = &args.preferences {
        let r = preference_eval(
            main()?,
            path,
            args.beta,
            args.max_length,
            args.reward_model.as_deref(),
        )?;
        table.push((
            "preferences".into(),
            format!(
                "accuracy {:.3}, margin {:.4} over {} pairs",
                r["rewards/accuracies"].as_f64().unwrap_or(f64::NAN),
                r["rewards/margins"].as_f64().unwrap_or(f64::NAN),
                r["pairs"]
            ),
        ));
        report.insert("preferences".into(), r);
    }
    if let Some(path) = &args.score {
        let rm = args
            .reward_model
            .as_deref()
            .context("--score needs --reward-model DIR")?;
        let head = RewardHead::load(rm, &device)?;
        let own;
        let backbone = match &loaded {
            Some(l) => {
                head.check_backbone(rm, &l.model, "--model (with --base-adapter merged)")?;
                (l, ForwardCtx::REFERENCE)
            }
            None => {
                own = head.load_backbone(rm, dtype, &device)?;
                (&own, ForwardCtx::EVAL)
            }
        };
        let n = score_file(&head, backbone, path, args.output.as_deref())?;
        report.insert("scored".into(), n.into());
    }
    if args.win_rate {
        let prompts_file = args
            .prompts
            .as_deref()
            .context("--win-rate needs --prompts FILE")?
            .display()
            .to_string();
        let (bpath, badapter) = parse_model_spec(
            args.baseline
                .as_deref()
                .context("--win-rate needs --baseline PATH[+ADAPTER]")?,
        );
        let judge = crate::judge::Judge::load(
            args.judge.as_deref().context("--win-rate needs --judge")?,
            &args.judge_weights,
            dtype,
            &device,
        )?;
        let baseline = load_for_eval(&bpath, badapter.as_deref(), None, dtype, &device)?;
        // One setting for both models: the flags over the evaluated model's defaults.
        let sampling = args.sampling.resolve(main()?.generation_config().as_ref());
        sampling.validate()?;
        let (prompts, too_long) = prompts_that_fit(
            read_prompt_records(&prompts_file, args.max_prompts)?,
            &[args.model.spec(), &bpath],
            sampling.max_new_tokens,
        )?;
        report.insert("prompts_skipped_too_long".into(), too_long.into());
        // A weight-conditioned policy answers at --weights.
        let conditioned = match &args.weights {
            Some(w) => {
                let p = load_policy_at(
                    args.model.spec(),
                    args.base_adapter.as_deref(),
                    args.model.adapter.as_deref(),
                    Some(&parse_weights(w).context("--weights")?),
                    dtype,
                    &device,
                )?;
                if let Some((_, line)) = &p.conditioning {
                    report.insert("conditioning".into(), line.as_str().into());
                }
                Some(p)
            }
            None => None,
        };
        let (model, prompt_line) = match &conditioned {
            Some(p) => (&p.loaded, p.prompt_conditioning()),
            None => (main()?, None),
        };
        let (wr, gens) = win_rate_eval(
            model,
            prompt_line,
            &baseline,
            &judge,
            &prompts,
            &sampling,
            args.gen_batch_size,
            args.tie_margin,
        )?;
        let o = &wr.overall;
        table.push((
            "win rate".into(),
            format!(
                "{:.1}% [{:.1}, {:.1}] ({}W/{}T/{}L of {}), mean reward diff {:+.4}",
                100.0 * o.win_rate,
                100.0 * o.ci95.0,
                100.0 * o.ci95.1,
                o.wins,
                o.ties,
                o.losses,
                o.n,
                o.mean_reward_diff
            ),
        ));
        if let Some(p) = &args.generations_out {
            write_generations(p, &gens)?;
        }
        report.insert("win_rate".into(), serde_json::to_value(&wr)?);
    }
    let report = serde_json::Value::Object(report);
    if let Some(p) = &args.report {
        crate::io::write_json_atomic(p, &report)?;
        // The per-objective bar chart (model vs baseline) goes next to the report.
        let chart = report_chart(p);
        crate::plot::plot_objective_scores(p, chart.parent().unwrap_or(p), false)?;
    }
    if args.json {
        println!("{report}");
    } else {
        for (k, v) in table {
            println!("{k:<12} {v}");
        }
    }
    Ok(())
}
