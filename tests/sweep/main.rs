//! `mo-align sweep` on the tiny model: a 2 x 2 grid (two weightings x two seeds) of hybrid-DPO
//! runs of two steps, on the local backend (and on Slurm when `sbatch` is on the PATH).

#[path = "../common/mod.rs"]
mod common;
mod resume;
mod slurm;

use common::{bin, repo_root, scratch, tiny_dir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const POINTS: [&str; 4] = [
    "w1-0-0-0_seed1",
    "w1-0-0-0_seed2",
    "w0-1-0-0_seed1",
    "w0-1-0-0_seed2",
];

/// A 2 x 2 sweep config in `root` (its runs under `root/sweep`), with `extra` TOML appended.
fn sweep_config(root: &Path, extra: &str) -> PathBuf {
    sweep_config_with(root, &[], extra)
}

/// `sweep_config` with more overrides of every point (later ones win).
fn sweep_config_with(root: &Path, more: &[&str], extra: &str) -> PathBuf {
    let base = repo_root().join("configs/demo/compare/hybrid-dpo-fixed.toml");
    let text = format!(
        r#"[sweep]
stage = "hybrid-dpo"
base = {base:?}
output_dir = {out:?}
overrides = [
    'model.path={model:?}',
    'train.cache_dir={cache:?}',
    "train.max_steps=2",
    "train.batch_size=2",
    "train.grad_accum=1",
    "data.max_samples=8",
    "data.validation_files=[]",
    "data.validation_fraction=0.25",
    "data.max_length=128",{more}
]

[axes]
weights = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
seed = [1, 2]
{extra}
"#,
        base = base.to_str().unwrap(),
        out = root.join("sweep").to_str().unwrap(),
        model = tiny_dir().to_str().unwrap(),
        cache = root.join("cache").to_str().unwrap(),
        more = more
            .iter()
            .map(|o| format!("\n    {o:?},"))
            .collect::<String>(),
    );
    let path = root.join("sweep.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn mo_align(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap()
}

fn sweep(config: &Path, more: &[&str]) -> Output {
    let mut args = vec!["sweep", "--config", config.to_str().unwrap(), "--quiet"];
    args.extend(more);
    mo_align(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn summary(root: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(root.join("sweep/summary.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Each point's state and whether this run ran it, by name.
fn states(root: &Path) -> Vec<(String, String, bool)> {
    summary(root)["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["state"].as_str().unwrap().to_string(),
                p["ran"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// When each point's adapter was last written: a rerun that trains a point again changes it.
fn adapter_mtimes(root: &Path, points: &[&str]) -> Vec<std::time::SystemTime> {
    points
        .iter()
        .map(|point| {
            std::fs::metadata(
                root.join("sweep")
                    .join(point)
                    .join("adapter_model.safetensors"),
            )
            .unwrap()
            .modified()
            .unwrap()
        })
        .collect()
}

#[test]
fn a_two_by_two_grid_runs_and_a_rerun_does_nothing() {
    let root = scratch("sweep-grid");
    let config = sweep_config(&root, "[local]\nparallel = 2\n");
    let dry = mo_align(&["sweep", "--config", config.to_str().unwrap(), "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let listed = String::from_utf8_lossy(&dry.stdout);
    for p in POINTS {
        assert!(listed.contains(p) && listed.contains("pending"), "{listed}");
    }
    assert!(!root.join("sweep").exists(), "--dry-run wrote the sweep");

    let run = sweep(&config, &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let got = states(&root);
    let names: Vec<&str> = got.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, POINTS);
    assert!(got.iter().all(|(_, s, ran)| s == "done" && *ran), "{got:?}");
    for p in POINTS {
        let resolved =
            std::fs::read_to_string(root.join("sweep").join(p).join("config.resolved.toml"))
                .unwrap();
        let seed = if p.ends_with("seed1") { 1 } else { 2 };
        assert!(
            resolved.contains(&format!("seed = {seed}")),
            "{p}: {resolved}"
        );
    }
    let md = std::fs::read_to_string(root.join("sweep/summary.md")).unwrap();
    assert!(md.contains("4 of 4 points done"), "{md}");

    let before = adapter_mtimes(&root, &POINTS);
    let again = sweep(&config, &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("4 up to date, 0 to run"),
        "{}",
        stderr(&again)
    );
    assert!(states(&root).iter().all(|(_, s, ran)| s == "done" && !ran));
    let after = adapter_mtimes(&root, &POINTS);
    assert_eq!(before, after, "a rerun trained a finished point again");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_changed_axis_value_or_base_setting_is_refused() {
    let root = scratch("sweep-changed");
    let config = sweep_config(&root, "");
    assert!(sweep(&config, &[]).status.success());
    let before = adapter_mtimes(&root, &POINTS);

    let changed = sweep(&config, &["--set", "axes.seed=[1, 3]"]);
    assert_eq!(changed.status.code(), Some(2));
    let e = stderr(&changed);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(
        e.contains("point w1-0-0-0_seed2") && e.contains("train.seed = 2"),
        "{e}"
    );

    // A changed setting of every point (through the sweep's overrides) names point and key.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("train.max_steps=2", "train.max_steps=3");
    std::fs::write(&config, text).unwrap();
    let changed = sweep(&config, &[]);
    assert_eq!(changed.status.code(), Some(2));
    let e = stderr(&changed);
    assert!(
        e.contains("point w1-0-0-0_seed1") && e.contains("train.max_steps: 2 -> 3"),
        "{e}"
    );
    let after = adapter_mtimes(&root, &POINTS);
    assert_eq!(before, after, "a refused sweep touched a point");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn bad_sweep_configs_are_named_in_one_line() {
    let root = scratch("sweep-bad");
    for (extra_set, want) in [
        (
            "sweep.stage=\"dpx\"",
            "sweep.stage `dpx` is not a training stage",
        ),
        ("axes.simplex=2", "give weights or simplex, not both"),
        ("axes.seed=[1.5]", "seed must be a list of integers"),
        (
            "axes.train.output_dir=[\"x\"]",
            "output directory is the sweep's",
        ),
        ("sweep.stag=\"dpo\"", "unknown field `stag`"),
    ] {
        let config = sweep_config(&root, "");
        let o = sweep(&config, &["--dry-run", "--set", extra_set]);
        assert_eq!(o.status.code(), Some(2), "{extra_set}");
        let e = stderr(&o);
        assert!(
            e.contains(want) && e.contains("sweep.toml"),
            "{extra_set}: {e}"
        );
        assert_eq!(e.trim().lines().count(), 1, "{e}");
    }
    // A value the stage would refuse is refused for its point before any point runs, and
    // nothing is written.
    for (extra_set, want) in [
        ("axes.train.lr=[-0.001]", "_lr-0.001: train.lr must be"),
        (
            "axes.weights=[[1.0,0.0,0.0]]",
            "hybrid.weights has 3 values for 4 objectives",
        ),
    ] {
        let config = sweep_config(&root, "");
        let o = sweep(&config, &["--set", extra_set]);
        assert_eq!(o.status.code(), Some(2), "{extra_set}");
        let e = stderr(&o);
        assert!(e.contains(want), "{extra_set}: {e}");
        assert!(!root.join("sweep").exists(), "{extra_set}: {e}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// A Pareto report over the sweep in `root/sweep` (`[[policy]] sweep`), its config's path.
fn pareto_config(root: &Path) -> PathBuf {
    let pareto = root.join("pareto.toml");
    std::fs::write(
        &pareto,
        format!(
            r#"[pareto]
output_dir = {out:?}
model = {model:?}
prompts = "data/ultrafeedback_binarized/test_prefs.jsonl"
max_prompts = 4
judge = "rules:configs/demo/rules.toml"
objectives = ["helpfulness", "honesty", "instruction_following", "truthfulness"]
device = "cpu"
[sampling]
max_new_tokens = 8
temperature = 0.0
[[policy]]
name = "fixed"
sweep = {sweep:?}
"#,
            out = root.join("pareto").to_str().unwrap(),
            model = tiny_dir().to_str().unwrap(),
            sweep = root.join("sweep").to_str().unwrap(),
        ),
    )
    .unwrap();
    pareto
}
