//! What protects a user's run directory: one run per output directory (an OS lock taken before
//! anything is written), a resumed run that must describe the same training, and a resume that
//! survives a damaged newest checkpoint and the leftovers of an interrupted save.

mod common;

use common::*;
use mo_align::io::RunLock;
use mo_align::recipes::{sft, RunFlags};
use std::path::Path;
use std::process::Command;

fn overrides(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        format!("model.path={:?}", tiny_dir().to_str().unwrap()),
        format!("train.output_dir={:?}", out.to_str().unwrap()),
        "train.eval_every=1000".to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn sft_run(out: &Path, extra: &[&str], flags: RunFlags) -> anyhow::Result<()> {
    let config = Path::new("configs/demo/sft-lora.toml");
    sft::run(Some(config), &overrides(out, extra), flags).map(drop)
}

fn cli(out: &Path, extra: &[&str], more: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(bin());
    cmd.args(["sft", "--quiet", "--config", "configs/demo/sft-lora.toml"]);
    for o in overrides(out, extra) {
        cmd.arg("--set").arg(o);
    }
    cmd.args(more).output().unwrap()
}

#[test]
fn a_second_run_in_the_same_directory_is_refused_before_it_writes() {
    let out = scratch("locked");
    sft_run(&out, &["train.max_steps=2"], flags(false, true)).unwrap();
    let before: Vec<Vec<u8>> = ["config.resolved.toml", "data_report.json", "metrics.jsonl"]
        .iter()
        .map(|f| std::fs::read(out.join(f)).unwrap())
        .collect();
    // This process holds the lock, as a running `mo-align sft` would.
    let lock = RunLock::acquire(&out).unwrap();
    let e = sft_run(&out, &["train.max_steps=4"], flags(true, true))
        .unwrap_err()
        .to_string();
    let me = std::process::id().to_string();
    assert!(e.contains("is running") && e.contains(&me), "{e}");
    let res = cli(&out, &["train.max_steps=4"], &["--resume"]);
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&format!("process {me}")), "{err}");
    let after: Vec<Vec<u8>> = ["config.resolved.toml", "data_report.json", "metrics.jsonl"]
        .iter()
        .map(|f| std::fs::read(out.join(f)).unwrap())
        .collect();
    assert!(before == after, "a refused run modified the run directory");
    // The lock goes with its holder.
    drop(lock);
    sft_run(&out, &["train.max_steps=2"], flags(true, true)).unwrap();
}

#[test]
fn resume_refuses_a_changed_config_and_records_an_allowed_change() {
    let out = scratch("resume-config");
    let base = ["train.max_steps=4", "train.save_every=2", "train.lr=0.002"];
    sft_run(&out, &base, flags(false, true)).unwrap();
    let resolved = std::fs::read(out.join("config.resolved.toml")).unwrap();
    let allow = RunFlags {
        resume: true,
        quiet: true,
        allow_config_change: true,
    };
    // Unsafe changes are refused even with --allow-config-change, and name old -> new.
    for (extra, key) in [
        ("train.seed=7", "train.seed: 42 -> 7"),
        ("train.batch_size=2", "train.batch_size"),
        ("lora.dropout=0.2", "lora.dropout"),
        ("data.max_samples=50", "data.max_samples"),
    ] {
        let set = [base[0], base[1], base[2], extra];
        for flags in [flags(true, true), allow] {
            let e = sft_run(&out, &set, flags).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("cannot change"), "{e}");
        }
    }
    // A schedule change needs the opt-in, and is then recorded.
    let longer = ["train.max_steps=6", base[1], "train.lr=0.001"];
    let e = sft_run(&out, &longer, flags(true, true))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("train.lr: 0.002 -> 0.001")
            && e.contains("train.max_steps: 4 -> 6")
            && e.contains("--allow-config-change"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(out.join("config.resolved.toml")).unwrap(),
        resolved
    );
    assert!(!out.join("config.changes.jsonl").exists());
    sft_run(&out, &longer, allow).unwrap();
    let changes = std::fs::read_to_string(out.join("config.changes.jsonl")).unwrap();
    let entry: serde_json::Value = serde_json::from_str(changes.lines().next().unwrap()).unwrap();
    assert_eq!(entry["changes"]["train.max_steps"]["old"], "4");
    assert_eq!(entry["changes"]["train.max_steps"]["new"], "6");
    let steps: Vec<u64> = metrics(&out)
        .iter()
        .filter_map(|l| l["step"].as_u64())
        .collect();
    assert_eq!(steps.iter().max(), Some(&6));
}

/// Writes garbage over a file, keeping its name (what a torn write leaves).
fn truncate(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() / 3]).unwrap();
}

/// The adapter's first f32 set to NaN in place (a bit-flipped or NaN-poisoned checkpoint).
fn poison(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let start = 8 + header;
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn resume_falls_back_past_a_damaged_checkpoint_and_clears_interrupted_saves() {
    let extra = [
        "train.max_steps=6",
        "train.save_every=2",
        "train.keep_checkpoints=3",
    ];
    let whole = scratch("fallback-whole");
    sft_run(&whole, &extra, flags(false, true)).unwrap();
    for damage in [truncate as fn(&Path), poison] {
        let out = scratch("fallback");
        sft_run(&out, &extra, flags(false, true)).unwrap();
        let ckpts = out.join("checkpoints");
        let newest = ckpts.join("checkpoint-0000006");
        damage(&newest.join("adapter_model.safetensors"));
        // Leftovers of a save killed mid-way, and a file of the user's.
        std::fs::create_dir_all(ckpts.join(".checkpoint-0000008.tmp-4242")).unwrap();
        std::fs::write(ckpts.join(".checkpoint-0000008.tmp-4242/x"), "partial").unwrap();
        std::fs::write(ckpts.join("notes.txt"), "mine").unwrap();
        std::fs::remove_file(out.join("adapter_model.safetensors")).unwrap();
        let res = cli(&out, &extra, &["--resume"]);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(res.status.success(), "{err}");
        assert!(
            err.contains("checkpoint-0000006 is unusable") && err.contains("step 4"),
            "{err}"
        );
        assert!(!ckpts.join(".checkpoint-0000008.tmp-4242").exists());
        assert_eq!(
            std::fs::read_to_string(ckpts.join("notes.txt")).unwrap(),
            "mine"
        );
        // Steps 5 and 6 were trained again from step 4: the same adapter as the whole run.
        assert!(
            std::fs::read(whole.join("adapter_model.safetensors")).unwrap()
                == std::fs::read(out.join("adapter_model.safetensors")).unwrap()
        );
    }
}
