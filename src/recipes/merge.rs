//! `mo-align merge`: base + adapter folded into one Hugging Face checkpoint (safetensors,
//! config, tokenizer files) that transformers, vLLM and mo-align load as a plain model, and
//! with `--gguf` a GGUF file beside it for llama.cpp, Ollama and LM Studio.

use crate::io::AtomicDir;
use crate::model::gguf::{write_gguf, GgufType};
use crate::model::loader::{load_pretrained, save_pretrained};
use crate::model::parse_dtype;
use crate::outputs::{check, Existing, Inputs};
use anyhow::Result;
use candle_core::{DType, Device};
use std::path::Path;

/// `mo-align merge`: refuses an `--out` that overlaps the model or the adapter, and an existing
/// non-empty `--out` without `force`; writes into a temporary sibling and renames at the end.
pub fn run(
    model: &str,
    adapter: &Path,
    out: &Path,
    dtype: &str,
    force: bool,
    gguf: Option<&str>,
) -> Result<()> {
    let dtype = parse_dtype(dtype)?;
    let gguf = gguf.map(GgufType::parse).transpose()?;
    let mut inputs = Inputs::new();
    inputs.add("adapter", adapter).add("model", model);
    check(out, "--out", Existing::Dir, &inputs, force)?;
    // Merge in f32 whatever the output dtype: W + s * B A is then rounded once.
    let mut loaded = load_pretrained(model, Some(adapter), DType::F32, &Device::Cpu)?;
    // A Hub id resolves to the cache: check that too.
    inputs.add("model", loaded.files.dir());
    check(out, "--out", Existing::Dir, &inputs, force)?;
    loaded.model.merge_lora()?;
    let dir = AtomicDir::new(out)?;
    save_pretrained(&loaded, dir.path(), dtype)?;
    if let Some(kind) = gguf {
        write_gguf(&loaded, &dir.path().join(gguf_file_name(kind)), kind)?;
    }
    dir.commit()?;
    eprintln!(
        "merged {} into {} -> {}{}",
        adapter.display(),
        model,
        out.display(),
        gguf.map(|k| format!(" (and {})", gguf_file_name(k)))
            .unwrap_or_default()
    );
    Ok(())
}

/// The GGUF file's name inside --out.
pub fn gguf_file_name(kind: GgufType) -> String {
    format!("model-{}.gguf", kind.name())
}
