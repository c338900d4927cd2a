//! The pipeline's evaluation: the base model and every trained stage answer the same held-out
//! prompts once; each judge (rule objectives = ground truth, and the trained reward model)
//! scores every answer; each stage is compared with the base and with the stage it started
//! from. The checkpoints of the stages named in `eval.curves` are judged by the ground truth.

use super::answering::Answering;
use super::config::PipelineEvalConfig;
use super::stages::TrainedStage;
use super::summary::{Curve, CurvePoint, JudgeInfo, JudgedStage, Sample, StageRow};
use crate::eval::judge::{mean_objectives, mean_total, win_rate, Judge, Verdict};
use crate::eval::load_for_eval;
use crate::eval::prompts::{prompts_that_fit, read_prompt_records};
use crate::eval::win_rate::{answer_prompts, compare, judge_answers, write_generations};
use crate::generate::SamplingConfig;
use crate::model::dtype::parse_dtype;
use crate::model::loader::select_device;
use crate::util::keyed::Keyed;
use anyhow::{bail, Result};
use std::path::Path;
use std::time::Instant;

/// Every stage judged against the base and its predecessor.
pub struct Judged {
    pub curves: Vec<Curve>,
    pub rows: Vec<StageRow>,
    pub judges: Vec<JudgeInfo>,
    pub base_samples: Vec<Sample>,
    pub sampling: SamplingConfig,
    pub prompts: usize,
}

/// The judges' verdicts: `[judge][model][prompt]`, model 0 being the base, then the stages.
type Verdicts = Vec<Vec<Vec<Verdict>>>;

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
    let (prompts, _) = prompts_that_fit(
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
    let mut answers = vec![answer_prompts(&baseline, &messages, &sampling, batch)?];
    drop(baseline);
    let ans = Answering {
        prompts,
        messages,
        sampling,
        batch,
        dtype,
        device,
    };
    for st in stages {
        answers.push(ans.answers_of(
            &st.model,
            st.base_adapter.as_deref(),
            st.adapter.as_deref(),
        )?);
    }
    eprintln!(
        "generated {} answers per model in {:.1}s",
        ans.prompts.len(),
        t.elapsed().as_secs_f64()
    );
    let verdicts: Verdicts = judges
        .iter()
        .map(|(_, judge)| {
            answers
                .iter()
                .map(|a| judge_answers(judge, &ans.prompts, a, batch))
                .collect()
        })
        .collect::<Result<_>>()?;
    let rows = stage_rows(e, &ans, &judges, &answers, &verdicts, stages, out)?;
    let curves = match judges.iter().position(|(k, _)| k == "rules") {
        Some(ji) => judge_checkpoints(&e.curves, &ans, &judges[ji].1, &verdicts[ji], stages)?,
        None => vec![],
    };
    let judges = judges
        .iter()
        .zip(&verdicts)
        .map(|((key, judge), v)| JudgeInfo {
            key: key.clone(),
            describe: judge.describe(),
            objectives: judge.objectives(),
            base_mean_objectives: mean_objectives(&v[0], judge.objectives().len()),
            base_mean_total: mean_total(&v[0]),
        })
        .collect();
    Ok(Judged {
        curves,
        rows,
        judges,
        base_samples: ans.samples(&answers[0], e.samples),
        prompts: ans.prompts.len(),
        sampling: ans.sampling,
    })
}

/// Every stage judged by every judge against the base and the stage it started from.
fn stage_rows(
    e: &PipelineEvalConfig,
    ans: &Answering,
    judges: &[(String, Judge)],
    answers: &[Vec<String>],
    verdicts: &Verdicts,
    stages: &[TrainedStage],
    out: &Path,
) -> Result<Vec<StageRow>> {
    let index = |name: &str| stages.iter().position(|s| s.name == name).map(|i| i + 1);
    let mut rows = vec![];
    for (si, st) in stages.iter().enumerate() {
        let me = si + 1;
        let prev = st.previous.as_deref().and_then(index);
        let mut judged = Keyed::default();
        for (ji, ((key, judge), v)) in judges.iter().zip(verdicts).enumerate() {
            let (report, gens) = compare(
                judge,
                &ans.prompts,
                (&answers[me], &v[me]),
                (&answers[0], &v[0]),
                &ans.sampling,
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
                mean_objectives: mean_objectives(&v[me], judge.objectives().len()),
                mean_total: mean_total(&v[me]),
            };
            judged.push(key.clone(), row);
        }
        let rates: Vec<String> = judged
            .0
            .iter()
            .map(|(key, j)| format!("{key} {:.1}%", 100.0 * j.vs_base.win_rate))
            .collect();
        eprintln!(
            "{}: win rate against the base: {}",
            st.name,
            rates.join(", ")
        );
        rows.push(StageRow {
            stage: st.name.clone(),
            output_dir: st.output_dir.display().to_string(),
            previous: st.previous.clone().unwrap_or_else(|| "base".into()),
            train_seconds: st.train_seconds,
            skipped: st.skipped,
            judged,
            samples: ans.samples(&answers[me], e.samples),
        });
    }
    Ok(rows)
}

/// Wall-time curves: every checkpoint of the stages `names` answers the same
/// prompts and the ground truth (`judge`, whose verdicts on every model are `verdicts`)
/// judges it.
fn judge_checkpoints(
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
