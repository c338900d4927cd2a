//! The CUDA counterparts of the CPU model and training tests. Built only with `--features cuda`
//! and meant for a machine with a GPU: every test fails (rather than skips) when no GPU is
//! visible, so a green run always means the GPU path was exercised.
//!
//! `scripts/build-cuda.sh` builds this test binary next to the CUDA `mo-align` and writes a
//! runner; run it from the repository root (it reads `tests/golden`, `configs/demo` and `data/`
//! from the current directory, and the binary from `MO_ALIGN_BIN` when set).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::{golden_dir, golden_seqs, max_abs_diff, repo_root as repo};
use mo_align::model::lm_head::gather_rows;
use mo_align::model::loader::{apply_adapter, load_pretrained};
use mo_align::model::lora::{LoraConfig, LoraCtx};
use mo_align::model::qwen2::ModelInput;
use mo_align::model::Qwen2;

fn gpu() -> Device {
    Device::new_cuda(0).expect("tests/cuda.rs needs a visible CUDA GPU")
}

fn load(dtype: DType, device: &Device) -> Qwen2 {
    load_pretrained(common::tiny_dir().to_str().unwrap(), None, dtype, device)
        .expect("load tiny")
        .model
}

/// Per-token log-probs (as f64) of every sequence, right-padded into one batch.
fn batch_logprobs(m: &Qwen2, seqs: &[Vec<u32>], ctx: LoraCtx) -> Vec<Vec<f64>> {
    let input = ModelInput::right_padded(seqs, 0, &m.device).unwrap();
    let hidden = m.forward(&input, ctx, None).unwrap();
    let t = hidden.dim(1).unwrap();
    seqs.iter()
        .enumerate()
        .map(|(b, s)| {
            let rows: Vec<u32> = (0..s.len() - 1).map(|i| (b * t + i) as u32).collect();
            let lp = m
                .token_logprobs(&gather_rows(&hidden, &rows).unwrap(), &s[1..], false)
                .unwrap();
            lp.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
        })
        .collect()
}

#[test]
fn cuda_logprobs_with_a_peft_adapter_match_the_cpu() {
    let seqs = golden_seqs();
    let adapter = golden_dir().join("adapter");
    let mut cpu = load(DType::F32, &Device::Cpu);
    let mut cuda = load(DType::F32, &gpu());
    apply_adapter(&mut cpu, &adapter).unwrap();
    apply_adapter(&mut cuda, &adapter).unwrap();
    for ctx in [LoraCtx::EVAL, LoraCtx::REFERENCE] {
        let a = batch_logprobs(&cpu, &seqs, ctx);
        let b = batch_logprobs(&cuda, &seqs, ctx);
        for (x, y) in a.iter().zip(&b) {
            let d = max_abs_diff(x, y);
            assert!(d < 1e-4, "CUDA f32 log-probs differ from the CPU by {d}");
        }
    }
}

#[test]
fn cuda_bf16_logprobs_stay_close_to_f32() {
    let seqs = golden_seqs();
    let f32s = batch_logprobs(&load(DType::F32, &Device::Cpu), &seqs, LoraCtx::EVAL);
    let bf16 = batch_logprobs(&load(DType::BF16, &gpu()), &seqs, LoraCtx::EVAL);
    for (x, y) in f32s.iter().zip(&bf16) {
        let mean = x.iter().zip(y).map(|(a, b)| (a - b).abs()).sum::<f64>() / x.len() as f64;
        assert!(mean.is_finite() && mean < 0.05, "bf16 mean |diff| {mean}");
    }
}

/// Sum of the log-probs of every sequence: a scalar whose gradient reaches every LoRA tensor.
fn scalar_loss(m: &Qwen2, seqs: &[Vec<u32>]) -> Tensor {
    let input = ModelInput::right_padded(seqs, 0, &m.device).unwrap();
    let hidden = m.forward(&input, LoraCtx::TRAIN, None).unwrap();
    let t = hidden.dim(1).unwrap();
    let mut rows = vec![];
    let mut targets = vec![];
    for (b, s) in seqs.iter().enumerate() {
        rows.extend((0..s.len() - 1).map(|i| (b * t + i) as u32));
        targets.extend_from_slice(&s[1..]);
    }
    m.token_logprobs(&gather_rows(&hidden, &rows).unwrap(), &targets, true)
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn cuda_lora_gradients_match_the_cpu_and_frozen_weights_get_none() {
    let seqs = golden_seqs();
    let lora = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        ..LoraConfig::default()
    };
    let mut cpu = load(DType::F32, &Device::Cpu);
    let mut cuda = load(DType::F32, &gpu());
    cpu.attach_lora(&lora, 3).unwrap();
    cuda.attach_lora(&lora, 3).unwrap();
    // A non-zero B everywhere, identical on both devices (a zero B zeroes A's gradient).
    for (i, ((_, vc), (_, vg))) in cpu
        .lora_vars()
        .into_iter()
        .zip(cuda.lora_vars())
        .enumerate()
    {
        let t =
            (Tensor::randn(0f32, 0.2, vc.dims(), &Device::Cpu).unwrap() + 0.01 * i as f64).unwrap();
        vc.set(&t).unwrap();
        vg.set(&t.to_device(&cuda.device).unwrap()).unwrap();
    }
    let (lc, lg) = (scalar_loss(&cpu, &seqs), scalar_loss(&cuda, &seqs));
    let (sc, sg) = (
        lc.to_scalar::<f32>().unwrap(),
        lg.to_scalar::<f32>().unwrap(),
    );
    assert!(
        (sc - sg).abs() < 1e-3 * sc.abs().max(1.0),
        "loss {sc} vs {sg}"
    );
    let (gc, gg) = (lc.backward().unwrap(), lg.backward().unwrap());
    for ((name, vc), (_, vg)) in cpu.lora_vars().into_iter().zip(cuda.lora_vars()) {
        let a: Vec<f32> = gc
            .get(vc.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = gg
            .get(vg.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient on CUDA"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
        let d = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            d <= 1e-3 * scale,
            "{name}: CUDA gradient differs by {d} (scale {scale})"
        );
    }
    for lin in cuda.linears() {
        assert!(
            gg.get(&lin.weight).is_none(),
            "a frozen weight got a gradient on CUDA"
        );
    }
    assert!(gg.get(&cuda.embed_tokens).is_none());
}

fn bin() -> String {
    std::env::var("MO_ALIGN_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_mo-align").to_string())
}

/// Runs a demo recipe on the GPU and returns its training losses.
fn run_demo(recipe: &str, config: &str, out: &std::path::Path, extra: &[String]) -> Vec<f64> {
    let mut cmd = std::process::Command::new(bin());
    cmd.current_dir(repo()).args([recipe, "--config", config]);
    for s in [
        format!("train.output_dir={}", out.display()),
        "train.device=cuda".to_string(),
        format!("model.path={}", common::tiny_dir().display()),
    ]
    .iter()
    .chain(extra)
    {
        cmd.args(["--set", s]);
    }
    let res = cmd.output().unwrap();
    assert!(
        res.status.success(),
        "{recipe} on CUDA failed: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("loss").and_then(|x| x.as_f64()))
        .collect()
}

#[test]
fn cuda_sft_and_dpo_demo_runs_train() {
    let root = common::scratch("cuda-demo");
    let sft = run_demo(
        "sft",
        "configs/demo/sft.toml",
        &root.join("sft"),
        &["train.max_steps=60".into()],
    );
    assert!(sft.len() >= 2 && sft.iter().all(|l| l.is_finite()));
    assert!(
        sft.last().unwrap() < sft.first().unwrap(),
        "SFT loss did not fall on CUDA: {sft:?}"
    );
    assert!(root.join("sft/adapter_model.safetensors").is_file());
    let dpo = run_demo(
        "dpo",
        "configs/demo/dpo.toml",
        &root.join("dpo"),
        &[
            format!("model.adapter={}", root.join("sft").display()),
            format!("dpo.cache_dir={}", root.join("cache").display()),
            "train.max_steps=20".into(),
        ],
    );
    assert!(!dpo.is_empty() && dpo.iter().all(|l| l.is_finite()));
    assert!(root.join("dpo/adapter_model.safetensors").is_file());
}
