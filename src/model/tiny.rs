//! `init-tiny`: a tiny random Qwen2 or Qwen3 checkpoint in the exact Hugging Face layout, with a
//! real byte-level BPE tokenizer shaped like Qwen2.5's or Qwen3's (NFC, the same split regex,
//! ChatML specials, Qwen3's thinking tags) and the family's own chat template.
//! Tests, CI and the demo go through the same loading, tokenising and training code as the
//! real model.

use super::config::{Family, QwenConfig};
use crate::util::io::safetensors_bytes;
use crate::util::io::write_atomic;
use crate::util::rng::{normal_vec, stream_rng};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::BpeTrainer;
use tokenizers::models::TrainerWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// Qwen2.5's special tokens, in Qwen's id order (they follow the BPE vocabulary).
pub const SPECIAL_TOKENS: [&str; 22] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
];

/// Qwen3's added tokens after Qwen2.5's (ids 151665-151668 in the real vocabulary). Not special,
/// as in Qwen3's tokenizer.json: decoding with special tokens skipped keeps them.
pub const QWEN3_ADDED_TOKENS: [&str; 4] =
    ["<tool_response>", "</tool_response>", "<think>", "</think>"];

pub const QWEN25_CHAT_TEMPLATE: &str = include_str!("qwen25_chat_template.jinja");
/// The `chat_template` of Qwen/Qwen3-0.6B's tokenizer_config.json (the whole Qwen3 family
/// shares it).
pub const QWEN3_CHAT_TEMPLATE: &str = include_str!("qwen3_chat_template.jinja");
const CORPUS: &str = include_str!("tiny_corpus.txt");
/// Qwen2's pre-tokenizer regex.
const SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub fn tiny_config() -> QwenConfig {
    QwenConfig {
        family: Family::Qwen2,
        attention_bias: true,
        vocab_size: 1024,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        max_position_embeddings: 4096,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: vec![],
    }
}

/// The shape of a tiny model made by `init-tiny` or `[model.tiny]`. Defaults give the 64-wide,
/// 2-layer model every test and golden file uses; the demo asks for a larger one whose
/// tokenizer is trained on its own corpus, so a sentence of the task is a handful of tokens.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TinySpec {
    /// `qwen2` (the default) or `qwen3`: the decoder, tokenizer and chat template of the family.
    pub arch: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Width of a head; unset = hidden_size / num_attention_heads.
    pub head_dim: Option<usize>,
    /// Std of the random weights: 0.1 (the default) keeps a random model's logits apart for
    /// tests; a model meant to be trained from scratch wants transformers' 0.02.
    pub init_std: f32,
    /// Data files (JSON Lines or Parquet) whose text trains the BPE tokenizer; empty = the
    /// small embedded corpus.
    pub tokenizer_corpus: Vec<String>,
}

impl Default for TinySpec {
    fn default() -> Self {
        let c = tiny_config();
        Self {
            arch: Family::Qwen2,
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads,
            head_dim: None,
            init_std: 0.1,
            tokenizer_corpus: vec![],
        }
    }
}

impl TinySpec {
    /// The tiny Qwen3 of `init-tiny --arch qwen3`: the default shape with heads twice as wide
    /// as hidden / heads (as Qwen3-0.6B's 16 x 128 on 1024), so nothing can confuse the two.
    pub fn qwen3() -> Self {
        let d = Self::default();
        Self {
            arch: Family::Qwen3,
            head_dim: Some(2 * d.hidden_size / d.num_attention_heads),
            ..d
        }
    }

    pub fn config(&self) -> Result<QwenConfig> {
        anyhow::ensure!(
            self.num_attention_heads > 0
                && self.num_key_value_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads)
                && self.num_attention_heads.is_multiple_of(self.num_key_value_heads),
            "model.tiny: hidden_size {} must divide into num_attention_heads {}, which must divide into num_key_value_heads {}",
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads
        );
        anyhow::ensure!(
            self.vocab_size > 256 + 2 * SPECIAL_TOKENS.len(),
            "model.tiny.vocab_size must exceed {} (the byte alphabet and special tokens)",
            256 + 2 * SPECIAL_TOKENS.len()
        );
        let head_dim = self
            .head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads);
        anyhow::ensure!(
            head_dim > 0 && head_dim.is_multiple_of(2),
            "model.tiny.head_dim {head_dim} must be even and positive"
        );
        let cfg = QwenConfig {
            family: self.arch,
            attention_bias: self.arch == Family::Qwen2,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim,
            ..tiny_config()
        };
        anyhow::ensure!(
            self.num_hidden_layers <= 1000,
            "model.tiny.num_hidden_layers {} is no tiny model (at most 1000)",
            self.num_hidden_layers
        );
        // Sizes are multiplied in f64 so a mistyped one cannot overflow before it is refused.
        let params: f64 = cfg
            .weight_shapes()
            .iter()
            .map(|(_, s)| s.iter().map(|&d| d as f64).product::<f64>())
            .sum();
        anyhow::ensure!(
            params <= 2e9,
            "model.tiny: {params:.3e} parameters is no tiny model (at most 2e9): check its sizes"
        );
        Ok(cfg)
    }

    /// The tokenizer's training text: every string in every record of the corpus files, one
    /// line per line of text.
    fn corpus(&self) -> Result<Vec<String>> {
        if self.tokenizer_corpus.is_empty() {
            return Ok(embedded_corpus());
        }
        fn strings(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::String(s) => out.extend(s.lines().map(|l| format!("{l}\n"))),
                serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
                serde_json::Value::Object(m) => m.values().for_each(|x| strings(x, out)),
                _ => {}
            }
        }
        // The embedded corpus holds the chat template's words (roles, Qwen's default system
        // prompt), which every example carries.
        let mut out = embedded_corpus();
        for spec in &self.tokenizer_corpus {
            for path in crate::data::source::resolve_files(spec)? {
                for rec in crate::data::source::read_records(&path)? {
                    let v = rec
                        .value
                        .map_err(|why| anyhow::anyhow!("{}: {why}", rec.loc))?;
                    strings(&v, &mut out);
                }
            }
        }
        anyhow::ensure!(
            !out.is_empty(),
            "model.tiny.tokenizer_corpus: no text in {:?}",
            self.tokenizer_corpus
        );
        Ok(out)
    }
}

/// A byte-level BPE tokenizer trained on a small embedded corpus, in Qwen2.5's format.
pub fn build_tokenizer(regular_vocab: usize) -> Result<Tokenizer> {
    build_tokenizer_on(regular_vocab, embedded_corpus(), Family::Qwen2)
}

/// The embedded corpus, one entry per line (as the BPE trainer reads lines).
fn embedded_corpus() -> Vec<String> {
    CORPUS.lines().map(|l| format!("{l}\n")).collect()
}

fn build_tokenizer_on(
    regular_vocab: usize,
    corpus: Vec<String>,
    family: Family,
) -> Result<Tokenizer> {
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false
    });
    let skeleton = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_REGEX}, "behavior": "Isolated", "invert": false},
            byte_level.clone(),
        ]},
        "post_processor": byte_level.clone(),
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": {}, "merges": []},
    });
    let mut tok: Tokenizer = std::str::FromStr::from_str(&skeleton.to_string())
        .map_err(|e| anyhow::anyhow!("tokenizer skeleton: {e}"))?;
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(regular_vocab)
        .min_frequency(1)
        .show_progress(false)
        .initial_alphabet(
            tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
                .into_iter()
                .collect(),
        )
        .build()
        .into();
    tok.train(&mut trainer, corpus.into_iter())
        .map_err(|e| anyhow::anyhow!("training the tiny tokenizer: {e}"))?;
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true).normalized(false))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| anyhow::anyhow!("adding special tokens: {e}"))?;
    if family == Family::Qwen3 {
        let added: Vec<AddedToken> = QWEN3_ADDED_TOKENS
            .iter()
            .map(|s| AddedToken::from(s.to_string(), false).normalized(false))
            .collect();
        tok.add_tokens(added)
            .map_err(|e| anyhow::anyhow!("adding Qwen3's tokens: {e}"))?;
    }
    Ok(tok)
}

pub fn tokenizer_config_json(model_max_length: usize, family: Family) -> serde_json::Value {
    let template = match family {
        Family::Qwen2 => QWEN25_CHAT_TEMPLATE,
        Family::Qwen3 => QWEN3_CHAT_TEMPLATE,
    };
    serde_json::json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "bos_token": null,
        "chat_template": template,
        "clean_up_tokenization_spaces": false,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": false,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": null,
    })
}

/// Random weights (normal, std 0.1, larger than transformers' 0.02 so a tiny model's
/// logits are not all alike), norm weights near 1 (not exactly 1,
/// so a forward that ignored them would fail the golden tests) and small random biases.
pub fn random_weights(cfg: &QwenConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    random_weights_std(cfg, seed, 0.1)
}

fn random_weights_std(cfg: &QwenConfig, seed: u64, std: f32) -> Result<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let mut stream = 0u64;
    let mut next = |shape: &[usize], std: f32, mean: f32| -> Result<Tensor> {
        stream += 1;
        let mut rng = stream_rng(seed, stream);
        let n: usize = shape.iter().product();
        let data: Vec<f32> = normal_vec(&mut rng, n, std)
            .into_iter()
            .map(|x| x + mean)
            .collect();
        Ok(Tensor::from_vec(data, shape, &dev)?)
    };
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let mut w = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".into(),
        next(&[cfg.vocab_size, h], std, 0.0)?,
    );
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let shapes: [(&str, Vec<usize>); 13] = [
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.q_proj.bias", vec![q]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.bias", vec![kv]),
            ("self_attn.q_norm.weight", vec![cfg.head_dim]),
            ("self_attn.k_norm.weight", vec![cfg.head_dim]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
        ];
        for (name, shape) in shapes {
            let absent = (name.ends_with(".bias") && !cfg.attention_bias)
                || (name.contains("_norm.") && !cfg.family.has_qk_norm());
            if absent {
                continue;
            }
            let (std, mean) = if name.ends_with("norm.weight") {
                (0.1, 1.0)
            } else {
                (std, 0.0)
            };
            w.insert(format!("{p}.{name}"), next(&shape, std, mean)?);
        }
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            next(&[h], 0.1, 1.0)?,
        );
    }
    w.insert("model.norm.weight".into(), next(&[h], 0.1, 1.0)?);
    Ok(w)
}

/// A model with random weights (std 0.02) of any config, built in memory: benchmarks at the
/// real dimensions need no download. The values are drawn on the host from a seeded stream
/// and copied to `device`: the same model on every device, and no random-number library
/// needed on a GPU (the CUDA dist ships only a cuRAND stub).
pub fn random_model(
    cfg: &QwenConfig,
    dtype: candle_core::DType,
    device: &Device,
) -> Result<super::Qwen> {
    let mut rng = crate::util::rng::stream_rng(0, 0x7261_6e64);
    super::Qwen::build(cfg.clone(), |name, shape| {
        let n: usize = shape.iter().product();
        // bf16 values, as the published checkpoints hold (decoding reads such weights as bf16).
        let values = if name.ends_with("norm.weight") {
            vec![1.0f32; n]
        } else {
            let v = crate::util::rng::normal_vec(&mut rng, n, 0.02);
            v.into_iter()
                .map(|x| half::bf16::from_f32(x).to_f32())
                .collect()
        };
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    })
}

/// Checks that the checkpoint in `dir` has the family and shape `spec` asks for.
pub fn check_made_for(dir: &Path, spec: &TinySpec) -> Result<()> {
    let want = spec.config()?;
    let got = QwenConfig::from_file(&dir.join("config.json"))?;
    let shape = |c: &QwenConfig| {
        (
            c.family,
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
    };
    anyhow::ensure!(
        shape(&got) == shape(&want),
        "{}: holds a {} of another shape than model.tiny asks for (a {}: {:?} against {:?}); remove it or point model.path elsewhere",
        dir.display(),
        got.family.causal_lm(),
        want.family.causal_lm(),
        shape(&got),
        shape(&want)
    );
    Ok(())
}

/// Writes config.json, generation_config.json, model.safetensors, tokenizer.json and
/// tokenizer_config.json into `out`.
pub fn write_tiny_checkpoint(out: &Path, seed: u64) -> Result<()> {
    write_tiny_checkpoint_of(out, seed, &TinySpec::default())
}

/// `write_tiny_checkpoint` of any `TinySpec`.
pub fn write_tiny_checkpoint_of(out: &Path, seed: u64, spec: &TinySpec) -> Result<()> {
    let mut cfg = spec.config()?;
    let tok = build_tokenizer_on(
        cfg.vocab_size - 2 * SPECIAL_TOKENS.len(),
        spec.corpus()?,
        cfg.family,
    )?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create directory", out.display()))?;
    let id = |s: &str| {
        tok.token_to_id(s)
            .with_context(|| format!("tiny tokenizer lacks {s}"))
    };
    let (eot, im_end) = (id("<|endoftext|>")?, id("<|im_end|>")?);
    anyhow::ensure!(
        tok.get_vocab_size(true) <= cfg.vocab_size,
        "tiny tokenizer too large"
    );
    cfg.bos_token_id = Some(eot);
    cfg.eos_token_id = vec![im_end];

    let weights = random_weights_std(&cfg, seed, spec.init_std)?;
    let bytes = safetensors_bytes(
        &weights,
        Some(HashMap::from([("format".into(), "pt".into())])),
    )?;
    write_atomic(&out.join("model.safetensors"), &bytes)?;
    let mut config = cfg.to_hf_json("f32");
    config["pad_token_id"] = eot.into();
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let gen = serde_json::json!({
        "bos_token_id": eot, "pad_token_id": eot, "eos_token_id": [im_end, eot],
        "do_sample": false,
    });
    write_atomic(
        &out.join("generation_config.json"),
        serde_json::to_string_pretty(&gen)?.as_bytes(),
    )?;
    let tok_json = tok
        .to_string(true)
        .map_err(|e| anyhow::anyhow!("serialising tokenizer: {e}"))?;
    write_atomic(&out.join("tokenizer.json"), tok_json.as_bytes())?;
    let tc = tokenizer_config_json(cfg.max_position_embeddings, cfg.family);
    write_atomic(
        &out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?.as_bytes(),
    )?;
    Ok(())
}
