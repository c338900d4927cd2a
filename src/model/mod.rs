//! Qwen2 / Qwen2.5 and Qwen3 decoders with LoRA adapters, built only from differentiable Candle
//! ops plus frozen-operand custom ops whose backward computes the input gradient alone.

pub mod checkpointing;
pub mod config;
pub mod ctx;
pub mod decode;
pub mod dtype;
pub mod frozen;
pub mod fused;
pub mod gguf;
pub mod input;
pub mod lm_head;
pub mod loader;
pub mod lora;
pub mod matmul;
pub mod peft;
pub mod qwen;
pub mod stack;
pub mod streaming;
pub mod tiny;

pub use config::QwenConfig;
pub use ctx::{Adapters, ForwardCtx};
pub use lora::LoraConfig;
pub use qwen::{KvCache, Qwen};
