//! The pipeline's evaluation and summary: the base model and every trained stage answer the
//! same held-out prompts once; each judge (rule objectives = ground truth, and the trained
//! reward model) scores every answer; each stage is compared with the base and with the stage it
//! started from. One row per stage and judge goes into the JSON and markdown summary.

use super::pipeline::PipelineEvalConfig;
use crate::eval::prompts::{prompts_that_fit, read_prompt_records, PromptRecord};
use crate::eval::win_rate::{answer_prompts, compare, judge_answers, write_generations};
use crate::eval::{load_for_eval, load_policy_at};
use crate::judge::{win_rate, Judge, Verdict, WinRate};
use crate::model::loader::select_device;
use crate::model::parse_dtype;
use anyhow::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A trained stage to judge: the model it is (base path, adapters), what it started from, and
/// how long it trained.
pub struct TrainedStage {
    pub name: String,
    pub model: String,
    pub base_adapter: Option<PathBuf>,
    pub adapter: Option<PathBuf>,
    /// The stage this one started from (`None`: the base model).
    pub previous: Option<String>,
    pub output_dir: PathBuf,
    pub train_seconds: f64,
    pub skipped: bool,
}

/// One judge's view of one stage.
#[derive(Debug, Clone, Serialize)]
pub struct JudgedStage {
    pub vs_base: WinRate,
    /// Against the stage it started from (absent when that is the base).
    pub vs_previous: Option<WinRate>,
    pub mean_objectives: Vec<f64>,
    pub mean_total: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct JudgeInfo {
    /// `rules` or `reward_model`.
    pub key: String,
    pub describe: String,
    pub objectives: Vec<String>,
    /// The base model's mean scores.
    pub base_mean_objectives: Vec<f64>,
    pub base_mean_total: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub prompt: String,
    pub answer: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageRow {
    pub stage: String,
    pub output_dir: String,
    pub previous: String,
    pub train_seconds: f64,
    pub skipped: bool,
    /// Keyed like `JudgeInfo::key`.
    pub judged: serde_json::Map<String, serde_json::Value>,
    pub samples: Vec<Sample>,
}

/// A checkpoint judged by the ground truth: the training seconds it had behind it.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    pub step: u64,
    pub elapsed_s: f64,
    pub mean_total: f64,
    pub mean_objectives: Vec<f64>,
}

/// A stage's ground-truth score against its training time (its first point is the model it
/// started from, at 0 s).
#[derive(Debug, Clone, Serialize)]
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

/// Every stage judged against the base and its predecessor.
pub struct Judged {
    pub curves: Vec<Curve>,
    pub rows: Vec<StageRow>,
    pub judges: Vec<JudgeInfo>,
    pub base_samples: Vec<Sample>,
    pub sampling: crate::generate::SamplingConfig,
    pub prompts: usize,
}

fn mean(v: &[Verdict], f: impl Fn(&Verdict) -> f64) -> f64 {
    v.iter().map(f).sum::<f64>() / v.len().max(1) as f64
}

fn mean_objectives(v: &[Verdict]) -> Vec<f64> {
    let k = v.first().map_or(0, |x| x.objectives.len());
    (0..k)
        .map(|i| mean(v, |x| x.objectives[i] as f64))
        .collect()
}

/// Judges `(key, spec)` every stage's answers against the base model `base` (path, adapter);
/// each stage's generations against the base are written into `out`.
pub fn judge_stages(
    e: &PipelineEvalConfig,
    base: (&str, Option<&Path>),
    judge_specs: &[(String, String)],
    stages: &[TrainedStage],
    out: &Path,
) -> Result<Judged> {
    let device = select_device(&e.device)?;
    let dtype = parse_dtype(&e.dtype)?;
    let judges: Vec<(String, Judge)> = judge_specs
        .iter()
        .map(|(key, spec)| {
            Ok((
                key.clone(),
                Judge::load(spec, &e.judge_weights, dtype, &device)?,
            ))
        })
        .collect::<Result<_>>()?;
    let (prompts, _): (Vec<PromptRecord>, _) = prompts_that_fit(
        read_prompt_records(&e.prompts, e.max_prompts)?,
        &[base.0],
        crate::eval::prompts::ANSWER_ROOM,
    )?;
    let messages: Vec<_> = prompts.iter().map(|p| p.messages.clone()).collect();
    let baseline = load_for_eval(base.0, base.1, None, dtype, &device)?;
    let sampling = e.sampling.resolve(baseline.generation_config().as_ref());
    sampling.validate()?;
    let batch = e.gen_batch_size;

    // Every model answers once; every judge scores every answer set once.
    let t = Instant::now();
    let mut answers: Vec<(String, Vec<String>)> = vec![(
        "base".into(),
        answer_prompts(&baseline, &messages, &sampling, batch)?,
    )];
    drop(baseline);
    for st in stages {
        // A weight-conditioned stage answers at equal weights.
        let policy = load_policy_at(
            &st.model,
            st.base_adapter.as_deref(),
            st.adapter.as_deref(),
            None,
            dtype,
            &device,
        )?;
        let msgs: Vec<_> = messages.iter().map(|m| policy.prompt(m)).collect();
        answers.push((
            st.name.clone(),
            answer_prompts(&policy.loaded, &msgs, &sampling, batch)?,
        ));
    }
    eprintln!(
        "generated {} answers per model in {:.1}s",
        prompts.len(),
        t.elapsed().as_secs_f64()
    );
    let mut verdicts: Vec<Vec<Vec<Verdict>>> = vec![];
    for (_, judge) in &judges {
        verdicts.push(
            answers
                .iter()
                .map(|(_, a)| judge_answers(judge, &prompts, a, batch))
                .collect::<Result<_>>()?,
        );
    }

    let index = |name: &str| answers.iter().position(|(n, _)| n == name);
    let samples = |a: &[String]| -> Vec<Sample> {
        prompts
            .iter()
            .zip(a)
            .take(e.samples)
            .map(|(p, a)| Sample {
                prompt: p
                    .messages
                    .last()
                    .map(|m| m.content.clone())
                    .unwrap_or_default(),
                answer: a.clone(),
            })
            .collect()
    };
    let mut rows = vec![];
    for (si, st) in stages.iter().enumerate() {
        let me = si + 1;
        let prev = st.previous.as_deref().and_then(index);
        let mut judged = serde_json::Map::new();
        for (ji, (key, judge)) in judges.iter().enumerate() {
            let v = &verdicts[ji];
            let (report, gens) = compare(
                judge,
                &prompts,
                (&answers[me].1, &v[me]),
                (&answers[0].1, &v[0]),
                &sampling,
                e.tie_margin,
            );
            if ji == 0 {
                write_generations(&out.join(format!("generations-{}.jsonl", st.name)), &gens)?;
            }
            let totals = |i: usize| v[i].iter().map(|x| x.total).collect::<Vec<_>>();
            let vs_previous = prev.map(|p| win_rate(&totals(me), &totals(p), e.tie_margin));
            let row = JudgedStage {
                vs_base: report.overall,
                vs_previous,
                mean_objectives: mean_objectives(&v[me]),
                mean_total: mean(&v[me], |x| x.total),
            };
            judged.insert(key.clone(), serde_json::to_value(row)?);
        }
        let wr = |key: &str| {
            judged[key]["vs_base"]["win_rate"]
                .as_f64()
                .map(|w| format!("{key} {:.1}%", 100.0 * w))
                .unwrap_or_default()
        };
        eprintln!(
            "{}: win rate against the base: {}",
            st.name,
            judges
                .iter()
                .map(|(k, _)| wr(k))
                .collect::<Vec<_>>()
                .join(", ")
        );
        rows.push(StageRow {
            stage: st.name.clone(),
            output_dir: st.output_dir.display().to_string(),
            previous: st.previous.clone().unwrap_or_else(|| "base".into()),
            train_seconds: st.train_seconds,
            skipped: st.skipped,
            judged,
            samples: samples(&answers[me].1),
        });
    }
    // Wall-time curves: every checkpoint of the named stages answers the same prompts and the
    // ground truth judges it.
    let mut curves = vec![];
    let ground_truth = judges.iter().position(|(k, _)| k == "rules");
    if let (Some(ji), false) = (ground_truth, e.curves.is_empty()) {
        let (_, judge) = &judges[ji];
        for name in &e.curves {
            let Some(si) = stages.iter().position(|s| &s.name == name) else {
                anyhow::bail!("eval.curves names `{name}`, which is not a stage of this pipeline");
            };
            let st = &stages[si];
            let start = st.previous.as_deref().and_then(index).unwrap_or(0);
            let v0 = &verdicts[ji][start];
            let mut points = vec![CurvePoint {
                step: 0,
                elapsed_s: 0.0,
                mean_total: mean(v0, |x| x.total),
                mean_objectives: mean_objectives(v0),
            }];
            for dir in crate::train::checkpoint::complete(&st.output_dir)? {
                let state = crate::train::checkpoint::read_state(&dir)?;
                let policy = load_policy_at(
                    &st.model,
                    st.base_adapter.as_deref(),
                    Some(&dir),
                    None,
                    dtype,
                    &device,
                )?;
                let msgs: Vec<_> = messages.iter().map(|m| policy.prompt(m)).collect();
                let a = answer_prompts(&policy.loaded, &msgs, &sampling, batch)?;
                let v = judge_answers(judge, &prompts, &a, batch)?;
                points.push(CurvePoint {
                    step: state.step,
                    elapsed_s: state.elapsed_s,
                    mean_total: mean(&v, |x| x.total),
                    mean_objectives: mean_objectives(&v),
                });
            }
            if points.len() < 2 {
                eprintln!("warning: {name} kept no checkpoints; its curve has only its start (set train.save_every)");
            }
            curves.push(Curve {
                stage: name.clone(),
                points,
            });
        }
    }
    let judges = judges
        .iter()
        .enumerate()
        .map(|(ji, (key, judge))| JudgeInfo {
            key: key.clone(),
            describe: judge.describe(),
            objectives: judge.objectives(),
            base_mean_objectives: mean_objectives(&verdicts[ji][0]),
            base_mean_total: mean(&verdicts[ji][0], |x| x.total),
        })
        .collect();
    Ok(Judged {
        curves,
        rows,
        judges,
        base_samples: samples(&answers[0].1),
        sampling,
        prompts: prompts.len(),
    })
}

fn pct(w: &serde_json::Value) -> String {
    match w["win_rate"].as_f64() {
        Some(p) => format!(
            "{:.1}% ({}/{}/{})",
            100.0 * p,
            w["wins"],
            w["ties"],
            w["losses"]
        ),
        None => "".into(),
    }
}

fn one_line(s: &str) -> String {
    s.replace('\n', " / ").replace('|', "\\|")
}

pub fn markdown(summary: &serde_json::Value, judged: &Judged) -> String {
    let mut s = String::from("# mo-align pipeline summary\n\n");
    s.push_str(&format!(
        "Each stage and the base model `{}` answer the same {} held-out prompts (one seeded sampling stream per prompt). \
         Win rates: W/T/L per prompt, ties count half.\n\n",
        summary["baseline"].as_str().unwrap_or("?"),
        judged.prompts,
    ));
    for j in &judged.judges {
        let title = match j.key.as_str() {
            "rules" => "Judged by the rule objectives (ground truth)",
            _ => "Judged by the trained reward model",
        };
        s.push_str(&format!("## {title}\n\n`{}`\n\n", j.describe));
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
        for r in &judged.rows {
            let v = &r.judged[&j.key];
            s.push_str(&format!(
                "| {} | {} | {} |",
                r.stage,
                pct(&v["vs_base"]),
                if v["vs_previous"].is_null() {
                    String::new()
                } else {
                    format!("{} vs {}", pct(&v["vs_previous"]), r.previous)
                }
            ));
            for x in v["mean_objectives"].as_array().into_iter().flatten() {
                s.push_str(&format!(" {:.3} |", x.as_f64().unwrap_or(f64::NAN)));
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
    }
    if !judged.curves.is_empty() {
        s.push_str(&curves_markdown(&judged.curves));
    }
    let rm = &summary["reward_model"];
    s.push_str("## Reward model\n\n");
    if let Some(acc) = rm["report"]["ranking"]["composite_accuracy"].as_f64() {
        s.push_str(&format!(
            "Ranks {:.1}% of held-out binarized pairs correctly.",
            100.0 * acc
        ));
    }
    if let Some(per) = rm["report"]["validation"].as_object() {
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
    s.push_str(&format!(
        " Trained in {:.1}s.\n\n",
        rm["train_seconds"].as_f64().unwrap_or(0.0)
    ));
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
    emit("base", &judged.base_samples);
    for r in &judged.rows {
        emit(&r.stage, &r.samples);
    }
    s.push_str(&format!(
        "\nWhole pipeline {:.1}s.\n",
        summary["wall_seconds"].as_f64().unwrap_or(0.0)
    ));
    s
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
