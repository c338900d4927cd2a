//! AdamW with decoupled weight decay (PyTorch's `torch.optim.AdamW` arithmetic), f32 moments,
//! and state that is saved and restored exactly (candle's AdamW keeps its state private).

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};
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
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimizer steps taken (PyTorch's `state["step"]`).
    pub step: u64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let zeros = |v: &Var| Tensor::zeros(v.dims(), DType::F32, v.device());
        let m = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            params,
            vars,
            m,
            v,
            step: 0,
        })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with learning rate `lr`; `grads[i]` is the gradient of `vars[i]` (f32).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        let step_size = lr / bc1;
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let g = grads[i].to_dtype(DType::F32)?;
            self.m[i] = ((&self.m[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            self.v[i] = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = ((self.v[i].sqrt()? / bc2.sqrt())? + p.eps)?;
            let w = var.as_tensor().to_dtype(DType::F32)?;
            let w = if p.weight_decay != 0.0 {
                (&w * (1.0 - lr * p.weight_decay))?
            } else {
                w
            };
            let update = ((&self.m[i] / denom)? * step_size)?;
            var.set(&(w - update)?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Moments as named tensors (`<param>.exp_avg`, `<param>.exp_avg_sq`) for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("{name}.exp_avg"), self.m[i].clone());
            out.insert(format!("{name}.exp_avg_sq"), self.v[i].clone());
        }
        out
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
                Ok(t.to_dtype(DType::F32)?)
            };
            self.m[i] = get(format!("{name}.exp_avg"))?;
            self.v[i] = get(format!("{name}.exp_avg_sq"))?;
        }
        self.step = step;
        Ok(())
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
        opt.step(&[Tensor::new(&[0.5f32, 0.25], &Device::Cpu)?], 0.1)?;
        opt.step(&[Tensor::new(&[-1.0f32, 2.0], &Device::Cpu)?], 0.1)?;
        let got = var.as_tensor().to_vec1::<f32>()?;
        let want = [0.934_711_4_f32, -2.178_048_6];
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs PyTorch {want:?}");
        }
        Ok(())
    }
}
