//! On-disk caches for work that depends only on frozen things: reference log-probs (here),
//! reward features and reward-model scores (`reward::features`). Entries are safetensors files
//! named by a digest of everything the values depend on (the model's files, the merged adapter,
//! the exact token ids, the settings), so a rerun or a later epoch skips the computation and any
//! change misses the cache.

use crate::data::preference::PreferencePair;
use crate::io::{safetensors_bytes, write_atomic};
use crate::model::loader::ModelFiles;
use crate::model::Qwen;
use crate::objectives::pair::{reference_logprobs, PairIds};
use crate::train::progress::Progress;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// FNV-1a, 64-bit: stable across platforms and Rust versions (unlike std's hasher).
#[derive(Clone)]
pub struct Digest(u64);

impl Default for Digest {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Digest {
    pub fn bytes(&mut self, data: &[u8]) -> &mut Self {
        for b in data {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(&(s.len() as u64).to_le_bytes())
            .bytes(s.as_bytes())
    }

    pub fn ids(&mut self, ids: &[u32]) -> &mut Self {
        self.bytes(&(ids.len() as u64).to_le_bytes());
        for i in ids {
            self.bytes(&i.to_le_bytes());
        }
        self
    }

    /// A file's identity: its name, size and modification time (contents of small files).
    pub fn file(&mut self, path: &Path) -> Result<&mut Self> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("{}: cannot stat", path.display()))?;
        self.str(&path.file_name().unwrap_or_default().to_string_lossy());
        self.bytes(&meta.len().to_le_bytes());
        if meta.len() <= 64 << 20 {
            let data =
                std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
            self.bytes(&data);
        } else if let Ok(m) = meta.modified() {
            let t = m.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            self.bytes(&t.as_nanos().to_le_bytes());
        }
        Ok(self)
    }

    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

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

/// Reference (adapters off) summed log-probs of every pair's chosen and rejected response, from
/// the cache or one no-grad pass (`model_key` identifies the frozen weights).
pub fn cached_reference(
    model: &Qwen,
    model_key: &Digest,
    pairs: &[PreferencePair],
    dir: &Path,
    quiet: bool,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut key = model_key.clone();
    key.str("dpo-reference-packed-v1");
    for p in pairs {
        key.ids(&p.prompt).ids(&p.chosen).ids(&p.rejected);
    }
    let (t, hit) = load_or_compute(dir, "reference", &key, &model.device, || {
        let bar = Progress::new(pairs.len() as u64, 0, quiet, "reference log-probs");
        let ids: Vec<PairIds<'_>> = pairs.iter().map(PreferencePair::ids).collect();
        let (c, r) = reference_logprobs(model, &ids, &|n| bar.set(n as u64, String::new()))?;
        bar.finish();
        let n = pairs.len();
        Ok(HashMap::from([
            ("chosen".to_string(), Tensor::from_vec(c, n, &model.device)?),
            (
                "rejected".to_string(),
                Tensor::from_vec(r, n, &model.device)?,
            ),
        ]))
    })?;
    if hit {
        eprintln!(
            "reference log-probs of {} pairs from the cache",
            pairs.len()
        );
    }
    Ok((t["chosen"].to_vec1()?, t["rejected"].to_vec1()?))
}
