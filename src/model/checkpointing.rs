//! Activation checkpointing for decoder layers.
//!
//! A checkpointed layer runs its forward without a graph and keeps only its input. In the
//! backward, the layer is run again with a graph (same dropout masks: the generator restarts
//! at the layer's first call id), and `<output, incoming gradient>` is differentiated. The input
//! gradient flows on through the outer graph; the adapter gradients found inside cannot (a
//! custom op returns gradients for its inputs only), so they go to a `GradSink` that the
//! trainer adds to the outer gradients.

use super::fused::attach1;
use super::lora::LoraCtx;
use super::qwen2::{DecoderLayer, ModelInput, Rope};
use crate::rng::DropoutRng;
use candle_core::{Result, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Gradients of trainable tensors computed inside recomputed layers.
#[derive(Default)]
pub struct GradSink {
    grads: Mutex<HashMap<TensorId, Tensor>>,
}

impl GradSink {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn add(&self, id: TensorId, g: &Tensor) -> Result<()> {
        let mut map = self.grads.lock().expect("grad sink poisoned");
        let sum = match map.remove(&id) {
            Some(acc) => (acc + g)?,
            None => g.clone(),
        };
        map.insert(id, sum);
        Ok(())
    }

    /// Removes and returns the gradient deposited for `id`.
    pub fn take(&self, id: TensorId) -> Option<Tensor> {
        self.grads.lock().expect("grad sink poisoned").remove(&id)
    }
}

/// `layer(x)`, keeping only `x` for the backward.
pub fn checkpointed_layer(
    layer: &DecoderLayer,
    x: &Tensor,
    input: &ModelInput,
    rope: &Rope,
    ctx: LoraCtx,
    sink: &Arc<GradSink>,
) -> Result<Tensor> {
    let replay = ctx.dropout.map(|d| (d.seed(), d.calls()));
    // On the detached input nothing inside the layer is recorded.
    let y = layer.forward(
        &x.detach(),
        input,
        rope,
        LoraCtx {
            grad: false,
            recompute: None,
            ..ctx
        },
        None,
    )?;
    // The first layer's input (embeddings) is outside any graph: make it a leaf so the layer's
    // backward (and with it the adapter gradients) still runs.
    let x = if x.track_op() {
        x.clone()
    } else {
        Var::from_tensor(x)?.as_tensor().clone()
    };
    let (layer, input, rope, sink) = (layer.clone(), input.clone(), rope.clone(), sink.clone());
    let (x_saved, adapters) = (x.detach(), ctx.adapters);
    attach1(
        &x,
        y,
        Box::new(move |dy| {
            let xv = Var::from_tensor(&x_saved)?;
            let rng = replay.map(|(seed, calls)| DropoutRng::starting_at(seed, calls));
            let ctx = LoraCtx {
                adapters,
                dropout: rng.as_ref(),
                grad: true,
                recompute: None,
            };
            let out = layer.forward(xv.as_tensor(), &input, &rope, ctx, None)?;
            let grads = (out * dy)?.sum_all()?.backward()?;
            for lin in layer.linears() {
                if let Some(l) = &lin.lora {
                    for var in [&l.a, &l.b] {
                        if let Some(g) = grads.get(var.as_tensor()) {
                            sink.add(var.as_tensor().id(), g)?;
                        }
                    }
                }
            }
            match grads.get(xv.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => x_saved.zeros_like(),
            }
        }),
    )
}
