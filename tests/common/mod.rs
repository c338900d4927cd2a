//! Shared test fixtures: the tiny checkpoint (written once per test binary) and golden files.
#![allow(dead_code)]

pub mod readiness;

use candle_core::{DType, Device};
use mo_align::model::loader::{load_pretrained, Loaded};
use mo_align::model::ForwardCtx;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The tiny checkpoints the goldens were made from: `init-tiny --seed 0`, and the same with
/// `--arch qwen3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tiny {
    Qwen2,
    Qwen3,
}

impl Tiny {
    pub const BOTH: [Tiny; 2] = [Tiny::Qwen2, Tiny::Qwen3];

    /// The checkpoint, written once per test binary into a temp dir.
    pub fn dir(self) -> &'static Path {
        static DIRS: [OnceLock<PathBuf>; 2] = [OnceLock::new(), OnceLock::new()];
        DIRS[self as usize].get_or_init(|| {
            let (name, spec) = match self {
                Tiny::Qwen2 => ("tiny", mo_align::model::tiny::TinySpec::default()),
                Tiny::Qwen3 => ("tiny-qwen3", mo_align::model::tiny::TinySpec::qwen3()),
            };
            let dir =
                std::env::temp_dir().join(format!("mo-align-test-{name}-{}", std::process::id()));
            mo_align::model::tiny::write_tiny_checkpoint_of(&dir, 0, &spec).expect("init-tiny");
            dir
        })
    }

    pub fn load(self, dtype: DType) -> Loaded {
        load_pretrained(self.dir().to_str().unwrap(), None, dtype, &Device::Cpu).expect("load tiny")
    }

    pub fn golden_dir(self) -> PathBuf {
        repo_root().join(match self {
            Tiny::Qwen2 => "tests/golden/tiny_seed0",
            Tiny::Qwen3 => "tests/golden/tiny_qwen3_seed0",
        })
    }

    pub fn golden(self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.golden_dir().join("reference.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// The token sequences the goldens were computed on.
    pub fn seqs(self) -> Vec<Vec<u32>> {
        self.golden()["seqs"]
            .as_array()
            .unwrap()
            .iter()
            .map(json_u32s)
            .collect()
    }

    /// Scores of a sequence-classification judge on this base (benches/peer/golden_judge.py).
    pub fn judge_golden(self) -> PathBuf {
        repo_root().join(match self {
            Tiny::Qwen2 => "tests/golden/judge_tiny.json",
            Tiny::Qwen3 => "tests/golden/judge_tiny_qwen3.json",
        })
    }
}

/// The tiny Qwen2 checkpoint of `init-tiny --seed 0`.
pub fn tiny_dir() -> &'static Path {
    Tiny::Qwen2.dir()
}

pub fn load_tiny(dtype: DType) -> Loaded {
    Tiny::Qwen2.load(dtype)
}

/// The repository root: the current directory when it is one (cargo runs tests there; a test
/// binary carried to a GPU machine runs from a copied checkout), else where it was compiled.
pub fn repo_root() -> PathBuf {
    match std::env::current_dir() {
        Ok(cwd) if cwd.join("tests/golden/tiny_seed0").is_dir() => cwd,
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

pub fn golden_dir() -> PathBuf {
    Tiny::Qwen2.golden_dir()
}

pub fn golden_seqs() -> Vec<Vec<u32>> {
    Tiny::Qwen2.seqs()
}

pub fn golden() -> serde_json::Value {
    Tiny::Qwen2.golden()
}

/// A fresh, empty scratch directory under the system temp dir.
pub fn scratch(name: &str) -> PathBuf {
    // Unique per call: tests run in parallel and must never share (or wipe) a directory.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("mo-align-test-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mo-align")
}

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

pub fn json_f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

pub fn json_u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Adapters on, gradients recorded, no dropout.
pub fn train_ctx() -> ForwardCtx<'static> {
    ForwardCtx {
        grad: true,
        ..ForwardCtx::EVAL
    }
}

/// Which decoder a gradient test runs: the fused one (`model::stack`, adapter gradients in a
/// sink, as the trainer runs it) or the unfused blocks (candle's gradient store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    Fused,
    Unfused,
}

impl Decoder {
    pub const BOTH: [Decoder; 2] = [Decoder::Fused, Decoder::Unfused];
}

/// One backward of a test on either decoder.
pub struct GradRun {
    pub decoder: Decoder,
    sink: std::sync::Arc<mo_align::model::ctx::GradSink>,
}

impl GradRun {
    pub fn new(decoder: Decoder) -> Self {
        GradRun {
            decoder,
            sink: mo_align::model::ctx::GradSink::new(),
        }
    }

    /// Adapters on, gradients recorded, no dropout, on this run's decoder.
    pub fn ctx(&self) -> ForwardCtx<'_> {
        match self.decoder {
            Decoder::Fused => train_ctx().with_sink(&self.sink),
            Decoder::Unfused => train_ctx(),
        }
    }

    /// Every adapter tensor's gradient after `loss.backward()`, in `lora_vars` order; a
    /// tensor without one is a test failure.
    pub fn lora_grads(
        &self,
        loss: &candle_core::Tensor,
        m: &mo_align::model::Qwen,
    ) -> Vec<(String, candle_core::Tensor)> {
        let store = loss.backward().unwrap();
        m.lora_vars()
            .into_iter()
            .map(|(name, v)| {
                let g = match (
                    store.get(v.as_tensor()).cloned(),
                    self.sink.take(v.as_tensor().id()),
                ) {
                    (Some(g), None) | (None, Some(g)) => g,
                    (Some(_), Some(_)) => panic!("{name}: a gradient from both decoders"),
                    (None, None) => panic!("{name}: no gradient ({:?})", self.decoder),
                };
                (name, g)
            })
            .collect()
    }
}

/// How a recipe is run from a test.
pub fn flags(resume: bool, quiet: bool) -> mo_align::recipes::RunFlags {
    mo_align::recipes::RunFlags {
        resume,
        quiet,
        ..Default::default()
    }
}

/// Train and validation examples, with what happened to the records of each.
pub type SftData = (
    Vec<mo_align::tokenizer::LabelledIds>,
    Vec<mo_align::tokenizer::LabelledIds>,
    mo_align::data::DataReport,
    Option<mo_align::data::DataReport>,
);

/// Loads, validates, tokenises and splits SFT data as `mo-align sft` does.
pub fn load_sft_data(
    data: &mo_align::data::DataConfig,
    tok: &mo_align::tokenizer::ChatTokenizer,
) -> anyhow::Result<SftData> {
    let s = mo_align::data::load_splits(data, |v, r| {
        mo_align::data::chat::sft_example(v, tok, data, r)
    })?;
    Ok((s.train, s.val, s.train_report, s.val_report))
}

/// Greedy decoding that recomputes the whole prefix every step (no cache). Slow; the reference
/// the KV-cache path is tested against.
pub fn greedy_no_cache(
    model: &mo_align::model::Qwen,
    prompt: &[u32],
    max_new_tokens: usize,
    ctx: ForwardCtx,
) -> candle_core::Result<Vec<u32>> {
    let mut seq = prompt.to_vec();
    let mut out = vec![];
    for _ in 0..max_new_tokens {
        let input = mo_align::model::input::ModelInput::right_padded(
            std::slice::from_ref(&seq),
            0,
            &model.device,
        )?;
        let hidden = model.forward(&input, ctx, None)?;
        let last = hidden.narrow(1, seq.len() - 1, 1)?.squeeze(1)?;
        let tok = mo_align::generate::argmax(&model.logits(&last)?.squeeze(0)?.to_vec1::<f32>()?);
        seq.push(tok);
        out.push(tok);
    }
    Ok(out)
}

/// Largest |a - b| over two tensors of the same shape (any float dtype).
pub fn tensor_max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The lines of a run's `metrics.jsonl`.
pub fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Sum of squares of every lora_B in the adapter saved in `dir` (0 for a fresh adapter: B starts
/// at zero, so it tells whether training moved it).
pub fn lora_b_norm(dir: &Path) -> f64 {
    let path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: no adapter: {e}", path.display()));
    tensors
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .map(|(_, t)| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .sum()
}

/// `tiny`'s checkpoint turned into a `Qwen2ForSequenceClassification` /
/// `Qwen3ForSequenceClassification` reward model with score head `score` [labels, hidden].
pub fn classifier_checkpoint_on(tiny: Tiny, name: &str, score: &candle_core::Tensor) -> PathBuf {
    let dir = scratch(name);
    for f in std::fs::read_dir(tiny.dir()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let class = match tiny {
        Tiny::Qwen2 => "Qwen2ForSequenceClassification",
        Tiny::Qwen3 => "Qwen3ForSequenceClassification",
    };
    cfg["architectures"] = serde_json::json!([class]);
    cfg["num_labels"] = 1.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut w =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    w.insert("score.weight".into(), score.clone());
    std::fs::write(
        dir.join("model.safetensors"),
        mo_align::util::io::safetensors_bytes(&w, None).unwrap(),
    )
    .unwrap();
    dir
}

/// 30 steps of the demo's LoRA SFT on `model` into `out`, asserting the loss falls (by 0.2 nats).
pub fn sft_lora_30_steps(model: &Path, out: &Path) -> mo_align::train::trainer::TrainOutcome {
    let sft = mo_align::recipes::sft::run(
        Some(Path::new("configs/demo/sft-lora.toml")),
        &[
            format!("model.path={:?}", model.to_str().unwrap()),
            format!("train.output_dir={:?}", out.to_str().unwrap()),
            "train.max_steps=30".into(),
        ],
        flags(false, true),
    )
    .unwrap();
    let (first, last) = (sft.first_loss.unwrap(), sft.last_loss.unwrap());
    assert!(
        last < first - 0.2,
        "{}: SFT loss did not fall: {first} -> {last}",
        model.display()
    );
    sft
}
