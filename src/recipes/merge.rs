//! `mo-align merge`: base + adapter folded into one Hugging Face checkpoint (safetensors,
//! config, tokenizer files) that transformers, vLLM and mo-align load as a plain model, and
//! with `--gguf` a GGUF file beside it for llama.cpp, Ollama and LM Studio.
//!
//! The merge streams: each weight is read, has its adapter update added (in f32), and is
//! written to the checkpoint and the GGUF file before the next is read. Memory holds one
//! weight and the adapter, never the model, so a 7B model merges on a workstation.

use crate::model::dtype::parse_dtype;
use crate::model::gguf::{GgufSource, GgufType, GgufWriter};
use crate::model::loader::{
    check_layers, load_tokenizer, resolve, warn_if_other_base, write_model_files,
};
use crate::model::lora::merged_weight;
use crate::model::peft::{read_peft_config, read_peft_tensors};
use crate::model::qwen::module_name;
use crate::model::streaming::{peak_rss_bytes, CheckpointWriter, StreamedWeights};
use crate::model::QwenConfig;
use crate::outputs::{check, Existing, Inputs};
use crate::util::io::AtomicDir;
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use std::path::Path;

pub use crate::model::streaming::DEFAULT_SHARD_BYTES;

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
    run_sharded(model, adapter, out, dtype, force, gguf, DEFAULT_SHARD_BYTES)
}

/// `run` with checkpoint files of at most `shard_bytes` each (one tensor larger than that gets
/// a file of its own), as transformers' `max_shard_size`.
pub fn run_sharded(
    model: &str,
    adapter: &Path,
    out: &Path,
    dtype: &str,
    force: bool,
    gguf: Option<&str>,
    shard_bytes: u64,
) -> Result<()> {
    let dtype = match parse_dtype(dtype)? {
        DType::F64 => bail!("--dtype f64: a checkpoint is written in f32, bf16 or f16"),
        d => d,
    };
    let gguf = gguf.map(GgufType::parse).transpose()?;
    // A merge killed earlier may have left its temporary directory, or the old output moved
    // aside: tidied (or put back) before --out is judged.
    crate::util::io::clean_stale_siblings(out)?;
    let mut inputs = Inputs::new();
    inputs.add("adapter", adapter).add("model", model);
    check(out, "--out", Existing::Dir, &inputs, force)?;
    let files = resolve(model)?;
    // A Hub id resolves to the cache: check that too.
    inputs.add("model", files.dir());
    check(out, "--out", Existing::Dir, &inputs, force)?;

    // Everything is read and checked before the output directory exists.
    let config = QwenConfig::from_file(&files.config)?;
    let weights = StreamedWeights::open(&files.weights)?;
    check_layers(&config, &files, weights.layer_count())?;
    let tokenizer = load_tokenizer(&files, &config)?;
    warn_if_other_base(model, adapter);
    let lora = read_peft_config(adapter)?;
    let mut deltas = read_peft_tensors(adapter, &Device::Cpu)?;
    let adapter_file = adapter.join("adapter_model.safetensors");
    let mut plan = config.weight_shapes();
    plan.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, shape) in &plan {
        if !weights.contains(name) {
            bail!("{}: tensor `{name}` is missing", files.weights.display());
        }
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        match deltas.get(module) {
            Some((a, b)) if a.dims() != [lora.r, shape[1]] || b.dims() != [shape[0], lora.r] => {
                bail!(
                    "{}: {module}: lora_A {:?} / lora_B {:?} do not fit r={} and weight {shape:?}",
                    adapter_file.display(),
                    a.dims(),
                    b.dims(),
                    lora.r
                );
            }
            Some(_) => {}
            None if module.starts_with("model.layers.") && lora.targets(module_name(module)) => {
                bail!(
                    "{}: no lora_A/lora_B for `{module}` although target_modules names {}",
                    adapter_file.display(),
                    module_name(module)
                )
            }
            None => {}
        }
    }
    if let Some(extra) = deltas.keys().find(|m| {
        !plan
            .iter()
            .any(|(n, _)| n.strip_suffix(".weight") == Some(m.as_str()))
    }) {
        bail!(
            "{}: adapter has weights for `{extra}`, which this model does not have",
            adapter_file.display()
        );
    }

    let dir = AtomicDir::new(out)?;
    let typed: Vec<_> = plan
        .iter()
        .map(|(n, s)| (n.clone(), dtype, s.clone()))
        .collect();
    let mut checkpoint = CheckpointWriter::create(dir.path(), &typed, shard_bytes)?;
    let mut gguf_writer = match gguf {
        Some(kind) => Some(GgufWriter::create(
            &dir.path().join(gguf_file_name(kind)),
            &GgufSource {
                config: &config,
                files: &files,
                tokenizer: &tokenizer,
            },
            kind,
            &plan,
        )?),
        None => None,
    };
    // In name order: the order both writers planned.
    for (name, shape) in &plan {
        // Merged in f32 whatever the output dtype: W + s * B A is then rounded once.
        let w = weights.read(name, shape)?.to_dtype(DType::F32)?;
        let delta = name.strip_suffix(".weight").and_then(|m| deltas.remove(m));
        let w = match delta {
            Some((a, b)) => merged_weight(
                &w,
                &a.to_dtype(DType::F32)?,
                &b.to_dtype(DType::F32)?,
                lora.scale(),
            )?,
            None => w,
        };
        checkpoint.write(name, &w.to_dtype(dtype)?)?;
        if let Some(g) = gguf_writer.as_mut() {
            g.write(name, &w)?;
        }
    }
    checkpoint.finish()?;
    if let Some(g) = gguf_writer {
        g.finish()?;
    }
    write_model_files(&files, dir.path(), dtype)?;
    dir.commit()?;
    let peak = peak_rss_bytes()
        .map(|b| format!("; peak memory {:.0} MB", b as f64 / 1e6))
        .unwrap_or_default();
    eprintln!(
        "merged {} into {} -> {}{}{peak}",
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
