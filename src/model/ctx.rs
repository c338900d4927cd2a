//! What one forward pass does besides computing: which adapters are on, whether a gradient
//! will be taken, where dropout masks come from, and whether decoder layers are recomputed in
//! the backward (with the sink that collects the gradients found there).

use crate::rng::DropoutRng;
use candle_core::{Result, Tensor, TensorId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Whether a forward pass uses the LoRA adapters. `Disabled` is the DPO reference model: the
/// same weights without a second copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adapters {
    Enabled,
    Disabled,
}

/// Per-forward switches: adapters on or off, gradient or not, dropout masks, recomputation.
#[derive(Clone, Copy)]
pub struct ForwardCtx<'a> {
    pub adapters: Adapters,
    /// Dropout masks when training; `None` means no dropout (eval, reference, generation).
    pub dropout: Option<&'a DropoutRng>,
    /// Whether a gradient will be taken. Without one the adapters enter as constants, so the
    /// forward records no graph and keeps no activations (candle has no no-grad mode).
    pub grad: bool,
    /// Activation checkpointing: decoder layers are recomputed in the backward, and the
    /// adapter gradients found there are deposited in this sink for the trainer.
    pub recompute: Option<&'a Arc<GradSink>>,
    /// Per-rank gates of every LoRA adapter ([rank]): a weight-conditioned adapter is one block
    /// of rank r per objective side by side, and the gates are each block's objective weight,
    /// so the adapter's update is sum_i w_i B_i A_i (`None`: every gate 1).
    pub gate: Option<&'a Tensor>,
}

impl<'a> ForwardCtx<'a> {
    pub const EVAL: ForwardCtx<'static> = ForwardCtx {
        adapters: Adapters::Enabled,
        dropout: None,
        grad: false,
        recompute: None,
        gate: None,
    };
    pub const REFERENCE: ForwardCtx<'static> = ForwardCtx {
        adapters: Adapters::Disabled,
        dropout: None,
        grad: false,
        recompute: None,
        gate: None,
    };
    /// Adapters on, gradients recorded, dropout masks from `rng`.
    pub fn train(rng: &'a DropoutRng) -> Self {
        ForwardCtx {
            adapters: Adapters::Enabled,
            dropout: Some(rng),
            grad: true,
            recompute: None,
            gate: None,
        }
    }

    /// The same context with the LoRA blocks gated by `gate` (see `gate`).
    pub fn with_gate(self, gate: Option<&'a Tensor>) -> Self {
        ForwardCtx { gate, ..self }
    }

    /// The same context with decoder layers recomputed in the backward (see `checkpointing`).
    pub fn with_recompute(self, sink: &'a Arc<GradSink>) -> Self {
        ForwardCtx {
            recompute: Some(sink),
            ..self
        }
    }
}

/// Gradients of trainable tensors computed inside recomputed layers.
#[derive(Default)]
pub struct GradSink {
    grads: Mutex<HashMap<TensorId, Tensor>>,
}

impl GradSink {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub(crate) fn add(&self, id: TensorId, g: &Tensor) -> Result<()> {
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
