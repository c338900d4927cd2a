//! The pipeline's summary: one row per trained stage, written as JSON and as a markdown table.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct StageRow {
    pub stage: String,
    pub output_dir: String,
    pub train_seconds: f64,
    pub skipped: bool,
    pub win_rate: f64,
    pub ci95: (f64, f64),
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    pub mean_reward_diff: f64,
    pub model_objectives: Vec<f64>,
    pub baseline_objectives: Vec<f64>,
}

pub fn markdown(summary: &serde_json::Value, rows: &[StageRow], objectives: &[String]) -> String {
    let mut s = String::from("# mo-align pipeline summary\n\n");
    s.push_str(&format!(
        "Win rate of each stage against the base model `{}` on {} held-out prompts, judged by {}. Ties count half.\n\n",
        summary["baseline"].as_str().unwrap_or("?"),
        summary["prompts"],
        summary["judge"].as_str().unwrap_or("?")
    ));
    s.push_str("| stage | win rate | 95% CI | W/T/L | mean reward diff |");
    for o in objectives {
        s.push_str(&format!(" {o} |"));
    }
    s.push_str(" train time (s) |\n|---|---|---|---|---|");
    s.push_str(&"---|".repeat(objectives.len()));
    s.push_str("---|\n");
    if let Some(first) = rows.first() {
        s.push_str("| base | | | | |");
        for v in &first.baseline_objectives {
            s.push_str(&format!(" {v:.3} |"));
        }
        s.push_str(" |\n");
    }
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.1}% | {:.1}-{:.1}% | {}/{}/{} | {:+.4} |",
            r.stage,
            100.0 * r.win_rate,
            100.0 * r.ci95.0,
            100.0 * r.ci95.1,
            r.wins,
            r.ties,
            r.losses,
            r.mean_reward_diff
        ));
        for v in &r.model_objectives {
            s.push_str(&format!(" {v:.3} |"));
        }
        s.push_str(&format!(
            " {:.1}{} |\n",
            r.train_seconds,
            if r.skipped { " (cached)" } else { "" }
        ));
    }
    s.push_str(&format!(
        "\nReward model trained in {:.1}s; whole pipeline {:.1}s.\n",
        summary["reward_model"]["train_seconds"]
            .as_f64()
            .unwrap_or(0.0),
        summary["wall_seconds"].as_f64().unwrap_or(0.0)
    ));
    if let Some(acc) = summary["reward_model"]["report"]["ranking"]["composite_accuracy"].as_f64() {
        s.push_str(&format!(
            "Reward model ranks {:.1}% of held-out binarized pairs correctly.\n",
            100.0 * acc
        ));
    }
    s
}
