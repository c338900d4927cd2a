//! On-disk caches for work that depends only on frozen things: reference log-probs
//! (`objectives::pair`), reward features and reward-model scores (`reward::features`). Entries are safetensors files
//! named by a digest of everything the values depend on (the model's files, the merged adapter,
//! the exact token ids, the settings), so a rerun or a later epoch skips the computation and any
//! change misses the cache.

use crate::model::loader::ModelFiles;
use crate::util::digest::Digest;
use crate::util::io::{safetensors_bytes, write_atomic};
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Digest of a checkpoint (config, weights, tokenizer) plus an optional adapter merged into it.
pub fn model_digest(files: &ModelFiles, adapter: Option<&Path>, dtype: &str) -> Result<Digest> {
    let mut d = Digest::default();
    d.str(dtype);
    d.file(&files.config)?
        .file(&files.weights)?
        .file(&files.tokenizer)?;
    if files.weights.extension().is_some_and(|e| e == "json") {
        let dir = files.weights.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        shards.sort();
        for s in shards {
            d.file(&s)?;
        }
    }
    if let Some(a) = adapter {
        d.file(&a.join("adapter_config.json"))?
            .file(&a.join("adapter_model.safetensors"))?;
    }
    Ok(d)
}

/// Where caches live: `dir` if given, else `$MO_ALIGN_CACHE`, else `$XDG_CACHE_HOME/mo-align`
/// or `~/.cache/mo-align`.
pub fn cache_dir(dir: Option<&str>) -> PathBuf {
    if let Some(d) = dir.filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Ok(d) = std::env::var("MO_ALIGN_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|_| std::env::temp_dir());
    base.join("mo-align")
}

/// Returns the cached tensors for (`kind`, `key`), computing and storing them on a miss.
/// The bool says whether it was a hit.
pub fn load_or_compute(
    dir: &Path,
    kind: &str,
    key: &Digest,
    device: &Device,
    compute: impl FnOnce() -> Result<HashMap<String, Tensor>>,
) -> Result<(HashMap<String, Tensor>, bool)> {
    let path = dir.join(format!("{kind}-{}.safetensors", key.hex()));
    if path.is_file() {
        if let Ok(t) = candle_core::safetensors::load(&path, device) {
            return Ok((t, true));
        }
    }
    let tensors = compute()?;
    let meta = HashMap::from([
        ("kind".to_string(), kind.to_string()),
        ("key".to_string(), key.hex()),
    ]);
    let cpu: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    write_atomic(&path, &safetensors_bytes(&cpu, Some(meta))?)?;
    Ok((tensors, false))
}
