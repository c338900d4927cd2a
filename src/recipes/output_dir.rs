//! Claiming a recipe's output directory: checked against what its config reads, locked, and
//! judged against the run or report it may already hold, before anything is written.

use super::RunFlags;
use crate::outputs::RunDir;
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::PathBuf;

/// Settings a resumed run may change with `--allow-config-change`: the schedule and the
/// cadence of logs, evaluations and checkpoints, and where and how fast it runs. Everything
/// else (data, model, LoRA, batch, seed, dropout, precision) would make the record describe a
/// run that did not happen.
const CHANGEABLE_ON_RESUME: [&str; 19] = [
    "train.lr",
    "train.scheduler",
    "train.warmup_ratio",
    "train.warmup_steps",
    "train.min_lr_ratio",
    "train.max_steps",
    "train.epochs",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.early_stopping_patience",
    "train.early_stopping_min_delta",
    "train.eval_batch_size",
    "train.threads",
    "train.device",
    "train.cache_dir",
    "train.logits_chunk",
    "train.recompute_layers",
];

/// Claims the output directory (`outputs::RunDir`: checked against every path the config
/// reads, locked, and judged against the run it may already hold) and queues the resolved
/// config for it; nothing is written until the caller commits, once the run is validated and
/// starts. A training run (`training` given) that resumes a checkpoint must resume the same
/// config: changed keys are refused with their old and new values, unless every one is in
/// `CHANGEABLE_ON_RESUME` and `--allow-config-change` was given, which records the change in
/// `config.changes.jsonl`. Without `training` the directory holds a report, rewritten each run.
pub fn prepare_output<R: Serialize + Default>(
    output_dir: &str,
    resolved: &R,
    training: Option<RunFlags>,
) -> Result<RunDir> {
    prepare(output_dir, resolved, training, false)
}

/// `prepare_output` for a report (pipeline summary, Pareto report): a directory holding the
/// report of another config is replaced only with `force` (the same config rewrites its own
/// report, reusing its caches).
pub fn prepare_report<R: Serialize + Default>(
    output_dir: &str,
    resolved: &R,
    force: bool,
) -> Result<RunDir> {
    prepare(output_dir, resolved, None, force)
}

fn prepare<R: Serialize + Default>(
    output_dir: &str,
    resolved: &R,
    training: Option<RunFlags>,
    report_force: bool,
) -> Result<RunDir> {
    let path = PathBuf::from(output_dir);
    let text = crate::util::config::to_toml(resolved)?;
    let inputs = crate::outputs::Inputs::from_config(&text)?;
    crate::outputs::check_cache_dirs(&text, &inputs)?;
    let mode = crate::outputs::RunMode {
        resume: training.is_some_and(|f| f.resume),
        force: training.is_some_and(|f| f.force),
        report: training.is_none(),
    };
    let flag = if training.is_some() {
        "train.output_dir"
    } else {
        "output_dir"
    };
    let mut dir = RunDir::claim(&path, flag, &inputs, mode)?;
    let config_path = path.join(crate::outputs::RUN_RECORD);
    if training.is_none() && !report_force {
        if let Ok(old) = std::fs::read_to_string(&config_path) {
            let changes = crate::util::config::changed_keys(&old, &text, None)?;
            if !changes.is_empty() {
                bail!(
                    "{}: holds the report of another config ({}); pass --force to replace it, or choose another output_dir",
                    path.display(),
                    crate::util::config::describe_changes(&changes)
                );
            }
        }
    }
    let resuming = dir.state == crate::outputs::RunState::Resume;
    if resuming {
        crate::outputs::check_inputs_unchanged(&path, &text)?;
    } else if training.is_some() {
        dir.record_inputs(text.clone());
    }
    if let (true, Ok(old)) = (resuming, std::fs::read_to_string(&config_path)) {
        // A run recorded before an upgrade lacks the keys added since; at their defaults
        // they are what the run used.
        let defaults = crate::util::config::to_toml(&R::default())?;
        let changes = crate::util::config::changed_keys(&old, &text, Some(&defaults))?;
        if !changes.is_empty() {
            let list = changes
                .iter()
                .map(|(k, a, b)| format!("{k}: {a} -> {b}"))
                .collect::<Vec<_>>()
                .join(", ");
            let allowed = training.is_some_and(|f| f.allow_config_change);
            let unsafe_keys: Vec<&str> = changes
                .iter()
                .map(|(k, _, _)| k.as_str())
                .filter(|k| !CHANGEABLE_ON_RESUME.contains(k))
                .collect();
            if !unsafe_keys.is_empty() {
                bail!(
                    "{}: --resume with a changed config ({list}); {} cannot change within a run: restore them, or start a new train.output_dir",
                    config_path.display(),
                    unsafe_keys.join(", ")
                );
            }
            if !allowed {
                bail!(
                    "{}: --resume with a changed config ({list}); pass --allow-config-change to continue with the new values (the change is recorded)",
                    config_path.display()
                );
            }
            let entry: serde_json::Map<String, serde_json::Value> = changes
                .iter()
                .map(|(k, a, b)| (k.clone(), serde_json::json!({"old": a, "new": b})))
                .collect();
            let since = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            dir.queue_line(
                "config.changes.jsonl",
                serde_json::json!({"unix_time": since, "changes": entry}),
            );
            eprintln!("resuming with changed settings: {list} (recorded in config.changes.jsonl)");
        }
    }
    dir.queue(crate::outputs::RUN_RECORD, text.into_bytes());
    Ok(dir)
}
