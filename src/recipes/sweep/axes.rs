//! The sweep's axes, read from `[axes]` and checked: `weights` (a list of weightings) or
//! `simplex = N`, `seed`, and any `"section.key" = [values]`.

use super::config::SweepConfig;
use crate::objectives::weighting::Weighting;
use crate::recipes::reuse::StageKind;
use anyhow::{bail, Context, Result};

/// Points a sweep may hold: every one is a training run.
pub(super) const MAX_POINTS: usize = 10_000;

/// One axis: the config key it sets, its label in point names, and its values.
#[derive(Debug, Clone)]
pub struct Axis {
    pub key: String,
    pub label: String,
    pub values: Vec<toml::Value>,
}

/// The axes of `[axes]`, in order: weights (or simplex), seed, then the others by key.
pub(super) fn axes(cfg: &SweepConfig, kind: StageKind) -> Result<Vec<Axis>> {
    // Nested tables are dotted keys: `train.lr = [...]` and `"train.lr" = [...]` are the
    // same axis.
    let mut given: Vec<(String, toml::Value)> = vec![];
    crate::util::config::flatten("", &cfg.axes, &mut given);
    if given.is_empty() {
        bail!("[axes] is empty: give weights (or simplex), seed, or a \"section.key\" list");
    }
    let mut out = vec![];
    let weights = given.iter().find(|(k, _)| k == "weights");
    let simplex = given.iter().find(|(k, _)| k == "simplex");
    if weights.is_some() || simplex.is_some() {
        let Some(key) = kind.weights_key() else {
            bail!(
                "axes: weights: stage {} has no objective weights",
                kind.name()
            );
        };
        let grid = match (weights, simplex) {
            (Some(_), Some(_)) => bail!("axes: give weights or simplex, not both"),
            (Some((_, w)), None) => weight_list(w)?,
            (None, Some((_, n))) => simplex_grid(n, cfg, key)?,
            (None, None) => vec![],
        };
        let values: Vec<toml::Value> = grid
            .into_iter()
            .map(|w| toml::Value::Array(w.into_iter().map(toml::Value::Float).collect()))
            .collect();
        out.push(axis(key, "w", values)?);
    }
    if let Some((_, v)) = given.iter().find(|(k, _)| k == "seed") {
        if v.as_array()
            .is_some_and(|a| a.iter().any(|x| !x.is_integer()))
        {
            bail!("axes: seed must be a list of integers, got {v}");
        }
        out.push(axis("train.seed", "seed", v.clone())?);
    }
    for (key, v) in given
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "weights" | "simplex" | "seed"))
    {
        if !key.contains('.') {
            bail!("axes: `{key}` is not an axis: use weights, simplex, seed, or \"section.key\"");
        }
        if key.ends_with("output_dir") {
            bail!("axes: {key}: each point's output directory is the sweep's to choose");
        }
        if out.iter().any(|a| a.key == *key) {
            bail!("axes: {key} is given twice (as itself and as weights or seed)");
        }
        let label = key.rsplit('.').next().unwrap_or(key);
        out.push(axis(key, label, v.clone())?);
    }
    // Labels name points: two axes with the same last key component use their full keys.
    let labels: Vec<String> = out.iter().map(|a| a.label.clone()).collect();
    for a in &mut out {
        if a.key != "train.seed"
            && a.label != "w"
            && labels.iter().filter(|l| **l == a.label).count() > 1
        {
            a.label = a.key.replace('.', "-");
        }
    }
    Ok(out)
}

fn axis(key: &str, label: &str, values: impl Into<AxisValues>) -> Result<Axis> {
    let values = match values.into() {
        AxisValues::List(v) => v,
        AxisValues::One(v) => match v {
            toml::Value::Array(a) => a,
            other => bail!("axes: {key} must be a list of values, got {other}"),
        },
    };
    if values.is_empty() {
        bail!("axes: {key} has no values");
    }
    Ok(Axis {
        key: key.to_string(),
        label: label.to_string(),
        values,
    })
}

enum AxisValues {
    List(Vec<toml::Value>),
    One(toml::Value),
}

impl From<Vec<toml::Value>> for AxisValues {
    fn from(v: Vec<toml::Value>) -> Self {
        AxisValues::List(v)
    }
}

impl From<toml::Value> for AxisValues {
    fn from(v: toml::Value) -> Self {
        AxisValues::One(v)
    }
}

/// `weights = [[...], ...]`: each a valid weighting.
fn weight_list(v: &toml::Value) -> Result<Vec<Vec<f64>>> {
    let Some(rows) = v.as_array() else {
        bail!("axes: weights must be a list of weightings, like [[1.0, 0.0], [0.5, 0.5]]");
    };
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let what = format!("axes: weights[{i}]");
            let Some(values) = numbers(row) else {
                bail!("{what} must be a list of numbers, got {row}");
            };
            Ok(Weighting::new(values, &what)?.values().to_vec())
        })
        .collect()
}

/// `simplex = N`: every weighting of the base config's objectives in steps of 1/N (their
/// number: the length of the base config's weights).
fn simplex_grid(n: &toml::Value, cfg: &SweepConfig, key: &str) -> Result<Vec<Vec<f64>>> {
    let Some(n) = n.as_integer().filter(|n| *n >= 1) else {
        bail!("axes: simplex must be an integer of at least 1, got {n}");
    };
    let text = std::fs::read_to_string(&cfg.sweep.base)
        .with_context(|| format!("{}: cannot read", cfg.sweep.base))?;
    let mut base: toml::Table = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", cfg.sweep.base, e.message()))?;
    for o in &cfg.sweep.overrides {
        crate::util::config::apply_override(&mut base, o)?;
    }
    let k = lookup(&base, key)
        .and_then(|w| w.as_array())
        .map_or(0, |w| w.len());
    if k == 0 {
        bail!(
            "axes: simplex = {n} needs the number of objectives: give {key} in {} (any weighting of them)",
            cfg.sweep.base
        );
    }
    let count = (1..k).fold(1.0f64, |c, j| c * (n as usize + j) as f64 / j as f64);
    if count > MAX_POINTS as f64 {
        bail!(
            "axes: simplex = {n} over {k} objectives gives {count:.0} points; at most {MAX_POINTS}"
        );
    }
    Ok(crate::pareto::simplex_grid(k, n as usize))
}

/// The value of dotted `key` (`hybrid.weights`) in a config table.
pub(crate) fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut v = table.get(parts.next()?)?;
    for part in parts {
        v = v.get(part)?;
    }
    Some(v)
}

/// A list of numbers (integers read as floats); `None` when `v` is anything else.
pub(crate) fn numbers(v: &toml::Value) -> Option<Vec<f64>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_float().or_else(|| x.as_integer().map(|n| n as f64)))
        .collect()
}
