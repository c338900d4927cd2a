//! mo-align: multi-objective alignment of Qwen2.5 / Qwen3 models, on Candle.
//!
//! The module tree mirrors the pipeline. Domain: `model` (the decoder, LoRA, loading, exports),
//! `kernels` (the fused decoder's CPU and CUDA kernels), `tokenizer` (ChatML), `data`
//! (records, batches), `objectives` (one loss per stage, scalarisers, weight conditioning),
//! `reward` (reward heads, rule objectives), `train` (the one trainer: step, optimizer,
//! checkpoints, logs), `generate`, `eval`, `judge`, `pareto` (front measures), `recipes` (one
//! per subcommand, wiring the rest), `cli` (parses and dispatches). Shared utilities: `config`,
//! `outputs` (where commands may write), `io`, `cache`, `rng`, `plot`, `profile`, `cpu`,
//! `memory`, `switch`.

pub mod cache;
pub mod cli;
pub mod config;
pub mod cpu;
pub mod data;
pub mod digest;
pub mod eval;
pub mod generate;
pub mod hub;
pub mod io;
pub mod judge;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod objectives;
pub mod outputs;
pub mod pareto;
pub mod plot;
pub mod profile;
pub mod recipes;
pub mod reward;
pub mod rng;
pub mod switch;
#[cfg(test)]
pub(crate) mod test_support;
pub mod tokenizer;
pub mod train;
