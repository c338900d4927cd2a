//! The Pareto report in markdown: `pareto.md`, and the section the pipeline's summary links.

use super::report::{fmt_rho, ParetoReport};
use crate::objectives::weighting::{format_line, PREFIX};
use std::path::{Path, PathBuf};

impl ParetoReport {
    /// `pareto.md`: the measures per policy, then each policy's weightings (`plots` are
    /// shown by file name, beside it).
    pub fn markdown(&self, plots: &[PathBuf]) -> String {
        let (objectives, judged) = (&self.objectives, &self.judged_objectives);
        let mut md = String::from("# Pareto report\n\n");
        md.push_str(&format!(
            "Each policy answers the same {} held-out prompts at each weighting; every answer is scored on every objective. Weightings are over {objectives:?}. Hypervolume is measured above the reference point {:?}; \"shared\" counts only the {} weightings every policy was evaluated at. Spearman's rho: how each objective's mean score follows its weight.\n\n",
            self.n_prompts,
            self.reference_point,
            self.shared_weightings.len()
        ));
        for p in plots {
            if let Some(name) = p.file_name().and_then(|n| n.to_str()) {
                md.push_str(&format!("![{name}]({name})\n\n"));
            }
        }
        md.push_str("| policy | kind | weightings | hypervolume | hypervolume (shared) | front | sparsity | spacing | rho per objective | seconds |\n|---|---|---|---|---|---|---|---|---|---|\n");
        for r in &self.policies {
            md.push_str(&format!(
                "| {} | {} | {} | {:.4} | {:.4} | {} | {:.4} | {:.4} | {} | {:.1} |\n",
                r.name,
                r.kind,
                r.weightings.len(),
                r.hypervolume,
                r.hypervolume_shared,
                r.front_size,
                r.sparsity,
                r.spacing,
                fmt_rho(&r.spearman),
                r.seconds
            ));
        }
        for r in &self.policies {
            md.push_str(&format!(
                "\n## {}\n\n| weights | {} | front |\n|---|{}---|\n",
                r.name,
                judged.join(" | "),
                "---|".repeat(judged.len())
            ));
            for w in &r.weightings {
                let cells: Vec<String> = w
                    .means
                    .iter()
                    .zip(&w.ci95)
                    .map(|(m, c)| format!("{m:.3} ± {c:.3}"))
                    .collect();
                md.push_str(&format!(
                    "| {} | {} | {} |\n",
                    format_line(objectives, &w.weights).trim_start_matches(PREFIX),
                    cells.join(" | "),
                    if w.on_front { "yes" } else { "" }
                ));
            }
        }
        md
    }

    /// The pipeline summary's section on this report (written to `dir`): each policy's
    /// hypervolume and rho, the plots, and a link to the whole report (paths relative to the
    /// summary's directory `summary_dir`).
    pub fn summary_section(&self, dir: &Path, summary_dir: &Path) -> String {
        let rel = relative_to(dir, summary_dir);
        let mut md = format!(
            "\n## Pareto front\n\nEvery policy answered the held-out prompts at each weighting of {} (full report: [{}/pareto.md]({}/pareto.md)). Hypervolume above {}; rho: Spearman's correlation of each objective's weight with its judged mean (1 = the score rises with every increase of its weight).\n\n| policy | kind | weightings | hypervolume | hypervolume (shared) | rho per objective |\n|---|---|---|---|---|---|\n",
            json(&self.objectives), rel, rel, json(&self.reference_point)
        );
        for p in &self.policies {
            md.push_str(&format!(
                "| {} | {} | {} | {:.3} | {:.3} | {} |\n",
                p.name,
                p.kind,
                p.weightings.len(),
                p.hypervolume,
                p.hypervolume_shared,
                fmt_rho(&p.spearman),
            ));
        }
        // The trade-off a user steers: each policy at all weight on one objective (and at equal
        // weights), every objective's judged mean.
        let judged = &self.judged_objectives;
        for p in &self.policies {
            let rows: Vec<String> = p
                .weightings
                .iter()
                .filter_map(|w| {
                    let ws = &w.weights;
                    let k = ws.len() as f64;
                    let vertex = ws.contains(&1.0);
                    let equal = ws.iter().all(|x| (x - 1.0 / k).abs() < 0.011);
                    if !(vertex || equal) {
                        return None;
                    }
                    let means: Vec<String> = w.means.iter().map(|m| format!("{m:.3}")).collect();
                    let label = match ws.iter().position(|x| *x == 1.0) {
                        Some(i) => format!(
                            "all on {}",
                            self.objectives.get(i).map_or("?", String::as_str)
                        ),
                        None => "equal".to_string(),
                    };
                    Some(format!("| {label} | {} |\n", means.join(" | ")))
                })
                .collect();
            if !rows.is_empty() {
                md.push_str(&format!(
                    "\n{} at single-objective weightings (judged means):\n\n| weights | {} |\n|---|{}\n{}",
                    p.name,
                    judged.join(" | "),
                    "---|".repeat(judged.len()),
                    rows.concat()
                ));
            }
        }
        md.push_str(&format!(
            "\n![front, objective pairs]({rel}/pareto_pairs.svg)\n\n![front, parallel coordinates]({rel}/pareto_parallel.svg)\n"
        ));
        md
    }
}

/// A value as compact JSON, as the summary has always shown lists.
fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// `path` relative to `base` when it lies below it, else as given.
fn relative_to(path: &Path, base: &Path) -> String {
    let (p, b) = (
        crate::util::io::resolved_path(path),
        crate::util::io::resolved_path(base),
    );
    if let Ok(r) = p.strip_prefix(&b) {
        return r.display().to_string();
    }
    // Siblings (runs/demo/pareto next to runs/demo/pipeline): one level up.
    match (p.parent(), b.parent(), p.file_name()) {
        (Some(pp), Some(bp), Some(name)) if pp == bp => format!("../{}", name.to_string_lossy()),
        _ => p.display().to_string(),
    }
}
