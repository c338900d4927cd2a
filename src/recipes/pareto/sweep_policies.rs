//! A finished sweep as Pareto policies: `[[policy]] sweep = DIR` becomes adapters trained one
//! per weighting, each point at the weighting its resolved config trained for. A sweep over
//! more than weights (seeds, learning rates) gives one policy per combination of its other
//! axis values, named after them. A sweep with a point that is not finished is refused: a
//! report over part of a sweep would read as the whole of it.

use super::config::{ParetoConfig, PolicySpec};
use crate::recipes::reuse::StageKind;
use crate::recipes::sweep::axes::{lookup, numbers};
use crate::recipes::sweep::manifest::Manifest;
use crate::recipes::sweep::plan::{safe_name, value_label};
use crate::recipes::sweep::point::{recorded_state, PointState};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// `cfg` with every `sweep` policy replaced by its fixed-weight policies (each keeping `sweep`
/// as where its adapters came from).
pub fn expand_sweep_policies(cfg: ParetoConfig) -> Result<ParetoConfig> {
    let mut policies: Vec<PolicySpec> = vec![];
    for (i, pol) in cfg.policy.iter().enumerate() {
        if pol.sweep.is_empty() {
            policies.push(pol.clone());
            continue;
        }
        let here = format!("policy[{i}] ({})", pol.name);
        if !pol.conditioned.is_empty() || !pol.adapters.is_empty() || !pol.soup.is_empty() {
            bail!("{here}: give exactly one of conditioned, adapters (with adapter_weights), soup or sweep");
        }
        policies.extend(of_sweep(&pol.name, Path::new(&pol.sweep)).with_context(|| here)?);
    }
    for (i, p) in policies.iter().enumerate() {
        if policies[..i].iter().any(|q| q.name == p.name) {
            bail!(
                "[[policy]] name `{}` is used twice (a sweep's policies are named NAME-<axis values>); rename one",
                p.name
            );
        }
    }
    Ok(ParetoConfig {
        policy: policies,
        ..cfg
    })
}

/// The points of the sweep in `dir`, every one finished, grouped by their axis values but
/// the weights.
fn of_sweep(name: &str, dir: &Path) -> Result<Vec<PolicySpec>> {
    let m = Manifest::read(dir)?;
    let kind = StageKind::parse(&m.stage)
        .with_context(|| format!("{}: unknown stage {}", dir.display(), m.stage))?;
    let Some(key) = kind.weights_key() else {
        bail!(
            "sweep {} trains {}, which has no objective weights",
            dir.display(),
            m.stage
        );
    };
    let mut unfinished = vec![];
    for p in &m.points {
        let state = recorded_state(kind, &dir.join(&p.name))
            .with_context(|| format!("sweep {}: point {}", dir.display(), p.name))?;
        if state != PointState::Done {
            unfinished.push(format!("{} ({})", p.name, state.word()));
        }
    }
    if !unfinished.is_empty() {
        bail!(
            "sweep {}: {} of {} points not finished: {}; finish them (rerun `mo-align sweep`) before reporting on the sweep",
            dir.display(),
            unfinished.len(),
            m.points.len(),
            unfinished.join(", ")
        );
    }
    let mut groups: Vec<PolicySpec> = vec![];
    for p in &m.points {
        let out = dir.join(&p.name);
        let weights = trained_weights(&out, key)?;
        let rest: Vec<String> = p
            .values
            .iter()
            .filter(|(k, _)| k.as_str() != key)
            .map(|(k, v)| {
                let label = k.rsplit('.').next().unwrap_or(k);
                let v =
                    toml::Value::try_from(v).map_or_else(|_| v.to_string(), |v| value_label(&v));
                format!("{label}{v}")
            })
            .collect();
        let group = if rest.is_empty() {
            name.to_string()
        } else {
            format!("{name}-{}", safe_name(&rest.join("_")))
        };
        let at = match groups.iter().position(|g| g.name == group) {
            Some(at) => at,
            None => {
                groups.push(PolicySpec {
                    name: group,
                    sweep: dir.display().to_string(),
                    ..PolicySpec::default()
                });
                groups.len() - 1
            }
        };
        groups[at].adapters.push(out.display().to_string());
        groups[at].adapter_weights.push(weights);
    }
    if groups.is_empty() {
        bail!("sweep {}: holds no points", dir.display());
    }
    Ok(groups)
}

/// The weights a point trained for, from its `config.resolved.toml`.
fn trained_weights(out: &Path, key: &str) -> Result<Vec<f64>> {
    let path = out.join(crate::outputs::RUN_RECORD);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not a config", path.display()))?;
    match lookup(&table, key).and_then(numbers) {
        Some(w) if !w.is_empty() => Ok(w),
        _ => bail!(
            "{}: {key} is empty (equal weights over objectives it does not name); give the weights in the sweep's base config or axes",
            path.display()
        ),
    }
}
