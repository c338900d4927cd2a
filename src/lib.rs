//! mo-align: multi-objective alignment of Qwen2 and Qwen3 models, in pure Rust on Candle.
//!
//! The module tree mirrors the pipeline; one stage reads config -> data -> model -> objective ->
//! train -> outputs (README, "Code map"). Domain modules:
//! - `model`: the Qwen2 / Qwen3 decoder, LoRA, loading, the LM head, GGUF and PEFT export.
//! - `kernels`: the fused decoder's CPU and CUDA kernels.
//! - `tokenizer`: tokenisation and the families' chat templates.
//! - `data`: records in the Hub schemas, validated and batched.
//! - `objectives`: the losses (NLL, DPO, hybrid, reward-weighted, online), scalarisers,
//!   weightings and weight conditioning.
//! - `reward`: the reward vector (reward-model heads, rule objectives) and its features.
//! - `train`: the one training loop every stage uses: step, optimizer, checkpoints, logs.
//! - `generate`: KV-cache decoding, greedy or sampled, batched.
//! - `eval`: perplexity, chat NLL, preference accuracy, reward scores, win rates, and the judges
//!   that score an answer (a trained reward model, an HF classifier, or rules).
//! - `cache`: on-disk caches of values that depend only on frozen weights (reference log-probs).
//! - `pareto`: pure measures of a front (hypervolume, sparsity, spacing, rank correlation).
//! - `plot`: the charts runs and reports draw.
//! - `recipes`: one short recipe per subcommand, wiring the rest together.
//! - `cli`: parses the command line and dispatches to a recipe.
//! - `outputs`: where commands may write: run directories, locks, overlap with inputs.
//! - `util`: what the domain stands on: file I/O, seeded streams, CPU
//!   and memory probes, switches, profiling scopes, digests, config loading, the Hub client.

pub mod cache;
pub mod cli;
pub mod data;
pub mod eval;
pub mod generate;
pub mod kernels;
pub mod model;
pub mod objectives;
pub mod outputs;
pub mod pareto;
pub mod plot;
pub mod recipes;
pub mod reward;
#[cfg(test)]
pub(crate) mod test_support;
pub mod tokenizer;
pub mod train;
pub mod util;
