//! Checkpoints: `<output_dir>/checkpoints/checkpoint-<step>/` with the trained artifact (PEFT
//! files, or a reward head), the AdamW moments, and the trainer state. A directory is written under a temporary name
//! and renamed when complete, so the newest `checkpoint-*` is always whole.

use super::optim::AdamW;
use super::trainable::Trainable;
use super::window::Window;
use crate::util::io::safetensors_bytes;
use crate::util::io::{write_json_atomic, AtomicDir};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything besides tensors that an exact resume needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Where the data cursor is: epoch and batch within the epoch's plan.
    pub epoch: u64,
    pub batch_in_epoch: usize,
    /// f16 dynamic loss scaling.
    pub loss_scale: f64,
    pub clean_steps: u64,
    /// Consecutive and total steps skipped for a non-finite loss or gradient.
    pub bad_streak: u32,
    pub skipped_steps: u64,
    pub best_eval_loss: Option<f64>,
    pub evals_without_improvement: u32,
    pub tokens_seen: u64,
    pub early_stopped: bool,
    /// The log window in progress and the first logged loss, so a resumed run's log lines and
    /// its final "loss X -> Y" cover the same steps as an uninterrupted run's.
    #[serde(default)]
    pub window: Window,
    #[serde(default)]
    pub first_loss: Option<f64>,
    /// Seconds spent in training steps so far (evaluation and checkpointing excluded), carried
    /// over a resume: the x axis of wall-time curves.
    #[serde(default)]
    pub elapsed_s: f64,
    /// Wall seconds the run has spent training so far (steps, evaluation and checkpointing),
    /// carried over a resume: a resumed run reports the time it took over all its segments.
    #[serde(default)]
    pub wall_s: f64,
    /// The batch being reused when an objective takes several steps per batch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group: Vec<Vec<usize>>,
    /// The objective's own resume state (`Objective::state`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective: Option<serde_json::Value>,
}

pub fn checkpoints_dir(output_dir: &Path) -> PathBuf {
    output_dir.join("checkpoints")
}

/// Whether an entry of the checkpoints directory is one `save` writes: a checkpoint
/// (`checkpoint-<step>`) or one half-written or set aside (`.checkpoint-*`).
pub fn saved_by_run(name: &str) -> bool {
    name.starts_with("checkpoint-") || name.starts_with(".checkpoint-")
}

pub fn save(
    output_dir: &Path,
    trainable: &dyn Trainable,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    for (name, var) in opt.vars() {
        if ensure_finite(var.as_tensor()).is_err() {
            bail!(
                "refusing to checkpoint step {}: parameter `{name}` is not finite",
                state.step
            );
        }
    }
    let dest = checkpoints_dir(output_dir).join(format!("checkpoint-{:07}", state.step));
    let dir = AtomicDir::new(&dest)?;
    trainable.save(dir.path())?;
    let opt_bytes = safetensors_bytes(&opt.state_tensors()?, None)?;
    crate::util::io::write_atomic(&dir.path().join("optimizer.safetensors"), &opt_bytes)?;
    write_json_atomic(&dir.path().join("trainer_state.json"), state)?;
    dir.commit()?;
    Ok(dest)
}

/// A checkpoint's trainer state alone (step, training seconds), without loading its tensors.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a trainer state", path.display()))
}

/// The complete checkpoints (those with a trainer state), oldest first.
pub fn complete(output_dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = checkpoints_dir(output_dir);
    if !dir.is_dir() {
        return Ok(vec![]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"))
                && p.join("trainer_state.json").is_file()
        })
        .collect();
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint, if any.
pub fn latest(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(complete(output_dir)?.pop())
}

/// Cleans up after a run killed while saving: temporary checkpoint directories
/// (`.checkpoint-*.tmp-PID`, written by `save`) are removed; a checkpoint set aside for
/// replacement (`.checkpoint-*.old-PID`) is moved back if its replacement never arrived, else
/// removed. Nothing else in the directory is touched.
pub fn clear_partial(output_dir: &Path) -> Result<()> {
    let dir = checkpoints_dir(output_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".checkpoint-") else {
            continue;
        };
        let path = e.path();
        if let Some((step, _pid)) = rest.split_once(".old-") {
            let original = dir.join(format!("checkpoint-{step}"));
            if !original.exists() {
                std::fs::rename(&path, &original)
                    .with_context(|| format!("{}: cannot restore", path.display()))?;
                continue;
            }
        } else if !rest.contains(".tmp-") {
            continue;
        }
        eprintln!("removing {} (left by an interrupted save)", path.display());
        std::fs::remove_dir_all(&path)
            .with_context(|| format!("{}: cannot remove", path.display()))?;
    }
    Ok(())
}

/// Restores the artifact, optimizer moments and trainer state from `dir`.
pub fn load(
    dir: &Path,
    trainable: &dyn Trainable,
    opt: &mut AdamW,
    device: &Device,
) -> Result<TrainerState> {
    let state = read_state(dir)?;
    trainable.load(dir)?;
    let opt_path = dir.join("optimizer.safetensors");
    let opt_tensors = candle_core::safetensors::load(&opt_path, device)
        .with_context(|| format!("{}: cannot read optimizer state", opt_path.display()))?;
    opt.load_state(&opt_tensors, state.step)
        .with_context(|| opt_path.display().to_string())?;
    // A checkpoint is written only when every parameter is finite, so a non-finite value here
    // is damage, not training: refuse it rather than skip every following step.
    for (name, t) in opt.state_tensors()? {
        ensure_finite(&t).with_context(|| format!("{}: `{name}`", opt_path.display()))?;
    }
    for (name, var) in opt.vars() {
        ensure_finite(var.as_tensor()).with_context(|| format!("{}: `{name}`", dir.display()))?;
    }
    Ok(state)
}

/// Errors when `t` holds a NaN or an infinity (a sum of absolute values in f64 is NaN or inf
/// exactly then; a max would skip NaNs).
fn ensure_finite(t: &candle_core::Tensor) -> Result<()> {
    let total = t
        .to_dtype(DType::F64)?
        .abs()?
        .sum_all()?
        .to_scalar::<f64>()?;
    anyhow::ensure!(total.is_finite(), "holds a non-finite value");
    Ok(())
}

/// Deletes all but the newest `keep` checkpoints.
pub fn prune(output_dir: &Path, keep: usize) -> Result<()> {
    let dir = checkpoints_dir(output_dir);
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"))
        })
        .collect();
    found.sort();
    let excess = found.len().saturating_sub(keep.max(1));
    for p in found.into_iter().take(excess) {
        std::fs::remove_dir_all(&p)
            .with_context(|| format!("{}: cannot remove old checkpoint", p.display()))?;
    }
    Ok(())
}
