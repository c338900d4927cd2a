//! A finished sweep as Pareto policies: `[[policy]] sweep = DIR` becomes adapters trained one
//! per weighting, each finished point at the weighting its resolved config trained for. A
//! sweep over more than weights (seeds, learning rates) gives one policy per combination of
//! its other axis values, named after them.

use super::manifest::Manifest;
use crate::recipes::pareto::config::{ParetoConfig, PolicySpec};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// `cfg` with every `sweep` policy replaced by its fixed-weight policies.
pub fn expand_sweep_policies(cfg: ParetoConfig) -> Result<ParetoConfig> {
    let mut policies = vec![];
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
    Ok(ParetoConfig {
        policy: policies,
        ..cfg
    })
}

/// The finished points of the sweep in `dir`, grouped by their axis values but the weights.
fn of_sweep(name: &str, dir: &Path) -> Result<Vec<PolicySpec>> {
    let m = Manifest::read(dir)?;
    let Some(key) = m.weights_key.as_deref() else {
        bail!(
            "sweep {} trains {}, which has no objective weights",
            dir.display(),
            m.stage
        );
    };
    let mut groups: Vec<PolicySpec> = vec![];
    for p in &m.points {
        let out = &p.output_dir;
        if !out.join("adapter_model.safetensors").is_file() {
            continue;
        }
        let weights = trained_weights(out, key)?;
        let rest: Vec<String> = p
            .values
            .iter()
            .filter(|(k, _)| k.as_str() != key)
            .map(|(k, v)| {
                let label = k.rsplit('.').next().unwrap_or(k);
                format!("{label}{}", v.to_string().trim_matches('"'))
            })
            .collect();
        let group = if rest.is_empty() {
            name.to_string()
        } else {
            let suffix: String = rest
                .join("_")
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            format!("{name}-{suffix}")
        };
        let at = match groups.iter().position(|g| g.name == group) {
            Some(at) => at,
            None => {
                groups.push(PolicySpec {
                    name: group,
                    ..PolicySpec::default()
                });
                groups.len() - 1
            }
        };
        groups[at].adapters.push(out.display().to_string());
        groups[at].adapter_weights.push(weights);
    }
    if groups.is_empty() {
        bail!(
            "sweep {}: no point has finished (run `mo-align sweep` first)",
            dir.display()
        );
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
    let (section, field) = key.split_once('.').unwrap_or(("", key));
    let values: Option<Vec<f64>> = table
        .get(section)
        .and_then(|s| s.get(field))
        .and_then(|w| w.as_array())
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_float().or_else(|| x.as_integer().map(|n| n as f64)))
                .collect()
        });
    match values {
        Some(w) if !w.is_empty() => Ok(w),
        _ => bail!(
            "{}: {key} is empty (equal weights over objectives it does not name); give the weights in the sweep's base config or axes",
            path.display()
        ),
    }
}
