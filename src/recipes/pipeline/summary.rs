//! The pipeline's summary: typed records written as `summary.json`, rendered as `summary.md`
//! and drawn as charts, all from the same values.

use crate::eval::judge::WinRate;
use crate::generate::SamplingConfig;
use crate::objectives::reward_head::RewardModelReport;
use crate::recipes::pareto::report::ParetoBrief;
use crate::util::keyed::Keyed;
use anyhow::{Context, Result};
use serde::{Deserialize, Deserializer, Serialize};
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
    /// Keyed like `JudgeInfo::key`, in the judges' order.
    pub judged: Keyed<JudgedStage>,
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
    pub report: Option<RewardModelReport>,
}

/// A checkpoint judged by the ground truth: the training seconds it had behind it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CurvePoint {
    pub step: u64,
    pub elapsed_s: f64,
    pub mean_total: f64,
    pub mean_objectives: Vec<f64>,
}

/// A stage's ground-truth score against its training time (its first point is the model it
/// started from, at 0 s).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Curve {
    pub stage: String,
    pub points: Vec<CurvePoint>,
}

impl Curve {
    /// The score of the newest checkpoint at or before `t` seconds: what a run stopped then has.
    pub fn at(&self, t: f64) -> Option<&CurvePoint> {
        self.points.iter().rev().find(|p| p.elapsed_s <= t + 1e-9)
    }

    pub fn end_s(&self) -> f64 {
        self.points.last().map_or(0.0, |p| p.elapsed_s)
    }
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

impl PipelineSummary {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a pipeline summary", path.display()))
    }
}
