//! `mo-align merge`: base + adapter folded into one Hugging Face checkpoint (safetensors,
//! config, tokenizer files) that transformers, vLLM and mo-align load as a plain model.

use crate::io::safetensors_bytes;
use crate::io::{refuse_nonempty, refuse_overlap, write_atomic, AtomicDir};
use crate::model::loader::{load_pretrained, Loaded};
use crate::model::{dtype_name, parse_dtype};
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use std::collections::HashMap;
use std::path::Path;

/// `mo-align merge`: refuses an `--out` that overlaps the model or the adapter, and an existing
/// non-empty `--out` without `force`; writes into a temporary sibling and renames at the end.
pub fn run(model: &str, adapter: &Path, out: &Path, dtype: &str, force: bool) -> Result<()> {
    let dtype = parse_dtype(dtype)?;
    let mut inputs = vec![("adapter", adapter)];
    let model_dir = Path::new(model);
    if model_dir.exists() {
        inputs.push(("model", model_dir));
    }
    refuse_overlap(out, "--out", &inputs)?;
    refuse_nonempty(out, "--out", force)?;
    // Merge in f32 whatever the output dtype: W + s * B A is then rounded once.
    let mut loaded = load_pretrained(model, Some(adapter), DType::F32, &Device::Cpu)?;
    // A Hub id resolves to the cache: check that too.
    refuse_overlap(out, "--out", &[("model", loaded.files.dir())])?;
    loaded.model.merge_lora()?;
    write_checkpoint(&loaded, out, dtype)?;
    eprintln!(
        "merged {} into {} -> {}",
        adapter.display(),
        model,
        out.display()
    );
    Ok(())
}

/// Writes `loaded`'s base weights (adapters must be merged) as an HF checkpoint directory.
pub fn write_checkpoint(loaded: &Loaded, out: &Path, dtype: DType) -> Result<()> {
    anyhow::ensure!(
        !loaded.model.has_lora(),
        "merge the adapters before writing a checkpoint"
    );
    let dir = AtomicDir::new(out)?;
    let tensors: HashMap<String, candle_core::Tensor> = loaded
        .model
        .named_weights()
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomic(
        &dir.path().join("model.safetensors"),
        &safetensors_bytes(&tensors, Some(meta))?,
    )?;
    // The original config with the new dtype (both the 4.x and 5.x keys).
    let text = std::fs::read_to_string(&loaded.files.config)
        .with_context(|| format!("{}: cannot read", loaded.files.config.display()))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text)?;
    let torch_dtype = match dtype_name(dtype) {
        "bf16" => "bfloat16",
        "f16" => "float16",
        _ => "float32",
    };
    cfg["torch_dtype"] = torch_dtype.into();
    if cfg.get("dtype").is_some() {
        cfg["dtype"] = torch_dtype.into();
    }
    write_atomic(
        &dir.path().join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    let src = loaded.files.dir();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
    ] {
        let p = if f == "tokenizer.json" {
            loaded.files.tokenizer.clone()
        } else {
            src.join(f)
        };
        if p.is_file() {
            let bytes =
                std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?;
            write_atomic(&dir.path().join(f), &bytes)?;
        }
    }
    dir.commit()
}
