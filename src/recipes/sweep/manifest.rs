//! `sweep.json`: the points a sweep directory holds, what `pareto` reads, and what a rerun is
//! held to: points may be added to a sweep, never changed or dropped.

use super::plan::Plan;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const MANIFEST: &str = "sweep.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The training subcommand every point ran.
    pub stage: String,
    pub base: String,
    /// The config key holding a point's objective weights (`None`: the stage has none).
    pub weights_key: Option<String>,
    pub points: Vec<ManifestPoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestPoint {
    /// Its run directory's name in the sweep directory (a name, not a path: a sweep read from
    /// another directory, or copied elsewhere, finds its points).
    pub name: String,
    /// Axis key -> value.
    pub values: serde_json::Map<String, serde_json::Value>,
}

impl Manifest {
    /// The manifest of `plan` (an earlier run's points that are not in it hold no run:
    /// `check_rerun`).
    pub fn of(plan: &Plan) -> Result<Self> {
        let points = plan
            .points
            .iter()
            .map(|p| {
                let values = p
                    .values
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), serde_json::to_value(v)?)))
                    .collect::<Result<_>>()?;
                Ok(ManifestPoint {
                    name: p.name.clone(),
                    values,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Manifest {
            stage: plan.kind.name().to_string(),
            base: plan.base.display().to_string(),
            weights_key: plan.kind.weights_key().map(String::from),
            points,
        })
    }

    /// The manifest in sweep directory `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read (not a sweep directory?)", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a sweep manifest", path.display()))
    }
}

/// Refuses a rerun whose grid drops or changes a point that an earlier run of this sweep
/// directory started: the point and the axis value that is gone are named.
pub fn check_rerun(plan: &Plan) -> Result<()> {
    let path = plan.dir.join(MANIFEST);
    if !path.is_file() {
        return Ok(());
    }
    let old = Manifest::read(&plan.dir)?;
    if old.stage != plan.kind.name() {
        bail!(
            "{}: holds a sweep of stage {}, not {}; choose another sweep.output_dir",
            path.display(),
            old.stage,
            plan.kind.name()
        );
    }
    for p in &old.points {
        let started = plan
            .dir
            .join(&p.name)
            .join(crate::outputs::RUN_RECORD)
            .is_file();
        if !started || plan.points.iter().any(|q| q.name == p.name) {
            continue;
        }
        // The axis value that no point of the new grid has.
        let gone = p
            .values
            .iter()
            .find(|(k, v)| {
                !plan.axes.iter().any(|a| {
                    a.key == **k
                        && a.values
                            .iter()
                            .any(|x| serde_json::to_value(x).ok().as_ref() == Some(*v))
                })
            })
            .map(|(k, v)| format!("{k} = {v}"))
            .unwrap_or_else(|| "its axes".into());
        bail!(
            "{}: point {} ({gone}) is not in the sweep any more; a sweep's points may be added, not changed or dropped: restore the axis value, or choose another sweep.output_dir",
            path.display(),
            p.name
        );
    }
    Ok(())
}
