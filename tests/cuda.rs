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
use common::readiness::{
    grad_distance, readiness_model, readiness_seqs, training_step, READINESS_VOCAB,
};
use common::{golden_dir, golden_seqs, max_abs_diff, repo_root as repo, train_ctx};
use mo_align::generate::{generate, SamplingConfig};
use mo_align::kernels::dropout::DropoutMask;
use mo_align::model::ctx::ForwardCtx;
use mo_align::model::input::ModelInput;
use mo_align::model::lm_head::gather_rows;
use mo_align::model::loader::{apply_adapter, load_pretrained};
use mo_align::model::lora::LoraConfig;
use mo_align::model::Qwen;

fn gpu() -> Device {
    Device::new_cuda(0).expect("tests/cuda.rs needs a visible CUDA GPU")
}

fn load(dtype: DType, device: &Device) -> Qwen {
    load_pretrained(common::tiny_dir().to_str().unwrap(), None, dtype, device)
        .expect("load tiny")
        .model
}

/// Per-token log-probs (as f64) of every sequence, right-padded into one batch.
fn batch_logprobs(m: &Qwen, seqs: &[Vec<u32>], ctx: ForwardCtx) -> Vec<Vec<f64>> {
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
    for ctx in [ForwardCtx::EVAL, ForwardCtx::REFERENCE] {
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
    let f32s = batch_logprobs(&load(DType::F32, &Device::Cpu), &seqs, ForwardCtx::EVAL);
    let bf16 = batch_logprobs(&load(DType::BF16, &gpu()), &seqs, ForwardCtx::EVAL);
    for (x, y) in f32s.iter().zip(&bf16) {
        let mean = x.iter().zip(y).map(|(a, b)| (a - b).abs()).sum::<f64>() / x.len() as f64;
        assert!(mean.is_finite() && mean < 0.05, "bf16 mean |diff| {mean}");
    }
}

/// Sum of the log-probs of every sequence: a scalar whose gradient reaches every LoRA tensor.
fn scalar_loss(m: &Qwen, seqs: &[Vec<u32>]) -> Tensor {
    let input = ModelInput::right_padded(seqs, 0, &m.device).unwrap();
    let hidden = m.forward(&input, train_ctx(), None).unwrap();
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

#[test]
fn cuda_dropout_masks_are_the_cpu_twin_bit_for_bit() {
    let mask = DropoutMask {
        key: 0x5eed,
        p: 0.1,
    };
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let ones = Tensor::ones((1000, 37), dtype, &Device::Cpu).unwrap();
        let on_cpu = mask.apply(&ones).unwrap();
        let on_gpu = mask.apply(&ones.to_device(&gpu()).unwrap()).unwrap();
        let (a, b) = (
            on_cpu.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
            on_gpu
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap(),
        );
        assert_eq!(
            a.to_vec1::<f32>().unwrap(),
            b.to_vec1::<f32>().unwrap(),
            "{dtype:?}: the GPU drew another mask"
        );
    }
}

/// A training step at a vocabulary above the LM head's block size, dropout 0.1 on every LoRA
/// target (masks drawn on the GPU), recomputed layers: in f32, bf16 and f16 its adapter
/// gradients stay within each precision's distance of the CPU f32 step.
#[test]
fn cuda_large_vocabulary_steps_match_the_cpu_f32_step() {
    let seqs = readiness_seqs();
    let want = training_step(&readiness_model(DType::F32, &Device::Cpu), &seqs, 3, true).unwrap();
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 0.03), (DType::F16, 0.005)] {
        let m = readiness_model(dtype, &gpu());
        assert_eq!(m.config.vocab_size, READINESS_VOCAB);
        let got = training_step(&m, &seqs, 3, true)
            .unwrap_or_else(|e| panic!("{dtype:?} step on CUDA failed: {e}"));
        let (total, worst, name) = grad_distance(&want, &got);
        assert!(
            total < tol,
            "{dtype:?}: CUDA gradients {total} from the CPU f32 step (worst {worst} at {name})"
        );
        assert!((got.loss - want.loss).abs() < 0.02 * want.loss.abs());
    }
}

#[test]
fn cuda_adamw_step_matches_the_cpu_twin() {
    use mo_align::train::optim::{AdamW, AdamWParams};
    let params = AdamWParams {
        weight_decay: 0.01,
        ..AdamWParams::default()
    };
    let init: Vec<f32> = (0..5000)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 30.0)
        .collect();
    let grads: Vec<f32> = (0..5000)
        .map(|i| ((i * 53 % 97) as f32 - 48.0) / 20.0)
        .collect();
    let run = |dev: &Device| {
        let var = candle_core::Var::from_vec(init.clone(), (50, 100), dev).unwrap();
        let mut opt = AdamW::new(vec![("p".into(), var.clone())], params).unwrap();
        let g = Tensor::from_vec(grads.clone(), (50, 100), dev).unwrap();
        for _ in 0..3 {
            opt.step(std::slice::from_ref(&g), 1e-2, 0.5).unwrap();
        }
        var.as_tensor()
            .flatten_all()
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (run(&Device::Cpu), run(&gpu()));
    let d = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d < 1e-5, "the CUDA AdamW differs from the CPU twin by {d}");
}

#[test]
fn cuda_batched_greedy_generation_matches_the_cpu() {
    let prompts: Vec<Vec<u32>> = readiness_seqs()
        .into_iter()
        .chain([vec![5, 17, 19_999]])
        .map(|s| s[..s.len().min(9)].to_vec())
        .collect();
    let cfg = SamplingConfig {
        max_new_tokens: 8,
        repetition_penalty: 1.3,
        ..SamplingConfig::default()
    };
    let cpu = readiness_model(DType::F32, &Device::Cpu);
    let cuda = readiness_model(DType::F32, &gpu());
    let ids = [0, 1, 2];
    let want = generate(&cpu, &prompts, &ids, &cfg, &[], 0, ForwardCtx::EVAL).unwrap();
    let got = generate(&cuda, &prompts, &ids, &cfg, &[], 0, ForwardCtx::EVAL).unwrap();
    assert_eq!(got, want, "greedy CUDA decoding differs from the CPU");
    // Sampling (host-side selection from device logits) and bf16 decoding run.
    let sampled = SamplingConfig {
        temperature: 0.7,
        top_k: 20,
        top_p: 0.8,
        ..cfg.clone()
    };
    let bf16 = readiness_model(DType::BF16, &gpu());
    for (m, c) in [(&cuda, &sampled), (&bf16, &cfg), (&bf16, &sampled)] {
        let out = generate(m, &prompts, &ids, c, &[], 0, ForwardCtx::EVAL).unwrap();
        assert!(out.iter().all(|o| o.len() == 8));
    }
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
    demo_stages_train("f32");
}

#[test]
fn cuda_sft_and_dpo_demo_runs_train_in_bf16() {
    demo_stages_train("bf16");
}

fn demo_stages_train(dtype: &str) {
    let root = common::scratch(&format!("cuda-demo-{dtype}"));
    let sft = run_demo(
        "sft",
        "configs/demo/sft-lora.toml",
        &root.join("sft"),
        &["train.max_steps=60".into(), format!("train.dtype={dtype}")],
    );
    assert!(sft.len() >= 2 && sft.iter().all(|l| l.is_finite()));
    assert!(
        sft.last().unwrap() < sft.first().unwrap(),
        "{dtype} SFT loss did not fall on CUDA: {sft:?}"
    );
    assert!(root.join("sft/adapter_model.safetensors").is_file());
    let dpo = run_demo(
        "dpo",
        "configs/demo/dpo.toml",
        &root.join("dpo"),
        &[
            format!("model.adapter={}", root.join("sft").display()),
            format!("train.cache_dir={}", root.join("cache").display()),
            "train.max_steps=20".into(),
            format!("train.dtype={dtype}"),
        ],
    );
    assert!(!dpo.is_empty() && dpo.iter().all(|l| l.is_finite()));
    assert!(root.join("dpo/adapter_model.safetensors").is_file());
}

// ---- the fused kernels against their CPU twins ---------------------------------------------
//
// Each kernel of src/kernels runs on random inputs on the CPU (the twin, f32) and on the GPU in
// f32 and bf16; f32 must agree to float rounding, bf16 within bf16's precision.

mod kernels {
    use super::gpu;
    use candle_core::{DType, Device, Tensor};
    use mo_align::kernels::attention::{self, RowSpan};
    use mo_align::kernels::dropout::DropoutMask;
    use mo_align::kernels::spec::{Adapter, AttnSpec, GateUp, GradSlots, Projection, QkvSpec};
    use mo_align::kernels::{gemm, lora, norm, qkv, swiglu, xent};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut rng = mo_align::util::rng::stream_rng(seed, 77);
        let v = mo_align::util::rng::normal_vec(&mut rng, n, 1.0);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The tensor on the GPU in `dtype` (adapters, norms' inputs stay f32 where the model keeps
    /// them f32: the caller decides).
    fn on_gpu(t: &Tensor, dtype: DType) -> Tensor {
        t.to_dtype(dtype).unwrap().to_device(&gpu()).unwrap()
    }

    fn back(t: &Tensor) -> Vec<f32> {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// Relative max difference: max |a - b| / max(1, max |a|).
    fn close(name: &str, want: &Tensor, got: &Tensor, dtype: DType) {
        let (a, b) = (back(want), back(got));
        assert_eq!(a.len(), b.len(), "{name}: sizes differ");
        let scale = a.iter().fold(1f32, |m, x| m.max(x.abs()));
        let d = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale;
        let tol = if dtype == DType::F32 { 2e-5 } else { 3e-2 };
        assert!(
            d < tol,
            "{name} ({dtype:?}): GPU differs from the CPU twin by {d} (relative)"
        );
    }

    const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

    #[test]
    fn gemm_views_and_accumulation() {
        let x = rand(&[37, 50], 1);
        let w = rand(&[23, 40], 2);
        let a = x.narrow(1, 5, 40).unwrap();
        let want = gemm::mm(&a, &w.t().unwrap()).unwrap();
        for dt in DTYPES {
            let (xg, wg) = (on_gpu(&x, dt), on_gpu(&w, dt));
            let got = gemm::mm(&xg.narrow(1, 5, 40).unwrap(), &wg.t().unwrap()).unwrap();
            close("mm", &want, &got, dt);
            let dst = Tensor::ones((37, 30), DType::F32, &gpu()).unwrap();
            gemm::mm_acc(
                &dst.narrow(1, 3, 23).unwrap(),
                &xg.narrow(1, 5, 40).unwrap(),
                &wg.t().unwrap(),
                0.5,
            )
            .unwrap();
            let want_acc = ((&want * 0.5).unwrap() + 1.0).unwrap();
            close("mm_acc", &want_acc, &dst.narrow(1, 3, 23).unwrap(), dt);
        }
    }

    /// Three adapters of ranks 8, 4, 8 on one input, dropout on two, a gate on one.
    fn adapters_for(
        inp: usize,
        outs: [usize; 3],
        dev: &Device,
    ) -> Vec<(Tensor, Tensor, Option<Tensor>, Option<DropoutMask>)> {
        let ranks = [8, 4, 8];
        (0..3)
            .map(|i| {
                let a = (rand(&[ranks[i], inp], 10 + i as u64) * 0.1)
                    .unwrap()
                    .to_device(dev)
                    .unwrap();
                let b = (rand(&[outs[i], ranks[i]], 20 + i as u64) * 0.1)
                    .unwrap()
                    .to_device(dev)
                    .unwrap();
                let gate = (i == 1).then(|| Tensor::new(&[0.5f32, 1.5, 1.0, 0.25], dev).unwrap());
                let mask = (i != 2).then_some(DropoutMask {
                    key: 1000 + i as u64,
                    p: 0.2,
                });
                (a, b, gate, mask)
            })
            .collect()
    }

    fn group(parts: &[(Tensor, Tensor, Option<Tensor>, Option<DropoutMask>)]) -> Vec<Adapter<'_>> {
        let (mut out_offset, mut u_offset) = (0, 0);
        parts
            .iter()
            .map(|(a, b, gate, mask)| {
                let ad = Adapter {
                    a,
                    b,
                    scale: 2.0,
                    gate: gate.as_ref(),
                    dropout: *mask,
                    out_offset,
                    u_offset,
                };
                out_offset += b.dims()[0];
                u_offset += a.dims()[0];
                ad
            })
            .collect()
    }

    #[test]
    fn lora_down_up_backward_and_grads() {
        let (n, inp, outs) = (33, 72, [48, 16, 16]);
        let width: usize = outs.iter().sum();
        let x = rand(&[n, inp], 3);
        let dy = rand(&[n, width], 4);
        let cpu_parts = adapters_for(inp, outs, &Device::Cpu);
        let cpu_ads = group(&cpu_parts);
        let u = lora::down(&x, &cpu_ads).unwrap();
        let du = lora::up_backward(&dy, &cpu_ads).unwrap();
        let params: usize = cpu_parts
            .iter()
            .map(|(a, b, ..)| a.elem_count() + b.elem_count())
            .sum();
        let mut slots = vec![];
        let mut off = 0;
        for (a, b, ..) in &cpu_parts {
            slots.push(GradSlots {
                a: off,
                b: off + a.elem_count(),
            });
            off += a.elem_count() + b.elem_count();
        }
        let grads = Tensor::zeros(params, DType::F32, &Device::Cpu).unwrap();
        lora::grads(&grads, &slots, &dy, &u, &du, &x, &cpu_ads).unwrap();
        let gpu_parts = adapters_for(inp, outs, &gpu());
        let gpu_ads = group(&gpu_parts);
        for dt in DTYPES {
            let (xg, dyg) = (on_gpu(&x, dt), on_gpu(&dy, dt));
            let ug = lora::down(&xg, &gpu_ads).unwrap();
            close("lora down", &u, &ug, dt);
            let dug = lora::up_backward(&dyg, &gpu_ads).unwrap();
            close("lora up backward", &du, &dug, dt);
            let gg = Tensor::zeros(params, DType::F32, &gpu()).unwrap();
            lora::grads(
                &gg,
                &slots,
                &dyg,
                &on_gpu(&u, dt),
                &on_gpu(&du, dt),
                &xg,
                &gpu_ads,
            )
            .unwrap();
            close("lora grads", &grads, &gg, dt);
        }
    }

    #[test]
    fn norms_and_the_residual_epilogue() {
        let (n, h) = (19, 96);
        let (x, y, w) = (
            rand(&[n, h], 5),
            rand(&[n, h], 6),
            rand(&[h], 7).affine(0.1, 1.0).unwrap(),
        );
        let parts = adapters_for(40, [h, 0, 0], &Device::Cpu);
        let ads = &group(&parts[..1]);
        let u = rand(&[n, 8], 8);
        let proj = Projection {
            y: &y,
            bias: None,
            u: Some(&u),
            adapters: ads,
        };
        let want = norm::residual_norm(&x, proj, &w, 1e-6).unwrap();
        let plain = norm::rms_norm(&x, &w, 1e-6).unwrap();
        let (dy, res) = (rand(&[n, h], 9), rand(&[n, h], 10));
        let du = rand(&[n, 8], 11);
        let xa = rand(&[n, 40], 12);
        let _ = xa;
        let parts_in = adapters_for(h, [40, 0, 0], &Device::Cpu);
        let ads_in = &group(&parts_in[..1]);
        let back_want =
            norm::norm_backward(&dy, &x, &w, 1e-6, Some(&res), Some((&du, ads_in))).unwrap();
        let gparts = adapters_for(40, [h, 0, 0], &gpu());
        let gads = &group(&gparts[..1]);
        let gparts_in = adapters_for(h, [40, 0, 0], &gpu());
        let gads_in = &group(&gparts_in[..1]);
        for dt in DTYPES {
            let (xg, yg, wg, ug) = (
                on_gpu(&x, dt),
                on_gpu(&y, dt),
                on_gpu(&w, dt),
                on_gpu(&u, dt),
            );
            let proj = Projection {
                y: &yg,
                bias: None,
                u: Some(&ug),
                adapters: gads,
            };
            close(
                "residual norm",
                &want,
                &norm::residual_norm(&xg, proj, &wg, 1e-6).unwrap(),
                dt,
            );
            close(
                "rms norm",
                &plain,
                &norm::rms_norm(&xg, &wg, 1e-6).unwrap(),
                dt,
            );
            let got = norm::norm_backward(
                &on_gpu(&dy, dt),
                &xg,
                &wg,
                1e-6,
                Some(&on_gpu(&res, dt)),
                Some((&on_gpu(&du, dt), gads_in)),
            )
            .unwrap();
            close("norm backward", &back_want, &got, dt);
        }
    }

    fn rope_tables(max: usize, d: usize) -> (Tensor, Tensor) {
        let half = d / 2;
        let ang: Vec<f32> = (0..max * half)
            .map(|i| (i / half) as f32 * 0.1 / (1 + i % half) as f32)
            .collect();
        let a = Tensor::from_vec(ang, (max, half), &Device::Cpu).unwrap();
        (a.cos().unwrap(), a.sin().unwrap())
    }

    #[test]
    fn qkv_epilogue_forward_and_backward_both_families() {
        let (b, t, nh, nkv, d) = (2, 5, 4, 2, 16);
        let width = (nh + 2 * nkv) * d;
        let y = rand(&[b * t, width], 13);
        let bias = rand(&[width], 14);
        let (cos, sin) = rope_tables(64, d);
        let pos = Tensor::from_vec(
            (0..(b * t) as u32)
                .map(|i| (i * 3) % 50)
                .collect::<Vec<_>>(),
            (b, t),
            &Device::Cpu,
        )
        .unwrap();
        let (qn, kn) = (
            rand(&[d], 15).affine(0.1, 1.0).unwrap(),
            rand(&[d], 16).affine(0.1, 1.0).unwrap(),
        );
        let grad = rand(&[b * t * width], 17);
        let (cg, sg, pg) = (
            cos.to_device(&gpu()).unwrap(),
            sin.to_device(&gpu()).unwrap(),
            pos.to_device(&gpu()).unwrap(),
        );
        for qwen3 in [false, true] {
            let spec = QkvSpec {
                batch: b,
                seq: t,
                heads: nh,
                kv_heads: nkv,
                head_dim: d,
                bias: (!qwen3).then_some(&bias),
                lora: None,
                qk_norm: qwen3.then_some((&qn, &kn, 1e-6)),
                cos: &cos,
                sin: &sin,
                positions: &pos,
            };
            let (fw, bw) = (
                qkv::forward(&y, spec).unwrap(),
                qkv::backward(&y, spec, &grad).unwrap(),
            );
            for dt in DTYPES {
                let (bg, qg, kg) = (on_gpu(&bias, dt), on_gpu(&qn, dt), on_gpu(&kn, dt));
                let gspec = QkvSpec {
                    bias: (!qwen3).then_some(&bg),
                    qk_norm: qwen3.then_some((&qg, &kg, 1e-6)),
                    cos: &cg,
                    sin: &sg,
                    positions: &pg,
                    ..spec
                };
                let yg = on_gpu(&y, dt);
                close("qkv forward", &fw, &qkv::forward(&yg, gspec).unwrap(), dt);
                close(
                    "qkv backward",
                    &bw,
                    &qkv::backward(&yg, gspec, &on_gpu(&grad, dt)).unwrap(),
                    dt,
                );
            }
        }
    }

    #[test]
    fn attention_forward_and_backward_over_spans() {
        for d in [16, 64, 128] {
            let (b, nh, nkv, t) = (2, 4, 2, 45);
            let q = (rand(&[b, nh, t, d], 20) * 0.3).unwrap();
            let k = (rand(&[b, nkv, t, d], 21) * 0.3).unwrap();
            let v = rand(&[b, nkv, t, d], 22);
            let spans = [
                RowSpan::causal(37),
                RowSpan {
                    start: 0,
                    end: 45,
                    seg1: 12,
                    seg2: 30,
                },
            ];
            let sp = Tensor::from_vec(RowSpan::flatten(&spans), (b, 4), &Device::Cpu).unwrap();
            let spec = AttnSpec {
                q: &q,
                k: &k,
                v: &v,
                spans: &sp,
                past: 0,
            };
            let (o, lse) = attention::forward(spec).unwrap();
            let dout = rand(&[b, t, nh * d], 23);
            let grads = attention::backward(spec, &o, &lse, &dout, None).unwrap();
            let spg = sp.to_device(&gpu()).unwrap();
            for dt in DTYPES {
                let (qg, kg, vg) = (on_gpu(&q, dt), on_gpu(&k, dt), on_gpu(&v, dt));
                let gspec = AttnSpec {
                    q: &qg,
                    k: &kg,
                    v: &vg,
                    spans: &spg,
                    past: 0,
                };
                let (og, lg) = attention::forward(gspec).unwrap();
                close(&format!("attention forward d{d}"), &o, &og, dt);
                close(&format!("attention lse d{d}"), &lse, &lg, dt);
                let gg = attention::backward(gspec, &og, &lg, &on_gpu(&dout, dt), None).unwrap();
                close(&format!("attention backward d{d}"), &grads, &gg, dt);
            }
        }
    }

    #[test]
    fn swiglu_forward_and_backward() {
        let (n, i) = (9, 40);
        let gu = rand(&[n, 2 * i], 30);
        let dh = rand(&[n, i], 31);
        let want = swiglu::forward(GateUp { y: &gu, lora: None }).unwrap();
        let want_b = swiglu::backward(GateUp { y: &gu, lora: None }, &dh, None).unwrap();
        for dt in DTYPES {
            let g = on_gpu(&gu, dt);
            close(
                "swiglu",
                &want,
                &swiglu::forward(GateUp { y: &g, lora: None }).unwrap(),
                dt,
            );
            let got =
                swiglu::backward(GateUp { y: &g, lora: None }, &on_gpu(&dh, dt), None).unwrap();
            close("swiglu backward", &want_b, &got, dt);
        }
    }

    #[test]
    fn cross_entropy_chunks() {
        let (c, h, v) = (7, 24, 300);
        let hid = rand(&[c, h], 40);
        let w = (rand(&[v, h], 41) * 0.2).unwrap();
        let tg = Tensor::from_vec(
            (0..c as u32).map(|i| i * 37 % v as u32).collect::<Vec<_>>(),
            c,
            &Device::Cpu,
        )
        .unwrap();
        let want = Tensor::zeros((c, h + 1), DType::F32, &Device::Cpu).unwrap();
        xent::chunk_into(&want, &hid, &w, &tg, true).unwrap();
        for dt in DTYPES {
            let got = Tensor::zeros((c, h + 1), DType::F32, &gpu()).unwrap();
            xent::chunk_into(
                &got,
                &on_gpu(&hid, dt),
                &on_gpu(&w, dt),
                &tg.to_device(&gpu()).unwrap(),
                true,
            )
            .unwrap();
            close("cross entropy", &want, &got, dt);
        }
    }
}
