//! Command-line interface: the commands and their arguments, and the dispatch of each to its
//! recipe. Nothing here does work.

use crate::model::loader::DEFAULT_MODEL;
use crate::recipes::evaluate::EvalOptions;
use crate::recipes::generate::GenerateOptions;
use crate::recipes::RunFlags;
use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "mo-align",
    version,
    about = "Multi-objective alignment of Qwen2 and Qwen3 models (SFT, reward models, DPO family, GRPO, Pareto fronts), in pure Rust"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run [base ->] sft -> train-rm -> dpo -> hybrid-dpo [-> grpo] -> eval [-> pareto] from one
    /// config, with a summary.
    Pipeline(StageArgs),
    /// Supervised fine-tuning on chat data: LoRA, or every weight with train.finetune = "full".
    Sft(StageArgs),
    /// Train the multi-objective reward model head.
    TrainRm(StageArgs),
    /// Direct Preference Optimization.
    Dpo(StageArgs),
    /// DPO with an explicit multi-objective reward term (linear, Chebyshev, MODPO).
    HybridDpo(StageArgs),
    /// Online multi-objective policy optimisation: GRPO or RLOO scored by the reward vector.
    Grpo(StageArgs),
    /// Reward-weighted likelihood: each response's log-likelihood weighted by its reward.
    RewardWeighted(StageArgs),
    /// The Pareto front of policies across objective weightings (conditioned adapters,
    /// one adapter per weighting, or Rewarded soups), with hypervolume and plots.
    Pareto(StageArgs),
    /// A grid of runs of one stage (weightings x seeds x any config key), each point its own
    /// run directory, run locally (N at a time) or as a Slurm array job, with a summary.
    Sweep(SweepArgs),
    /// Evaluate a model: perplexity, chat NLL, preferences, reward scores, win rate.
    Eval(Box<EvalOptions>),
    /// Generate text with KV-cache decoding.
    Generate(GenerateOptions),
    /// Merge an adapter into the base and write a full HF checkpoint (and, with --gguf, a GGUF
    /// file).
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
        /// Replace an existing, non-empty --out (never the model's or the adapter's directory).
        #[arg(long)]
        force: bool,
        /// Also write `model-TYPE.gguf` into --out for llama.cpp / Ollama / LM Studio: f32,
        /// f16 or q8_0 (norms and biases stay f32).
        #[arg(long, value_name = "TYPE")]
        gguf: Option<String>,
    },
    /// Redraw a run directory's plots from its metrics.
    Plot {
        run_dir: PathBuf,
        /// Also write PNG files (needs a build with the `png` feature).
        #[arg(long)]
        png: bool,
    },
    /// Write a tiny random Qwen2 or Qwen3 checkpoint (HF layout, real BPE tokenizer, the
    /// family's chat template) for tests and demos.
    InitTiny {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The model family: qwen2 (Qwen2 / Qwen2.5) or qwen3.
        #[arg(long, default_value = "qwen2")]
        arch: String,
        /// Replace an existing, non-empty --out.
        #[arg(long)]
        force: bool,
    },
    /// Convert a JSON Lines data file to Parquet (schema inferred from the records).
    ConvertData {
        input: PathBuf,
        output: PathBuf,
        /// Replace an existing output file (never the input).
        #[arg(long)]
        force: bool,
    },
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
    /// Replace the run the output directory holds (it is removed once the new run has loaded
    /// and validated everything and starts; never a directory the run reads).
    #[arg(long)]
    pub force: bool,
    /// With --resume: continue although schedule or cadence settings changed (lr, max_steps,
    /// eval/save/log cadence, ...); the change is recorded in config.changes.jsonl.
    #[arg(long)]
    pub allow_config_change: bool,
}

#[derive(Args, Debug)]
pub struct SweepArgs {
    /// The sweep's TOML config: [sweep] stage, base, output_dir, backend; [axes]; [local];
    /// [slurm].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a sweep config value: section.key=value (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// List the points and their states (and the Slurm script it would submit); run nothing.
    #[arg(long, conflicts_with = "point")]
    pub dry_run: bool,
    /// Run one point here, by name (what each local child and each Slurm task runs).
    #[arg(long, value_name = "NAME")]
    pub point: Option<String>,
    /// Log lines only, no progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl StageArgs {
    fn config(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    fn flags(&self) -> RunFlags {
        RunFlags {
            resume: self.resume,
            force: self.force,
            quiet: self.quiet,
            allow_config_change: self.allow_config_change,
        }
    }
}

/// Dispatches the parsed command to its recipe.
pub fn run(cli: Cli) -> Result<()> {
    use crate::recipes::{dpo, evaluate, generate, merge, pipeline, reward_weighted};
    use crate::recipes::{sft, train_rm, utility};
    match cli.command {
        Command::Pipeline(a) => pipeline::run(a.config(), &a.set, a.flags()),
        Command::Sft(a) => sft::run(a.config(), &a.set, a.flags()).map(drop),
        Command::TrainRm(a) => train_rm::run(a.config(), &a.set, a.flags()),
        Command::Dpo(a) => dpo::run_dpo(a.config(), &a.set, a.flags()).map(drop),
        Command::HybridDpo(a) => dpo::run_hybrid(a.config(), &a.set, a.flags()).map(drop),
        Command::Grpo(a) => crate::recipes::grpo::run(a.config(), &a.set, a.flags()).map(drop),
        Command::RewardWeighted(a) => reward_weighted::run(a.config(), &a.set, a.flags()).map(drop),
        Command::Pareto(a) => {
            crate::recipes::pareto::run(a.config(), &a.set, a.quiet, a.force).map(drop)
        }
        Command::Sweep(a) => crate::recipes::sweep::run(
            a.config.as_deref(),
            &a.set,
            crate::recipes::sweep::SweepOptions {
                dry_run: a.dry_run,
                point: a.point,
                quiet: a.quiet,
            },
        ),
        Command::Eval(args) => evaluate::run(*args),
        Command::Generate(args) => generate::run(args),
        Command::Merge {
            model,
            adapter,
            out,
            dtype,
            force,
            gguf,
        } => merge::run(&model, &adapter, &out, &dtype, force, gguf.as_deref()),
        Command::Plot { run_dir, png } => utility::plot(&run_dir, png),
        Command::InitTiny {
            out,
            seed,
            arch,
            force,
        } => utility::init_tiny(&out, seed, &arch, force),
        Command::ConvertData {
            input,
            output,
            force,
        } => utility::convert_data(&input, &output, force),
    }
}
