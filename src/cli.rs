//! Command-line interface: argument definitions and the dispatch to each command.

use crate::eval::perplexity;
use crate::generate::{generate, SamplingConfig};
use crate::model::ctx::ForwardCtx;
use crate::model::loader::{load_pretrained, select_device, Loaded, DEFAULT_MODEL};
use crate::model::parse_dtype;
use crate::recipes::evaluate as ev;
use crate::tokenizer::Message;
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "mo-align",
    version,
    about = "Multi-objective alignment of Qwen2.5 with LoRA, in pure Rust"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run sft -> train-rm -> dpo -> hybrid-dpo -> eval from one config, with a summary.
    Pipeline(StageArgs),
    /// LoRA supervised fine-tuning on chat data.
    Sft(StageArgs),
    /// Train the multi-objective reward model head.
    TrainRm(StageArgs),
    /// Direct Preference Optimization.
    Dpo(StageArgs),
    /// DPO with an explicit multi-objective reward term (linear, Chebyshev, MODPO).
    HybridDpo(StageArgs),
    /// Reward-weighted likelihood training (report 2).
    RewardWeighted(StageArgs),
    /// Evaluate a model: perplexity, chat NLL, preferences, reward scores, win rate.
    Eval(Box<EvalArgs>),
    /// Generate text with KV-cache decoding.
    Generate(GenerateArgs),
    /// Merge an adapter into the base and write a full HF checkpoint.
    Merge {
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Dtype of the written weights: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Redraw a run directory's plots from its metrics.
    Plot {
        run_dir: PathBuf,
        /// Also write PNG files (needs a build with the `png` feature).
        #[arg(long)]
        png: bool,
    },
    /// Write a tiny random Qwen2 checkpoint (HF layout, real BPE tokenizer) for tests and demos.
    InitTiny {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Convert a JSON Lines data file to Parquet (schema inferred from the records).
    ConvertData { input: PathBuf, output: PathBuf },
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Local model directory or Hub repo id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// PEFT adapter directory to apply on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Dtype of the frozen weights and activations: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl ModelArgs {
    pub fn load(&self) -> Result<Loaded> {
        let device = select_device(&self.device)?;
        let dtype = parse_dtype(&self.dtype)?;
        load_pretrained(&self.model, self.adapter.as_deref(), dtype, &device)
    }
}

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn config(&self) -> SamplingConfig {
        SamplingConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An adapter merged into the base before --adapter (e.g. the SFT adapter under a DPO
    /// adapter); it is part of the reference.
    #[arg(long)]
    pub base_adapter: Option<PathBuf>,
    /// Plain-text file: mean negative log-likelihood per predicted token (no template, no BOS).
    #[arg(long)]
    pub perplexity: Option<PathBuf>,
    /// Tokens per window for --perplexity (non-overlapping windows).
    #[arg(long, default_value_t = 2048)]
    pub context: usize,
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
    /// A train-rm directory, or an HF Qwen2ForSequenceClassification checkpoint.
    #[arg(long)]
    pub judge: Option<String>,
    /// Objective weights w for our reward model as judge (equal when omitted).
    #[arg(long, value_delimiter = ',')]
    pub judge_weights: Vec<f64>,
    /// Score differences within this margin count as ties.
    #[arg(long, default_value_t = 0.0)]
    pub tie_margin: f64,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 8)]
    pub gen_batch_size: usize,
    /// Every prompt with both answers, judge scores and decoding settings (JSONL).
    #[arg(long)]
    pub generations_out: Option<PathBuf>,
    /// Write the JSON report here (atomically).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print the JSON report on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the chat template (with the generation prompt) and stop at <|im_end|>.
    #[arg(long)]
    pub chat: bool,
    /// System prompt for --chat (Qwen's default when omitted).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct StageArgs {
    /// TOML config file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a config value: section.key=value (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from the newest complete checkpoint in the output directory.
    #[arg(long)]
    pub resume: bool,
    /// Log lines only, no progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(cli: Cli) -> Result<()> {
    use crate::recipes::{dpo, pipeline, sft, train_rm};
    match cli.command {
        Command::Pipeline(a) => pipeline::run(a.config.as_deref(), &a.set, a.resume, a.quiet),
        Command::Sft(a) => sft::run(a.config.as_deref(), &a.set, a.resume, a.quiet).map(drop),
        Command::TrainRm(a) => train_rm::run(a.config.as_deref(), &a.set, a.resume, a.quiet),
        Command::Dpo(a) => dpo::run_dpo(a.config.as_deref(), &a.set, a.resume, a.quiet).map(drop),
        Command::HybridDpo(a) => {
            dpo::run_hybrid(a.config.as_deref(), &a.set, a.resume, a.quiet).map(drop)
        }
        Command::RewardWeighted(a) => {
            dpo::run_reward_weighted(a.config.as_deref(), &a.set, a.resume, a.quiet).map(drop)
        }
        Command::Eval(args) => run_eval(*args),
        Command::Generate(args) => run_generate(args),
        Command::Merge {
            model,
            adapter,
            out,
            dtype,
        } => crate::recipes::merge::run(&model, &adapter, &out, &dtype),
        Command::Plot { run_dir, png } => {
            let written = crate::plot::plot_run(&run_dir, png)?;
            for p in written {
                eprintln!("wrote {}", p.display());
            }
            Ok(())
        }
        Command::InitTiny { out, seed } => {
            crate::model::tiny::write_tiny_checkpoint(&out, seed)?;
            eprintln!("wrote a tiny Qwen2 checkpoint to {}", out.display());
            Ok(())
        }
        Command::ConvertData { input, output } => {
            let rows = crate::data::source::jsonl_to_parquet(&input, &output)?;
            eprintln!("wrote {rows} rows to {}", output.display());
            Ok(())
        }
    }
}

fn run_eval(args: EvalArgs) -> Result<()> {
    let any = args.perplexity.is_some()
        || args.sft_data.is_some()
        || args.preferences.is_some()
        || args.score.is_some()
        || args.win_rate;
    if !any {
        bail!("eval: nothing to evaluate (give --perplexity, --sft-data, --preferences, --score or --win-rate)");
    }
    let device = select_device(&args.model.device)?;
    let dtype = parse_dtype(&args.model.dtype)?;
    let loaded = ev::load_for_eval(
        &args.model.model,
        args.base_adapter.as_deref(),
        args.model.adapter.as_deref(),
        dtype,
        &device,
    )?;
    let mut report = serde_json::Map::new();
    report.insert("model".into(), args.model.model.clone().into());
    report.insert("base_adapter".into(), serde_json::json!(args.base_adapter));
    report.insert("adapter".into(), serde_json::json!(args.model.adapter));
    let mut table: Vec<(String, String)> = vec![];
    if let Some(path) = &args.perplexity {
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
        let nll = perplexity(&loaded.model, &ids, args.context, ForwardCtx::EVAL)?;
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
        let r = ev::sft_nll(&loaded, path, args.max_length)?;
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
        let r = ev::preference_eval(
            &loaded,
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
        let n = ev::score_file(&loaded, rm, path, args.output.as_deref())?;
        report.insert("scored".into(), n.into());
    }
    if args.win_rate {
        let prompts_file = args
            .prompts
            .as_deref()
            .context("--win-rate needs --prompts FILE")?
            .display()
            .to_string();
        let (bpath, badapter) = ev::parse_model_spec(
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
        let baseline = ev::load_for_eval(&bpath, badapter.as_deref(), None, dtype, &device)?;
        let prompts = ev::read_prompts(&prompts_file, args.max_prompts)?;
        let (wr, gens) = ev::win_rate_eval(
            &loaded,
            &baseline,
            &judge,
            &prompts,
            &args.sampling.config(),
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
            ev::write_generations(p, &gens)?;
        }
        report.insert("win_rate".into(), serde_json::to_value(&wr)?);
    }
    let report = serde_json::Value::Object(report);
    if let Some(p) = &args.report {
        crate::io::write_json_atomic(p, &report)?;
        // The per-objective bar chart (model vs baseline) goes next to the report.
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        crate::plot::plot_objective_scores(p, dir, false)?;
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

fn run_generate(args: GenerateArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let tok = &loaded.tokenizer;
    let (prompt_ids, stop) = if args.chat {
        let mut msgs = vec![];
        if let Some(s) = &args.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &args.prompt));
        (tok.encode_prompt(&msgs)?, tok.stop_ids())
    } else {
        (tok.encode(&args.prompt)?, vec![tok.endoftext])
    };
    if prompt_ids.is_empty() {
        bail!("--prompt is empty");
    }
    let out = generate(
        &loaded.model,
        &[prompt_ids],
        &[0],
        &args.sampling.config(),
        &stop,
        tok.pad_id,
        ForwardCtx::EVAL,
    )?;
    let ids = &out[0];
    let text = tok.decode(ids, true)?;
    if args.json {
        println!("{}", serde_json::json!({"text": text, "token_ids": ids}));
    } else {
        println!("{text}");
    }
    Ok(())
}
