//! GGUF export for llama.cpp, Ollama and LM Studio: a merged model's weights under llama.cpp's
//! tensor names, with the metadata its `qwen2` / `qwen3` loaders read (shape, rope, norm
//! epsilon) and the byte-level BPE tokenizer (tokens, token types, merges, special ids, chat
//! template), written tensor by tensor (`GgufWriter`) so memory holds one tensor at a time.
//!
//! Tensor names and keys follow llama.cpp's `convert_hf_to_gguf.py` for Qwen2 / Qwen3:
//! `token_embd`, `blk.N.attn_{q,k,v,output}`, `blk.N.attn_{q,k}_norm` (Qwen3),
//! `blk.N.ffn_{gate,up,down}`, `blk.N.{attn,ffn}_norm`, `output_norm`, `output` (untied only).

use super::config::{Family, QwenConfig};
use super::loader::ModelFiles;
use crate::tokenizer::ChatTokenizer;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use serde_json::Value as Json;
use std::io::Write;
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
fn tokenizer_metadata(src: &GgufSource) -> Result<Vec<(String, Value)>> {
    let path = &src.files.tokenizer;
    let tok = read_json(path)?;
    let field = |what: &str| format!("{}: {what}", path.display());
    let vocab = tok["model"]["vocab"]
        .as_object()
        .with_context(|| field("model.vocab is missing (not a BPE tokenizer?)"))?;
    let n = src.config.vocab_size;
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
    let t = src.tokenizer;
    let config = match &src.files.tokenizer_config {
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
        src.config.eos_token_id.first().copied().unwrap_or(t.im_end),
    );
    let bos = src.config.bos_token_id.unwrap_or(t.endoftext);
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
    let jinja = src.files.dir().join("chat_template.jinja");
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

/// What a GGUF file's metadata is made of: the model's config, its files and tokenizer.
pub struct GgufSource<'a> {
    pub config: &'a QwenConfig,
    pub files: &'a ModelFiles,
    pub tokenizer: &'a ChatTokenizer,
}

/// The metadata llama.cpp's loaders read, for a model exported as `kind`.
fn metadata(src: &GgufSource, kind: GgufType) -> Result<Vec<(String, Value)>> {
    let c = src.config;
    let arch = match c.family {
        Family::Qwen2 => "qwen2",
        Family::Qwen3 => "qwen3",
    };
    let name = src
        .files
        .dir()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| src.files.name.clone());
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
    meta.extend(tokenizer_metadata(src)?);
    Ok(meta)
}

/// GGUF's numbers for its value types (the spec's `gguf_metadata_value_type`).
fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

/// One metadata value as GGUF lays it out (candle's writer does the same, privately).
fn write_value(w: &mut impl Write, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => w.write_all(&x.to_le_bytes())?,
        Value::I8(x) => w.write_all(&x.to_le_bytes())?,
        Value::U16(x) => w.write_all(&x.to_le_bytes())?,
        Value::I16(x) => w.write_all(&x.to_le_bytes())?,
        Value::U32(x) => w.write_all(&x.to_le_bytes())?,
        Value::I32(x) => w.write_all(&x.to_le_bytes())?,
        Value::U64(x) => w.write_all(&x.to_le_bytes())?,
        Value::I64(x) => w.write_all(&x.to_le_bytes())?,
        Value::F32(x) => w.write_all(&x.to_le_bytes())?,
        Value::F64(x) => w.write_all(&x.to_le_bytes())?,
        Value::Bool(x) => w.write_all(&[u8::from(*x)])?,
        Value::String(x) => write_str(w, x)?,
        Value::Array(items) => {
            let id = items.first().map_or(4, value_type_id);
            if items.iter().any(|x| value_type_id(x) != id) {
                bail!("GGUF metadata: an array mixes value types");
            }
            w.write_all(&id.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for x in items {
                write_value(w, x)?;
            }
        }
    }
    Ok(())
}

/// ggml's numbers for the tensor types an export stores.
fn ggml_type_id(t: GgmlDType) -> Result<u32> {
    Ok(match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q8_0 => 8,
        other => bail!("GGUF export: tensor type {other:?} is not written"),
    })
}

const ALIGNMENT: u64 = 32;

fn padding(n: u64) -> u64 {
    (ALIGNMENT - n % ALIGNMENT) % ALIGNMENT
}

/// Writes a GGUF file tensor by tensor. Every tensor's type and size are known from its shape,
/// so the header (metadata and tensor table with offsets) is written first and each tensor's
/// data follows as it is produced: memory holds one tensor, never the model. The caller makes
/// the file atomic (merge writes it inside its `AtomicDir`).
pub struct GgufWriter {
    w: std::io::BufWriter<std::fs::File>,
    path: std::path::PathBuf,
    /// (Hugging Face name, stored type, dims) in file order.
    tensors: Vec<(String, GgmlDType, Vec<usize>)>,
    next: usize,
}

impl GgufWriter {
    /// `weights`: every (Hugging Face name, shape) in the order `write` will be given them.
    pub fn create(
        path: &Path,
        src: &GgufSource,
        kind: GgufType,
        weights: &[(String, Vec<usize>)],
    ) -> Result<Self> {
        let meta = metadata(src, kind)?;
        let mut tensors = vec![];
        for (hf, dims) in weights {
            let gg = gguf_name(hf).with_context(|| format!("weight `{hf}` has no GGUF name"))?;
            tensors.push((hf.clone(), gg, kind.storage(dims), dims.clone()));
        }
        let file = std::fs::File::create(path)
            .with_context(|| format!("{}: cannot create", path.display()))?;
        let mut w = std::io::BufWriter::new(file);
        let mut head = vec![];
        head.extend(0x4655_4747u32.to_le_bytes()); // "GGUF"
        head.extend(3u32.to_le_bytes()); // version 3, as llama.cpp's own converter writes it
        head.extend((tensors.len() as u64).to_le_bytes());
        head.extend((meta.len() as u64).to_le_bytes());
        for (k, v) in &meta {
            write_str(&mut head, k)?;
            head.extend(value_type_id(v).to_le_bytes());
            write_value(&mut head, v)?;
        }
        let mut offset = 0u64;
        for (_, gg, ty, dims) in &tensors {
            write_str(&mut head, gg)?;
            head.extend((dims.len() as u32).to_le_bytes());
            for d in dims.iter().rev() {
                head.extend((*d as u64).to_le_bytes());
            }
            head.extend(ggml_type_id(*ty)?.to_le_bytes());
            head.extend(offset.to_le_bytes());
            let elems: usize = dims.iter().product();
            let size = (elems / ty.block_size() * ty.type_size()) as u64;
            offset += size + padding(size);
        }
        let pad = padding(head.len() as u64) as usize;
        head.extend(std::iter::repeat_n(0u8, pad));
        w.write_all(&head)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(Self {
            w,
            path: path.to_path_buf(),
            tensors: tensors
                .into_iter()
                .map(|(hf, _, ty, d)| (hf, ty, d))
                .collect(),
            next: 0,
        })
    }

    /// Stores the next weight (`hf`, f32 on the CPU) in its planned type.
    pub fn write(&mut self, hf: &str, t: &Tensor) -> Result<()> {
        let Some((want, ty, dims)) = self.tensors.get(self.next) else {
            bail!("GGUF writer: `{hf}` is beyond the planned tensors");
        };
        if want != hf || t.dims() != dims.as_slice() {
            bail!(
                "GGUF writer: got `{hf}` {:?}, expected `{want}` {dims:?}",
                t.dims()
            );
        }
        // A standalone copy: quantize reads the whole storage.
        let t = t
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .force_contiguous()?;
        let q =
            QTensor::quantize(&t, *ty).with_context(|| format!("{hf}: cannot store as {ty:?}"))?;
        let data = q.data()?;
        let pad = padding(data.len() as u64) as usize;
        self.w
            .write_all(&data)
            .and_then(|_| self.w.write_all(&vec![0u8; pad]))
            .with_context(|| format!("{}: cannot write", self.path.display()))?;
        self.next += 1;
        Ok(())
    }

    /// Checks every tensor was written and syncs the file.
    pub fn finish(mut self) -> Result<()> {
        if let Some((missing, _, _)) = self.tensors.get(self.next) {
            bail!("GGUF writer: `{missing}` was never written");
        }
        self.w.flush()?;
        self.w
            .get_ref()
            .sync_all()
            .with_context(|| format!("{}: cannot write", self.path.display()))?;
        Ok(())
    }
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
