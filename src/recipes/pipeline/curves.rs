//! Wall-time curves: a stage's ground-truth score against the seconds it had trained, one
//! point per kept checkpoint, and every stage's score at equal training time.

use super::answering::Answering;
use super::stages::TrainedStage;
use crate::eval::win_rate::judge_answers;
use crate::judge::{mean_objectives, mean_total, Judge, Verdict};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

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

/// Wall-time curves: every checkpoint of the stages `names` answers the same
/// prompts and the ground truth (`judge`, whose verdicts on every model are `verdicts`)
/// judges it.
pub fn judge_checkpoints(
    names: &[String],
    ans: &Answering,
    judge: &Judge,
    verdicts: &[Vec<Verdict>],
    stages: &[TrainedStage],
) -> Result<Vec<Curve>> {
    let k = judge.objectives().len();
    let point = |step: u64, elapsed_s: f64, v: &[Verdict]| CurvePoint {
        step,
        elapsed_s,
        mean_total: mean_total(v),
        mean_objectives: mean_objectives(v, k),
    };
    let mut curves = vec![];
    for name in names {
        let Some(st) = stages.iter().find(|s| &s.name == name) else {
            bail!("eval.curves names `{name}`, which is not a stage of this pipeline");
        };
        let start = st
            .previous
            .as_deref()
            .and_then(|p| stages.iter().position(|s| s.name == p).map(|i| i + 1))
            .unwrap_or(0);
        let mut points = vec![point(0, 0.0, &verdicts[start])];
        for dir in crate::train::checkpoint::complete(&st.output_dir)? {
            let state = crate::train::checkpoint::read_state(&dir)?;
            let a = ans.answers_of(&st.model, st.base_adapter.as_deref(), Some(&dir))?;
            let v = judge_answers(judge, &ans.prompts, &a, ans.batch)?;
            points.push(point(state.step, state.elapsed_s, &v));
        }
        if points.len() < 2 {
            eprintln!("warning: {name} kept no checkpoints; its curve has only its start (set train.save_every)");
        }
        curves.push(Curve {
            stage: name.clone(),
            points,
        });
    }
    Ok(curves)
}

/// The wall-time curves as a table, and every stage's score at the shortest run's end.
pub fn curves_markdown(curves: &[Curve]) -> String {
    let mut s = String::from(
        "## Ground truth against training time\n\n\
         Every kept checkpoint answers the same prompts, judged by the rule objectives (mean score). \
         Seconds are those spent in training steps (a stage's one-off reference and reward-model \
         passes before its first step are not counted); 0 s is the model the stage started from.\n\n\
         | stage | step | seconds | mean score |\n|---|---|---|---|\n",
    );
    for c in curves {
        for p in &c.points {
            s.push_str(&format!(
                "| {} | {} | {:.1} | {:.3} |\n",
                c.stage, p.step, p.elapsed_s, p.mean_total
            ));
        }
    }
    let t = curves
        .iter()
        .map(Curve::end_s)
        .fold(f64::INFINITY, f64::min);
    if curves.len() > 1 && t.is_finite() {
        let at: Vec<String> = curves
            .iter()
            .filter_map(|c| {
                c.at(t)
                    .map(|p| format!("{} {:.3} (step {})", c.stage, p.mean_total, p.step))
            })
            .collect();
        s.push_str(&format!(
            "\nAt equal training time ({t:.1} s, where the shortest run ends): {}.\n",
            at.join(", ")
        ));
    }
    s.push('\n');
    s
}
