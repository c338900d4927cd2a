//! GGUF export for llama.cpp, Ollama and LM Studio: a merged model's weights under llama.cpp's
//! tensor names, with the metadata its `qwen2` / `qwen3` loaders read (shape, rope, norm
//! epsilon) and the byte-level BPE tokenizer (tokens, token types, merges, special ids, chat
//! template), written with candle's GGUF writer.
//!
//! Tensor names and keys follow llama.cpp's `convert_hf_to_gguf.py` for Qwen2 / Qwen3:
//! `token_embd`, `blk.N.attn_{q,k,v,output}`, `blk.N.attn_{q,k}_norm` (Qwen3),
//! `blk.N.ffn_{gate,up,down}`, `blk.N.{attn,ffn}_norm`, `output_norm`, `output` (untied only).

use super::config::Family;
use super::loader::Loaded;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::DType;
use serde_json::Value as Json;
use std::path::Path;

/// The weight type of an export. Norms and biases stay f32 in every type, as llama.cpp's
/// converter keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Q8_0,
}

impl GgufType {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "q8_0" => Self::Q8_0,
            other => bail!("--gguf `{other}`: expected f32, f16 or q8_0"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
        }
    }

    /// `general.file_type` (llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_Q8_0).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
        }
    }

    /// The type a tensor of `dims` is stored in.
    fn storage(self, dims: &[usize]) -> GgmlDType {
        let matrix = dims.len() == 2;
        match self {
            _ if !matrix => GgmlDType::F32,
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            // Q8_0 packs rows in blocks of 32; a row of another width stays f16.
            Self::Q8_0 if dims[1].is_multiple_of(32) => GgmlDType::Q8_0,
            Self::Q8_0 => GgmlDType::F16,
        }
    }
}

/// llama.cpp's name for a Hugging Face weight name, or None for a weight it does not hold.
fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, leaf) = rest.split_once('.')?;
    let (module, kind) = leaf.rsplit_once('.')?;
    let name = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.{kind}"))
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

/// The tokenizer as llama.cpp's `gpt2` (byte-level BPE) model reads it.
fn tokenizer_metadata(loaded: &Loaded) -> Result<Vec<(String, Value)>> {
    let path = &loaded.files.tokenizer;
    let tok = read_json(path)?;
    let field = |what: &str| format!("{}: {what}", path.display());
    let vocab = tok["model"]["vocab"]
        .as_object()
        .with_context(|| field("model.vocab is missing (not a BPE tokenizer?)"))?;
    let n = loaded.model.config.vocab_size;
    // (text, type): 1 normal, 3 control (special added), 4 user-defined (other added),
    // 5 unused (the padding rows a checkpoint's embedding has beyond its tokenizer).
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; n];
    let mut put = |id: Option<u64>, text: &str, kind: i32| -> Result<()> {
        let id = id.with_context(|| field(&format!("token `{text}` has no integer id")))? as usize;
        anyhow::ensure!(
            id < n,
            field(&format!(
                "token `{text}` has id {id}, beyond config.json's vocab_size {n}"
            ))
        );
        tokens[id] = Some((text.to_string(), kind));
        Ok(())
    };
    for (text, id) in vocab {
        put(id.as_u64(), text, 1)?;
    }
    for t in tok["added_tokens"].as_array().into_iter().flatten() {
        let text = t["content"].as_str().unwrap_or_default();
        let kind = if t["special"].as_bool().unwrap_or(false) {
            3
        } else {
            4
        };
        put(t["id"].as_u64(), text, kind)?;
    }
    let (texts, kinds): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let (text, kind) = t.unwrap_or_else(|| (format!("[PAD{i}]"), 5));
            (Value::String(text), Value::I32(kind))
        })
        .unzip();
    // tokenizers writes merges as "a b" strings (older files) or [a, b] pairs (newer ones).
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .with_context(|| field("model.merges is missing"))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(Value::String(s.clone())),
            Json::Array(p) if p.len() == 2 => Ok(Value::String(format!(
                "{} {}",
                p[0].as_str().unwrap_or_default(),
                p[1].as_str().unwrap_or_default()
            ))),
            other => bail!(field(&format!(
                "a merge is neither \"a b\" nor [a, b]: {other}"
            ))),
        })
        .collect::<Result<_>>()?;
    let t = &loaded.tokenizer;
    let config = match &loaded.files.tokenizer_config {
        Some(p) => read_json(p)?,
        None => Json::Null,
    };
    let id_of = |key: &str, fallback: u32| -> u32 {
        config[key]
            .as_str()
            .or_else(|| config[key]["content"].as_str())
            .and_then(|s| t.encode(s).ok())
            .filter(|ids| ids.len() == 1)
            .map_or(fallback, |ids| ids[0])
    };
    let eos = id_of(
        "eos_token",
        loaded
            .model
            .config
            .eos_token_id
            .first()
            .copied()
            .unwrap_or(t.im_end),
    );
    let bos = loaded.model.config.bos_token_id.unwrap_or(t.endoftext);
    let mut out = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(texts)),
        ("tokenizer.ggml.token_type".into(), Value::Array(kinds)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)),
        (
            "tokenizer.ggml.padding_token_id".into(),
            Value::U32(id_of("pad_token", t.pad_id)),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(bos)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    let jinja = loaded.files.dir().join("chat_template.jinja");
    let template = match config["chat_template"].as_str() {
        Some(t) => Some(t.to_string()),
        None if jinja.is_file() => Some(
            std::fs::read_to_string(&jinja)
                .with_context(|| format!("{}: cannot read", jinja.display()))?,
        ),
        None => None,
    };
    if let Some(template) = template {
        out.push(("tokenizer.chat_template".into(), Value::String(template)));
    }
    Ok(out)
}

/// Writes `loaded` (adapters merged) as one GGUF file at `path`, atomically.
pub fn write_gguf(loaded: &Loaded, path: &Path, kind: GgufType) -> Result<()> {
    anyhow::ensure!(
        !loaded.model.has_lora(),
        "merge the adapters before writing GGUF"
    );
    let c = &loaded.model.config;
    let arch = match c.family {
        Family::Qwen2 => "qwen2",
        Family::Qwen3 => "qwen3",
    };
    let name = loaded
        .files
        .dir()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| loaded.files.name.clone());
    let key = |k: &str| format!("{arch}.{k}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name)),
        ("general.file_type".into(), Value::U32(kind.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (
            key("context_length"),
            Value::U32(c.max_position_embeddings as u32),
        ),
        (key("embedding_length"), Value::U32(c.hidden_size as u32)),
        (key("block_count"), Value::U32(c.num_hidden_layers as u32)),
        (
            key("feed_forward_length"),
            Value::U32(c.intermediate_size as u32),
        ),
        (
            key("attention.head_count"),
            Value::U32(c.num_attention_heads as u32),
        ),
        (
            key("attention.head_count_kv"),
            Value::U32(c.num_key_value_heads as u32),
        ),
        // Qwen3's head_dim is its own (llama.cpp reads it here); Qwen2's is hidden / heads.
        (key("attention.key_length"), Value::U32(c.head_dim as u32)),
        (key("attention.value_length"), Value::U32(c.head_dim as u32)),
        (key("rope.freq_base"), Value::F32(c.rope_theta as f32)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
    ];
    meta.extend(tokenizer_metadata(loaded)?);

    let mut tensors: Vec<(String, QTensor)> = vec![];
    for (hf, t) in loaded.model.named_weights() {
        let name = gguf_name(&hf).with_context(|| format!("weight `{hf}` has no GGUF name"))?;
        // A standalone copy: quantize reads the whole storage, and a projection's weight is a
        // view of its layer's concatenated q|k|v or gate|up weight.
        let t = t
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .force_contiguous()?;
        let q = QTensor::quantize(&t, kind.storage(t.dims()))
            .with_context(|| format!("{hf}: cannot store as {}", kind.name()))?;
        tensors.push((name, q));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    crate::io::write_atomic_with(path, |w| {
        candle_core::quantized::gguf_file::write(w, &meta_refs, &tensor_refs)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.bias").unwrap(),
            "blk.3.attn_q.bias"
        );
        assert_eq!(
            gguf_name("model.layers.0.self_attn.k_norm.weight").unwrap(),
            "blk.0.attn_k_norm.weight"
        );
        assert_eq!(
            gguf_name("model.layers.12.post_attention_layernorm.weight").unwrap(),
            "blk.12.ffn_norm.weight"
        );
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert!(gguf_name("score.weight").is_none());
    }

    #[test]
    fn matrices_quantise_and_vectors_stay_f32() {
        assert_eq!(GgufType::Q8_0.storage(&[896, 4864]), GgmlDType::Q8_0);
        assert_eq!(GgufType::Q8_0.storage(&[896]), GgmlDType::F32);
        assert_eq!(GgufType::Q8_0.storage(&[8, 20]), GgmlDType::F16);
        assert_eq!(GgufType::F16.storage(&[64, 64]), GgmlDType::F16);
    }
}
