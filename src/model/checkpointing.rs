//! Activation checkpointing (used for decoder layers).
//!
//! A checkpointed layer runs its forward without a graph and keeps only its input. In the
//! backward, the layer is run again with a graph (same dropout masks: the generator restarts
//! at the layer's first call id), and `<output, incoming gradient>` is differentiated. The input
//! gradient flows on through the outer graph; the adapter gradients found inside cannot (a
//! custom op returns gradients for its inputs only), so they go to a `GradSink` that the
//! trainer adds to the outer gradients.

use super::ctx::{ForwardCtx, GradSink};
use super::fused::attach1;
use crate::kernels::dropout::DropoutRng;
use candle_core::{Result, Tensor, Var};
use std::sync::Arc;

/// `f(x)`, keeping only `x` for the backward. There `f` runs again with a graph (its dropout
/// generator restarted at the same call id, so the masks are the same), `<f(x), incoming
/// gradient>` is differentiated, the input gradient is returned to the outer graph and the
/// gradients of `params` found inside go to `sink`.
pub fn checkpointed<F>(
    x: &Tensor,
    ctx: ForwardCtx,
    sink: &Arc<GradSink>,
    params: Vec<Var>,
    f: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor, ForwardCtx) -> Result<Tensor> + Send + Sync + 'static,
{
    let replay = ctx.dropout.map(|d| (d.seed(), d.calls()));
    // On the detached input nothing inside `f` is recorded.
    let y = f(
        &x.detach(),
        ForwardCtx {
            grad: false,
            sink: None,
            recompute: false,
            ..ctx
        },
    )?;
    // The first layer's input (embeddings) is outside any graph: make it a leaf so the
    // backward (and with it the parameter gradients) still runs.
    let x = if x.track_op() {
        x.clone()
    } else {
        Var::from_tensor(x)?.as_tensor().clone()
    };
    let sink = sink.clone();
    let (x_saved, adapters, gate) = (x.detach(), ctx.adapters, ctx.gate.cloned());
    attach1(
        &x,
        y,
        Box::new(move |dy| {
            let xv = Var::from_tensor(&x_saved)?;
            let rng = replay.map(|(seed, calls)| DropoutRng::starting_at(seed, calls));
            let ctx = ForwardCtx {
                adapters,
                dropout: rng.as_ref(),
                grad: true,
                sink: None,
                recompute: false,
                gate: gate.as_ref(),
            };
            let out = f(xv.as_tensor(), ctx)?;
            let grads = (out * dy)?.sum_all()?.backward()?;
            for var in &params {
                if let Some(g) = grads.get(var.as_tensor()) {
                    sink.add(var.as_tensor().id(), g)?;
                }
            }
            match grads.get(xv.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => x_saved.zeros_like(),
            }
        }),
    )
}
