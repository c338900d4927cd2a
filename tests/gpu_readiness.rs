//! GPU readiness, checked on the CPU: the layouts every product hands to the matmul would be
//! accepted by cuBLAS as candle calls it (the layout guard), at a vocabulary above the LM head's
//! block size, with dropout, recomputation and batched generation; half-precision steps track
//! f32; the f16 residual stream does not overflow; the device-side greedy choice and the
//! partial-selection sampler decide as the host reference does. `tests/cuda.rs` runs the same
//! steps on a GPU.

mod common;

use candle_core::{DType, Device, Tensor};
use common::readiness::*;
use mo_align::generate::{generate, pick_token, SamplingConfig};
use mo_align::model::ctx::ForwardCtx;
use mo_align::model::input::ModelInput;
use mo_align::model::matmul::set_layout_guard;
use mo_align::util::rng::stream_rng;
use rand::Rng;

#[test]
fn a_large_vocabulary_training_step_passes_the_layout_guard() {
    set_layout_guard(true);
    let m = readiness_model(DType::F32, &Device::Cpu);
    let seqs = readiness_seqs();
    let plain = training_step(&m, &seqs, 3, false).expect("step under the layout guard");
    let recomputed = training_step(&m, &seqs, 3, true).expect("recomputed step under the guard");
    assert!(plain.loss.is_finite());
    assert_eq!(
        plain.grads.len(),
        2 * 7 * readiness_config().num_hidden_layers
    );
    for (name, g) in &plain.grads {
        assert!(
            g.iter().all(|x| x.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(g.iter().any(|&x| x != 0.0), "{name}: zero gradient");
    }
    // Recomputed layers redraw the same dropout masks: same loss, same gradients.
    assert_eq!(plain.loss, recomputed.loss);
    let (total, worst, name) = grad_distance(&plain, &recomputed);
    assert!(
        total < 1e-5 && worst < 1e-4,
        "recomputed: {total} (worst {worst} at {name})"
    );
    // Another dropout seed draws other masks.
    let other = training_step(&m, &seqs, 4, false).unwrap();
    assert_ne!(plain.loss, other.loss);
}

#[test]
fn bf16_and_f16_steps_track_the_f32_step() {
    set_layout_guard(true);
    let seqs = readiness_seqs();
    let want = training_step(&readiness_model(DType::F32, &Device::Cpu), &seqs, 3, true).unwrap();
    for (dtype, tol) in [(DType::BF16, 0.03), (DType::F16, 0.005)] {
        let got = training_step(&readiness_model(dtype, &Device::Cpu), &seqs, 3, true).unwrap();
        let (total, worst, name) = grad_distance(&want, &got);
        assert!(
            (got.loss - want.loss).abs() < 0.02 * want.loss.abs(),
            "{dtype:?} loss {} vs f32 {}",
            got.loss,
            want.loss
        );
        assert!(
            total < tol,
            "{dtype:?} gradients {total} from f32 (worst {worst} at {name})"
        );
    }
}

/// Qwen2.5 carries a few residual channels in the thousands. Here one channel starts at 60,000
/// (f16's largest finite value is 65,504) and every MLP adds about 10,000 to it: in an f16
/// residual stream that is inf after the first layer; in the f32 stream mo-align keeps under
/// f16 the hidden states stay finite and match the f32 model's.
#[test]
fn the_f16_residual_stream_does_not_overflow() {
    let build = |dtype: DType| {
        let mut m = readiness_model(dtype, &Device::Cpu);
        let (v, h) = (READINESS_VOCAB, m.config.hidden_size);
        let mut e = vec![0.01f32; v * h];
        for row in 0..v {
            e[row * h] = 60_000.0;
        }
        m.embed_tokens = Tensor::from_vec(e, (v, h), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        for layer in &mut m.layers {
            let i = m.config.intermediate_size;
            // gate = up = sum of the normalised input (about sqrt(h)) in every unit, so
            // silu(gate) * up is about 64 per unit; down_proj sums the units into channel 0.
            let ones = Tensor::ones((i, h), dtype, &Device::Cpu).unwrap();
            layer.mlp.gate_proj.weight = ones.clone();
            layer.mlp.up_proj.weight = ones;
            let mut d = vec![0f32; h * i];
            d[..i].fill(1.0);
            layer.mlp.down_proj.weight = Tensor::from_vec(d, (h, i), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
        }
        m
    };
    let seqs = readiness_seqs();
    let input = ModelInput::right_padded(&seqs[..1], 0, &Device::Cpu).unwrap();
    let hidden = |dtype| {
        build(dtype)
            .forward(&input, ForwardCtx::EVAL, None)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (full, half) = (hidden(DType::F32), hidden(DType::F16));
    assert!(
        half.iter().all(|x| x.is_finite()),
        "f16 hidden states overflowed"
    );
    let worst = full
        .iter()
        .zip(&half)
        .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
        .fold(0f32, f32::max);
    assert!(worst < 0.05, "f16 hidden states differ from f32 by {worst}");
}

/// The reference: whole-prefix forwards, host logits, the host penalty and argmax.
fn host_greedy(m: &mo_align::model::Qwen, prompt: &[u32], cfg: &SamplingConfig) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    let mut out = vec![];
    for _ in 0..cfg.max_new_tokens {
        let input = ModelInput::right_padded(std::slice::from_ref(&seq), 0, &m.device).unwrap();
        let hidden = m.forward(&input, ForwardCtx::EVAL, None).unwrap();
        let last = hidden
            .narrow(1, seq.len() - 1, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let logits = m.logits(&last).unwrap().squeeze(0).unwrap();
        let tok = pick_token(
            &logits.to_vec1::<f32>().unwrap(),
            &seq,
            cfg,
            &mut stream_rng(0, 0),
        );
        seq.push(tok);
        out.push(tok);
    }
    out
}

#[test]
fn batched_greedy_generation_chooses_on_the_device_as_the_host_does() {
    set_layout_guard(true);
    let m = readiness_model(DType::F32, &Device::Cpu);
    let prompts: Vec<Vec<u32>> = readiness_seqs()
        .into_iter()
        .chain([vec![5, 17, 19_999]])
        .map(|s| s[..s.len().min(9)].to_vec())
        .collect();
    for penalty in [1.0, 1.3] {
        let cfg = SamplingConfig {
            max_new_tokens: 6,
            repetition_penalty: penalty,
            ..SamplingConfig::default()
        };
        // B = 3 with different prompt lengths: left padding, a KV cache, [B, V] logits.
        let got = generate(&m, &prompts, &[0, 1, 2], &cfg, &[], 0, ForwardCtx::EVAL).unwrap();
        for (p, g) in prompts.iter().zip(&got) {
            assert_eq!(g, &host_greedy(&m, p, &cfg), "penalty {penalty}");
        }
    }
}

/// The sampler before partial selection: a full sort of the vocabulary, then top-k, then the
/// smallest prefix holding top_p of the mass, then one uniform draw over what is kept.
fn full_sort_pick(logits: &[f32], cfg: &SamplingConfig, rng: &mut impl Rng) -> u32 {
    let inv_t = 1.0 / cfg.temperature as f32;
    let mut cand: Vec<(u32, f32)> = (0u32..).zip(logits.iter().map(|l| l * inv_t)).collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    cand.truncate(if cfg.top_k > 0 { cfg.top_k } else { cand.len() });
    let weights: Vec<f64> = cand
        .iter()
        .map(|c| ((c.1 - cand[0].1) as f64).exp())
        .collect();
    let z: f64 = weights.iter().sum();
    let p: Vec<f64> = weights.iter().map(|w| w / z).collect();
    let mut mass = 0.0;
    let keep = match cfg.top_p < 1.0 {
        true => p.iter().position(|q| {
            mass += q;
            mass >= cfg.top_p
        }),
        false => None,
    }
    .map_or(p.len(), |i| i + 1);
    let u = rng.random::<f64>() * p[..keep].iter().sum::<f64>();
    let mut acc = 0.0;
    let hit = p[..keep].iter().position(|q| {
        acc += q;
        u < acc
    });
    cand[hit.unwrap_or(keep - 1)].0
}

#[test]
fn partial_selection_samples_exactly_as_a_full_sort() {
    let mut rng = stream_rng(5, 5);
    let logits: Vec<f32> = mo_align::util::rng::normal_vec(&mut rng, READINESS_VOCAB, 3.0);
    for (top_k, top_p, temperature) in [
        (20, 0.8, 0.7),
        (50, 1.0, 1.0),
        (0, 0.9, 1.0),
        (0, 0.999, 2.0),
        (1, 1.0, 1.0),
    ] {
        let cfg = SamplingConfig {
            top_k,
            top_p,
            temperature,
            ..SamplingConfig::default()
        };
        for seed in 0..40 {
            let a = pick_token(&logits, &[], &cfg, &mut stream_rng(seed, 1));
            let b = full_sort_pick(&logits, &cfg, &mut stream_rng(seed, 1));
            assert_eq!(
                a, b,
                "top_k {top_k} top_p {top_p} T {temperature} seed {seed}"
            );
        }
    }
}
