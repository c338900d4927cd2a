//! The summary's charts, drawn from its typed values.

use super::summary::PipelineSummary;
use crate::plot::{write_chart, Chart};
use anyhow::Result;
use std::path::{Path, PathBuf};

impl PipelineSummary {
    /// Per judge, each stage's mean score per objective beside the base's
    /// (`stage_objectives_<judge>`), and every stage's win rate against the base by each judge
    /// (`win_rates`).
    pub fn write_charts(&self, dir: &Path, png: bool) -> Result<Vec<PathBuf>> {
        let names: Vec<String> = self.stages.iter().map(|s| s.stage.clone()).collect();
        let mut out = vec![];
        let mut rates: Vec<(&str, Vec<f64>)> = vec![];
        for j in &self.judges {
            let key = j.key.as_str();
            if !j.objectives.is_empty() {
                let mut series: Vec<(&str, Vec<f64>)> =
                    vec![("base", j.base_mean_objectives.clone())];
                for s in &self.stages {
                    let means = s.judged.get(key).map(|v| v.mean_objectives.clone());
                    series.push((&s.stage, means.unwrap_or_default()));
                }
                let title = if key == "rules" {
                    "ground-truth (rule) scores by stage"
                } else {
                    "reward-model scores by stage"
                };
                let chart = Chart::Bars {
                    title,
                    labels: j.objectives.clone(),
                    series,
                };
                out.extend(write_chart(
                    dir,
                    &format!("stage_objectives_{key}"),
                    &chart,
                    png,
                )?);
            }
            rates.push((
                key,
                self.stages
                    .iter()
                    .map(|s| s.judged.get(key).map_or(f64::NAN, |v| v.vs_base.win_rate))
                    .collect(),
            ));
        }
        let chart = Chart::Bars {
            title: "win rate against the base model",
            labels: names,
            series: rates,
        };
        out.extend(write_chart(dir, "win_rates", &chart, png)?);
        Ok(out)
    }
}
