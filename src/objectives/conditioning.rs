//! Weight conditioning (issue 14): each example draws its own objective weights, the policy
//! sees them in a fixed line of text, and the loss uses exactly the weights that line states.
//!
//! The line is `Objective weights: helpfulness=0.40, honesty=0.10, ...` with two decimals, in
//! the objectives' order. Weights are quantised to hundredths that sum to exactly 1.00 before
//! use, so the text and the loss never disagree and the line parses back to the same numbers.
//! Draws are a pure function of (seed, epoch, example index): batching, resumption and the
//! number of workers do not change which weights an example gets.

use crate::rng::{mix_seed, stream_rng};
use anyhow::{bail, Context, Result};
use rand::Rng;

pub const PREFIX: &str = "Objective weights: ";

/// A Dirichlet(alpha, ..., alpha) draw over `k` objectives for example `index` of `epoch`,
/// quantised (see `quantise`).
pub fn dirichlet_weights(seed: u64, epoch: u64, index: u64, k: usize, alpha: f64) -> Vec<f64> {
    let mut rng = stream_rng(mix_seed(seed, epoch, index), 0x6469_7269);
    let g: Vec<f64> = (0..k).map(|_| gamma(&mut rng, alpha)).collect();
    let total: f64 = g.iter().sum();
    quantise(&g.iter().map(|x| x / total).collect::<Vec<_>>())
}

/// Gamma(shape, 1) by Marsaglia and Tsang; shapes below 1 through Gamma(shape + 1) * U^(1/shape).
fn gamma(rng: &mut impl Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random::<f64>();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Weights rounded to hundredths that sum to exactly 1.00 (largest remainders get the spare
/// hundredths), as the conditioning line prints them.
pub fn quantise(w: &[f64]) -> Vec<f64> {
    let total: f64 = w.iter().sum();
    let scaled: Vec<f64> = w.iter().map(|x| 100.0 * x / total).collect();
    let mut cents: Vec<i64> = scaled.iter().map(|x| x.floor() as i64).collect();
    let mut order: Vec<usize> = (0..w.len()).collect();
    order.sort_by(|&a, &b| {
        (scaled[b] - scaled[b].floor()).total_cmp(&(scaled[a] - scaled[a].floor()))
    });
    let spare = 100 - cents.iter().sum::<i64>();
    for &i in order.iter().take(spare.max(0) as usize) {
        cents[i] += 1;
    }
    cents.iter().map(|&c| c as f64 / 100.0).collect()
}

/// The conditioning line for `weights` over `objectives`.
pub fn format_line(objectives: &[String], weights: &[f64]) -> String {
    let parts: Vec<String> = objectives
        .iter()
        .zip(weights)
        .map(|(o, w)| format!("{o}={w:.2}"))
        .collect();
    format!("{PREFIX}{}", parts.join(", "))
}

/// The weights a conditioning line states, checked against `objectives` (same names, same
/// order).
pub fn parse_line(line: &str, objectives: &[String]) -> Result<Vec<f64>> {
    let body = line
        .trim()
        .strip_prefix(PREFIX)
        .with_context(|| format!("a conditioning line starts with {PREFIX:?}: {line:?}"))?;
    let parts: Vec<&str> = body.split(", ").collect();
    if parts.len() != objectives.len() {
        bail!(
            "conditioning line names {} objectives, expected {objectives:?}: {line:?}",
            parts.len()
        );
    }
    parts
        .iter()
        .zip(objectives)
        .map(|(p, o)| {
            let (name, value) = p
                .split_once('=')
                .with_context(|| format!("`{p}` is not name=weight in {line:?}"))?;
            if name != o {
                bail!("conditioning line has `{name}` where `{o}` belongs: {line:?}");
            }
            value
                .parse::<f64>()
                .ok()
                .filter(|w| w.is_finite() && *w >= 0.0)
                .with_context(|| format!("`{value}` is not a weight >= 0 in {line:?}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        [
            "helpfulness",
            "honesty",
            "instruction_following",
            "truthfulness",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn dirichlet_draws_are_seeded_per_example_and_sum_to_one() {
        let a = dirichlet_weights(7, 0, 3, 4, 1.0);
        // The same (seed, epoch, index) gives the same weights whatever was drawn before:
        // a resumed run or another batching sees the same conditioning.
        for i in 0..10 {
            dirichlet_weights(7, 0, i, 4, 1.0);
        }
        assert_eq!(a, dirichlet_weights(7, 0, 3, 4, 1.0));
        assert_ne!(a, dirichlet_weights(7, 0, 4, 4, 1.0));
        assert_ne!(a, dirichlet_weights(7, 1, 3, 4, 1.0));
        assert_ne!(a, dirichlet_weights(8, 0, 3, 4, 1.0));
        for i in 0..200 {
            let w = dirichlet_weights(1, 0, i, 4, 0.5);
            let cents: i64 = w.iter().map(|x| (x * 100.0).round() as i64).sum();
            assert_eq!(cents, 100, "{w:?}");
            assert!(w.iter().all(|x| *x >= 0.0));
        }
        // The mean of Dirichlet(alpha) is 1/k on every objective.
        let n = 4000;
        let mut mean = [0.0; 4];
        for i in 0..n {
            for (m, x) in mean.iter_mut().zip(dirichlet_weights(2, 0, i, 4, 1.0)) {
                *m += x / n as f64;
            }
        }
        assert!(mean.iter().all(|m| (m - 0.25).abs() < 0.02), "{mean:?}");
    }

    #[test]
    fn the_conditioning_line_round_trips() {
        let w = quantise(&[0.404, 0.101, 0.2449, 0.2501]);
        assert_eq!(w, [0.40, 0.10, 0.25, 0.25]);
        let line = format_line(&names(), &w);
        assert_eq!(
            line,
            "Objective weights: helpfulness=0.40, honesty=0.10, instruction_following=0.25, truthfulness=0.25"
        );
        assert_eq!(parse_line(&line, &names()).unwrap(), w);
        for i in 0..50 {
            let w = dirichlet_weights(3, 0, i, 4, 0.7);
            assert_eq!(parse_line(&format_line(&names(), &w), &names()).unwrap(), w);
        }
        // Largest remainders take the spare hundredth: thirds become 0.34, 0.33, 0.33.
        assert_eq!(quantise(&[1.0, 1.0, 1.0]), [0.34, 0.33, 0.33]);
        let mut swapped = names();
        swapped.swap(0, 1);
        let err = parse_line(&line, &swapped).unwrap_err().to_string();
        assert!(
            err.contains("`helpfulness` where `honesty` belongs"),
            "{err}"
        );
        assert!(parse_line("weights: a=1", &names()).is_err());
    }
}
