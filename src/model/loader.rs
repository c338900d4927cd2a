//! Finding and loading a checkpoint: a local directory in the Hugging Face layout, or a Hub repo
//! id resolved through `hf-hub` (its cache, `HF_HOME`, and offline mode with `HF_HUB_OFFLINE=1`).
//! Weights are memory-mapped safetensors, one file or shards listed in
//! `model.safetensors.index.json`. Every failure names the file and the tensor.

use super::config::QwenConfig;
use super::qwen::Qwen;
use crate::util::hub;
use crate::util::io::{safetensors_bytes, write_atomic};
use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_MODEL: &str = "Qwen/Qwen2.5-0.5B";

/// The files of one checkpoint.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user named: a directory or a Hub repo id.
    pub name: String,
    pub config: PathBuf,
    /// The single weights file, or the shard index (its shards sit beside it).
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_config: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
}

impl ModelFiles {
    pub fn dir(&self) -> &Path {
        self.config.parent().unwrap_or(Path::new("."))
    }
}

/// Loads `spec` and folds `merged_adapter` (if any) into its weights: the frozen base of a later
/// stage, a reward model's backbone, an evaluation's reference.
pub fn load_merged(
    spec: &str,
    merged_adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<Loaded> {
    let mut loaded = load_pretrained(spec, merged_adapter, dtype, device)?;
    loaded.model.merge_lora()?;
    // Folded into the weights: nothing is left to switch off.
    loaded.adapter = None;
    Ok(loaded)
}

/// Whether `spec` has the form of a Hub repo id (`org/name`) rather than a local path.
pub fn looks_like_repo(spec: &str) -> bool {
    spec.split('/').count() == 2
        && !spec.starts_with('.')
        && !spec.starts_with('/')
        && spec.split('/').all(|p| !p.is_empty())
}

/// Resolves `spec` (a directory, or `org/name` on the Hub) to local files.
pub fn resolve(spec: &str) -> Result<ModelFiles> {
    let path = Path::new(spec);
    if path.is_dir() {
        return local_files(spec, path);
    }
    if !looks_like_repo(spec) {
        bail!("{spec}: no such model directory (and not a Hub repo id like `Qwen/Qwen2.5-0.5B`)");
    }
    hub_files(spec)
}

fn local_files(spec: &str, dir: &Path) -> Result<ModelFiles> {
    let need = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            bail!("{}: missing (model directory {spec})", p.display())
        }
    };
    let opt = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    let index = dir.join("model.safetensors.index.json");
    let weights = if index.is_file() {
        index
    } else {
        need("model.safetensors")?
    };
    Ok(ModelFiles {
        name: spec.to_string(),
        config: need("config.json")?,
        weights,
        tokenizer: need("tokenizer.json")?,
        tokenizer_config: opt("tokenizer_config.json"),
        generation_config: opt("generation_config.json"),
    })
}

fn hub_files(repo_id: &str) -> Result<ModelFiles> {
    let cache = hf_hub::Cache::from_env();
    if hub::offline() {
        let repo = cache.model(repo_id.to_string());
        let need = |name: &str| -> Result<PathBuf> {
            repo.get(name).with_context(|| {
                format!(
                    "{repo_id}: `{name}` is not in the Hub cache {} and HF_HUB_OFFLINE is set",
                    cache.path().display()
                )
            })
        };
        let config = need("config.json")?;
        let weights = match repo.get("model.safetensors.index.json") {
            Some(p) => {
                for shard in shard_names(&p)? {
                    need(&shard)?;
                }
                p
            }
            None => need("model.safetensors")?,
        };
        return Ok(ModelFiles {
            name: repo_id.to_string(),
            config,
            weights,
            tokenizer: need("tokenizer.json")?,
            tokenizer_config: repo.get("tokenizer_config.json"),
            generation_config: repo.get("generation_config.json"),
        });
    }
    let repo = hub::client(cache, repo_id)?.model(repo_id.to_string());
    let get = |name: &str| -> Result<PathBuf> {
        repo.get(name).with_context(|| {
            format!(
                "{repo_id}: cannot download `{name}` (set HF_HUB_OFFLINE=1 to use the cache only)"
            )
        })
    };
    let config = get("config.json")?;
    let weights = match repo.get("model.safetensors.index.json") {
        Ok(p) => {
            for shard in shard_names(&p)? {
                get(&shard)?;
            }
            p
        }
        Err(_) => get("model.safetensors")?,
    };
    Ok(ModelFiles {
        name: repo_id.to_string(),
        config,
        weights,
        tokenizer: get("tokenizer.json")?,
        tokenizer_config: repo.get("tokenizer_config.json").ok(),
        generation_config: repo.get("generation_config.json").ok(),
    })
}

/// Shard file names listed in a `model.safetensors.index.json`.
fn shard_names(index: &Path) -> Result<Vec<String>> {
    Ok(read_index(index)?
        .into_values()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect())
}

fn read_index(index: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("{}: cannot read", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
    map.iter()
        .map(|(k, f)| {
            let f = f
                .as_str()
                .with_context(|| format!("{}: weight_map[{k}] is not a string", index.display()))?;
            Ok((k.clone(), f.to_string()))
        })
        .collect()
}

/// The safetensors files of `weights`: the file itself, or the shards its index lists (each
/// checked to exist).
pub fn weight_paths(weights: &Path) -> Result<Vec<PathBuf>> {
    if weights.extension().is_none_or(|e| e != "json") {
        if !weights.is_file() {
            bail!("{}: missing", weights.display());
        }
        return Ok(vec![weights.to_path_buf()]);
    }
    let dir = weights.parent().unwrap_or(Path::new("."));
    let paths: Vec<PathBuf> = shard_names(weights)?
        .into_iter()
        .map(|s| dir.join(s))
        .collect();
    if let Some(p) = paths.iter().find(|p| !p.is_file()) {
        bail!("{}: missing (listed in {})", p.display(), weights.display());
    }
    Ok(paths)
}

/// The number of decoder layers among tensor `names` (`model.layers.N.*`).
pub fn layer_count<'a>(names: impl Iterator<Item = &'a String>) -> usize {
    names
        .filter_map(|n| {
            n.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

/// Refuses a config that declares more layers than the weights hold (`held`), before anything
/// is allocated for them (the layer list is sized from the config).
pub fn check_layers(cfg: &super::QwenConfig, files: &ModelFiles, held: usize) -> Result<()> {
    if cfg.num_hidden_layers > held {
        bail!(
            "{}: num_hidden_layers is {}, but {} holds {held} layers",
            files.config.display(),
            cfg.num_hidden_layers,
            files.weights.display()
        );
    }
    Ok(())
}

/// Memory-mapped weights, remembering which file holds each tensor for error messages.
pub struct WeightFiles {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    owner: HashMap<String, usize>,
    /// What errors call the weights as a whole (the single file or the index).
    label: PathBuf,
}

impl WeightFiles {
    pub fn open(weights: &Path) -> Result<Self> {
        let paths = weight_paths(weights)?;
        let mut files = vec![];
        let mut owner = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            // SAFETY: the file is only read; mo-align never writes a checkpoint it has mapped.
            let st = unsafe { MmapedSafetensors::new(p) }.map_err(|e| {
                anyhow::anyhow!("{}: not a valid safetensors file ({e})", p.display())
            })?;
            for (name, _) in st.tensors() {
                owner.insert(name, i);
            }
            files.push((p.clone(), st));
        }
        Ok(Self {
            files,
            owner,
            label: weights.to_path_buf(),
        })
    }

    /// The number of decoder layers the weights hold (`model.layers.N.*`).
    pub fn layer_count(&self) -> usize {
        layer_count(self.owner.keys())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.owner.contains_key(name)
    }

    /// Loads `name`, checks its shape, converts it to `dtype`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let idx = *self
            .owner
            .get(name)
            .with_context(|| format!("{}: tensor `{name}` is missing", self.label.display()))?;
        let (path, st) = &self.files[idx];
        let view = st
            .get(name)
            .map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
        if view.shape() != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?}, expected {:?} from config.json",
                path.display(),
                view.shape(),
                shape
            );
        }
        let t = st
            .load(name, device)
            .map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
        Ok(t.to_dtype(dtype)?)
    }
}

/// Loads a Qwen2 model (no adapters) from resolved files.
pub fn load_model(files: &ModelFiles, dtype: DType, device: &Device) -> Result<Qwen> {
    let cfg = QwenConfig::from_file(&files.config)?;
    load_with_config(files, cfg, dtype, device)
}

pub fn load_with_config(
    files: &ModelFiles,
    cfg: QwenConfig,
    dtype: DType,
    device: &Device,
) -> Result<Qwen> {
    let w = WeightFiles::open(&files.weights)?;
    check_layers(&cfg, files, w.layer_count())?;
    Qwen::build(cfg, |name, shape| w.load(name, shape, dtype, device))
}

/// Attaches the PEFT adapter in `dir` (ours or PEFT's own files) to `model`.
/// Warns when an adapter says it was trained on another base than `spec`: PEFT writes the base
/// into `base_model_name_or_path`. Names are compared by their last path component (a Hub id
/// and its local snapshot agree), so only a real mismatch is reported.
pub fn warn_if_other_base(spec: &str, adapter_dir: &Path) {
    let path = adapter_dir.join("adapter_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let recorded = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["base_model_name_or_path"].as_str().map(str::to_string))
        .unwrap_or_default();
    let last = |s: &str| {
        s.trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    let same_path = match (
        Path::new(&recorded).canonicalize(),
        Path::new(spec).canonicalize(),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !recorded.is_empty() && !same_path && last(&recorded) != last(spec) {
        eprintln!(
            "warning: {}: the adapter was trained on `{recorded}`, and is applied to `{spec}`",
            path.display()
        );
    }
}

/// A Rewarded soup: `spec` (with `merged_adapter` folded in) plus sum_i w_i * delta_i, where
/// delta_i = s_i B_i A_i is adapter i's LoRA update, folded into the weights in order. The
/// deltas mix linearly, so a soup at (1, 0, ...) is exactly the first adapter merged.
pub fn load_soup(
    spec: &str,
    merged_adapter: Option<&Path>,
    adapters: &[&Path],
    weights: &[f64],
    dtype: DType,
    device: &Device,
) -> Result<Loaded> {
    if adapters.len() != weights.len() {
        bail!(
            "a soup of {} adapters needs {} weights, got {}",
            adapters.len(),
            adapters.len(),
            weights.len()
        );
    }
    let mut loaded = load_merged(spec, merged_adapter, dtype, device)?;
    for (dir, w) in adapters.iter().zip(weights) {
        apply_adapter(&mut loaded.model, dir)?;
        loaded.model.scale_lora(*w);
        loaded.model.merge_lora()?;
    }
    Ok(loaded)
}

pub fn apply_adapter(model: &mut Qwen, dir: &Path) -> Result<super::LoraConfig> {
    let cfg = super::peft::read_peft_config(dir)?;
    let mut tensors = super::peft::read_peft_tensors(dir, &model.device)?;
    let file = dir.join("adapter_model.safetensors");
    for lin in model.linears_mut() {
        let name = super::qwen::module_name(&lin.path).to_string();
        match tensors.remove(&lin.path) {
            Some((a, b)) => lin
                .attach(&cfg, a, b)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?,
            None if cfg.targets(&name) => {
                bail!(
                    "{}: no lora_A/lora_B for `{}` although target_modules names {name}",
                    file.display(),
                    lin.path
                )
            }
            None => {}
        }
    }
    if let Some(extra) = tensors.keys().next() {
        bail!(
            "{}: adapter has weights for `{extra}`, which this model does not have",
            file.display()
        );
    }
    Ok(cfg)
}

/// `cpu`, `cuda`, `cuda:N`, or `auto` (the GPU when built with `cuda` and one is present).
pub fn select_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            // `cuda_is_available` only says the feature is compiled in; a CUDA build on a
            // machine without a GPU must still run on the CPU.
            if candle_core::utils::cuda_is_available() {
                Ok(tuned(Device::new_cuda(0).unwrap_or(Device::Cpu)))
            } else {
                Ok(Device::Cpu)
            }
        }
        _ => {
            let ordinal = match name.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .with_context(|| {
                        format!("bad device `{name}` (expected cpu, cuda, cuda:N or auto)")
                    })?,
                None => bail!("bad device `{name}` (expected cpu, cuda, cuda:N or auto)"),
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("device `{name}`: this binary was built without the `cuda` feature or no GPU is visible");
            }
            Ok(tuned(Device::new_cuda(ordinal)?))
        }
    }
}

/// The device with mo-align's CUDA settings (see `kernels::cuda::tune_device`).
fn tuned(device: Device) -> Device {
    #[cfg(feature = "cuda")]
    crate::kernels::cuda::tune_device(&device);
    device
}

/// A model ready for inference or training: weights, tokenizer, and optional adapter.
pub struct Loaded {
    pub model: Qwen,
    pub tokenizer: crate::tokenizer::ChatTokenizer,
    pub files: ModelFiles,
    pub adapter: Option<super::LoraConfig>,
}

impl Loaded {
    /// The checkpoint's `generation_config.json` (decoding defaults), if it has a readable one.
    pub fn generation_config(&self) -> Option<serde_json::Value> {
        let path = self.files.dir().join("generation_config.json");
        let text = std::fs::read_to_string(&path).ok()?;
        match serde_json::from_str(&text) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("warning: {}: not valid JSON ({e}); ignored", path.display());
                None
            }
        }
    }
}

/// The model's tokenizer, refused when it has more tokens than the embedding has rows.
pub fn load_tokenizer(
    files: &ModelFiles,
    config: &super::QwenConfig,
) -> Result<crate::tokenizer::ChatTokenizer> {
    let tokenizer = crate::tokenizer::ChatTokenizer::from_file(&files.tokenizer)?;
    if tokenizer.vocab_size() > config.vocab_size {
        bail!(
            "{}: tokenizer has {} tokens but config.json vocab_size is {}",
            files.tokenizer.display(),
            tokenizer.vocab_size(),
            config.vocab_size
        );
    }
    Ok(tokenizer)
}

pub fn load_pretrained(
    spec: &str,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<Loaded> {
    let files = resolve(spec)?;
    let mut model = load_model(&files, dtype, device)?;
    let tokenizer = load_tokenizer(&files, &model.config)?;
    let adapter = match adapter {
        Some(dir) => {
            warn_if_other_base(spec, dir);
            Some(apply_adapter(&mut model, dir)?)
        }
        None => None,
    };
    Ok(Loaded {
        model,
        tokenizer,
        files,
        adapter,
    })
}

/// Writes `loaded`'s base weights (adapters must be merged) into `dir` as a Hugging Face
/// checkpoint: model.safetensors in `dtype`, config.json with that dtype, and the tokenizer and
/// generation files, each file atomically. The inverse of `load_pretrained`.
pub fn save_pretrained(loaded: &Loaded, dir: &Path, dtype: DType) -> Result<()> {
    anyhow::ensure!(
        !loaded.model.has_lora(),
        "merge the adapters before writing a checkpoint"
    );
    let tensors: HashMap<String, candle_core::Tensor> = loaded
        .model
        .named_weights()
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomic(
        &dir.join("model.safetensors"),
        &safetensors_bytes(&tensors, Some(meta))?,
    )?;
    write_model_files(&loaded.files, dir, dtype)
}

/// A checkpoint's files other than its weights: config.json with `dtype` recorded, and the
/// tokenizer and generation files copied, each atomically.
pub fn write_model_files(files: &ModelFiles, dir: &Path, dtype: DType) -> Result<()> {
    // The original config with the new dtype (both the 4.x and 5.x keys).
    let text = std::fs::read_to_string(&files.config)
        .with_context(|| format!("{}: cannot read", files.config.display()))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text)?;
    let torch_dtype = match super::dtype::dtype_name(dtype) {
        "bf16" => "bfloat16",
        "f16" => "float16",
        _ => "float32",
    };
    cfg["torch_dtype"] = torch_dtype.into();
    if cfg.get("dtype").is_some() {
        cfg["dtype"] = torch_dtype.into();
    }
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    let src = files.dir();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
    ] {
        let p = if f == "tokenizer.json" {
            files.tokenizer.clone()
        } else {
            src.join(f)
        };
        if p.is_file() {
            let bytes =
                std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?;
            write_atomic(&dir.join(f), &bytes)?;
        }
    }
    Ok(())
}
