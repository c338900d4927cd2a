//! A sweep's points: its axes, checked, and their product, each point a run directory named
//! by its axis values and the `--set` overrides that make the base config its config.

use super::config::SweepConfig;
use crate::objectives::weighting::Weighting;
use crate::recipes::reuse::StageKind;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Points a sweep may hold: every one is a training run.
const MAX_POINTS: usize = 10_000;

/// One axis: the config key it sets, its label in point names, and its values.
#[derive(Debug, Clone)]
pub struct Axis {
    pub key: String,
    pub label: String,
    pub values: Vec<toml::Value>,
}

/// One point of the grid.
#[derive(Debug, Clone)]
pub struct Point {
    /// Its directory's name under the sweep's: the axis values, e.g. `w1-0-0-0_seed2`.
    pub name: String,
    /// (key, value) per axis.
    pub values: Vec<(String, toml::Value)>,
    /// The `--set` overrides of its run: the sweep's, its axis values, its output directory.
    pub overrides: Vec<String>,
    pub out: PathBuf,
}

/// The expanded sweep.
pub struct Plan {
    /// The sweep config, for messages and for the points' commands.
    pub source: PathBuf,
    pub kind: StageKind,
    pub base: PathBuf,
    pub dir: PathBuf,
    pub axes: Vec<Axis>,
    pub points: Vec<Point>,
}

impl Plan {
    pub fn new(cfg: &SweepConfig, source: &Path) -> Result<Plan> {
        let here = source.display();
        let s = &cfg.sweep;
        let names: Vec<&str> = StageKind::ALL.iter().map(|k| k.name()).collect();
        let Some(kind) = StageKind::parse(&s.stage) else {
            bail!(
                "{here}: sweep.stage `{}` is not a training stage: use one of {}",
                s.stage,
                names.join(", ")
            );
        };
        for (key, v) in [("base", &s.base), ("output_dir", &s.output_dir)] {
            if v.is_empty() {
                bail!("{here}: sweep.{key} is empty");
            }
        }
        if !Path::new(&s.base).is_file() {
            bail!("{here}: sweep.base {}: no such config file", s.base);
        }
        let axes = axes(cfg, kind).with_context(|| here.to_string())?;
        let dir = PathBuf::from(&s.output_dir);
        let points = product(&axes, &s.overrides, &dir).with_context(|| here.to_string())?;
        Ok(Plan {
            source: source.to_path_buf(),
            kind,
            base: PathBuf::from(&s.base),
            dir,
            axes,
            points,
        })
    }

    pub fn point(&self, name: &str) -> Result<&Point> {
        self.points
            .iter()
            .find(|p| p.name == name)
            .with_context(|| {
                format!(
                    "{}: no point named `{name}` (points: {})",
                    self.source.display(),
                    self.points
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}

/// The axes of `[axes]`, in order: weights (or simplex), seed, then the others by key.
fn axes(cfg: &SweepConfig, kind: StageKind) -> Result<Vec<Axis>> {
    let mut given: Vec<(String, toml::Value)> = vec![];
    flatten("", &cfg.axes, &mut given);
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
            (None, None) => unreachable!("one of them is given"),
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

/// `[axes]` with nested tables as dotted keys (`train.lr = [...]` and `"train.lr" = [...]`
/// are the same axis).
fn flatten(prefix: &str, t: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(inner) => flatten(&key, inner, out),
            other => out.push((key, other.clone())),
        }
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
            let values: Option<Vec<f64>> = row.as_array().and_then(|r| {
                r.iter()
                    .map(|x| x.as_float().or_else(|| x.as_integer().map(|n| n as f64)))
                    .collect()
            });
            let Some(values) = values else {
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
    let (section, field) = key.split_once('.').unwrap_or(("", key));
    let k = base
        .get(section)
        .and_then(|s| s.get(field))
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

/// Every combination of the axes' values, the first axis varying slowest.
fn product(axes: &[Axis], overrides: &[String], dir: &Path) -> Result<Vec<Point>> {
    let total = axes
        .iter()
        .try_fold(1usize, |n, a| n.checked_mul(a.values.len()));
    if total.is_none_or(|n| n > MAX_POINTS) {
        bail!("axes: the grid has more than {MAX_POINTS} points");
    }
    let mut combos: Vec<Vec<(String, String, toml::Value)>> = vec![vec![]];
    for a in axes {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                a.values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((a.key.clone(), a.label.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    let mut points: Vec<Point> = vec![];
    for combo in combos {
        let name = combo
            .iter()
            .map(|(_, label, v)| format!("{label}{}", value_label(v)))
            .collect::<Vec<_>>()
            .join("_");
        let name = safe_name(&name);
        if let Some(p) = points.iter().find(|p| p.name == name) {
            bail!(
                "axes: two points would both be named {name} ({:?} and {:?}); give values that differ in their first digits",
                p.values.iter().map(|(_, v)| v.to_string()).collect::<Vec<_>>(),
                combo.iter().map(|(_, _, v)| v.to_string()).collect::<Vec<_>>()
            );
        }
        let out = dir.join(&name);
        let mut sets = overrides.to_vec();
        sets.extend(combo.iter().map(|(k, _, v)| format!("{k}={v}")));
        let out_value = toml::Value::String(out.display().to_string());
        sets.push(format!("train.output_dir={out_value}"));
        points.push(Point {
            name,
            values: combo.into_iter().map(|(k, _, v)| (k, v)).collect(),
            overrides: sets,
            out,
        });
    }
    Ok(points)
}

/// A value as it appears in a point's name: numbers short (0.25, 1, 2e-05 as 0.00002),
/// strings bare, lists joined by `-`.
fn value_label(v: &toml::Value) -> String {
    match v {
        toml::Value::Float(f) => {
            let s = format!("{f:.6}");
            let s = s.trim_end_matches('0').trim_end_matches('.');
            if s.is_empty() || s == "-" {
                "0".into()
            } else {
                s.to_string()
            }
        }
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(a) => a.iter().map(value_label).collect::<Vec<_>>().join("-"),
        other => other.to_string(),
    }
}

/// Letters, digits, `.`, `_` and `-` only (anything else becomes `-`), not starting with `.`.
fn safe_name(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    let s = s.trim_matches('-').trim_start_matches('.').to_string();
    if s.is_empty() {
        "point".into()
    } else {
        s
    }
}
