//! Training-step and forward benchmarks at tiny and real Qwen2.5-0.5B dimensions (random
//! weights, random token ids, no download), one JSON line per case.
//!
//!     cargo bench --bench train_step                  # every case, each in a fresh process
//!     cargo bench --bench train_step -- --only tiny   # cases whose name contains "tiny"
//!     cargo bench --bench train_step -- --case real-sft-b1-t256
//!
//! Modes: `sft` is LoRA r8 (alpha 16, dropout 0.05) on all seven projections, forward, backward
//! and AdamW with the NLL over every position (what the reference PyTorch script times);
//! `forward` is a no-grad forward plus log-probs at every position.
//!
//! Each case: 1 warm-up step, then the median of the timed steps. Peak RSS is the process's
//! VmHWM, so every case runs in its own process.

use candle_core::{DType, Device};
use mo_align::model::lora::{LoraConfig, LoraCtx};
use mo_align::model::tiny::{random_model, tiny_config};
use mo_align::model::Qwen2Config;
use mo_align::objectives::nll::Nll;
use mo_align::rng::{mix_seed, stream_rng, DropoutRng};
use mo_align::tokenizer::LabelledIds;
use mo_align::train::optim::{AdamW, AdamWParams};
use mo_align::train::Objective;
use rand::Rng;
use std::time::Instant;

struct Case {
    name: &'static str,
    real: bool,
    mode: &'static str,
    batch: usize,
    seq: usize,
    steps: usize,
}

const CASES: [Case; 8] = [
    Case {
        name: "tiny-sft-b4-t128",
        real: false,
        mode: "sft",
        batch: 4,
        seq: 128,
        steps: 10,
    },
    Case {
        name: "tiny-forward-b4-t128",
        real: false,
        mode: "forward",
        batch: 4,
        seq: 128,
        steps: 10,
    },
    Case {
        name: "real-sft-b1-t256",
        real: true,
        mode: "sft",
        batch: 1,
        seq: 256,
        steps: 3,
    },
    Case {
        name: "real-forward-b1-t256",
        real: true,
        mode: "forward",
        batch: 1,
        seq: 256,
        steps: 3,
    },
    Case {
        name: "real-sft-b2-t512",
        real: true,
        mode: "sft",
        batch: 2,
        seq: 512,
        steps: 3,
    },
    Case {
        name: "real-forward-b2-t512",
        real: true,
        mode: "forward",
        batch: 2,
        seq: 512,
        steps: 3,
    },
    Case {
        name: "real-sft-b1-t64",
        real: true,
        mode: "sft",
        batch: 1,
        seq: 64,
        steps: 3,
    },
    Case {
        name: "real-forward-b1-t64",
        real: true,
        mode: "forward",
        batch: 1,
        seq: 64,
        steps: 3,
    },
];

fn real_config() -> Qwen2Config {
    Qwen2Config {
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

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn run_case(case: &Case) -> anyhow::Result<serde_json::Value> {
    let cfg = if case.real {
        real_config()
    } else {
        tiny_config()
    };
    let device = Device::Cpu;
    let mut model = random_model(&cfg, DType::F32, &device)?;
    let lora = LoraConfig::default();
    model.attach_lora(&lora, 0)?;
    let rss_after_load = peak_rss_mib();
    let mut rng = stream_rng(1234, 0);
    let vocab = cfg.vocab_size.min(151643) as u32;
    let batch: Vec<LabelledIds> = (0..case.batch)
        .map(|_| LabelledIds {
            ids: (0..case.seq).map(|_| rng.random_range(0..vocab)).collect(),
            labelled: vec![true; case.seq],
        })
        .collect();
    let refs: Vec<&LabelledIds> = batch.iter().collect();
    let mut opt = AdamW::new(model.lora_vars(), AdamWParams::default())?;
    let nll = Nll { model: &model };
    let weight: f64 = refs.iter().map(|e| nll.weight(e)).sum();
    let mut times = vec![];
    let mut phases: Vec<[f64; 3]> = vec![];
    let mut losses = vec![];
    for step in 0..case.steps + 1 {
        let t0 = Instant::now();
        let (loss, phase) = if case.mode == "sft" {
            let dropout = DropoutRng::new(mix_seed(0, step as u64, 0));
            let out = nll.loss(&refs, LoraCtx::train(&dropout))?;
            let loss = (out.loss_sum / weight)?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let g: Vec<_> = opt
                .vars()
                .iter()
                .map(|(_, v)| {
                    grads
                        .get(v.as_tensor())
                        .cloned()
                        .unwrap_or_else(|| v.zeros_like().unwrap())
                })
                .collect();
            drop(grads);
            let t2 = Instant::now();
            opt.step(&g, 1e-5)?;
            let t3 = Instant::now();
            (
                value,
                [
                    (t1 - t0).as_secs_f64(),
                    (t2 - t1).as_secs_f64(),
                    (t3 - t2).as_secs_f64(),
                ],
            )
        } else {
            let out = nll.loss(&refs, LoraCtx::EVAL)?;
            let value = (out.loss_sum / weight)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            (value, [t0.elapsed().as_secs_f64(), 0.0, 0.0])
        };
        if step > 0 {
            times.push(t0.elapsed().as_secs_f64());
            phases.push(phase);
        }
        losses.push(loss);
    }
    let phase_median = |i: usize| {
        let mut v: Vec<f64> = phases.iter().map(|p| p[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = case.batch * case.seq;
    Ok(serde_json::json!({
        "bench": "train_step",
        "case": case.name,
        "model": if case.real { "qwen2.5-0.5b-dims" } else { "tiny" },
        "mode": case.mode,
        "B": case.batch,
        "T": case.seq,
        "tokens_per_step": tokens,
        "timed_steps": times.len(),
        "step_s_median": median,
        "step_s_min": times[0],
        "step_s_max": times[times.len() - 1],
        "tok_per_s": tokens as f64 / median,
        "forward_s_median": phase_median(0),
        "backward_s_median": phase_median(1),
        "optimizer_s_median": phase_median(2),
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_load_mib": rss_after_load,
        "threads": candle_core::utils::get_num_threads(),
        "loss_first": losses[0],
        "loss_last": losses[losses.len() - 1],
        "dtype": "f32",
        "device": "cpu",
    }))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(name) = value_of("--case") {
        let case = CASES
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| anyhow::anyhow!("unknown case {name}"))?;
        println!("{}", run_case(case)?);
        return Ok(());
    }
    let only = value_of("--only");
    let exe = std::env::current_exe()?;
    for case in CASES
        .iter()
        .filter(|c| only.as_deref().is_none_or(|o| c.name.contains(o)))
    {
        let out = std::process::Command::new(&exe)
            .args(["--case", case.name])
            .output()?;
        if out.status.success() {
            print!("{}", String::from_utf8_lossy(&out.stdout));
        } else {
            println!(
                "{}",
                serde_json::json!({"bench": "train_step", "case": case.name, "error": String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("")})
            );
        }
    }
    Ok(())
}
