//! AdamW with decoupled weight decay (PyTorch's `torch.optim.AdamW` arithmetic), f32 moments,
//! and state that is saved and restored exactly (candle's AdamW keeps its state private).

use anyhow::{Context, Result};
use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

pub struct AdamW {
    pub params: AdamWParams,
    vars: Vec<(String, Var)>,
    /// Per parameter, f32 [2, numel]: exp_avg in row 0, exp_avg_sq in row 1 (one buffer, so one
    /// fused kernel updates both).
    moments: Vec<Tensor>,
    /// Optimizer steps taken (PyTorch's `state["step"]`).
    pub step: u64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|(_, v)| Tensor::zeros((2, v.elem_count()), DType::F32, v.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            params,
            vars,
            moments,
            step: 0,
        })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with learning rate `lr`; `grads[i]` is the gradient of `vars[i]`, used as
    /// `grads[i] * grad_scale` (the trainer folds loss-scale removal and clipping into it, so no
    /// scaled copy of any gradient is made). Two fused in-place ops per parameter: moments, then
    /// the parameter.
    pub fn step(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        // Scalars are formed in f64 and rounded once, as PyTorch passes Python floats.
        let moments = AdamMoments {
            one_minus_beta1: (1.0 - p.beta1) as f32,
            beta2: p.beta2 as f32,
            one_minus_beta2: (1.0 - p.beta2) as f32,
            grad_scale: grad_scale as f32,
        };
        let update = AdamUpdate {
            decay: (1.0 - lr * p.weight_decay) as f32,
            neg_step_size: (-lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: p.eps as f32,
        };
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let g = grads[i].to_dtype(DType::F32)?.flatten_all()?.contiguous()?;
            anyhow::ensure!(
                g.elem_count() == var.elem_count(),
                "gradient of `{name}` has {} elements, the parameter {}",
                g.elem_count(),
                var.elem_count()
            );
            self.moments[i].inplace_op2(&g, &moments)?;
            var.as_tensor().inplace_op2(&self.moments[i], &update)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let row = |r: usize| self.moments[i].get(r)?.reshape(var.dims());
            out.insert(format!("{name}.exp_avg"), row(0)?);
            out.insert(format!("{name}.exp_avg_sq"), row(1)?);
        }
        Ok(out)
    }

    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let get = |k: String| -> Result<Tensor> {
                let t = tensors
                    .get(&k)
                    .with_context(|| format!("optimizer state lacks `{k}`"))?;
                anyhow::ensure!(
                    t.dims() == var.dims(),
                    "optimizer state `{k}` has shape {:?}, parameter {:?}",
                    t.dims(),
                    var.dims()
                );
                Ok(t.to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_device(var.device())?)
            };
            let (m, v) = (
                get(format!("{name}.exp_avg"))?,
                get(format!("{name}.exp_avg_sq"))?,
            );
            self.moments[i] = Tensor::stack(&[m, v], 0)?;
        }
        self.step = step;
        Ok(())
    }
}

/// exp_avg.lerp_(g, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2), with
/// g = grad * grad_scale: torch.optim.AdamW's single-tensor arithmetic in f32, operation order
/// included (addcmul is `self + (value * g) * g`). `ops.cu`'s `mo_adamw_moments` is the twin.
struct AdamMoments {
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    grad_scale: f32,
}

impl AdamMoments {
    #[inline]
    fn apply(&self, m: &mut f32, v: &mut f32, g: f32) {
        let g = g * self.grad_scale;
        let w = self.one_minus_beta1;
        // torch.lerp's two branches (exact at both ends).
        *m = if w < 0.5 {
            *m + w * (g - *m)
        } else {
            g - (g - *m) * (1.0 - w)
        };
        *v = *v * self.beta2 + self.one_minus_beta2 * g * g;
    }
}

/// param.mul_(1 - lr wd); param.addcdiv_(exp_avg, sqrt(exp_avg_sq) / sqrt(bc2) + eps,
/// value=-lr / bc1), addcdiv being `self + (value * m) / denom`. Twin: `mo_adamw_params`.
struct AdamUpdate {
    decay: f32,
    neg_step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

impl AdamUpdate {
    #[inline]
    fn apply(&self, w: f32, m: f32, v: f32) -> f32 {
        let denom = v.sqrt() / self.bc2_sqrt + self.eps;
        w * self.decay + self.neg_step_size * m / denom
    }
}

fn offsets(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("adamw: {what} is not contiguous")))
}

impl InplaceOp2 for AdamMoments {
    fn name(&self) -> &'static str {
        "mo-adamw-moments"
    }

    fn cpu_fwd(
        &self,
        mv: &mut CpuStorage,
        ml: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let ((m0, m1), (g0, g1)) = (offsets(ml, "moments")?, offsets(gl, "gradient")?); // count-ops: inplace_op
        let (CpuStorage::F32(mv), CpuStorage::F32(g)) = (mv, g) else {
            candle_core::bail!("adamw: moments and gradients must be f32");
        };
        let n = g1 - g0;
        let (m, v) = mv[m0..m1].split_at_mut(n);
        for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(&g[g0..g1]) {
            self.apply(m, v, g);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        mv: &mut candle_core::CudaStorage,
        ml: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let ((m0, m1), (g0, g1)) = (offsets(ml, "moments")?, offsets(gl, "gradient")?); // count-ops: inplace_op
        let n = (g1 - g0) as u64;
        let dev = mv.device.clone();
        let gv = g.as_cuda_slice::<f32>()?.slice(g0..g1);
        let mut mvv = mv.as_cuda_slice_mut::<f32>()?.slice_mut(m0..m1);
        crate::launch_kernel!(
            dev,
            "mo_adamw_moments",
            n as usize,
            &mut mvv,
            &gv,
            &n,
            &self.one_minus_beta1,
            &self.beta2,
            &self.one_minus_beta2,
            &self.grad_scale
        )
    }
}

impl InplaceOp2 for AdamUpdate {
    fn name(&self) -> &'static str {
        "mo-adamw-update"
    }

    fn cpu_fwd(
        &self,
        w: &mut CpuStorage,
        wl: &Layout,
        mv: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<()> {
        let ((w0, w1), (m0, m1)) = (offsets(wl, "parameter")?, offsets(ml, "moments")?); // count-ops: inplace_op
        let CpuStorage::F32(mv) = mv else {
            candle_core::bail!("adamw: moments must be f32");
        };
        let (m, v) = mv[m0..m1].split_at((m1 - m0) / 2);
        match w {
            CpuStorage::F32(w) => {
                for ((w, &m), &v) in w[w0..w1].iter_mut().zip(m).zip(v) {
                    *w = self.apply(*w, m, v);
                }
            }
            // f64 models (finite-difference tests) keep f64 parameters; the update is f32.
            CpuStorage::F64(w) => {
                for ((w, &m), &v) in w[w0..w1].iter_mut().zip(m).zip(v) {
                    *w = self.apply(*w as f32, m, v) as f64;
                }
            }
            _ => candle_core::bail!("adamw: parameters must be f32 (or f64 on the CPU)"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &mut candle_core::CudaStorage,
        wl: &Layout,
        mv: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> candle_core::Result<()> {
        let ((w0, w1), (m0, m1)) = (offsets(wl, "parameter")?, offsets(ml, "moments")?); // count-ops: inplace_op
        let n = (w1 - w0) as u64;
        let dev = w.device.clone();
        let mvv = mv.as_cuda_slice::<f32>()?.slice(m0..m1);
        let mut wv = w.as_cuda_slice_mut::<f32>()?.slice_mut(w0..w1);
        crate::launch_kernel!(
            dev,
            "mo_adamw_params",
            n as usize,
            &mut wv,
            &mvv,
            &n,
            &self.decay,
            &self.neg_step_size,
            &self.bc2_sqrt,
            &self.eps
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps of torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    /// on p = [1.0, -2.0] with grads [0.5, 0.25] then [-1.0, 2.0]; the expected values were
    /// printed by PyTorch 2.15.
    #[test]
    fn matches_pytorch_adamw() -> Result<()> {
        let var = Var::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu)?;
        let params = AdamWParams {
            weight_decay: 0.01,
            ..AdamWParams::default()
        };
        let mut opt = AdamW::new(vec![("p".into(), var.clone())], params)?;
        opt.step(&[Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?], 0.1, 1.0)?;
        // The second gradient arrives scaled by 4 (a loss scale) and is unscaled on the fly.
        opt.step(&[Tensor::new(&[-4.0f32, 8.0], &Device::Cpu)?], 0.1, 0.25)?;
        let got = var.as_tensor().to_vec1::<f32>()?;
        let want = [0.934_711_4_f32, -2.178_048_6];
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs PyTorch {want:?}");
        }
        Ok(())
    }
}
