//! What one forward pass does besides computing: which adapters are on, whether a gradient
//! will be taken, where dropout masks come from, and whether decoder layers are recomputed in
//! the backward (with the sink that collects the gradients found there).

use crate::kernels::dropout::DropoutRng;
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
    /// Where adapter gradients go. With a sink, the fused decoder (`model::stack`) writes
    /// every adapter's gradient into the sink's flat buffer; without one, the unfused blocks
    /// return them through candle's gradient store.
    pub sink: Option<&'a Arc<GradSink>>,
    /// Activation checkpointing: decoder layers are recomputed in the backward (needs `sink`:
    /// the adapter gradients found there are deposited in it).
    pub recompute: bool,
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
        sink: None,
        recompute: false,
        gate: None,
    };
    pub const REFERENCE: ForwardCtx<'static> = ForwardCtx {
        adapters: Adapters::Disabled,
        dropout: None,
        grad: false,
        sink: None,
        recompute: false,
        gate: None,
    };
    /// Adapters on, gradients recorded, dropout masks from `rng`.
    pub fn train(rng: &'a DropoutRng) -> Self {
        ForwardCtx {
            adapters: Adapters::Enabled,
            dropout: Some(rng),
            grad: true,
            sink: None,
            recompute: false,
            gate: None,
        }
    }

    /// The same context with adapter gradients written into `sink` (the fused decoder).
    pub fn with_sink(self, sink: &'a Arc<GradSink>) -> Self {
        ForwardCtx {
            sink: Some(sink),
            ..self
        }
    }

    /// The same context with the LoRA blocks gated by `gate` (see `gate`).
    pub fn with_gate(self, gate: Option<&'a Tensor>) -> Self {
        ForwardCtx { gate, ..self }
    }

    /// The same context with decoder layers recomputed in the backward (see `checkpointing`).
    pub fn with_recompute(self, sink: &'a Arc<GradSink>) -> Self {
        ForwardCtx {
            sink: Some(sink),
            recompute: true,
            ..self
        }
    }
}

/// Adapter gradients computed outside candle's gradient store: by the fused decoder, which
/// writes every adapter's gradient into one flat buffer (one zero-fill per optimizer step, no
/// per-tensor bookkeeping), and by recomputed unfused layers, which deposit per tensor.
#[derive(Default)]
pub struct GradSink {
    grads: Mutex<HashMap<TensorId, Tensor>>,
    flat: Mutex<Option<FlatGrads>>,
}

/// The flat buffer and where each tensor's gradient sits in it.
#[derive(Clone)]
pub struct FlatGrads {
    pub buffer: Tensor,
    /// Per tensor: (offset, dims).
    pub slots: HashMap<TensorId, (usize, Vec<usize>)>,
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

    /// The flat buffer for `tensors` (in this order, each at the next offset), zero-filled the
    /// first time it is asked for; later backwards of the same step accumulate into it.
    pub fn flat(
        &self,
        tensors: &[&Tensor],
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<FlatGrads> {
        let mut slot = self.flat.lock().expect("grad sink poisoned");
        if let Some(f) = slot.as_ref() {
            return Ok(f.clone());
        }
        let mut slots = HashMap::new();
        let mut offset = 0;
        for t in tensors {
            slots.insert(t.id(), (offset, t.dims().to_vec()));
            offset += t.elem_count();
        }
        let f = FlatGrads {
            buffer: Tensor::zeros(offset, dtype, device)?,
            slots,
        };
        *slot = Some(f.clone());
        Ok(f)
    }

    /// The flat buffer, when a fused backward made one.
    pub fn flat_buffer(&self) -> Option<FlatGrads> {
        self.flat.lock().expect("grad sink poisoned").clone()
    }

    /// Removes and returns the gradient deposited for `id` (a view of the flat buffer when the
    /// fused decoder wrote it, plus any per-tensor deposit).
    pub fn take(&self, id: TensorId) -> Option<Tensor> {
        let deposited = self.grads.lock().expect("grad sink poisoned").remove(&id);
        let flat = self.flat.lock().expect("grad sink poisoned");
        let view = flat.as_ref().and_then(|f| {
            let (offset, dims) = f.slots.get(&id)?;
            let n = dims.iter().product();
            f.buffer
                .narrow(0, *offset, n)
                .ok()?
                .reshape(dims.as_slice())
                .ok()
        });
        match (deposited, view) {
            (Some(a), Some(b)) => (a + b).ok(),
            (a, b) => a.or(b),
        }
    }
}
