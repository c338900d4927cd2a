//! mo-align: multi-objective alignment of Qwen2.5 with LoRA, on Candle.
//!
//! The module tree mirrors the pipeline: `model` (Qwen2 + LoRA, loading, the LM head),
//! `tokenizer` (ChatML), `generate`, `eval`, and the shared utilities they stand on.

pub mod cache;
pub mod cli;
pub mod config;
pub mod cpu;
pub mod data;
pub mod eval;
pub mod generate;
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
pub mod tokenizer;
pub mod train;

pub use model::{Adapters, Qwen};
