//! The `local` backend: the points that are not done run on this machine as child processes
//! (`mo-align sweep --point NAME`), `local.parallel` at a time, each slot with its own GPU
//! through `CUDA_VISIBLE_DEVICES` when more than one runs at once.

use super::config::LocalSection;
use super::plan::Plan;
use super::point::{step_of, PointState};
use crate::train::progress::Progress;
use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The GPU of each slot: `local.gpus`, else (with more than one slot) the devices
/// `CUDA_VISIBLE_DEVICES` lists, else 0, 1, ...; `None`: one slot, the environment as it is.
fn slot_gpus(cfg: &LocalSection) -> Result<Option<Vec<String>>> {
    let n = cfg.parallel;
    if !cfg.gpus.is_empty() {
        if cfg.gpus.len() < n {
            bail!(
                "local.gpus lists {} devices for local.parallel = {n}: give one per slot",
                cfg.gpus.len()
            );
        }
        return Ok(Some(cfg.gpus.clone()));
    }
    if n == 1 {
        return Ok(None);
    }
    let visible: Vec<String> = std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    Ok(Some(if visible.len() >= n {
        visible
    } else {
        (0..n).map(|i| i.to_string()).collect()
    }))
}

/// A point running in a slot.
struct Running {
    point: usize,
    slot: usize,
    child: Child,
    started: Instant,
}

/// Runs every point whose state is not `Done`, updating `states` as they finish.
pub fn run(
    plan: &Plan,
    cfg: &LocalSection,
    point_args: &[String],
    states: &mut [PointState],
    quiet: bool,
) -> Result<()> {
    if cfg.parallel == 0 {
        bail!(
            "{}: local.parallel must be at least 1",
            plan.source.display()
        );
    }
    let gpus = slot_gpus(cfg).with_context(|| plan.source.display().to_string())?;
    let exe = super::binary("")?;
    let mut todo: VecDeque<usize> = (0..plan.points.len())
        .filter(|&i| states[i] != PointState::Done)
        .collect();
    let finished = |states: &[PointState]| {
        states
            .iter()
            .filter(|s| matches!(s, PointState::Done | PointState::Failed))
            .count() as u64
    };
    let progress = Progress::new(plan.points.len() as u64, finished(states), quiet, "sweep");
    let logs = plan.dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("{}: cannot create", logs.display()))?;
    let mut free: Vec<usize> = (0..cfg.parallel).rev().collect();
    let mut running: Vec<Running> = vec![];
    let mut last_message = Instant::now() - Duration::from_secs(10);
    loop {
        while !todo.is_empty() && !free.is_empty() {
            let (Some(i), Some(slot)) = (todo.pop_front(), free.pop()) else {
                break;
            };
            let p = &plan.points[i];
            let log_path = super::log_path(plan, &p.name);
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .with_context(|| format!("{}: cannot open", log_path.display()))?;
            let mut cmd = Command::new(&exe);
            cmd.args(point_args)
                .args(["--point", p.name.as_str()])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            if let Some(g) = &gpus {
                cmd.env("CUDA_VISIBLE_DEVICES", &g[slot]);
            }
            let child = cmd
                .spawn()
                .with_context(|| format!("{}: cannot start", exe.display()))?;
            let gpu = gpus
                .as_ref()
                .map(|g| format!(" with CUDA_VISIBLE_DEVICES={}", g[slot]))
                .unwrap_or_default();
            progress.log(&format!("point {}: started{gpu}", p.name));
            states[i] = PointState::Running;
            running.push(Running {
                point: i,
                slot,
                child,
                started: Instant::now(),
            });
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut k = 0;
        while k < running.len() {
            let Some(status) = running[k].child.try_wait()? else {
                k += 1;
                continue;
            };
            let r = running.swap_remove(k);
            let p = &plan.points[r.point];
            let secs = r.started.elapsed().as_secs_f64();
            if status.success() {
                states[r.point] = PointState::Done;
                progress.log(&format!("point {}: done in {secs:.1}s", p.name));
            } else {
                states[r.point] = PointState::Failed;
                let code = status
                    .code()
                    .map_or_else(|| "a signal".to_string(), |c| format!("exit {c}"));
                progress.log(&format!(
                    "point {}: failed ({code}) after {secs:.1}s; see {}",
                    p.name,
                    super::log_path(plan, &p.name).display()
                ));
            }
            free.push(r.slot);
        }
        if last_message.elapsed() >= Duration::from_secs(1) {
            last_message = Instant::now();
            let now: Vec<String> = running
                .iter()
                .map(|r| {
                    let p = &plan.points[r.point];
                    match step_of(&p.out) {
                        Some(s) => format!("{} step {s}", p.name),
                        None => format!("{} starting", p.name),
                    }
                })
                .collect();
            progress.set(finished(states), now.join(", "));
        }
    }
    progress.finish();
    Ok(())
}
