//! What protects a user's run directory: one run per output directory (an OS lock taken before
//! anything is written), a resumed run that must describe the same training, and a resume that
//! survives a damaged newest checkpoint and the leftovers of an interrupted save.

mod common;

use common::*;
use mo_align::recipes::{sft, RunFlags};
use mo_align::util::io::RunLock;
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
        ..Default::default()
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

/// Rule 1: no command writes over what it reads. A DPO run whose output is its own SFT
/// adapter, and a full fine-tuning whose output is its base model, are refused before anything
/// is written; both inputs stay as they were.
#[test]
fn an_output_directory_that_is_an_input_is_refused() {
    let root = scratch("output-is-input");
    let adapter = root.join("sft");
    sft_run(&adapter, &["train.max_steps=2"], flags(false, true)).unwrap();
    let before = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    let sets = vec![
        format!("model.path={:?}", tiny_dir().to_str().unwrap()),
        format!("model.adapter={:?}", adapter.to_str().unwrap()),
        format!("train.output_dir={:?}", adapter.to_str().unwrap()),
        "train.max_steps=2".to_string(),
    ];
    let e = mo_align::recipes::dpo::run_dpo(
        Some(Path::new("configs/demo/dpo.toml")),
        &sets,
        flags(false, true),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("train.output_dir") && e.contains("is the"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(adapter.join("adapter_model.safetensors")).unwrap(),
        before
    );
    // Full fine-tuning into the base model's own directory.
    let base = root.join("base");
    copy_dir(tiny_dir(), &base);
    let weights = std::fs::read(base.join("model.safetensors")).unwrap();
    let sets = overrides(&base, &["train.max_steps=2", "train.finetune=\"full\""])
        .into_iter()
        .map(|s| s.replace(tiny_dir().to_str().unwrap(), base.to_str().unwrap()))
        .collect::<Vec<_>>();
    let e = sft::run(
        Some(Path::new("configs/demo/sft-lora.toml")),
        &sets,
        flags(false, true),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("is the") && e.contains("which this command reads"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(base.join("model.safetensors")).unwrap(),
        weights
    );
    assert!(!base.join("config.resolved.toml").exists());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Rules 3 and 4: a refused run writes nothing (not even its resolved config over the run it
/// was refused by), a run that fails on its data leaves no directory behind, and a finished run
/// is not trained over, also without its checkpoints, unless --force, which replaces it only
/// once the new run has started.
#[test]
fn a_refused_or_failed_run_writes_nothing_and_a_finished_run_is_kept() {
    let out = scratch("finished");
    sft_run(
        &out,
        &["train.max_steps=2", "train.save_every=1000"],
        flags(false, true),
    )
    .unwrap();
    let files = [
        "config.resolved.toml",
        "data_report.json",
        "metrics.jsonl",
        "adapter_model.safetensors",
    ];
    let snapshot = || -> Vec<Vec<u8>> {
        files
            .iter()
            .map(|f| std::fs::read(out.join(f)).unwrap())
            .collect()
    };
    let before = snapshot();
    // Its checkpoints removed: a new run with another lr, with or without --resume, is refused.
    let _ = std::fs::remove_dir_all(out.join("checkpoints"));
    for resume in [false, true] {
        let e = sft_run(
            &out,
            &["train.max_steps=2", "train.lr=0.5"],
            flags(resume, true),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("finished run") && e.contains("--force"), "{e}");
        assert!(
            snapshot() == before,
            "a refused run (resume {resume}) modified the finished run"
        );
    }
    // --force, but the new run fails on its data: the old run is still whole.
    let bad = scratch("finished-bad-data").with_extension("jsonl");
    std::fs::write(&bad, "{\"messages\": 3}\n").unwrap();
    let force = RunFlags {
        force: true,
        quiet: true,
        ..Default::default()
    };
    let data = format!("data.train_files=[{:?}]", bad.to_str().unwrap());
    assert!(sft_run(&out, &["train.max_steps=2", &data], force).is_err());
    assert!(
        snapshot() == before,
        "a failed --force run removed the run it was to replace"
    );
    // --force with good data replaces it.
    sft_run(&out, &["train.max_steps=2", "train.lr=0.5"], force).unwrap();
    assert!(std::fs::read_to_string(out.join("config.resolved.toml"))
        .unwrap()
        .contains("lr = 0.5"));
    // A first run that fails on its data leaves no directory.
    let fresh = scratch("failed-first-run").join("run");
    assert!(sft_run(&fresh, &["train.max_steps=2", &data], flags(false, true)).is_err());
    assert!(
        !fresh.exists(),
        "a failed run left {} behind",
        fresh.display()
    );
}

/// Rule 5: --resume checks the data it resumes on, not only the config: a training file whose
/// records changed, or a glob that now matches one more file, is refused with the input named.
#[test]
fn resume_refuses_changed_data_and_a_glob_that_matches_more() {
    let root = scratch("resume-data");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let lines: Vec<String> = std::fs::read_to_string("data/smoltalk/train.jsonl")
        .unwrap()
        .lines()
        .take(40)
        .map(String::from)
        .collect();
    std::fs::write(data.join("part-1.jsonl"), lines[..20].join("\n")).unwrap();
    let glob = format!(
        "data.train_files=[{:?}]",
        data.join("part-*.jsonl").to_str().unwrap()
    );
    let out = root.join("run");
    let base = ["train.max_steps=4", "train.save_every=1", glob.as_str()];
    sft_run(&out, &base, flags(false, true)).unwrap();
    // Back to a mid-run checkpoint, as after a kill.
    std::fs::remove_dir_all(out.join("checkpoints/checkpoint-0000004")).unwrap();
    std::fs::remove_file(out.join("adapter_model.safetensors")).unwrap();
    // A new file matches the glob: refused, naming it.
    std::fs::write(data.join("part-2.jsonl"), lines[20..].join("\n")).unwrap();
    let e = sft_run(&out, &base, flags(true, true))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("part-2.jsonl") && e.contains("did not start from"),
        "{e}"
    );
    std::fs::remove_file(data.join("part-2.jsonl")).unwrap();
    // The one file's records swapped for others: refused.
    std::fs::write(data.join("part-1.jsonl"), lines[20..].join("\n")).unwrap();
    let e = sft_run(&out, &base, flags(true, true))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("part-1.jsonl") && e.contains("has changed"),
        "{e}"
    );
    // Restored: it resumes.
    std::fs::write(data.join("part-1.jsonl"), lines[..20].join("\n")).unwrap();
    sft_run(&out, &base, flags(true, true)).unwrap();
    assert!(out.join("adapter_model.safetensors").is_file());
}

/// Rule 8: a run recorded before an upgrade added a setting resumes when the setting is at its
/// default (what the old version did); at another value it is a change like any other.
#[test]
fn a_run_recorded_before_a_setting_existed_resumes_at_its_default() {
    let out = scratch("resume-upgrade");
    let base = ["train.max_steps=4", "train.save_every=2"];
    sft_run(&out, &base, flags(false, true)).unwrap();
    // The record as an older version wrote it (no lora.use_rslora), and the run killed before
    // its final adapter was written.
    let record = out.join("config.resolved.toml");
    let text = std::fs::read_to_string(&record).unwrap();
    assert!(text.contains("use_rslora = false"), "{text}");
    let older: String = text
        .lines()
        .filter(|l| !l.starts_with("use_rslora"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&record, older).unwrap();
    std::fs::remove_file(out.join("adapter_model.safetensors")).unwrap();
    let e = sft_run(
        &out,
        &[base[0], base[1], "lora.use_rslora=true"],
        flags(true, true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("lora.use_rslora: (unset) -> true"), "{e}");
    sft_run(&out, &base, flags(true, true)).unwrap();
    assert!(out.join("adapter_model.safetensors").is_file());
}

/// Rule 8: a merge killed mid-write leaves a hidden temporary directory; the next merge into
/// the same place removes it. One killed while replacing an output had moved the old output
/// aside: it is put back, and a merge without --force then refuses to replace it.
#[test]
fn a_killed_merges_leftovers_are_cleaned_or_restored() {
    let root = scratch("merge-leftovers");
    let adapter = golden_dir().join("adapter");
    let model = tiny_dir().to_str().unwrap().to_string();
    // A process id that is surely gone: a child that has exited.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let out = root.join("merged");
    let stale = root.join(format!(".merged.tmp-{dead}"));
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"half").unwrap();
    // One of a running process (init) is left alone.
    let live = root.join(".merged.tmp-1");
    std::fs::create_dir_all(&live).unwrap();
    mo_align::recipes::merge::run(&model, &adapter, &out, "f32", false, None).unwrap();
    assert!(
        !stale.exists(),
        "the killed merge's temporary directory is still there"
    );
    assert!(live.exists(), "a running process's directory was removed");
    // Killed between moving the old output aside and moving the new one in.
    let aside = root.join(format!(".merged.old-{dead}"));
    std::fs::rename(&out, &aside).unwrap();
    let e = mo_align::recipes::merge::run(&model, &adapter, &out, "f32", false, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--force"), "{e}");
    assert!(
        out.join("model.safetensors").is_file(),
        "the old output was not put back"
    );
    assert!(!aside.exists());
}

/// Rules 1-3 on directories that hold someone else's files: a run is never started among
/// them (with or without --force), a refused run leaves neither its directory, nor the parents
/// it made, nor a lock file behind, and --force replacing a run keeps a file the user added.
#[test]
fn foreign_files_are_never_trained_into_or_deleted() {
    let root = scratch("foreign");
    let notes = root.join("notes");
    std::fs::create_dir_all(&notes).unwrap();
    std::fs::write(notes.join("notes.txt"), "mine").unwrap();
    for force in [false, true] {
        let e = sft_run(&notes, &["train.max_steps=2"], flags(false, true))
            .err()
            .or_else(|| {
                force
                    .then(|| {
                        sft_run(
                            &notes,
                            &["train.max_steps=2"],
                            RunFlags {
                                force: true,
                                quiet: true,
                                ..Default::default()
                            },
                        )
                        .err()
                    })
                    .flatten()
            })
            .expect("a run among foreign files was started")
            .to_string();
        assert!(
            e.contains("not a mo-align run") && e.contains("notes.txt"),
            "{e}"
        );
    }
    let names: Vec<_> = std::fs::read_dir(&notes)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec!["notes.txt"],
        "a refused run left files (a lock?)"
    );
    // A refused run that made its directory and parents removes them all.
    let deep = root.join("x/a/b");
    let e = sft_run(
        &deep,
        &[
            "train.max_steps=2",
            "data.train_files=[\"/nonexistent.jsonl\"]",
        ],
        flags(false, true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("no such data file"), "{e}");
    assert!(!root.join("x").exists(), "a refused run left its parents");
    // An empty output directory is refused rather than taken as the current directory.
    let e = sft::run(
        Some(Path::new("configs/demo/sft-lora.toml")),
        &[
            format!("model.path={:?}", tiny_dir().to_str().unwrap()),
            "train.output_dir=\"\"".to_string(),
        ],
        flags(false, true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("train.output_dir is empty"), "{e}");
    // A finished run the user added a file to: --force replaces the run, keeps the file.
    let run = root.join("run");
    sft_run(&run, &["train.max_steps=2"], flags(false, true)).unwrap();
    std::fs::write(run.join("my-notes.txt"), "mine").unwrap();
    let force = RunFlags {
        force: true,
        quiet: true,
        ..Default::default()
    };
    sft_run(&run, &["train.max_steps=2"], force).unwrap();
    assert_eq!(
        std::fs::read_to_string(run.join("my-notes.txt")).unwrap(),
        "mine"
    );
    assert!(run.join("adapter_model.safetensors").is_file());
}

/// Rule 1 for caches: train.cache_dir may not be or lie inside what the run reads (the
/// reference caches would be written into the model's directory).
#[test]
fn a_cache_directory_inside_an_input_is_refused() {
    let root = scratch("cache-in-input");
    let model = root.join("model");
    copy_dir(tiny_dir(), &model);
    let before = std::fs::read_dir(&model).unwrap().count();
    let e = mo_align::recipes::dpo::run_dpo(
        Some(Path::new("configs/demo/dpo.toml")),
        &[
            format!("model.path={:?}", model.to_str().unwrap()),
            "model.adapter=\"\"".to_string(),
            format!("train.output_dir={:?}", root.join("dpo").to_str().unwrap()),
            format!(
                "train.cache_dir={:?}",
                model.join("cache").to_str().unwrap()
            ),
        ],
        flags(false, true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("cache_dir") && e.contains("lies inside"), "{e}");
    assert_eq!(std::fs::read_dir(&model).unwrap().count(), before);
    assert!(!root.join("dpo").exists());
}

/// Rule 3: a directory holding a model or adapter that no mo-align run wrote (same file names
/// as a run's outputs, but no run record) is never trained into, even with --force.
#[test]
fn a_model_directory_is_not_a_run_to_replace() {
    let root = scratch("model-not-run");
    let model = root.join("model");
    copy_dir(tiny_dir(), &model);
    let force = RunFlags {
        force: true,
        quiet: true,
        ..Default::default()
    };
    let e = sft_run(&model, &["train.max_steps=2"], force)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a mo-align run"), "{e}");
    assert!(model.join("model.safetensors").is_file());
    assert!(!model.join(".mo-align.lock").exists());
}
