//! Scalarisers turn a reward vector r (one score per objective, in [0, 1]) into one number.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

pub trait Scalarizer {
    fn scalarize(&self, r: &[f32]) -> f64;
}

/// s(r) = w . r
pub struct LinearScalarizer {
    pub weights: Vec<f64>,
}

impl Scalarizer for LinearScalarizer {
    fn scalarize(&self, r: &[f32]) -> f64 {
        self.weights.iter().zip(r).map(|(w, x)| w * *x as f64).sum()
    }
}

/// Tchebycheff: s(r) = -max_i w_i (z*_i - r_i), with utopia point z* (z*_i >= best r_i).
/// It rewards the worst-served objective, so it can reach Pareto-optimal trade-offs that no
/// weighted sum reaches.
pub struct ChebyshevScalarizer {
    pub weights: Vec<f64>,
    pub utopia: Vec<f64>,
}

impl Scalarizer for ChebyshevScalarizer {
    fn scalarize(&self, r: &[f32]) -> f64 {
        let worst = self
            .weights
            .iter()
            .zip(&self.utopia)
            .zip(r)
            .map(|((w, z), x)| w * (z - *x as f64))
            .fold(f64::NEG_INFINITY, f64::max);
        -worst
    }
}

/// Smooth Tchebycheff: s(r) = -mu * log sum_i exp(w_i (z*_i - r_i) / mu); tends to Chebyshev as
/// mu -> 0 and is differentiable everywhere.
pub struct SmoothChebyshevScalarizer {
    pub weights: Vec<f64>,
    pub utopia: Vec<f64>,
    pub mu: f64,
}

impl Scalarizer for SmoothChebyshevScalarizer {
    fn scalarize(&self, r: &[f32]) -> f64 {
        let terms: Vec<f64> = self
            .weights
            .iter()
            .zip(&self.utopia)
            .zip(r)
            .map(|((w, z), x)| w * (z - *x as f64) / self.mu)
            .collect();
        let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln();
        -self.mu * lse
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScalarizerKind {
    Linear,
    Chebyshev,
    SmoothChebyshev,
}

/// Builds a scalariser for `k` objectives; `utopia` defaults to 1.0 per objective (scores are
/// normalised ratings in [0, 1]).
pub fn build(
    kind: ScalarizerKind,
    weights: &[f64],
    utopia: Option<&[f64]>,
    mu: f64,
    k: usize,
) -> Result<Box<dyn Scalarizer>> {
    if weights.len() != k {
        bail!("{} weights given for {k} objectives", weights.len());
    }
    let utopia = utopia.map(<[f64]>::to_vec).unwrap_or_else(|| vec![1.0; k]);
    if utopia.len() != k {
        bail!("{} utopia values given for {k} objectives", utopia.len());
    }
    let weights = weights.to_vec();
    Ok(match kind {
        ScalarizerKind::Linear => Box::new(LinearScalarizer { weights }),
        ScalarizerKind::Chebyshev => Box::new(ChebyshevScalarizer { weights, utopia }),
        ScalarizerKind::SmoothChebyshev => {
            if mu <= 0.0 {
                bail!("smooth_chebyshev needs mu > 0");
            }
            Box::new(SmoothChebyshevScalarizer {
                weights,
                utopia,
                mu,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_values() {
        let r = [0.5f32, 0.25, 1.0, 0.0];
        let w = [0.4, 0.3, 0.2, 0.1];
        let lin = LinearScalarizer {
            weights: w.to_vec(),
        };
        assert!((lin.scalarize(&r) - (0.2 + 0.075 + 0.2 + 0.0)).abs() < 1e-12);
        // w_i (1 - r_i) = 0.2, 0.225, 0.0, 0.1 -> max 0.225
        let cheb = ChebyshevScalarizer {
            weights: w.to_vec(),
            utopia: vec![1.0; 4],
        };
        assert!((cheb.scalarize(&r) + 0.225).abs() < 1e-12);
        // A different utopia point changes the worst objective: w_i (z_i - r_i) with z = 0.6.
        let cheb = ChebyshevScalarizer {
            weights: w.to_vec(),
            utopia: vec![0.6; 4],
        };
        assert!((cheb.scalarize(&r) + 0.105).abs() < 1e-12);
        let smooth = SmoothChebyshevScalarizer {
            weights: w.to_vec(),
            utopia: vec![1.0; 4],
            mu: 0.1,
        };
        let want = -0.1
            * [2.0f64, 2.25, 0.0, 1.0]
                .iter()
                .map(|t| t.exp())
                .sum::<f64>()
                .ln();
        assert!((smooth.scalarize(&r) - want).abs() < 1e-12);
        let sharp = SmoothChebyshevScalarizer {
            weights: w.to_vec(),
            utopia: vec![1.0; 4],
            mu: 1e-4,
        };
        assert!((sharp.scalarize(&r) + 0.225).abs() < 1e-3);
        assert!(build(ScalarizerKind::Linear, &w, None, 0.1, 3).is_err());
    }
}
