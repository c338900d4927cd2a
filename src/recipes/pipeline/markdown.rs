//! The summary in markdown (`summary.md`), rendered from its typed values.

use super::summary::{Curve, JudgeInfo, PipelineSummary, Sample};
use crate::eval::judge::WinRate;

impl PipelineSummary {
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
        let report = rm.report.as_ref();
        if let Some(ranking) = report.and_then(|r| r.ranking.as_ref()) {
            s.push_str(&format!(
                "Ranks {:.1}% of held-out binarized pairs correctly.",
                100.0 * ranking.composite_accuracy
            ));
        }
        if let Some(report) = report {
            let r: Vec<String> = report
                .validation
                .0
                .iter()
                .filter_map(|(k, v)| v.pearson.map(|p| format!("{k} {p:.3}")))
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

/// The wall-time curves as a table, and every stage's score at the shortest run's end.
fn curves_markdown(curves: &[Curve]) -> String {
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
