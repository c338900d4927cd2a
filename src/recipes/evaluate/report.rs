//! The JSON report `mo-align eval --report` writes, and the bar chart drawn beside it.

use crate::eval::preferences::{ChatNll, PreferenceEval};
use crate::eval::win_rate::WinRateReport;
use crate::plot::{write_chart, Chart};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What was evaluated and every mode's result (a mode not run is left out).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalReport {
    pub model: String,
    pub base_adapter: Option<PathBuf>,
    pub adapter: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nll_per_token: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sft_data: Option<ChatNll>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preferences: Option<PreferenceEval>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scored: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompts_skipped_too_long: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conditioning: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub win_rate: Option<WinRateReport>,
}

impl EvalReport {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not an eval report", path.display()))
    }

    /// The per-objective bar chart of a win rate (model vs baseline), written into `dir` under
    /// the name `chart_name(report)`; nothing when there is no win rate or no objectives.
    pub fn write_chart(&self, report: &Path, dir: &Path, png: bool) -> Result<Vec<PathBuf>> {
        let Some(w) = self.win_rate.as_ref().filter(|w| !w.objectives.is_empty()) else {
            return Ok(vec![]);
        };
        let chart = Chart::Bars {
            title: "reward-model scores: model vs baseline",
            labels: w.objectives.clone(),
            series: vec![
                ("model", w.mean_objectives_model.clone()),
                ("baseline", w.mean_objectives_baseline.clone()),
            ],
        };
        write_chart(dir, &chart_name(report), &chart, png)
    }
}

/// The name of the chart drawn for a report: `REPORT_objectives` beside `REPORT.json`, so two
/// reports in one directory keep a chart each.
pub fn chart_name(report: &Path) -> String {
    let stem = report
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "eval".into());
    format!("{stem}_objectives")
}

/// Where the chart of a win-rate report written to `report` goes.
pub fn chart_path(report: &Path) -> PathBuf {
    report
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(format!("{}.svg", chart_name(report)))
}
