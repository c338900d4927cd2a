//! `mo-align eval`: stage-agnostic evaluation over one model load. Modes combine freely:
//! perplexity of a text, held-out chat NLL, preference accuracy against the reference, reward
//! scores, and win rate against a baseline judged by a reward model. The evaluations
//! themselves live in `crate::eval`; this recipe loads, dispatches and reports.

mod options;
pub mod report;

pub use options::EvalOptions;

use crate::eval::preferences::{preference_eval, score_file, sft_nll};
use crate::eval::prompts::{prompts_that_fit, read_prompt_records};
use crate::eval::win_rate::{win_rate_eval, write_generations};
use crate::eval::{load_for_eval, load_policy_at, perplexity};
use crate::model::ctx::ForwardCtx;
use crate::model::dtype::parse_dtype;
use crate::model::loader::{select_device, Loaded};
use crate::objectives::weighting::Weighting;
use crate::reward::RewardHead;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use options::parse_model_spec;
use report::{chart_path, EvalReport};
use std::path::Path;

/// One line of the printed table: the mode and its result.
type Row = (String, String);

pub fn run(args: EvalOptions) -> Result<()> {
    args.validate()?;
    args.check_outputs()?;
    let device = select_device(&args.model.device)?;
    let dtype = parse_dtype(&args.model.dtype)?;
    let loaded = if args.scores_only() {
        None
    } else {
        Some(load_for_eval(
            args.model.spec(),
            args.base_adapter.as_deref(),
            args.model.adapter.as_deref(),
            dtype,
            &device,
        )?)
    };
    let mut report = EvalReport {
        model: args.model.spec().into(),
        base_adapter: args.base_adapter.clone(),
        adapter: args.model.adapter.clone(),
        ..EvalReport::default()
    };
    let mut table: Vec<Row> = vec![];
    let main = || loaded.as_ref().context("no model loaded");
    if let Some(path) = &args.perplexity {
        table.push(perplexity_of(main()?, path, args.context, &mut report)?);
    }
    if let Some(path) = &args.sft_data {
        let r = sft_nll(main()?, path, args.max_length)?;
        table.push((
            "chat NLL".into(),
            format!(
                "{:.6} per assistant token over {} examples",
                r.nll_per_token, r.examples
            ),
        ));
        report.sft_data = Some(r);
    }
    if let Some(path) = &args.preferences {
        let r = preference_eval(
            main()?,
            path,
            args.beta,
            args.max_length,
            args.reward_model.as_deref(),
        )?;
        table.push((
            "preferences".into(),
            format!(
                "accuracy {:.3}, margin {:.4} over {} pairs",
                r.accuracy, r.margin, r.pairs
            ),
        ));
        report.preferences = Some(r);
    }
    if let Some(path) = &args.score {
        report.scored = Some(score(&args, loaded.as_ref(), path, dtype, &device)?);
    }
    if args.win_rate {
        table.push(win_rate(&args, main()?, dtype, &device, &mut report)?);
    }
    if let Some(p) = &args.report {
        crate::util::io::write_json_atomic(p, &report)?;
        // The per-objective bar chart (model vs baseline) goes next to the report.
        let chart = chart_path(p);
        report.write_chart(p, chart.parent().unwrap_or(p), false)?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        for (k, v) in table {
            println!("{k:<12} {v}");
        }
    }
    Ok(())
}

/// Mean NLL per predicted token of a plain text, in windows of `context` tokens.
fn perplexity_of(
    loaded: &Loaded,
    path: &Path,
    context: Option<usize>,
    report: &mut EvalReport,
) -> Result<Row> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let ids = loaded.tokenizer.encode(&text)?;
    if ids.len() < 2 {
        bail!(
            "{}: needs at least 2 tokens, has {}",
            path.display(),
            ids.len()
        );
    }
    let context = context.unwrap_or(loaded.model.config.max_position_embeddings);
    let nll = perplexity(&loaded.model, &ids, context, ForwardCtx::EVAL)?;
    let mean = nll.mean();
    report.nll_per_token = Some(mean);
    report.tokens = Some(nll.tokens);
    report.perplexity = Some(mean.exp());
    Ok((
        "perplexity".into(),
        format!(
            "nll/token {mean:.6}, perplexity {:.4} ({} tokens)",
            mean.exp(),
            nll.tokens
        ),
    ))
}

/// Scores the records of `path` with `--reward-model`, on the loaded model when there is one
/// (it must be the reward model's backbone), else on the reward model's own backbone.
fn score(
    args: &EvalOptions,
    loaded: Option<&Loaded>,
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<usize> {
    let rm = args
        .reward_model
        .as_deref()
        .context("--score needs --reward-model DIR")?;
    let head = RewardHead::load(rm, device)?;
    let own;
    let backbone = match loaded {
        Some(l) => {
            head.check_backbone(rm, &l.model, "--model (with --base-adapter merged)")?;
            (l, ForwardCtx::REFERENCE)
        }
        None => {
            own = head.load_backbone(rm, dtype, device)?;
            (&own, ForwardCtx::EVAL)
        }
    };
    score_file(&head, backbone, path, args.output.as_deref())
}

/// The win rate of the loaded model (answering at `--weights` when conditioned) against
/// `--baseline`, judged by `--judge`.
fn win_rate(
    args: &EvalOptions,
    loaded: &Loaded,
    dtype: DType,
    device: &Device,
    report: &mut EvalReport,
) -> Result<Row> {
    let prompts_file = args
        .prompts
        .as_deref()
        .context("--win-rate needs --prompts FILE")?
        .display()
        .to_string();
    let (bpath, badapter) = parse_model_spec(
        args.baseline
            .as_deref()
            .context("--win-rate needs --baseline PATH[+ADAPTER]")?,
    );
    let judge = crate::eval::judge::Judge::load(
        args.judge.as_deref().context("--win-rate needs --judge")?,
        &args.judge_weights,
        dtype,
        device,
    )?;
    let baseline = load_for_eval(&bpath, badapter.as_deref(), None, dtype, device)?;
    // One setting for both models: the flags over the evaluated model's defaults.
    let sampling = args.sampling.resolve(loaded.generation_config().as_ref());
    sampling.validate()?;
    let (prompts, too_long) = prompts_that_fit(
        read_prompt_records(&prompts_file, args.max_prompts)?,
        &[args.model.spec(), &bpath],
        sampling.max_new_tokens,
    )?;
    report.prompts_skipped_too_long = Some(too_long);
    // A weight-conditioned policy answers at --weights.
    let conditioned = match &args.weights {
        Some(w) => {
            let p = load_policy_at(
                args.model.spec(),
                args.base_adapter.as_deref(),
                args.model.adapter.as_deref(),
                Some(&Weighting::from_flag(w)?),
                dtype,
                device,
            )?;
            if let Some((_, line)) = &p.conditioning {
                report.conditioning = Some(line.clone());
            }
            Some(p)
        }
        None => None,
    };
    let (model, prompt_line) = match &conditioned {
        Some(p) => (&p.loaded, p.prompt_conditioning()),
        None => (loaded, None),
    };
    let (wr, gens) = win_rate_eval(
        model,
        prompt_line,
        &baseline,
        &judge,
        &prompts,
        &sampling,
        args.gen_batch_size,
        args.tie_margin,
    )?;
    if let Some(p) = &args.generations_out {
        write_generations(p, &gens)?;
    }
    let o = &wr.overall;
    let row = (
        "win rate".into(),
        format!(
            "{:.1}% [{:.1}, {:.1}] ({}W/{}T/{}L of {}), mean reward diff {:+.4}",
            100.0 * o.win_rate,
            100.0 * o.ci95.0,
            100.0 * o.ci95.1,
            o.wins,
            o.ties,
            o.losses,
            o.n,
            o.mean_reward_diff
        ),
    );
    report.win_rate = Some(wr);
    Ok(row)
}
