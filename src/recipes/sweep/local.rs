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

/// The GPU of each slot, given `CUDA_VISIBLE_DEVICES` as this process sees it (`visible`):
/// `local.gpus` when given; else, when the variable is set, exactly the devices it lists
/// (fewer than `local.parallel` is refused: two points would share a GPU; set but empty means
/// no GPU, and every slot gets it empty: CPU points); else 0, 1, ... `None`: one slot and no
/// `local.gpus`, the environment as it is.
fn slot_gpus(cfg: &LocalSection, visible: Option<&str>) -> Result<Option<Vec<String>>> {
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
    let Some(visible) = visible else {
        return Ok(Some((0..n).map(|i| i.to_string()).collect()));
    };
    let listed: Vec<String> = visible
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if listed.is_empty() {
        return Ok(Some(vec![String::new(); n]));
    }
    if listed.len() < n {
        bail!(
            "local.parallel = {n}, but CUDA_VISIBLE_DEVICES={visible} lists {} devices: lower local.parallel, or list the GPUs in local.gpus",
            listed.len()
        );
    }
    Ok(Some(listed))
}

/// The points running now; dropped before they all finished (an error, a panic), it kills
/// and waits for them, so the sweep never leaves points training that nothing follows.
struct Children(Vec<Running>);

impl Drop for Children {
    fn drop(&mut self) {
        for r in &mut self.0 {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
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
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let gpus =
        slot_gpus(cfg, visible.as_deref()).with_context(|| plan.source.display().to_string())?;
    let exe = super::binary("")?;
    // N points at once share this machine's CPU threads (this process's count, which `main`
    // pinned or the user set): N children with every thread each would fight over the cores.
    let threads_each =
        (cfg.parallel > 1).then(|| (crate::util::cpu::threads() / cfg.parallel).max(1));
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
    let mut running = Children(vec![]);
    let mut last_message: Option<Instant> = None;
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
            if let Some(n) = threads_each {
                cmd.env("RAYON_NUM_THREADS", n.to_string());
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
            running.0.push(Running {
                point: i,
                slot,
                child,
                started: Instant::now(),
            });
        }
        if running.0.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut k = 0;
        while k < running.0.len() {
            let Some(status) = running.0[k].child.try_wait()? else {
                k += 1;
                continue;
            };
            let r = running.0.swap_remove(k);
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
        if last_message.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_message = Some(Instant::now());
            let now: Vec<String> = running
                .0
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

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(parallel: usize, gpus: &[&str], visible: Option<&str>) -> Result<Option<Vec<String>>> {
        let cfg = LocalSection {
            parallel,
            gpus: gpus.iter().map(|g| g.to_string()).collect(),
        };
        slot_gpus(&cfg, visible)
    }

    #[test]
    fn each_slot_gets_a_gpu_of_its_own() {
        let some = |v: &[&str]| Some(v.iter().map(|g| g.to_string()).collect::<Vec<_>>());
        assert_eq!(slots(1, &[], Some("3")).unwrap(), None);
        assert_eq!(slots(2, &[], None).unwrap(), some(&["0", "1"]));
        assert_eq!(
            slots(2, &[], Some("4, 6,7")).unwrap(),
            some(&["4", "6", "7"])
        );
        assert_eq!(slots(2, &["5", "2"], Some("0")).unwrap(), some(&["5", "2"]));
        // Set but empty: no GPU, and every point runs on the CPU.
        assert_eq!(slots(3, &[], Some("")).unwrap(), some(&["", "", ""]));
        let e = slots(2, &[], Some("1")).unwrap_err().to_string();
        assert!(e.contains("CUDA_VISIBLE_DEVICES=1 lists 1 devices"), "{e}");
        assert!(slots(3, &["0", "1"], None).is_err());
    }
}
