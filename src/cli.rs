//! Command-line interface: argument definitions and the dispatch to each command.

use crate::eval::perplexity;
use crate::generate::{generate, SamplingConfig};
use crate::model::loader::{load_pretrained, select_device, Loaded, DEFAULT_MODEL};
use crate::model::lora::LoraCtx;
use crate::model::parse_dtype;
use crate::tokenizer::{ChatTokenizer, Message};
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
    /// Write a tiny random Qwen2 checkpoint (HF layout, real BPE tokenizer) for tests and demos.
    InitTiny {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Convert a JSON Lines data file to Parquet (schema inferred from the records).
    ConvertData { input: PathBuf, output: PathBuf },
    /// Evaluate a model: perplexity of a text file.
    Eval(EvalArgs),
    /// Generate text with KV-cache decoding.
    Generate(GenerateArgs),
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

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Plain-text file: mean negative log-likelihood per predicted token (no template, no BOS).
    #[arg(long)]
    pub perplexity: Option<PathBuf>,
    /// Tokens per window for --perplexity (non-overlapping windows).
    #[arg(long, default_value_t = 2048)]
    pub context: usize,
    /// Reward model directory (written by train-rm) for --score.
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    /// JSONL of {prompt, response} (or {messages} ending with the assistant's reply) to score
    /// with --reward-model; writes each record with its per-objective scores.
    #[arg(long)]
    pub score: Option<PathBuf>,
    /// Where --score writes its JSONL (stdout when omitted).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Print machine-readable JSON.
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
    match cli.command {
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
        Command::Eval(args) => run_eval(args),
        Command::Generate(args) => run_generate(args),
        Command::Sft(a) => {
            crate::recipes::sft::run(a.config.as_deref(), &a.set, a.resume, a.quiet).map(|_| ())
        }
        Command::TrainRm(a) => {
            crate::recipes::train_rm::run(a.config.as_deref(), &a.set, a.resume, a.quiet)
        }
        Command::Dpo(a) => {
            crate::recipes::dpo::run_dpo(a.config.as_deref(), &a.set, a.resume, a.quiet).map(|_| ())
        }
        Command::HybridDpo(a) => {
            crate::recipes::dpo::run_hybrid(a.config.as_deref(), &a.set, a.resume, a.quiet)
                .map(|_| ())
        }
        Command::RewardWeighted(a) => {
            crate::recipes::dpo::run_reward_weighted(a.config.as_deref(), &a.set, a.resume, a.quiet)
                .map(|_| ())
        }
    }
}

fn run_eval(args: EvalArgs) -> Result<()> {
    if args.perplexity.is_none() && args.score.is_none() {
        bail!("eval: nothing to evaluate (give --perplexity FILE and/or --score FILE --reward-model DIR)");
    }
    let loaded = args.model.load()?;
    let mut report = serde_json::Map::new();
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
        let nll = perplexity(&loaded.model, &ids, args.context, LoraCtx::EVAL)?;
        let mean = nll.mean();
        report.insert("nll_per_token".into(), mean.into());
        report.insert("tokens".into(), nll.tokens.into());
        report.insert("perplexity".into(), mean.exp().into());
        if !args.json {
            println!(
                "nll/token {mean:.6}  perplexity {:.4}  ({} predicted tokens)",
                mean.exp(),
                nll.tokens
            );
        }
    }
    if let Some(path) = &args.score {
        let rm = args
            .reward_model
            .as_deref()
            .context("--score needs --reward-model DIR")?;
        let n = crate::recipes::evaluate::score_file(&loaded, rm, path, args.output.as_deref())?;
        report.insert("scored".into(), n.into());
    }
    if args.json {
        println!("{}", serde_json::Value::Object(report));
    }
    Ok(())
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    let loaded = args.model.load()?;
    let tok: &ChatTokenizer = &loaded.tokenizer;
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
    let cfg = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    let out = generate(
        &loaded.model,
        &[prompt_ids],
        &[0],
        &cfg,
        &stop,
        tok.pad_id,
        LoraCtx::EVAL,
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
