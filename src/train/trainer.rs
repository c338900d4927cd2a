//! The training loop. `train_step` is the whole optimizer step on one screen; `train` around it
//! walks the data (`Cursor`), and after each step hands the step's outcome to the loss scaler,
//! the run log, evaluation with early stopping, and the checkpoint cadence (`Plan`). Resume and
//! signals are at its two ends.

use super::checkpoint::{self, TrainerState};
use super::early_stopping::EarlyStopping;
use super::loss_scale::LossScaler;
use super::optim::{AdamW, AdamWParams};
use super::progress::Progress;
use super::run_log::RunLog;
use super::schedule::LrSchedule;
use super::stats::StepStats;
use super::trainable::Trainable;
use super::{Objective, TrainConfig};
use crate::data::batching::epoch_batches;
use crate::kernels::dropout::DropoutRng;
use crate::model::ctx::ForwardCtx;
use crate::model::ctx::GradSink;
use crate::util::profile::{self, Phase};
use crate::util::rng::mix_seed;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Everything one training run needs.
pub struct TrainRun<'a, O: Objective> {
    pub objective: &'a O,
    /// What is updated and saved (LoRA adapters, a reward head).
    pub trainable: &'a dyn Trainable,
    pub train: &'a [O::Example],
    pub val: &'a [O::Example],
    pub cfg: &'a TrainConfig,
    pub device: &'a candle_core::Device,
    pub output_dir: &'a Path,
    pub group_by_length: bool,
    pub resume: bool,
    pub quiet: bool,
    /// Shown before the progress bar, e.g. "sft".
    pub label: &'a str,
}

#[derive(Debug, Clone, Default)]
pub struct TrainOutcome {
    pub steps: u64,
    /// Mean training loss of the last logging window.
    pub last_loss: Option<f64>,
    pub first_loss: Option<f64>,
    /// The last evaluation's metrics (`eval_loss`, ...).
    pub eval: BTreeMap<String, f64>,
    pub early_stopped: bool,
    pub skipped_steps: u64,
    /// Wall seconds over the whole run (a resumed run's earlier segments included, up to the
    /// checkpoint it resumed from).
    pub wall_s: f64,
    /// Seconds in training steps over the whole run (resumed runs included; evaluation and
    /// checkpointing excluded).
    pub train_s: f64,
}

/// What one optimizer step reads: the objective, its examples, and the `[train]` settings.
pub struct StepInputs<'a, O: Objective> {
    pub objective: &'a O,
    pub examples: &'a [O::Example],
    pub cfg: &'a TrainConfig,
}

/// One optimizer step over `group` (grad_accum micro-batches of example indices): forward,
/// backward, gradient accumulation, global-norm clipping and AdamW. The benchmarks time this
/// same function.
pub fn train_step<O: Objective>(
    run: &StepInputs<O>,
    opt: &mut AdamW,
    state: &TrainerState,
    group: &[Vec<usize>],
    lr: f64,
) -> Result<StepStats> {
    let weight: f64 = group
        .iter()
        .flatten()
        .map(|&i| run.objective.weight(&run.examples[i]))
        .sum();
    let device = opt
        .vars()
        .first()
        .map_or(candle_core::Device::Cpu, |(_, v)| v.device().clone());
    let mut grads: Vec<Option<Tensor>> = vec![None; opt.vars().len()];
    let (mut loss_sum, mut tokens, mut metrics) = (0.0, 0, BTreeMap::<String, f64>::new());
    let mut phase_s = [0.0; 3];
    // One sink for the whole step: the fused decoder accumulates every micro-batch's adapter
    // gradients into its one flat buffer.
    let sink = GradSink::new();
    for (k, idxs) in group.iter().enumerate() {
        let t0 = Instant::now();
        let batch: Vec<&O::Example> = idxs.iter().map(|&i| &run.examples[i]).collect();
        let dropout = DropoutRng::new(mix_seed(run.cfg.seed, state.step, k as u64));
        let ctx = ForwardCtx::train(&dropout).with_sink(&sink);
        let ctx = if run.cfg.recompute_layers {
            ctx.with_recompute(&sink)
        } else {
            ctx
        };
        let forward = profile::phase(Phase::Forward);
        let scope = profile::scope("step.forward", &device);
        let out = run.objective.loss(&batch, ctx)?;
        // Reading the loss waits for the forward, so the phases time what they say.
        loss_sum += out.loss_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        drop((scope, forward));
        let t1 = Instant::now();
        let backward = profile::phase(Phase::Backward);
        let scope = profile::scope("step.backward", &device);
        // Dividing by the whole step's weight makes k micro-batches sum to one big batch.
        let scaled = (&out.loss_sum * (state.loss_scale / weight.max(f64::MIN_POSITIVE)))?;
        let step_grads = scaled.backward()?;
        for (slot, (_, var)) in grads.iter_mut().zip(opt.vars()) {
            if let Some(g) = step_grads.get(var.as_tensor()).cloned() {
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        drop(step_grads);
        drop((scope, backward));
        tokens += batch.iter().map(|e| run.objective.tokens(e)).sum::<usize>();
        for (name, v) in out.metrics {
            *metrics.entry(name).or_default() += v;
        }
        phase_s[0] += (t1 - t0).as_secs_f64();
        phase_s[1] += t1.elapsed().as_secs_f64();
    }
    let t2 = Instant::now();
    let norm_phase = (
        profile::phase(Phase::GradNorm),
        profile::scope("grad_norm", &device),
    );
    // The fused decoder's gradients are views of the sink's flat buffer; the unfused blocks'
    // (and a reward head's) come from the gradient store or the sink's deposits.
    let flat = sink.flat_buffer();
    let only_flat = flat.is_some() && grads.iter().all(Option::is_none);
    let grads: Vec<Tensor> = grads
        .into_iter()
        .zip(opt.vars())
        .map(|(g, (_, var))| {
            let parts = [g, sink.take(var.as_tensor().id())];
            match parts {
                [Some(a), Some(b)] => Ok((a + b)?),
                [Some(a), None] | [None, Some(a)] => Ok(a),
                [None, None] => Ok(var.zeros_like()?),
            }
        })
        .collect::<Result<_>>()?;
    // One device-to-host read for the norm (it also waits for the last backward): over the
    // flat buffer when it holds every gradient, else per-tensor sums stacked on the device.
    let sq = match flat {
        Some(f) if only_flat && covers(&f, opt) => squared_norm(&f.buffer)?,
        _ => {
            let sums = grads
                .iter()
                .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::stack(&sums, 0)?
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?
        }
    };
    drop(norm_phase);
    let t3 = Instant::now();
    phase_s[1] += (t3 - t2).as_secs_f64();
    let _optimizer = (
        profile::phase(Phase::Optimizer),
        profile::scope("optimizer", &device),
    );
    let grad_norm = sq.sqrt() / state.loss_scale;
    let loss = loss_sum / weight;
    let applied = loss.is_finite() && grad_norm.is_finite();
    if applied {
        let max = run.cfg.max_grad_norm;
        let clip = if max > 0.0 && grad_norm > max {
            max / (grad_norm + 1e-6)
        } else {
            1.0
        };
        opt.step(&grads, lr, clip / state.loss_scale)?;
        if let Some((_, var)) = opt.vars().first() {
            var.device().synchronize()?;
        }
    }
    phase_s[2] = t3.elapsed().as_secs_f64();
    let metrics = metrics.into_iter().map(|(k, v)| (k, v / weight)).collect();
    Ok(StepStats {
        loss,
        grad_norm,
        weight,
        tokens,
        metrics,
        applied,
        phase_s,
    })
}

/// Whether the flat buffer holds a gradient slot for every trained tensor.
fn covers(flat: &crate::model::ctx::FlatGrads, opt: &AdamW) -> bool {
    opt.vars()
        .iter()
        .all(|(_, v)| flat.slots.contains_key(&v.as_tensor().id()))
        && flat.slots.len() == opt.vars().len()
}

/// Sum of squares of a flat buffer, as f64 on the host.
fn squared_norm(buffer: &Tensor) -> candle_core::Result<f64> {
    buffer
        .sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()
}

/// Mean loss and metrics over `examples` without gradients (adapters on, no dropout).
pub fn evaluate<O: Objective>(
    objective: &O,
    examples: &[O::Example],
    batch_size: usize,
) -> Result<BTreeMap<String, f64>> {
    let lengths: Vec<usize> = examples.iter().map(|e| objective.tokens(e)).collect();
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let (mut loss, mut weight, mut sums) = (0.0, 0.0, BTreeMap::<String, f64>::new());
    for idxs in order.chunks(batch_size.max(1)) {
        let batch: Vec<&O::Example> = idxs.iter().map(|&i| &examples[i]).collect();
        let out = objective.loss(&batch, ForwardCtx::EVAL)?;
        loss += out.loss_sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        weight += batch.iter().map(|e| objective.weight(e)).sum::<f64>();
        for (k, v) in out.metrics {
            *sums.entry(k).or_default() += v;
        }
    }
    let mut out = BTreeMap::from([("eval_loss".to_string(), loss / weight)]);
    for (k, v) in sums {
        out.insert(format!("eval_{k}"), v / weight);
    }
    Ok(out)
}

/// The run's length and cadences, fixed before the first step.
struct Plan<'a> {
    cfg: &'a TrainConfig,
    /// Optimizer steps each batch serves (`Objective::steps_per_batch`).
    reuse: u64,
    steps_per_epoch: u64,
    total_steps: u64,
    schedule: LrSchedule,
}

impl<'a> Plan<'a> {
    fn new<O: Objective>(run: &TrainRun<'a, O>) -> Self {
        let cfg = run.cfg;
        let batches_per_epoch = run.train.len().div_ceil(cfg.batch_size) as u64;
        let reuse = run.objective.steps_per_batch().max(1);
        let steps_per_epoch = batches_per_epoch.div_ceil(cfg.grad_accum as u64) * reuse;
        let total_steps = cfg.max_steps.unwrap_or(steps_per_epoch * cfg.epochs);
        let schedule = LrSchedule::new(
            cfg.lr,
            cfg.scheduler,
            total_steps,
            cfg.warmup_ratio,
            cfg.warmup_steps,
            cfg.min_lr_ratio,
        );
        Plan {
            cfg,
            reuse,
            steps_per_epoch,
            total_steps,
            schedule,
        }
    }

    fn epoch(&self, step: u64) -> f64 {
        step as f64 / self.steps_per_epoch as f64
    }

    fn log_due(&self, step: u64) -> bool {
        step.is_multiple_of(self.cfg.log_every) || step == self.total_steps
    }

    fn eval_due(&self, step: u64) -> bool {
        self.cfg.eval_every.is_some_and(|n| step.is_multiple_of(n)) || step == self.total_steps
    }

    fn save_due(&self, state: &TrainerState) -> bool {
        let step = state.step;
        self.cfg.save_every.is_some_and(|n| step.is_multiple_of(n))
            || step == self.total_steps
            || state.early_stopped
    }
}

/// Walks the epoch plans: `take` hands out up to n batches, never crossing an epoch boundary.
struct Cursor {
    epoch: u64,
    batch: usize,
    plan: Vec<Vec<usize>>,
}

impl Cursor {
    fn new<O: Objective>(run: &TrainRun<O>, epoch: u64, batch: usize) -> Self {
        let plan = Self::plan(run, epoch);
        Self { epoch, batch, plan }
    }

    fn plan<O: Objective>(run: &TrainRun<O>, epoch: u64) -> Vec<Vec<usize>> {
        let lengths: Vec<usize> = run.train.iter().map(|e| run.objective.tokens(e)).collect();
        epoch_batches(
            &lengths,
            run.cfg.batch_size,
            run.group_by_length,
            run.cfg.seed,
            epoch,
        )
    }

    fn take<O: Objective>(&mut self, run: &TrainRun<O>, n: usize) -> Vec<Vec<usize>> {
        if self.batch >= self.plan.len() {
            self.epoch += 1;
            self.batch = 0;
            self.plan = Self::plan(run, self.epoch);
        }
        let end = (self.batch + n).min(self.plan.len());
        let out = self.plan[self.batch..end].to_vec();
        self.batch = end;
        out
    }
}

static STOP: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// SIGINT/SIGTERM ask the loop to checkpoint and exit; a second SIGINT exits at once.
fn stop_flag() -> Arc<AtomicBool> {
    STOP.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone());
            let _ = signal_hook::flag::register(sig, flag.clone());
        }
        flag
    })
    .clone()
}

/// Marker error for an interrupted run (the CLI maps it to exit code 130).
#[derive(Debug, thiserror::Error)]
#[error("interrupted: checkpoint saved at step {0}; continue with --resume")]
pub struct Interrupted(pub u64);

/// The AdamW optimizer over what the run trains.
fn optimizer<O: Objective>(run: &TrainRun<O>) -> Result<AdamW> {
    let vars = run.trainable.vars();
    anyhow::ensure!(
        !vars.is_empty(),
        "nothing to train: no trainable parameters"
    );
    let cfg = run.cfg;
    let params = AdamWParams {
        beta1: cfg.adam_beta1,
        beta2: cfg.adam_beta2,
        eps: cfg.adam_eps,
        weight_decay: cfg.weight_decay,
    };
    AdamW::new(vars, params)
}

/// A fresh state starting at `loss_scale`, or with `--resume` the newest usable checkpoint's
/// (the step it resumes at comes with it). Without `--resume`, an earlier run's checkpoint in
/// the output directory is an error rather than something to overwrite.
fn start_or_resume<O: Objective>(
    run: &TrainRun<O>,
    opt: &mut AdamW,
    progress: &Progress,
    loss_scale: f64,
) -> Result<(TrainerState, Option<u64>)> {
    checkpoint::clear_partial(run.output_dir)?;
    match checkpoint::latest(run.output_dir)? {
        Some(_) if run.resume => {
            let state = resume_from_newest_usable(run, opt, progress)?;
            run.objective.restore(state.objective.as_ref())?;
            let step = state.step;
            Ok((state, Some(step)))
        }
        Some(dir) => bail!(
            "{}: an earlier run's checkpoint is here; pass --resume to continue it, or choose another train.output_dir",
            dir.display()
        ),
        None => Ok((
            TrainerState {
                loss_scale,
                ..TrainerState::default()
            },
            None,
        )),
    }
}

/// Loads the newest checkpoint that loads cleanly, newest first: a truncated or non-finite
/// checkpoint (a kill mid-write on a filesystem without atomic rename, a disk error) is named
/// in a warning and the previous one is used.
fn resume_from_newest_usable<O: Objective>(
    run: &TrainRun<O>,
    opt: &mut AdamW,
    progress: &Progress,
) -> Result<TrainerState> {
    let mut problems = vec![];
    for dir in checkpoint::complete(run.output_dir)?.iter().rev() {
        match checkpoint::load(dir, run.trainable, opt, run.device) {
            Ok(state) => {
                progress.log(&format!(
                    "resumed from {} (step {})",
                    dir.display(),
                    state.step
                ));
                return Ok(state);
            }
            Err(e) => {
                progress.log(&format!(
                    "warning: checkpoint {} is unusable ({e:#}); trying the previous one",
                    dir.display()
                ));
                problems.push(format!("{}: {e:#}", dir.display()));
            }
        }
    }
    bail!(
        "no usable checkpoint to resume from: {}",
        problems.join("; ")
    )
}

/// The run's wall time over all its segments: this one's so far, plus what the checkpoint it
/// resumed from had spent.
struct WallClock {
    started: Instant,
    before: f64,
}

impl WallClock {
    fn total(&self) -> f64 {
        self.before + self.started.elapsed().as_secs_f64()
    }
}

/// Checkpoints the run as it stands, the objective's own resume state included.
fn save_checkpoint<O: Objective>(
    run: &TrainRun<O>,
    opt: &AdamW,
    state: &mut TrainerState,
    clock: &WallClock,
) -> Result<()> {
    state.objective = run.objective.state();
    state.wall_s = clock.total();
    checkpoint::save(run.output_dir, run.trainable, opt, state)?;
    Ok(())
}

/// Trains `run.trainable` to the end of the plan (or early stopping), checkpointing on the way,
/// and saves it. A signal checkpoints and returns `Interrupted`; `run.resume` continues from
/// the newest checkpoint exactly as if the run had not stopped.
pub fn train<O: Objective>(run: TrainRun<O>) -> Result<TrainOutcome> {
    let cfg = run.cfg;
    let started = Instant::now();
    anyhow::ensure!(
        !run.train.is_empty(),
        "no training examples left after filtering"
    );
    let scaler = LossScaler::new(cfg)?;
    let stopping = EarlyStopping::new(cfg);
    let plan = Plan::new(&run);
    let mut opt = optimizer(&run)?;
    let progress = Progress::new(plan.total_steps, 0, run.quiet, run.label);
    let (mut state, resumed_at) = start_or_resume(&run, &mut opt, &progress, scaler.initial())?;
    let clock = WallClock {
        started,
        before: state.wall_s,
    };
    let mut log = RunLog::open(progress, run.output_dir, resumed_at, scaler.dynamic())?;
    let mut cursor = Cursor::new(&run, state.epoch, state.batch_in_epoch);
    let stop = stop_flag();
    let inputs = StepInputs {
        objective: run.objective,
        examples: run.train,
        cfg,
    };
    let eval_bs = cfg.eval_batch_size.unwrap_or(cfg.batch_size * 2);
    let mut last_eval = BTreeMap::new();
    log.progress.set(state.step, String::new());

    while state.step < plan.total_steps && !state.early_stopped {
        if stop.load(Ordering::SeqCst) {
            save_checkpoint(&run, &opt, &mut state, &clock)?;
            log.progress.finish();
            return Err(Interrupted(state.step).into());
        }
        // A batch serves `reuse` consecutive steps; the cursor moves at the first of them.
        if state.step.is_multiple_of(plan.reuse) || state.group.is_empty() {
            state.group = cursor.take(&run, cfg.grad_accum);
        }
        let group = state.group.clone();
        run.objective.begin_step(state.step);
        let lr = plan.schedule.lr(state.step);
        let t0 = Instant::now();
        let stats = train_step(&inputs, &mut opt, &state, &group, lr)?;
        (state.epoch, state.batch_in_epoch) = (cursor.epoch, cursor.batch);
        state.step += 1;
        state.tokens_seen += stats.tokens as u64;
        scaler.record(&mut state, &stats, &log.progress)?;
        let step_s = t0.elapsed().as_secs_f64();
        state.elapsed_s += step_s;
        log.step(&mut state, &stats, lr, step_s);
        let epoch = plan.epoch(state.step);
        if plan.log_due(state.step) {
            log.window(&mut state, epoch)?;
        }
        if !run.val.is_empty() && plan.eval_due(state.step) {
            let eval = evaluate(run.objective, run.val, eval_bs)?;
            log.eval(&state, epoch, &eval)?;
            stopping.record(&mut state, eval["eval_loss"], &log.progress);
            last_eval = eval;
        }
        if plan.save_due(&state) {
            save_checkpoint(&run, &opt, &mut state, &clock)?;
            checkpoint::prune(run.output_dir, cfg.keep_checkpoints)?;
        }
    }
    log.progress.finish();
    if state.step > 0 && state.skipped_steps >= state.step {
        bail!(
            "all {} steps were skipped for a non-finite loss or gradient: nothing was learned and no adapter was written; check the data and train.lr, or use f32",
            state.step
        );
    }
    run.trainable.save(run.output_dir)?;
    Ok(TrainOutcome {
        steps: state.step,
        last_loss: log.last_loss,
        first_loss: state.first_loss,
        eval: last_eval,
        early_stopped: state.early_stopped,
        skipped_steps: state.skipped_steps,
        wall_s: clock.total(),
        train_s: state.elapsed_s,
    })
}
