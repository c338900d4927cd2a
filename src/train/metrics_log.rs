//! A run's metrics, written twice: `metrics.jsonl` (every line, TRL's names) and TensorBoard
//! event files beside it (`events.rs`), kept in step across a fresh start and `--resume`.

use super::events::EventWriter;
use crate::util::io::JsonlWriter;
use anyhow::{Context, Result};
use std::path::Path;

pub const METRICS_FILE: &str = "metrics.jsonl";

pub struct MetricsLog {
    jsonl: JsonlWriter,
    events: EventWriter,
}

impl MetricsLog {
    /// A fresh run (`resumed_at` None) replaces both files; a run resumed at a checkpoint's step
    /// keeps the lines and events up to it, so the steps it logs again appear once.
    pub fn open(dir: &Path, resumed_at: Option<u64>) -> Result<Self> {
        let path = dir.join(METRICS_FILE);
        let kept = match resumed_at {
            Some(step) => truncate_metrics(&path, step)?,
            None => {
                if path.exists() {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("{}: cannot replace", path.display()))?;
                }
                vec![]
            }
        };
        Ok(Self {
            jsonl: JsonlWriter::append(&path)?,
            events: EventWriter::open(dir, resumed_at, &kept)?,
        })
    }

    pub fn write(&mut self, line: &serde_json::Value) -> Result<()> {
        self.jsonl.write(line)?;
        self.events.write_line(line)
    }
}

/// Keeps only metrics lines up to `step` (a resumed run rewrites what came after); returns them.
fn truncate_metrics(path: &Path, step: u64) -> Result<Vec<serde_json::Value>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let kept: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["step"].as_u64().is_some_and(|s| s <= step))
        .collect();
    let mut out = String::new();
    for v in &kept {
        out.push_str(&serde_json::to_string(v)?);
        out.push('\n');
    }
    crate::util::io::write_atomic(path, out.as_bytes())?;
    Ok(kept)
}
