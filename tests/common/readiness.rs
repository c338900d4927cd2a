//! GPU-readiness fixtures shared by the CPU suite (`tests/gpu_readiness.rs`, under the layout
//! guard) and `tests/cuda.rs` (the same steps on a GPU, compared with the CPU f32 run): a model
//! with a vocabulary above the LM head's 16,384-row block, LoRA with dropout on every target,
//! and one training step that returns every adapter gradient.

use candle_core::{DType, Device, Tensor};
use mo_align::kernels::dropout::DropoutRng;
use mo_align::model::ctx::ForwardCtx;
use mo_align::model::ctx::GradSink;
use mo_align::model::input::ModelInput;
use mo_align::model::lm_head::gather_rows;
use mo_align::model::lora::LoraConfig;
use mo_align::model::tiny::random_model;
use mo_align::model::{Qwen, QwenConfig};
use mo_align::util::rng::{normal_vec, stream_rng};

/// Two vocabulary blocks in the LM head's backward (16,384 + 3,616 rows).
pub const READINESS_VOCAB: usize = 20_000;

pub fn readiness_config() -> QwenConfig {
    QwenConfig {
        family: mo_align::model::config::Family::Qwen2,
        attention_bias: true,
        vocab_size: READINESS_VOCAB,
        hidden_size: 64,
        intermediate_size: 160,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        max_position_embeddings: 512,
        rope_theta: 1_000_000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: vec![],
    }
}

pub fn readiness_lora() -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        ..LoraConfig::default()
    }
}

/// The same model on every device and dtype: host-drawn weights, fresh adapters, and a
/// non-zero B everywhere (a zero B zeroes A's gradient).
pub fn readiness_model(dtype: DType, device: &Device) -> Qwen {
    let mut m = random_model(&readiness_config(), dtype, device).expect("random model");
    m.attach_lora(&readiness_lora(), 7).expect("attach lora");
    let mut rng = stream_rng(11, 0);
    for (name, var) in m.lora_vars() {
        if name.ends_with("lora_B.weight") {
            let v = normal_vec(&mut rng, var.elem_count(), 0.05);
            let t = Tensor::from_vec(v, var.dims(), &Device::Cpu)
                .and_then(|t| t.to_dtype(var.dtype()))
                .and_then(|t| t.to_device(device))
                .expect("B");
            var.set(&t).expect("set B");
        }
    }
    m
}

/// Two sequences of different lengths whose ids reach both vocabulary blocks.
pub fn readiness_seqs() -> Vec<Vec<u32>> {
    [40usize, 29]
        .iter()
        .enumerate()
        .map(|(b, &len)| {
            (0..len)
                .map(|i| ((i * 7919 + b * 104_729 + 13) % READINESS_VOCAB) as u32)
                .collect()
        })
        .collect()
}

pub struct StepGrads {
    pub loss: f64,
    /// (name, gradient as f32 values) for every LoRA tensor, in `lora_vars` order.
    pub grads: Vec<(String, Vec<f32>)>,
}

/// One SFT-shaped step: mean next-token NLL of `seqs` with dropout masks from `dropout_seed`,
/// optionally with recomputed layers; the gradient of every adapter tensor, as the trainer
/// collects it (the graph's, plus what recomputed layers deposit in the sink).
pub fn training_step(
    m: &Qwen,
    seqs: &[Vec<u32>],
    dropout_seed: u64,
    recompute: bool,
) -> candle_core::Result<StepGrads> {
    let rng = DropoutRng::new(dropout_seed);
    let sink = GradSink::new();
    let ctx = ForwardCtx::train(&rng);
    let ctx = if recompute {
        ctx.with_recompute(&sink)
    } else {
        ctx
    };
    let input = ModelInput::right_padded(seqs, 0, &m.device)?;
    let hidden = m.forward(&input, ctx, None)?;
    let t = hidden.dim(1)?;
    let (mut rows, mut targets) = (vec![], vec![]);
    for (b, s) in seqs.iter().enumerate() {
        rows.extend((0..s.len() - 1).map(|i| (b * t + i) as u32));
        targets.extend_from_slice(&s[1..]);
    }
    let lp = m.token_logprobs(&gather_rows(&hidden, &rows)?, &targets, true)?;
    let loss = (lp.sum_all()? * (-1.0 / targets.len() as f64))?;
    let store = loss.backward()?;
    let mut grads = vec![];
    for (name, var) in m.lora_vars() {
        let parts = [
            store.get(var.as_tensor()).cloned(),
            sink.take(var.as_tensor().id()),
        ];
        let mut total: Option<Tensor> = None;
        for g in parts.into_iter().flatten() {
            total = Some(match total {
                Some(acc) => (acc + g)?,
                None => g,
            });
        }
        let g = total.ok_or_else(|| candle_core::Error::Msg(format!("{name}: no gradient")))?;
        let values = g
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        grads.push((name, values));
    }
    Ok(StepGrads {
        loss: loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        grads,
    })
}

/// Relative L2 distance of `got` from `want` over all adapter gradients together, and the
/// worst single tensor's.
pub fn grad_distance(want: &StepGrads, got: &StepGrads) -> (f64, f64, String) {
    let (mut num, mut den, mut worst, mut worst_name) = (0.0f64, 0.0f64, 0.0f64, String::new());
    for ((name, a), (_, b)) in want.grads.iter().zip(&got.grads) {
        let (mut n, mut d) = (0.0f64, 0.0f64);
        for (x, y) in a.iter().zip(b) {
            n += ((x - y) as f64).powi(2);
            d += (*x as f64).powi(2);
        }
        num += n;
        den += d;
        let rel = (n / d.max(1e-30)).sqrt();
        if rel > worst {
            worst = rel;
            worst_name = name.clone();
        }
    }
    ((num / den.max(1e-30)).sqrt(), worst, worst_name)
}
