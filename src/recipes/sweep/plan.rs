//! A sweep's points: its axes, checked, and their product, each point a run directory named
//! by its axis values and the `--set` overrides that make the base config its config.

use super::axes::{axes, Axis, MAX_POINTS};
use super::config::SweepConfig;
use crate::recipes::reuse::StageKind;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

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
                "axes: two points would both be named {name} ({:?} and {:?}); give values that differ in more than punctuation",
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

/// A value as it appears in a point's name: numbers in Rust's shortest form that reads back
/// as the same number (0.25, 1, 2e-5 as 0.00002, 1e-7 as 0.0000001), so values that differ
/// anywhere, however small, name different points; strings bare, lists joined by `-`.
pub(crate) fn value_label(v: &toml::Value) -> String {
    match v {
        // -0 names the same point as 0.
        toml::Value::Float(f) if *f == 0.0 => "0".into(),
        toml::Value::Float(f) => format!("{f}"),
        toml::Value::String(s) => s.clone(),
        toml::Value::Array(a) => a.iter().map(value_label).collect::<Vec<_>>().join("-"),
        other => other.to_string(),
    }
}

/// Letters, digits, `.`, `_` and `-` only (anything else becomes `-`), not starting with `.`.
pub fn safe_name(name: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_learning_rates_name_distinct_points() {
        let names: Vec<String> = [1e-7, 5e-7, 1e-6, 2e-5, 0.25, 1.0, -0.0]
            .iter()
            .map(|&f| safe_name(&value_label(&toml::Value::Float(f))))
            .collect();
        assert_eq!(
            names,
            [
                "0.0000001",
                "0.0000005",
                "0.000001",
                "0.00002",
                "0.25",
                "1",
                "0"
            ]
        );
        let w = toml::Value::Array(vec![toml::Value::Float(1.0), toml::Value::Float(0.0)]);
        assert_eq!(value_label(&w), "1-0");
    }
}
