//! What one optimizer step reports: the trainer's step produces it, the log window, the loss
//! scaler and the progress bar read it.

/// Result of one optimizer step.
#[derive(Debug, Clone)]
pub struct StepStats {
    /// Mean loss over the step (summed loss / summed example weight).
    pub loss: f64,
    /// Global gradient norm before clipping (loss scale removed).
    pub grad_norm: f64,
    pub weight: f64,
    pub tokens: usize,
    pub metrics: Vec<(String, f64)>,
    /// False when the loss or gradient was not finite and the update was skipped.
    pub applied: bool,
    /// Wall seconds of the forward passes, the backward passes (through the gradient-norm read,
    /// which is where the device finishes them), and the update (clipping, AdamW), summed over
    /// the step's micro-batches.
    pub phase_s: [f64; 3],
}
