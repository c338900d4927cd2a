//! Objective weights: one weighting w over the reward vector's objectives, validated once where
//! it enters (a config list, a `--weights` flag, a conditioning draw) and carried as a
//! `Weighting` from there on.
//!
//! A weighting is finite, >= 0 and not all zero. All zeros would weigh every objective out: the
//! reward is 0 (nothing learned), and MODPO and hybrid DPO reduce to plain DPO while claiming
//! otherwise. The conditioning line states a weighting as `Objective weights: helpfulness=0.40,
//! honesty=0.10, ...`: quantised to hundredths that sum to exactly 1.00, so the text and the
//! loss never disagree and the line parses back to the same numbers.

use anyhow::{bail, Context, Result};

/// How a conditioning line starts.
pub const PREFIX: &str = "Objective weights: ";

/// Weights over a reward vector's objectives, in its order: finite, >= 0, not all zero.
#[derive(Debug, Clone, PartialEq)]
pub struct Weighting {
    values: Vec<f64>,
}

impl Weighting {
    /// `values` (named `what` in errors) as a weighting, refusing values that are not finite,
    /// negative, all zero, or none at all.
    pub fn new(values: Vec<f64>, what: &str) -> Result<Self> {
        if let Some(w) = values.iter().find(|w| !w.is_finite() || **w < 0.0) {
            bail!("{what} must be finite and >= 0, got {w} in {values:?}");
        }
        if values.is_empty() {
            bail!("{what} is empty: give one weight per objective");
        }
        if values.iter().all(|w| *w == 0.0) {
            bail!("{what} are all zero: every objective would be weighed out (leave the list empty for equal weights)");
        }
        Ok(Self { values })
    }

    /// Exactly one weight per objective of `objectives`, then as `new`.
    pub fn for_objectives(values: Vec<f64>, objectives: &[String], what: &str) -> Result<Self> {
        check_count(values.len(), objectives.len(), objectives, what)?;
        Self::new(values, what)
    }

    /// A config's weight list: `None` (equal weights, once the objectives are known) when it is
    /// empty, else the weighting it gives.
    pub fn configured(values: &[f64], what: &str) -> Result<Option<Self>> {
        if values.is_empty() {
            return Ok(None);
        }
        Self::new(values.to_vec(), what).map(Some)
    }

    /// `given` (from `configured`) for `k` objectives, or equal weights when none was given.
    pub fn given_or_equal(given: Option<&Self>, k: usize, what: &str) -> Result<Self> {
        match given {
            Some(w) => {
                check_count(w.len(), k, &[], what)?;
                Ok(w.clone())
            }
            None => Ok(Self::equal(k)),
        }
    }

    /// 1/k for each of `k` objectives.
    pub fn equal(k: usize) -> Self {
        Self {
            values: vec![1.0 / k.max(1) as f64; k],
        }
    }

    /// Refuses a weighting (`what`) whose count is not one per objective of `objectives`.
    pub fn check_count(&self, objectives: &[String], what: &str) -> Result<()> {
        check_count(self.values.len(), objectives.len(), objectives, what)
    }

    pub fn values(&self) -> &[f64] {
        &self.values
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The weighting as the conditioning line states it (see `quantise`).
    pub fn quantised(&self) -> Self {
        Self {
            values: quantise(&self.values),
        }
    }

    /// A weighting as `--weights` gives it (`0.7,0.1,0.1,0.1`); the policy it steers checks the
    /// count against its objectives.
    pub fn from_flag(s: &str) -> Result<Self> {
        Self::new(parse_weights(s).context("--weights")?, "weights")
    }

    /// The conditioning line stating this weighting (quantised) over `objectives`.
    pub fn line(&self, objectives: &[String]) -> String {
        format_line(objectives, &quantise(&self.values))
    }
}

/// Parses `0.7,0.1,0.1,0.1` (as `--weights` takes it); the policy it steers makes it a
/// `Weighting` over its objectives.
pub fn parse_weights(s: &str) -> Result<Vec<f64>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<f64>()
                .ok()
                .filter(|w| w.is_finite() && *w >= 0.0)
                .with_context(|| format!("`{x}` in `{s}` is not a weight >= 0"))
        })
        .collect()
}

/// Refuses `n` weights (`what`) for `k` objectives (named in the message when `objectives`
/// names them) unless n = k.
fn check_count(n: usize, k: usize, objectives: &[String], what: &str) -> Result<()> {
    if n != k {
        let names = if objectives.is_empty() {
            String::new()
        } else {
            format!(" {objectives:?}")
        };
        bail!("{what} has {n} values for {k} objectives{names}");
    }
    Ok(())
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
        let names = "helpfulness honesty instruction_following truthfulness";
        names.split(' ').map(String::from).collect()
    }

    fn err(r: Result<Weighting>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn refuses_what_would_train_the_wrong_way() {
        let e = err(Weighting::new(vec![0.5, f64::NAN], "hybrid.weights"));
        assert!(e.contains("hybrid.weights must be finite and >= 0"), "{e}");
        let e = err(Weighting::new(vec![1.0, -0.5], "hybrid.weights"));
        assert!(e.contains("must be finite and >= 0, got -0.5"), "{e}");
        let e = err(Weighting::new(vec![0.0; 4], "reward.weights"));
        assert!(e.contains("reward.weights are all zero"), "{e}");
        assert!(Weighting::new(vec![], "w").is_err());
        assert!(Weighting::new(vec![f64::INFINITY, 1.0], "w").is_err());
        assert_eq!(
            Weighting::new(vec![0.0, 2.0], "w").unwrap().values(),
            [0.0, 2.0]
        );
    }

    #[test]
    fn checks_the_objective_count() {
        let e = err(Weighting::for_objectives(
            vec![1.0, 0.0],
            &names(),
            "pareto.weights[0]",
        ));
        assert!(
            e.contains("pareto.weights[0] has 2 values for 4 objectives [\"helpfulness\""),
            "{e}"
        );
        let given = Weighting::configured(&[1.0, 1.0], "grpo.weights").unwrap();
        let e = err(Weighting::given_or_equal(given.as_ref(), 4, "grpo.weights"));
        assert!(
            e.contains("grpo.weights has 2 values for 4 objectives"),
            "{e}"
        );
        // An empty config list means equal weights, 1/k each.
        let none = Weighting::configured(&[], "grpo.weights").unwrap();
        let w = Weighting::given_or_equal(none.as_ref(), 4, "grpo.weights").unwrap();
        assert_eq!(w.values(), [0.25; 4]);
        assert!(Weighting::configured(&[0.0, 0.0], "grpo.weights").is_err());
    }

    #[test]
    fn parses_the_weights_flag() {
        assert_eq!(parse_weights("0.7, 0.3").unwrap(), [0.7, 0.3]);
        let e = format!("{:#}", parse_weights("0.7,x").unwrap_err());
        assert!(e.contains("`x` in `0.7,x` is not a weight >= 0"), "{e}");
        let zeros = Weighting::new(parse_weights("0,0").unwrap(), "weights");
        assert!(err(zeros).contains("weights are all zero"));
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
        let weighting = Weighting::new(vec![0.404, 0.101, 0.2449, 0.2501], "w").unwrap();
        assert_eq!(weighting.line(&names()), line);
        assert_eq!(weighting.quantised().values(), w);
        // Largest remainders take the spare hundredth: thirds become 0.34, 0.33, 0.33.
        assert_eq!(quantise(&[1.0, 1.0, 1.0]), [0.34, 0.33, 0.33]);
        assert_eq!(Weighting::equal(3).quantised().values(), [0.34, 0.33, 0.33]);
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
