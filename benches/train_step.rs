//! Speed and memory at tiny and real Qwen2.5-0.5B dimensions (random weights, random token ids,
//! no download), one JSON line per case:
//!
//!     cargo bench --bench train_step                  # every case, each in a fresh process
//!     cargo bench --bench train_step -- --only real   # cases whose name contains "real"
//!     cargo bench --bench train_step -- --case real-sft-b1-t256
//!     cargo bench --features cuda --bench train_step -- --device cuda --dtype bf16   # GPU cases
//!
//! `--device cuda` runs the `gpu` cases (real size, T = 1024) and reports the peak device memory
//! (driver-reported use, sampled every millisecond) and the model FLOP utilisation against the
//! card's dense bf16 peak (known cards by name, or `--peak-tflops X`); `--peak-tflops` also
//! gives an MFU on the CPU. FLOPs are nominal: what the PyTorch + PEFT step does per counted
//! token (see `nominal_flops_per_token`), so work mo-align skips shows up as a higher MFU.
//!
//! Modes (LoRA r 8, alpha 16, dropout 0.05 on all seven projections, f32, AdamW):
//! - `sft`: forward, backward, AdamW with the NLL over every position (what the reference
//!   PyTorch script in ../shared/tools/reference-env.sh times);
//! - `sftprompt`: the same with the first half of each sequence a prompt (no loss there), as
//!   in real SFT; PyTorch + PEFT computes full logits either way, so its cost is the `sft` row;
//! - `dpo`: pairs with a T/2 prompt and two T/2 responses (the PyTorch script's layout); the
//!   reference log-probs are one no-grad pass per pair per epoch, timed separately and added to
//!   the step, so tokens/s counts 2*B*T tokens per (step + reference pass) like PyTorch's;
//! - `forward`: no-grad forward plus log-probs at every position;
//! - `features`: reward-model feature extraction (last-token hidden states), no grad;
//! - `generate`: greedy KV-cache decoding, B prompts of T tokens, new tokens per second;
//!   `generate_sample` (`real-sample-*`) samples instead (temperature 0.7, top-p 0.9).
//! - `grpo`: one online step of `mo-align grpo` through the same objective: B prompts of T/2
//!   tokens, 4 completions each sampled to T/2 new tokens (temperature 1, no stop token), a
//!   4-objective reward head on the policy's own frozen weights (the adapter off, one feature
//!   pass), group advantages, and the policy-gradient update; tokens/s counts 4*B*T per step.
//!   `generation_s_median` and `scoring_s_median` split the step. Compare its peak RSS with the
//!   `dpo` case of the same tokens per step (`real-dpo-b2-t256`).
//!
//! - `gemm` (`micro-gemm-t256`): the machine's f32 matmul rate at the step's shapes, forward and
//!   input-gradient layouts; `best_gflops` is the ceiling to read the other cases against.
//! - `sample` / `sample_top_p` (`micro-sample-*`): the host's part of a sampled decoding step
//!   at Qwen2.5's 151,936-entry vocabulary, B rows picked in parallel as `generate` does and
//!   one after another, no model.
//!
//! Cases named `*-ckpt-*` recompute each decoder layer in the backward (activation
//! checkpointing, `train.recompute_layers = true`).
//!
//! Each case: 1 warm-up step, then the median of the timed steps. Peak RSS is the process's
//! VmHWM, so every case runs in its own process.

use candle_core::{DType, Device};
use mo_align::data::preference::PreferencePair;
use mo_align::generate::{generate, SamplingConfig};
use mo_align::model::ctx::ForwardCtx;
use mo_align::model::lora::LoraConfig;
use mo_align::model::tiny::{random_model, tiny_config};
use mo_align::model::{Qwen, QwenConfig};
use mo_align::objectives::dpo::{Dpo, DpoConfig, DpoExample};
use mo_align::objectives::nll::Nll;
use mo_align::objectives::online::{GrpoConfig, OnlinePolicyGradient, PromptExample, StopTokens};
use mo_align::objectives::pair::{reference_logprobs, PairIds};
use mo_align::objectives::weighting::Weighting;
use mo_align::reward::features::last_token_features;
use mo_align::reward::vector::CompletionScorer;
use mo_align::reward::FeatureSet;
use mo_align::reward::{RewardHead, RewardModelInfo};
use mo_align::tokenizer::LabelledIds;
use mo_align::train::checkpoint::TrainerState;
use mo_align::train::optim::{AdamW, AdamWParams};
use mo_align::train::trainer::{train_step, StepInputs};
use mo_align::train::{Objective, TrainConfig};
use mo_align::util::rng::stream_rng;
use rand::Rng;
use std::time::Instant;

struct Case {
    name: &'static str,
    real: bool,
    mode: &'static str,
    batch: usize,
    seq: usize,
    /// Timed steps (new tokens for `generate`).
    steps: usize,
}

const fn case(
    name: &'static str,
    real: bool,
    mode: &'static str,
    batch: usize,
    seq: usize,
    steps: usize,
) -> Case {
    Case {
        name,
        real,
        mode,
        batch,
        seq,
        steps,
    }
}

const CASES: [Case; 47] = [
    // Op counting (`scripts/count-ops.sh`): Qwen2.5-0.5B's structure (24 layers, 14/2 heads,
    // vocabulary 151,936, LoRA r 8 with dropout on all seven projections) at a narrow width, so
    // every op of the real step runs, each on small data; one timed step.
    case("count-sft-b4-t1024", false, "sft", 4, 1024, 1),
    case("count-dpo-b2-t1024", false, "dpo", 2, 1024, 1),
    case("count-generate-b16-t128", false, "generate", 16, 128, 2),
    // Byte accounting at the GPU step's real size (run with MO_ALIGN_TALLY_BF16=1 on the CPU to
    // count activations as bf16): `kernel_gbytes` of one step.
    case("bytes-sft-b4-t1024", true, "sft", 4, 1024, 1),
    case("bytes-dpo-b2-t1024", true, "dpo", 2, 1024, 1),
    case("micro-gemm-t256", true, "gemm", 1, 256, 5),
    case("micro-dropout-t256", true, "dropout", 1, 256, 5),
    case("micro-decode", true, "decode", 1, 1, 20),
    case("micro-sample-b16", true, "sample", 16, 1, 20),
    case("micro-sample-topp-b16", true, "sample_top_p", 16, 1, 20),
    case("real-fullsft-ckpt-b2-t1024", true, "fullsft", 2, 1024, 1),
    case("real-fullsft-b1-t256", true, "fullsft", 1, 256, 2),
    case("tiny-sft-b4-t128", false, "sft", 4, 128, 10),
    case("tiny-sftprompt-b4-t128", false, "sftprompt", 4, 128, 10),
    case("tiny-dpo-b4-t128", false, "dpo", 4, 128, 10),
    case("tiny-forward-b4-t128", false, "forward", 4, 128, 10),
    case("tiny-features-b8-t128", false, "features", 8, 128, 10),
    case("tiny-generate-b4-t32", false, "generate", 4, 32, 64),
    case("tiny-grpo-b4-t64", false, "grpo", 4, 64, 5),
    case("real-sft-b1-t256", true, "sft", 1, 256, 3),
    case("real-sftprompt-b1-t256", true, "sftprompt", 1, 256, 3),
    case("real-dpo-b1-t256", true, "dpo", 1, 256, 3),
    case("real-sft-b2-t512", true, "sft", 2, 512, 3),
    case("real-sftprompt-b2-t512", true, "sftprompt", 2, 512, 3),
    case("real-dpo-b2-t512", true, "dpo", 2, 512, 3),
    case("real-sft-ckpt-b1-t256", true, "sft", 1, 256, 3),
    case("real-sftprompt-ckpt-b1-t256", true, "sftprompt", 1, 256, 3),
    case("real-dpo-ckpt-b1-t256", true, "dpo", 1, 256, 3),
    case("real-sft-ckpt-b2-t512", true, "sft", 2, 512, 3),
    case("real-sftprompt-ckpt-b2-t512", true, "sftprompt", 2, 512, 3),
    case("real-dpo-ckpt-b2-t512", true, "dpo", 2, 512, 3),
    case("real-forward-b1-t256", true, "forward", 1, 256, 3),
    case("real-forward-b2-t512", true, "forward", 2, 512, 3),
    case("real-features-b8-t256", true, "features", 8, 256, 3),
    case("real-generate-b1-t64", true, "generate", 1, 64, 32),
    case("real-generate-b8-t64", true, "generate", 8, 64, 32),
    case("real-sample-b1-t64", true, "generate_sample", 1, 64, 32),
    case("real-sample-b8-t64", true, "generate_sample", 8, 64, 32),
    case("real-grpo-b1-t256", true, "grpo", 1, 256, 2),
    case("real-dpo-b2-t256", true, "dpo", 2, 256, 2),
    // GPU cases (run only with --device cuda): real size at T = 1024.
    case("gpu-sft-b4-t1024", true, "sft", 4, 1024, 10),
    case("gpu-sftprompt-b4-t1024", true, "sftprompt", 4, 1024, 10),
    case("gpu-dpo-b2-t1024", true, "dpo", 2, 1024, 10),
    case("gpu-sft-ckpt-b8-t1024", true, "sft", 8, 1024, 10),
    case("gpu-generate-b16-t128", true, "generate", 16, 128, 64),
    case("gpu-grpo-b4-t512", true, "grpo", 4, 512, 2),
    case("gpu-fullsft-b1-t1024", true, "fullsft", 1, 1024, 6),
];

/// The value after `flag` on the command line.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// What the benchmark runs on, from `--device` and `--dtype`.
struct Target {
    device: Device,
    device_name: String,
    dtype: DType,
}

fn target(args: &[String]) -> anyhow::Result<Target> {
    let value_of = |flag: &str| flag_value(args, flag);
    let dtype = match value_of("--dtype").as_deref().unwrap_or("f32") {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => anyhow::bail!("--dtype {other}: expected f32, bf16 or f16"),
    };
    let name = value_of("--device").unwrap_or_else(|| "cpu".into());
    let device = mo_align::model::loader::select_device(&name)?;
    let device_name = device_name(&device);
    Ok(Target {
        device,
        device_name,
        dtype,
    })
}

#[cfg(feature = "cuda")]
fn device_name(device: &Device) -> String {
    match device.as_cuda_device() {
        Ok(d) => d
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|_| "cuda".into()),
        Err(_) => "cpu".into(),
    }
}

#[cfg(not(feature = "cuda"))]
fn device_name(_: &Device) -> String {
    "cpu".into()
}

/// Dense bf16 tensor-core peak (TFLOP/s) of cards we know by name.
fn known_bf16_peak_tflops(name: &str) -> Option<f64> {
    let n = name.to_ascii_lowercase();
    [
        ("h200", 989.4),
        ("h100 pcie", 756.0),
        ("h100", 989.4),
        ("a100", 312.0),
        ("l40s", 362.0),
        ("4090", 165.2),
        ("a10g", 70.0),
    ]
    .iter()
    .find(|(k, _)| n.contains(k))
    .map(|(_, v)| *v)
}

/// Samples the device memory in use (driver free/total) every millisecond on its own thread and
/// keeps the maximum: candle allocates from CUDA's stream-ordered pool, which gives memory back
/// between steps, so a reading after the step would miss the peak.
struct DeviceMemoryPeak {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<f64>>,
}

impl DeviceMemoryPeak {
    #[cfg(feature = "cuda")]
    fn start(device: &Device) -> Option<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let ctx = device
            .as_cuda_device()
            .ok()?
            .cuda_stream()
            .context()
            .clone();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut peak = 0usize;
            if ctx.bind_to_thread().is_err() {
                return f64::NAN;
            }
            while !flag.load(Ordering::Relaxed) {
                if let Ok((free, total)) =
                    candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
                {
                    peak = peak.max(total - free);
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            peak as f64 / (1024.0 * 1024.0)
        });
        Some(Self {
            stop,
            handle: Some(handle),
        })
    }

    #[cfg(not(feature = "cuda"))]
    fn start(_: &Device) -> Option<Self> {
        None
    }

    fn finish(mut self) -> f64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or(f64::NAN)
    }
}

/// FLOPs per counted token of the step PyTorch + PEFT runs for `mode` (LoRA terms omitted):
/// a forward is 2 FLOPs per weight (the LM head at every position) plus causal attention
/// (QK^T and PV over T/2 keys on average: 2 T d per layer); a LoRA backward computes input
/// gradients only, another forward's worth for the weights and twice the attention. A DPO step
/// adds the reference forward. `features` skips the LM head; `generate` counts weights only.
fn nominal_flops_per_token(cfg: &QwenConfig, mode: &str, t: usize) -> f64 {
    let (h, i, l) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.num_hidden_layers as f64,
    );
    let d = (cfg.num_attention_heads * cfg.head_dim) as f64;
    let kv = (cfg.num_key_value_heads * cfg.head_dim) as f64;
    let per_layer = h * d + 2.0 * h * kv + d * h + 3.0 * h * i;
    let body = l * per_layer;
    let head = cfg.vocab_size as f64 * h;
    let attn = 2.0 * t as f64 * d * l;
    let fwd = 2.0 * (body + head) + attn;
    match mode {
        "sft" | "sftprompt" => 2.0 * fwd + attn,
        // Full fine-tuning adds the weight gradients: another forward's worth of products.
        "fullsft" => 3.0 * fwd + attn,
        "dpo" => 3.0 * fwd + attn,
        // Sampling (weights only, per new token), the reward features, and a LoRA step.
        "grpo" => 2.0 * (body + head) / 2.0 + (2.0 * body + attn) + 2.0 * fwd + attn,
        "forward" => fwd,
        "features" => 2.0 * body + attn,
        _ => 2.0 * (body + head),
    }
}

/// Qwen2.5-0.5B's structure (layers, heads, vocabulary, tied embeddings) at a narrow width:
/// the same ops as the real step, each on small data (op counting).
fn narrow_config() -> QwenConfig {
    QwenConfig {
        hidden_size: 56,
        intermediate_size: 64,
        head_dim: 4,
        ..real_config()
    }
}

fn real_config() -> QwenConfig {
    QwenConfig {
        family: mo_align::model::config::Family::Qwen2,
        attention_bias: true,
        vocab_size: 151936,
        hidden_size: 896,
        intermediate_size: 4864,
        num_hidden_layers: 24,
        num_attention_heads: 14,
        num_key_value_heads: 2,
        head_dim: 64,
        max_position_embeddings: 32768,
        rope_theta: 1e6,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: vec![151643],
    }
}

/// A `/proc/self/status` memory field (`VmHWM`, `VmRSS`) in MiB.
fn proc_status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| {
            l.strip_prefix(field)
                .is_some_and(|rest| rest.starts_with(':'))
        })
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn peak_rss_mib() -> f64 {
    proc_status_mib("VmHWM")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One optimizer step of `objective` over all `examples` as one micro-batch, through the
/// trainer's own `train_step` (dropout, recomputation, clipping, AdamW as in a real run):
/// (loss, [forward s, backward s, optimizer s]).
fn bench_step<O: Objective>(
    objective: &O,
    examples: &[O::Example],
    opt: &mut AdamW,
    step: u64,
    recompute: bool,
) -> anyhow::Result<(f64, [f64; 3])> {
    let cfg = TrainConfig {
        recompute_layers: recompute,
        seed: 0,
        ..TrainConfig::default()
    };
    let inputs = StepInputs {
        objective,
        examples,
        cfg: &cfg,
    };
    let state = TrainerState {
        step,
        loss_scale: 1.0,
        ..TrainerState::default()
    };
    let group = vec![(0..examples.len()).collect::<Vec<_>>()];
    // `count-*` cases: the debugger counts the ops of the first step after the warm-up.
    let window = COUNTING.load(std::sync::atomic::Ordering::Relaxed) && step == 1;
    if window {
        mo_align::util::profile::count_window(1);
    }
    mo_align::util::profile::take_tally();
    mo_align::util::profile::take_times();
    let stats = train_step(&inputs, opt, &state, &group, 1e-5)?;
    if window {
        mo_align::util::profile::count_window(0);
    }
    // The step's kernel launches and bytes per scope, and (MO_ALIGN_SCOPE_TIMERS=1) its
    // scope timings: the last step's are reported.
    LAST_STEP.with(|l| {
        *l.borrow_mut() = Some((
            mo_align::util::profile::take_tally(),
            mo_align::util::profile::take_times(),
        ))
    });
    if std::env::var("BENCH_RSS_TRACE").is_ok() {
        eprintln!("after step: peak {:.0} MiB", peak_rss_mib());
    }
    Ok((stats.loss, stats.phase_s))
}

type StepProfile = (
    std::collections::BTreeMap<String, mo_align::util::profile::Tally>,
    Vec<mo_align::util::profile::ScopeRow>,
);

thread_local! {
    static LAST_STEP: std::cell::RefCell<Option<StepProfile>> = const { std::cell::RefCell::new(None) };
}

/// Set for the `count-*` cases (see `bench_step`).
static COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn random_ids(rng: &mut impl Rng, n: usize, vocab: u32) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(0..vocab)).collect()
}

/// The machine's f32 matrix-multiply rate at the training step's shapes (T = `case.seq` rows):
/// the q/o projections, the MLP's up and down products, a slice of the LM head, in both the
/// forward layout (`x @ W^T`) and the input-gradient layout (`dy @ W`). The best of them is the
/// ceiling the other cases' `mfu` (with `--peak-tflops`) should be read against.
fn gemm_case(case: &Case, target: &Target) -> anyhow::Result<serde_json::Value> {
    use candle_core::Tensor;
    let cfg = real_config();
    let (t, h, i) = (case.seq, cfg.hidden_size, cfg.intermediate_size);
    let dev = &target.device;
    let mut shapes = vec![];
    for (k, n) in [(h, h), (h, i), (i, h), (h, 8192)] {
        let x = Tensor::randn(0f32, 1.0, (t, k), dev)?.to_dtype(target.dtype)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), dev)?.to_dtype(target.dtype)?;
        let dy = Tensor::randn(0f32, 1.0, (t, n), dev)?.to_dtype(target.dtype)?;
        for (layout, forward) in [("x@W^T", true), ("dy@W", false)] {
            let run = || {
                if forward {
                    x.matmul(&w.t()?)
                } else {
                    dy.matmul(&w)
                }
            };
            let mut times = vec![];
            for step in 0..=case.steps {
                let t0 = Instant::now();
                run()?;
                dev.synchronize()?;
                if step > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            let gflops = 2.0 * (t * k * n) as f64 / median(times) / 1e9;
            shapes.push(
                serde_json::json!({"m": t, "k": k, "n": n, "layout": layout, "gflops": gflops}),
            );
        }
    }
    let best = shapes
        .iter()
        .filter_map(|s| s["gflops"].as_f64())
        .fold(0.0, f64::max);
    Ok(serde_json::json!({
        "bench": "train_step",
        "case": case.name,
        "mode": "gemm",
        "T": t,
        "dtype": format!("{:?}", target.dtype).to_lowercase(),
        "device": target.device_name,
        "threads": candle_core::utils::get_num_threads(),
        "simd": mo_align::util::cpu::gemm_kernels(),
        "best_gflops": best,
        "shapes": shapes,
    }))
}

/// Decoding's products per shape: f32 gemm against the bf16-weight kernel (`model::decode`) at
/// 1..32 activation rows, on bf16-valued weights (as the published checkpoint holds). Picks
/// `decode::MAX_ROWS`: the kernel serves the rows where it wins.
fn decode_case(case: &Case, target: &Target) -> anyhow::Result<serde_json::Value> {
    use candle_core::Tensor;
    use mo_align::model::decode;
    let cfg = real_config();
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let dev = &target.device;
    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> anyhow::Result<f64> {
        let mut times = vec![];
        for step in 0..=case.steps {
            let t0 = Instant::now();
            f()?;
            if step > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        Ok(median(times))
    };
    let mut shapes = vec![];
    for (k, n) in [(h, h), (h, kv), (h, i), (i, h), (h, v)] {
        let w = Tensor::randn(0f32, 0.02, (n, k), dev)?
            .to_dtype(candle_core::DType::BF16)?
            .to_dtype(candle_core::DType::F32)?;
        let twin = decode::bf16_copy_if_exact(&w)?.expect("bf16 values");
        for m in [1usize, 2, 4, 8, 16, 32, 64] {
            let x = Tensor::randn(0f32, 1.0, (m, k), dev)?;
            let gemm_s = time(&|| x.matmul(&w.t()?))?;
            let kernel_s = time(&|| decode::bf16_rows_linear(&x, &twin, None))?;
            let flops = 2.0 * (m * k * n) as f64;
            shapes.push(serde_json::json!({
                "m": m, "k": k, "n": n,
                "gemm_f32_gflops": flops / gemm_s / 1e9,
                "bf16_kernel_gflops": flops / kernel_s / 1e9,
                "bf16_kernel_gbps": (2 * k * n) as f64 / kernel_s / 1e9,
                "kernel_over_gemm": gemm_s / kernel_s,
            }));
        }
    }
    Ok(serde_json::json!({
        "bench": "train_step",
        "case": case.name,
        "mode": "decode",
        "device": target.device_name,
        "threads": candle_core::utils::get_num_threads(),
        "simd": mo_align::util::cpu::gemm_kernels(),
        "kernel": decode::kernel_name(),
        "max_rows": decode::MAX_ROWS,
        "shapes": shapes,
    }))
}

/// The host's share of a sampled decoding step at Qwen2.5's vocabulary: B rows of random
/// logits picked by `generate`'s own `pick_tokens` (rows in parallel) and one after another on
/// one thread, temperature 0.7 with no truncation (`sample`, the online stage's setting) or
/// top-p 0.9 (`sample_top_p`, the evaluation's). Both give the same tokens.
fn sample_case(case: &Case) -> anyhow::Result<serde_json::Value> {
    use mo_align::generate::{pick_token, pick_tokens, SamplingConfig};
    let (b, v) = (case.batch, real_config().vocab_size);
    let cfg = SamplingConfig {
        temperature: 0.7,
        top_p: if case.mode == "sample_top_p" {
            0.9
        } else {
            1.0
        },
        ..SamplingConfig::default()
    };
    let mut rng = stream_rng(7, 0);
    let rows: Vec<Vec<f32>> = (0..b)
        .map(|_| (0..v).map(|_| rng.random_range(-8.0f32..8.0)).collect())
        .collect();
    let history: Vec<Vec<u32>> = (0..b).map(|_| random_ids(&mut rng, 64, v as u32)).collect();
    let done = vec![false; b];
    let (mut parallel, mut serial) = (vec![], vec![]);
    for step in 0..=case.steps as u64 {
        let mut rngs: Vec<_> = (0..b as u64).map(|i| stream_rng(step, i)).collect();
        let t0 = Instant::now();
        let a = pick_tokens(&rows, &history, &done, &cfg, &mut rngs, 0);
        let t1 = Instant::now();
        let mut rngs: Vec<_> = (0..b as u64).map(|i| stream_rng(step, i)).collect();
        let s: Vec<u32> = (0..b)
            .map(|i| pick_token(&rows[i], &history[i], &cfg, &mut rngs[i]))
            .collect();
        let t2 = Instant::now();
        anyhow::ensure!(a == s, "parallel and serial picks differ: {a:?} vs {s:?}");
        if step > 0 {
            parallel.push((t1 - t0).as_secs_f64());
            serial.push((t2 - t1).as_secs_f64());
        }
    }
    let (p, s) = (median(parallel), median(serial));
    Ok(serde_json::json!({
        "bench": "train_step",
        "case": case.name,
        "mode": case.mode,
        "B": b,
        "vocab": v,
        "threads": rayon::current_num_threads(),
        "step_s_median": p,
        "serial_step_s_median": s,
        "parallel_speedup": s / p,
    }))
}

/// The dropout work of one LoRA forward at Qwen2.5-0.5B size and T tokens (six [T, 896] inputs
/// and one [T, 4864] per layer, 24 layers): masks drawn by the counter-based op, against a
/// host ChaCha mask plus a multiply (what mo-align did before masks moved to the device).
fn dropout_case(case: &Case, target: &Target) -> anyhow::Result<serde_json::Value> {
    use mo_align::kernels::dropout::DropoutMask;
    let cfg = real_config();
    let t = case.seq;
    let shapes: Vec<(usize, usize)> = (0..cfg.num_hidden_layers)
        .flat_map(|_| {
            std::iter::repeat_n((t, cfg.hidden_size), 6).chain([(t, cfg.intermediate_size)])
        })
        .collect();
    let inputs: Vec<candle_core::Tensor> = [cfg.hidden_size, cfg.intermediate_size]
        .iter()
        .map(|&w| candle_core::Tensor::ones((t, w), target.dtype, &target.device))
        .collect::<candle_core::Result<_>>()?;
    let input = |w: usize| &inputs[usize::from(w != cfg.hidden_size)];
    let (mut ours, mut chacha) = (vec![], vec![]);
    for step in 0..=case.steps {
        let t0 = Instant::now();
        for (i, &(_, w)) in shapes.iter().enumerate() {
            DropoutMask {
                key: i as u64,
                p: 0.05,
            }
            .apply(input(w))?;
        }
        target.device.synchronize()?;
        let t1 = Instant::now();
        for (i, &(rows, w)) in shapes.iter().enumerate() {
            let mut rng = stream_rng(0, i as u64);
            let threshold = (0.05 * u32::MAX as f64) as u32;
            let m: Vec<f32> = (0..rows * w)
                .map(|_| {
                    if rand::RngCore::next_u32(&mut rng) < threshold {
                        0.0
                    } else {
                        1.0 / 0.95
                    }
                })
                .collect();
            let m = candle_core::Tensor::from_vec(m, (rows, w), &target.device)?;
            (input(w) * m.to_dtype(target.dtype)?)?;
        }
        target.device.synchronize()?;
        if step > 0 {
            ours.push((t1 - t0).as_secs_f64());
            chacha.push(t1.elapsed().as_secs_f64());
        }
    }
    let elements: usize = shapes.iter().map(|(r, w)| r * w).sum();
    let (a, b) = (median(ours), median(chacha));
    Ok(serde_json::json!({
        "bench": "train_step",
        "case": case.name,
        "mode": "dropout",
        "T": t,
        "elements": elements,
        "device_masks_s_median": a,
        "host_chacha_masks_s_median": b,
        "elements_per_s": elements as f64 / a,
        "host_chacha_elements_per_s": elements as f64 / b,
        "threads": candle_core::utils::get_num_threads(),
    }))
}

fn run_case(
    case: &Case,
    target: &Target,
    peak_tflops: Option<f64>,
) -> anyhow::Result<serde_json::Value> {
    if case.mode == "dropout" {
        return dropout_case(case, target);
    }
    if case.mode.starts_with("sample") {
        return sample_case(case);
    }
    if case.mode == "gemm" {
        return gemm_case(case, target);
    }
    if case.mode == "decode" {
        return decode_case(case, target);
    }
    let counting = case.name.starts_with("count-");
    COUNTING.store(counting, std::sync::atomic::Ordering::Relaxed);
    // BENCH_STEPS overrides a training case's timed steps (the GPU profile runs 6).
    let steps_override = std::env::var("BENCH_STEPS")
        .ok()
        .and_then(|v| v.parse().ok());
    let owned;
    let case = match (steps_override, case.mode) {
        (Some(steps), m) if !matches!(m, "generate" | "generate_sample") => {
            owned = Case { steps, ..*case };
            &owned
        }
        _ => case,
    };
    // Full fine-tuning keeps f32 masters: its cases run f32 whatever --dtype says.
    let fullsft_target;
    let target = if case.mode == "fullsft" && target.dtype != DType::F32 {
        fullsft_target = Target {
            device: target.device.clone(),
            device_name: target.device_name.clone(),
            dtype: DType::F32,
        };
        &fullsft_target
    } else {
        target
    };
    let cfg = if case.real {
        real_config()
    } else if counting {
        narrow_config()
    } else {
        tiny_config()
    };
    let device = target.device.clone();
    let mut model: Qwen = random_model(&cfg, target.dtype, &device)?;
    let dropout: f32 = std::env::var("BENCH_DROPOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.05);
    // `fullsft`: every weight trains (full fine-tuning); the other modes train a LoRA.
    let full = case.mode == "fullsft";
    let full_vars = if full {
        Some(model.make_trainable()?)
    } else {
        model.attach_lora(
            &LoraConfig {
                dropout,
                ..LoraConfig::default()
            },
            0,
        )?;
        None
    };
    if let Some(c) = std::env::var("BENCH_LOGITS_CHUNK")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        model.logits_chunk = c;
    }
    let rss_after_load = peak_rss_mib();
    let device_peak = DeviceMemoryPeak::start(&device);
    let mut rng = stream_rng(1234, 0);
    let vocab = cfg.vocab_size.min(151643) as u32;
    let (b, t) = (case.batch, case.seq);
    let recompute = case.name.contains("ckpt");
    let vars = full_vars.unwrap_or_else(|| model.lora_vars());
    let mut opt = AdamW::new(vars, AdamWParams::default())?;
    let mut times = vec![];
    let mut phases: Vec<[f64; 3]> = vec![];
    let mut extra = serde_json::Map::new();
    let mut losses = vec![];
    let tokens: usize;
    match case.mode {
        "sft" | "sftprompt" | "forward" | "fullsft" => {
            let prompt = if case.mode == "sftprompt" { t / 2 } else { 0 };
            let batch: Vec<LabelledIds> = (0..b)
                .map(|_| LabelledIds {
                    ids: random_ids(&mut rng, t, vocab),
                    labelled: (0..t).map(|i| i >= prompt).collect(),
                })
                .collect();
            let refs: Vec<&LabelledIds> = batch.iter().collect();
            let nll = Nll { model: &model };
            tokens = b * t;
            for step in 0..=case.steps {
                let t0 = Instant::now();
                let (loss, phase) = if case.mode == "forward" {
                    let out = nll.loss(&refs, ForwardCtx::EVAL)?;
                    (
                        out.loss_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                        [t0.elapsed().as_secs_f64(), 0.0, 0.0],
                    )
                } else {
                    bench_step(&nll, &batch, &mut opt, step as u64, recompute)?
                };
                if step > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                    phases.push(phase);
                }
                losses.push(loss);
            }
        }
        "dpo" => {
            let half = t / 2;
            let pairs: Vec<PreferencePair> = (0..b)
                .map(|_| PreferencePair {
                    prompt: random_ids(&mut rng, half, vocab),
                    chosen: random_ids(&mut rng, t - half, vocab),
                    rejected: random_ids(&mut rng, t - half, vocab),
                    prompt_messages: vec![],
                })
                .collect();
            let ids: Vec<PairIds> = pairs.iter().map(|p| p.ids()).collect();
            let (mut ref_times, mut examples) = (vec![], vec![]);
            for step in 0..=case.steps {
                let t0 = Instant::now();
                let (c, r) = reference_logprobs(&model, &ids, &|_| {})?;
                if step > 0 {
                    ref_times.push(t0.elapsed().as_secs_f64());
                }
                examples = pairs
                    .iter()
                    .zip(c.into_iter().zip(r))
                    .map(|(p, (ref_chosen, ref_rejected))| DpoExample {
                        pair: p.clone(),
                        ref_chosen,
                        ref_rejected,
                        offset: 0.0,
                        scale: 1.0,
                        gate: vec![],
                    })
                    .collect();
            }
            let dpo = Dpo {
                model: &model,
                cfg: DpoConfig::default(),
                explicit: false,
            };
            for step in 0..=case.steps {
                let t0 = Instant::now();
                let (loss, phase) = bench_step(&dpo, &examples, &mut opt, step as u64, recompute)?;
                if step > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                    phases.push(phase);
                }
                losses.push(loss);
            }
            let reference = median(ref_times);
            extra.insert("reference_pass_s_median".into(), reference.into());
            extra.insert("train_step_s_median".into(), median(times.clone()).into());
            // Reference log-probs are computed once per pair and epoch: add one pass per step.
            times.iter_mut().for_each(|x| *x += reference);
            tokens = 2 * b * t;
        }
        "features" => {
            let seqs: Vec<Vec<u32>> = (0..b).map(|_| random_ids(&mut rng, t, vocab)).collect();
            let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
            tokens = b * t;
            for step in 0..=case.steps {
                let t0 = Instant::now();
                let f = last_token_features(&model, &refs, b, ForwardCtx::EVAL, &|_| {})?;
                losses.push(
                    f.sqr()?
                        .mean_all()?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?,
                );
                if step > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
        }
        "generate" | "generate_sample" => {
            let prompts: Vec<Vec<u32>> = (0..b).map(|_| random_ids(&mut rng, t, vocab)).collect();
            let streams: Vec<u64> = (0..b as u64).collect();
            // Sampled as the evaluation samples (temperature 0.7, top-p 0.9, no top-k), the
            // same settings as the peer script's `--sample`.
            let cfg = if case.mode == "generate_sample" {
                SamplingConfig {
                    max_new_tokens: case.steps,
                    temperature: 0.7,
                    top_p: 0.9,
                    top_k: 0,
                    ..SamplingConfig::default()
                }
            } else {
                SamplingConfig {
                    max_new_tokens: case.steps,
                    ..SamplingConfig::default()
                }
            };
            tokens = b * case.steps;
            if counting {
                // Window 1: the prompt pass and one pick; window 2: the same plus one decoding
                // step. The difference is one decoding step.
                for (window, new) in [(1, 1), (2, 2)] {
                    let cfg = SamplingConfig {
                        max_new_tokens: new,
                        ..cfg.clone()
                    };
                    generate(&model, &prompts, &streams, &cfg, &[], 0, ForwardCtx::EVAL)?;
                    mo_align::util::profile::count_window(window);
                    generate(&model, &prompts, &streams, &cfg, &[], 0, ForwardCtx::EVAL)?;
                    mo_align::util::profile::count_window(0);
                }
            }
            for step in 0..3 {
                let t0 = Instant::now();
                let out = generate(&model, &prompts, &streams, &cfg, &[], 0, ForwardCtx::EVAL)?;
                losses.push(out.iter().map(Vec::len).sum::<usize>() as f64);
                if step > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
        }
        "grpo" => {
            let g = 4;
            let grpo_cfg = GrpoConfig {
                num_generations: g,
                max_new_tokens: t - t / 2,
                temperature: 1.0,
                ..GrpoConfig::default()
            };
            let names: Vec<String> = [
                "helpfulness",
                "honesty",
                "instruction_following",
                "truthfulness",
            ]
            .map(String::from)
            .to_vec();
            let info = RewardModelInfo {
                objectives: names.clone(),
                rating_normalisation: "bench".into(),
                backbone_model: "random".into(),
                backbone_adapter: None,
                backbone_model_abs: None,
                backbone_adapter_abs: None,
                backbone_fingerprint: None,
                backbone_fingerprint_bf16: None,
                backbone_dtype: None,
                hidden_size: cfg.hidden_size,
                feature: "last_token".into(),
                feature_set: FeatureSet::LastToken,
            };
            let h = cfg.hidden_size;
            let mut head = RewardHead::new(
                info,
                candle_core::Tensor::zeros(h, DType::F32, &device)?,
                candle_core::Tensor::ones(h, DType::F32, &device)?,
                &[0.0; 4],
            )?;
            // A random head, so completions differ in reward and advantages are not zero.
            head.weight = candle_core::Var::randn(0f32, 0.05, (4, h), &device)?;
            let scorer = CompletionScorer {
                head: Some((&head, &model, ForwardCtx::REFERENCE)),
                rules: None,
                batch_size: grpo_cfg.score_batch_size,
            };
            let objective = OnlinePolicyGradient::new(
                &model,
                &grpo_cfg,
                scorer,
                Weighting::equal(4),
                names,
                0,
                StopTokens {
                    stop_ids: vec![],
                    pad_id: 0,
                },
            );
            let examples: Vec<PromptExample> = (0..b)
                .map(|_| PromptExample {
                    prompt: random_ids(&mut rng, t / 2, vocab),
                    messages: vec![],
                    record: serde_json::Value::Null,
                })
                .collect();
            tokens = g * b * t;
            let (mut gen_times, mut score_times) = (vec![], vec![]);
            for step in 0..=case.steps {
                let before = objective.timing();
                let t0 = Instant::now();
                objective.begin_step(step as u64);
                let (loss, phase) =
                    bench_step(&objective, &examples, &mut opt, step as u64, recompute)?;
                let after = objective.timing();
                if step > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                    phases.push(phase);
                    gen_times.push(after.generation_s - before.generation_s);
                    score_times.push(after.scoring_s - before.scoring_s);
                }
                losses.push(loss);
            }
            extra.insert("generation_s_median".into(), median(gen_times).into());
            extra.insert("scoring_s_median".into(), median(score_times).into());
        }
        other => anyhow::bail!("unknown mode {other}"),
    }
    let step_s = median(times.clone());
    let peak_device_mib = device_peak.map(DeviceMemoryPeak::finish);
    let flops_per_token = nominal_flops_per_token(&cfg, case.mode, t);
    let achieved_tflops = flops_per_token * tokens as f64 / step_s / 1e12;
    let peak_tflops = peak_tflops.or_else(|| {
        (target.dtype == DType::BF16)
            .then(|| known_bf16_peak_tflops(&target.device_name))
            .flatten()
    });
    let mut out = serde_json::json!({
        "bench": "train_step",
        "case": case.name,
        "model": if case.real { "qwen2.5-0.5b-dims" } else { "tiny" },
        "mode": case.mode,
        "B": b,
        "T": t,
        "tokens_per_step": tokens,
        "timed_steps": times.len(),
        "step_s_median": step_s,
        "step_s_min": times.iter().copied().fold(f64::MAX, f64::min),
        "step_s_max": times.iter().copied().fold(0.0, f64::max),
        "tok_per_s": tokens as f64 / step_s,
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_load_mib": rss_after_load,
        "threads": candle_core::utils::get_num_threads(),
        "simd": mo_align::util::cpu::gemm_kernels(),
        "loss_first": losses.first(),
        "loss_last": losses.last(),
        "recompute_layers": recompute,
        "dtype": format!("{:?}", target.dtype).to_lowercase(),
        "device": target.device_name,
        "peak_device_mib": peak_device_mib,
        "nominal_flops_per_token": flops_per_token,
        "achieved_tflops": achieved_tflops,
        "peak_tflops": peak_tflops,
        "mfu": peak_tflops.map(|p| achieved_tflops / p),
    });
    if !phases.is_empty() {
        for (i, k) in [
            "forward_s_median",
            "backward_s_median",
            "optimizer_s_median",
        ]
        .iter()
        .enumerate()
        {
            out[*k] = median(phases.iter().map(|p| p[i]).collect()).into();
        }
    }
    for (k, v) in extra {
        out[k] = v;
    }
    if let Some((tally, times)) = LAST_STEP.with(|l| l.borrow_mut().take()) {
        let (ops, bytes) = tally
            .values()
            .fold((0, 0), |(o, b), t| (o + t.ops, b + t.bytes));
        // Launches and bytes of mo-align's own kernels in one step (candle's own ops, such
        // as the loss arithmetic, are not in it: scripts/count-ops.sh counts every op).
        out["kernel_launches"] = ops.into();
        out["kernel_gbytes"] = (bytes as f64 / 1e9).into();
        out["kernel_tally"] = serde_json::json!(tally
            .iter()
            .map(|(k, t)| (
                k.clone(),
                serde_json::json!({"launches": t.ops, "gbytes": t.bytes as f64 / 1e9})
            ))
            .collect::<serde_json::Map<_, _>>());
        if !times.is_empty() {
            eprint!("{}", mo_align::util::profile::format_times(&times));
            out["scopes"] = serde_json::to_value(&times)?;
        }
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    // The allocator settings the mo-align binary uses.
    mo_align::util::memory::keep_freed_memory();
    mo_align::util::cpu::pin_thread_count();
    let args: Vec<String> = std::env::args().collect();
    let value_of = |flag: &str| flag_value(&args, flag);
    let peak_tflops = match value_of("--peak-tflops") {
        Some(v) => Some(
            v.parse::<f64>()
                .map_err(|_| anyhow::anyhow!("--peak-tflops {v}: not a number"))?,
        ),
        None => None,
    };
    if let Some(name) = value_of("--case") {
        let case = CASES
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| anyhow::anyhow!("unknown case {name}"))?;
        println!("{}", run_case(case, &target(&args)?, peak_tflops)?);
        return Ok(());
    }
    let gpu = !matches!(value_of("--device").as_deref(), None | Some("cpu"));
    // Pass the device, dtype and peak on to every case's process.
    let mut passed = vec![];
    for flag in ["--device", "--dtype", "--peak-tflops"] {
        if let Some(v) = value_of(flag) {
            passed.extend([flag.to_string(), v]);
        }
    }
    let only = value_of("--only");
    let exe = std::env::current_exe()?;
    for case in CASES.iter().filter(|c| match only.as_deref() {
        Some(o) => c.name.contains(o),
        None => c.name.starts_with("gpu-") == gpu,
    }) {
        let out = std::process::Command::new(&exe)
            .args(["--case", case.name])
            .args(&passed)
            .output()?;
        if out.status.success() {
            print!("{}", String::from_utf8_lossy(&out.stdout));
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            println!(
                "{}",
                serde_json::json!({"bench": "train_step", "case": case.name, "error": err.lines().next().unwrap_or("")})
            );
        }
    }
    Ok(())
}
