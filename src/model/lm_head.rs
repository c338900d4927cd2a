//! The LM head: log-probs of given target tokens at selected positions, in chunks.
//!
//! Full [T, 151936] logits are never built for a batch, in the forward *or* the backward. For a
//! chunk of C rows we compute logits, log-softmax and the picked log-prob, and (when a gradient
//! is wanted) the exact input gradient of each row's log-prob,
//!     d logp_i / d h_i = E[t_i] - softmax(h_i E^T) E      ([C, H], small),
//! then drop the chunk's logits. The result is attached to the graph as
//!     logp = logp_value + (h . G) - (h . G).detach()
//! whose value is exactly `logp_value` and whose gradient w.r.t. h is exactly G. This is the
//! same arithmetic a backward through the LM head would do (one extra [C,V]x[V,H] matmul per
//! chunk), with memory O(C x V) instead of O(T x V), and no gradient for the frozen embedding.

use super::dtype::compute_dtype;
use super::frozen::frozen_mul;
use super::fused::attach3;
use super::matmul::{matmul, matmul_t};
use super::qwen::Qwen;
use candle_core::{DType, Result, Tensor, D};

impl Qwen {
    /// Log-probabilities (f32, or f64 for an f64 model; [N]) of `targets[i]` given hidden state row `hidden[i]` ([N, H]).
    /// With `with_grad`, the result carries the exact gradient back to `hidden`.
    pub fn token_logprobs(
        &self,
        hidden: &Tensor,
        targets: &[u32],
        with_grad: bool,
    ) -> Result<Tensor> {
        let (n, _h) = hidden.dims2()?;
        if n != targets.len() {
            candle_core::bail!(
                "token_logprobs: {n} hidden rows for {} targets",
                targets.len()
            );
        }
        let _phase = crate::util::profile::phase(crate::util::profile::Phase::LmHead);
        let _scope = crate::util::profile::scope("lm_head", &self.device);
        let acc = compute_dtype(hidden.dtype());
        if n == 0 {
            return Tensor::zeros(0, acc, &self.device);
        }
        let w_param = self.output_weight();
        if self.fused_head_applies(hidden) {
            return self.fused_token_logprobs(hidden, targets, with_grad);
        }
        let w = &w_param.detach();
        let h_const = hidden.detach().contiguous()?;
        let targets_t = Tensor::from_slice(targets, n, &self.device)?;
        let mut logps = Vec::new();
        let mut grads = Vec::new();
        let chunk = self.logits_chunk.max(1);
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            let h = h_const.narrow(0, start, len)?;
            let tgt = targets_t.narrow(0, start, len)?;
            // Logits in the model dtype (as transformers does), softmax arithmetic in f32.
            let logits = matmul_t(&h, w)?.to_dtype(acc)?;
            let max = logits.max_keepdim(D::Minus1)?;
            let shifted = logits.broadcast_sub(&max)?;
            drop(logits);
            let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
            let picked = shifted.gather(&tgt.unsqueeze(1)?, 1)?;
            logps.push((picked - &lse)?.squeeze(1)?);
            if with_grad {
                let expected = expected_embedding(&shifted, &lse, w)?;
                drop(shifted);
                let own = w.index_select(&tgt, 0)?.to_dtype(acc)?;
                grads.push((own - expected)?);
            }
        }
        let logp = Tensor::cat(&logps, 0)?;
        if !with_grad || !(hidden.track_op() || w_param.track_op()) {
            return Ok(logp);
        }
        let g = Tensor::cat(&grads, 0)?.to_dtype(hidden.dtype())?;
        if !w_param.track_op() {
            let dot = frozen_mul(hidden, &g)?.sum(D::Minus1)?.to_dtype(acc)?;
            return logp + (&dot - dot.detach())?;
        }
        // Full fine-tuning: the output embedding learns too. For upstream gradients dy [N],
        //   dW = sum_i dy_i (onehot(t_i) - softmax(h_i W^T))^T h_i,
        // recomputed chunk by chunk in the backward (no [N, V] tensor is kept).
        let (w, chunk, need_dh) = (w.clone(), chunk, hidden.track_op());
        attach3(
            hidden,
            w_param,
            w_param,
            logp,
            Box::new(move |dy| {
                let dyh = dy.to_dtype(h_const.dtype())?.unsqueeze(1)?;
                let dh = if need_dh {
                    Some(g.broadcast_mul(&dyh)?)
                } else {
                    None
                };
                let weighted = h_const.broadcast_mul(&dyh)?; // [N, H]: dy_i h_i
                let mut dw = w.zeros_like()?.index_add(&targets_t, &weighted, 0)?;
                for start in (0..n).step_by(chunk) {
                    let len = chunk.min(n - start);
                    let h = h_const.narrow(0, start, len)?;
                    let logits = matmul_t(&h, &w)?.to_dtype(acc)?;
                    let probs = candle_nn::ops::softmax_last_dim(&logits)?.to_dtype(w.dtype())?;
                    let part = matmul(&probs.t()?, &weighted.narrow(0, start, len)?)?;
                    dw = (dw - part)?;
                }
                Ok((dh, Some(dw), None))
            }),
        )
    }

    /// Whether `token_logprobs` runs the fused cross entropy (`kernels::xent`): a frozen output
    /// weight and a dtype with kernels.
    fn fused_head_applies(&self, hidden: &Tensor) -> bool {
        let kernels = if self.device.is_cpu() {
            crate::kernels::cpu::cpu_supported(self.dtype)
        } else {
            cfg!(feature = "cuda") && matches!(self.dtype, DType::F32 | DType::BF16)
        };
        kernels
            && super::stack::enabled()
            && !self.output_weight().is_variable()
            && hidden.dtype() == self.dtype
    }

    /// `token_logprobs` through the fused cross entropy: each chunk of rows is one op that
    /// writes the rows' log-probs and their exact gradients G into one [N, H + 1] buffer; the
    /// backward multiplies G by the incoming per-row gradient.
    fn fused_token_logprobs(
        &self,
        hidden: &Tensor,
        targets: &[u32],
        with_grad: bool,
    ) -> Result<Tensor> {
        let (n, h) = hidden.dims2()?;
        let acc = compute_dtype(self.dtype);
        let w = self.output_weight().detach();
        let hc = hidden.detach().contiguous()?;
        // The kernels index the vocabulary by target: check here, once, on the host.
        let vocab = w.dim(0)?;
        if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("token_logprobs: target id {t} is outside the vocabulary ({vocab})");
        }
        let targets_t = Tensor::from_slice(targets, n, &self.device)?;
        let out = crate::kernels::uninit((n, h + 1), acc, &hc)?;
        let chunk = self.logits_chunk.max(1);
        let grad = with_grad && hidden.track_op();
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            crate::kernels::xent::chunk_into(
                &out.narrow(0, start, len)?,
                &hc.narrow(0, start, len)?,
                &w,
                &targets_t.narrow(0, start, len)?,
                grad,
            )?;
        }
        let logp = out.narrow(1, h, 1)?.squeeze(1)?;
        if !grad {
            return logp.contiguous();
        }
        let g = out.narrow(1, 0, h)?;
        let hdtype = hidden.dtype();
        let value = logp.contiguous()?;
        super::fused::attach1(
            hidden,
            value,
            Box::new(move |dy: &Tensor| {
                let _scope = crate::util::profile::scope("lm_head.backward", dy.device());
                let dy = if dy.dtype() == g.dtype() {
                    dy.clone()
                } else {
                    dy.to_dtype(g.dtype())?
                };
                let dh = g.broadcast_mul(&dy.unsqueeze(1)?)?;
                if dh.dtype() == hdtype {
                    Ok(dh)
                } else {
                    dh.to_dtype(hdtype)
                }
            }),
        )
    }

    /// Full-vocabulary logits (f32) for a few rows, e.g. the last position when decoding.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let rows = hidden.elem_count() / self.config.hidden_size;
        if rows <= super::decode::MAX_ROWS && hidden.dtype() == DType::F32 {
            if let Some(twin) = self.output_twin.get(self.output_weight())? {
                let h = hidden.reshape((rows, self.config.hidden_size))?;
                let mut dims = hidden.dims().to_vec();
                *dims.last_mut().expect("rank >= 1") = self.config.vocab_size;
                return super::decode::bf16_rows_linear(&h, &twin, None)?.reshape(dims);
            }
        }
        matmul_t(&hidden.contiguous()?, &self.output_weight().detach())?.to_dtype(DType::F32)
    }
}

/// softmax(shifted - lse) [C, V] @ w [V, H] in f32, over vocabulary blocks: a single product
/// with a 151936-long inner dimension makes the CPU gemm keep per-thread packing buffers the
/// size of the whole embedding (about 0.5 GB each). The probabilities are computed once over
/// the whole row (element-wise ops are fastest on contiguous data), then each block is copied
/// out row by row into a contiguous [C, block] tensor: a column slice keeps the row stride V,
/// a layout cuBLAS refuses, and `w`'s row blocks are contiguous already.
fn expected_embedding(shifted: &Tensor, lse: &Tensor, w: &Tensor) -> Result<Tensor> {
    const BLOCK: usize = 16384;
    let v = w.dim(0)?;
    let acc = shifted.dtype();
    let probs_all = shifted.broadcast_sub(lse)?.exp()?.to_dtype(w.dtype())?;
    let mut sum: Option<Tensor> = None;
    for start in (0..v).step_by(BLOCK) {
        let len = BLOCK.min(v - start);
        let probs = if len == v {
            probs_all.clone()
        } else {
            probs_all.narrow(1, start, len)?.contiguous()?
        };
        // Half-precision products, f32 accumulation across blocks.
        let part = matmul(&probs, &w.narrow(0, start, len)?)?.to_dtype(acc)?;
        sum = Some(match sum {
            Some(a) => (a + part)?,
            None => part,
        });
    }
    sum.ok_or_else(|| candle_core::Error::Msg("empty vocabulary".into()))
}

/// Picks rows of `hidden` [B, T, H] at flat indices `b * T + t` -> [N, H] (differentiable).
pub fn gather_rows(hidden: &Tensor, flat_index: &[u32]) -> Result<Tensor> {
    let (b, t, h) = hidden.dims3()?;
    let idx = Tensor::from_slice(flat_index, flat_index.len(), hidden.device())?;
    hidden.reshape((b * t, h))?.index_select(&idx, 0)
}
