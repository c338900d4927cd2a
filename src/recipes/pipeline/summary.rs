//! The pipeline's summary: typed records written as `summary.json`, rendered as `summary.md`
//! and drawn as charts, all from the same values.

use super::curves::{curves_markdown, Curve};
use crate::generate::SamplingConfig;
use crate::judge::WinRate;
use crate::recipes::pareto::ParetoBrief;
use anyhow::{Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::{Path, PathBuf};

/// One judge's view of one stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JudgedStage {
    pub vs_base: WinRate,
    /// Against the stage it started from (absent when that is the base).
    pub vs_previous: Option<WinRate>,
    pub mean_objectives: Vec<f64>,
    pub mean_total: f64,
}

/// A stage's judgement by each judge, keyed like `JudgeInfo::key`, in the judges' order.
#[derive(Debug, Clone, Default)]
pub struct JudgedBy(pub Vec<(String, JudgedStage)>);

impl JudgedBy {
    /// The judgement of the judge `key`.
    pub fn get(&self, key: &str) -> Option<&JudgedStage> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, j)| j)
    }
}

impl Serialize for JudgedBy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de> Deserialize<'de> for JudgedBy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = serde_json::Map::deserialize(d)?;
        map.into_iter()
            .map(|(k, v)| {
                Ok((
                    k,
                    serde_json::from_value(v).map_err(serde::de::Error::custom)?,
                ))
            })
            .collect::<Result<_, _>>()
            .map(JudgedBy)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JudgeInfo {
    /// `rules` or `reward_model`.
    pub key: String,
    pub describe: String,
    pub objectives: Vec<String>,
    /// The base model's mean scores.
    pub base_mean_objectives: Vec<f64>,
    pub base_mean_total: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: String,
    pub answer: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StageRow {
    pub stage: String,
    pub output_dir: String,
    pub previous: String,
    /// NaN (written as null) when a stage trained by an older version is up to date.
    #[serde(deserialize_with = "nan_if_null")]
    pub train_seconds: f64,
    pub skipped: bool,
    pub judged: JudgedBy,
    pub samples: Vec<Sample>,
}

/// How long a stage took, and whether it was up to date (its earlier training time).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageSeconds {
    pub stage: String,
    #[serde(deserialize_with = "nan_if_null")]
    pub seconds: f64,
    pub cached: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RewardModelSummary {
    pub output_dir: PathBuf,
    pub train_seconds: f64,
    /// train-rm's `rm_report.json` (null when it is missing).
    pub report: serde_json::Value,
}

/// `summary.json` (a summary written before a field existed reads back with its default).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PipelineSummary {
    pub baseline: String,
    pub baseline_adapter: Option<PathBuf>,
    pub prompts: usize,
    pub sampling: SamplingConfig,
    pub judges: Vec<JudgeInfo>,
    pub base_samples: Vec<Sample>,
    pub stages: Vec<StageRow>,
    pub curves: Vec<Curve>,
    pub stage_seconds: Vec<StageSeconds>,
    pub reward_model: RewardModelSummary,
    pub wall_seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pareto: Option<ParetoBrief>,
}

/// Non-finite floats are written as null; they read back as NaN.
fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn pct(w: &WinRate) -> String {
    format!(
        "{:.1}% ({}/{}/{})",
        100.0 * w.win_rate,
        w.wins,
        w.ties,
        w.losses
    )
}

fn one_line(s: &str) -> String {
    s.replace('\n', " / ").replace('|', "\\|")
}

impl PipelineSummary {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a pipeline summary", path.display()))
    }

    pub fn markdown(&self) -> String {
        let mut s = String::from("# mo-align pipeline summary\n\n");
        s.push_str(&format!(
            "Each stage and the base model `{}` answer the same {} held-out prompts (one seeded sampling stream per prompt). \
             Win rates: W/T/L per prompt, ties count half.\n\n",
            self.baseline, self.prompts,
        ));
        for j in &self.judges {
            s.push_str(&self.judge_table(j));
        }
        if !self.curves.is_empty() {
            s.push_str(&curves_markdown(&self.curves));
        }
        s.push_str(&self.reward_model_section());
        s.push_str("## Sample generations\n\n| model | prompt | answer |\n|---|---|---|\n");
        let mut emit = |name: &str, samples: &[Sample]| {
            for x in samples {
                s.push_str(&format!(
                    "| {name} | {} | {} |\n",
                    one_line(&x.prompt),
                    one_line(&x.answer)
                ));
            }
        };
        emit("base", &self.base_samples);
        for r in &self.stages {
            emit(&r.stage, &r.samples);
        }
        s.push_str(&format!("\nWhole pipeline {:.1}s.\n", self.wall_seconds));
        s
    }

    /// One judge's table: every stage against the base and its predecessor, and its means.
    fn judge_table(&self, j: &JudgeInfo) -> String {
        let title = match j.key.as_str() {
            "rules" => "Judged by the rule objectives (ground truth)",
            _ => "Judged by the trained reward model",
        };
        let mut s = format!("## {title}\n\n`{}`\n\n", j.describe);
        s.push_str("| stage | vs base | vs previous stage |");
        for o in &j.objectives {
            s.push_str(&format!(" {o} |"));
        }
        s.push_str(" train time (s) |\n|---|---|---|");
        s.push_str(&"---|".repeat(j.objectives.len()));
        s.push_str("---|\n| base | | |");
        for v in &j.base_mean_objectives {
            s.push_str(&format!(" {v:.3} |"));
        }
        s.push_str(" |\n");
        for r in &self.stages {
            let Some(v) = r.judged.get(&j.key) else {
                continue;
            };
            s.push_str(&format!(
                "| {} | {} | {} |",
                r.stage,
                pct(&v.vs_base),
                match &v.vs_previous {
                    None => String::new(),
                    Some(w) => format!("{} vs {}", pct(w), r.previous),
                }
            ));
            for x in &v.mean_objectives {
                s.push_str(&format!(" {x:.3} |"));
            }
            let seconds = if r.train_seconds.is_finite() {
                format!("{:.1}", r.train_seconds)
            } else {
                "?".to_string()
            };
            s.push_str(&format!(
                " {seconds}{} |\n",
                if r.skipped { " (trained earlier)" } else { "" }
            ));
        }
        s.push('\n');
        s
    }

    /// The reward model's ranking accuracy and correlations, as train-rm reported them.
    fn reward_model_section(&self) -> String {
        let rm = &self.reward_model;
        let mut s = String::from("## Reward model\n\n");
        if let Some(acc) = rm.report["ranking"]["composite_accuracy"].as_f64() {
            s.push_str(&format!(
                "Ranks {:.1}% of held-out binarized pairs correctly.",
                100.0 * acc
            ));
        }
        if let Some(per) = rm.report["validation"].as_object() {
            let r: Vec<String> = per
                .iter()
                .filter_map(|(k, v)| v["pearson"].as_f64().map(|p| format!("{k} {p:.3}")))
                .collect();
            if !r.is_empty() {
                s.push_str(&format!(
                    " Pearson r against the ground-truth ratings of held-out completions: {}.",
                    r.join(", ")
                ));
            }
        }
        s.push_str(&format!(" Trained in {:.1}s.\n\n", rm.train_seconds));
        s
    }
}
