//! `init-tiny`: a tiny random Qwen2 checkpoint in the exact Hugging Face layout, with a real
//! byte-level BPE tokenizer shaped like Qwen2.5's (NFC, the same split regex, ChatML specials).
//! Tests, CI and the demo go through the same loading, tokenising and training code as the
//! real model.

use super::config::Qwen2Config;
use crate::io::safetensors_bytes;
use crate::io::write_atomic;
use crate::rng::{normal_vec, stream_rng};
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

pub const QWEN25_CHAT_TEMPLATE: &str = include_str!("qwen25_chat_template.jinja");
const CORPUS: &str = include_str!("tiny_corpus.txt");
/// Qwen2's pre-tokenizer regex.
const SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub fn tiny_config() -> Qwen2Config {
    Qwen2Config {
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

/// A byte-level BPE tokenizer trained on a small embedded corpus, in Qwen2.5's format.
pub fn build_tokenizer(regular_vocab: usize) -> Result<Tokenizer> {
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
    tok.train(&mut trainer, CORPUS.lines().map(|l| format!("{l}\n")))
        .map_err(|e| anyhow::anyhow!("training the tiny tokenizer: {e}"))?;
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true).normalized(false))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| anyhow::anyhow!("adding special tokens: {e}"))?;
    Ok(tok)
}

pub fn tokenizer_config_json(model_max_length: usize) -> serde_json::Value {
    serde_json::json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "bos_token": null,
        "chat_template": QWEN25_CHAT_TEMPLATE,
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
pub fn random_weights(cfg: &Qwen2Config, seed: u64) -> Result<HashMap<String, Tensor>> {
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
        next(&[cfg.vocab_size, h], 0.1, 0.0)?,
    );
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let shapes: [(&str, Vec<usize>); 11] = [
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.q_proj.bias", vec![q]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.k_proj.bias", vec![kv]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.bias", vec![kv]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
        ];
        for (name, shape) in shapes {
            let mean = if name.ends_with("layernorm.weight") {
                1.0
            } else {
                0.0
            };
            w.insert(format!("{p}.{name}"), next(&shape, 0.1, mean)?);
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
    cfg: &Qwen2Config,
    dtype: candle_core::DType,
    device: &Device,
) -> Result<super::Qwen2> {
    let mut rng = crate::rng::stream_rng(0, 0x7261_6e64);
    super::Qwen2::build(cfg.clone(), |name, shape| {
        let n: usize = shape.iter().product();
        let values = if name.ends_with("norm.weight") {
            vec![1.0f32; n]
        } else {
            crate::rng::normal_vec(&mut rng, n, 0.02)
        };
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    })
}

/// Writes config.json, generation_config.json, model.safetensors, tokenizer.json and
/// tokenizer_config.json into `out`.
pub fn write_tiny_checkpoint(out: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create directory", out.display()))?;
    let mut cfg = tiny_config();
    let tok = build_tokenizer(cfg.vocab_size - 2 * SPECIAL_TOKENS.len())?;
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

    let weights = random_weights(&cfg, seed)?;
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
    let tc = tokenizer_config_json(cfg.max_position_embeddings);
    write_atomic(
        &out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?.as_bytes(),
    )?;
    Ok(())
}
