//! A point interrupted after a checkpoint: `pareto` refuses the sweep (naming the point), and a
//! rerun resumes that point from its checkpoint, leaving the finished points untouched, and
//! counts the time its first segment spent.

use super::*;

/// The step of each `checkpoint-NNNNNNN` under `dir/checkpoints`.
fn checkpoint_steps(dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir.join("checkpoints"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix("checkpoint-")?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    steps.sort();
    steps
}

#[test]
fn an_interrupted_point_is_refused_by_pareto_and_resumed_from_its_checkpoint() {
    let root = scratch("sweep-resume");
    let config = sweep_config_with(
        &root,
        &[
            "train.max_steps=4",
            "train.save_every=2",
            "train.log_every=1",
        ],
        "",
    );
    let first = sweep(&config, &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    // What a run killed after its step-2 checkpoint leaves: its record, metrics and that
    // checkpoint; no later checkpoint, no final adapter, no recorded training time.
    let killed = root.join("sweep").join(POINTS[3]);
    assert!(checkpoint_steps(&killed).contains(&2), "{killed:?}");
    for step in checkpoint_steps(&killed).into_iter().filter(|s| *s > 2) {
        let dir = killed.join(format!("checkpoints/checkpoint-{step:07}"));
        std::fs::remove_dir_all(dir).unwrap();
    }
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "pipeline_train_seconds",
        "pipeline_inputs.digest",
    ] {
        let _ = std::fs::remove_file(killed.join(f));
    }
    let log = root.join("sweep/logs").join(format!("{}.log", POINTS[3]));
    std::fs::remove_file(&log).unwrap();
    // As if the first segment had run for 1000 s before its checkpoint (a preempted job): the
    // resumed point's training time must count them.
    let state_file = killed.join("checkpoints/checkpoint-0000002/trainer_state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_file).unwrap()).unwrap();
    assert!(state["wall_s"].as_f64().unwrap() > 0.0, "{state}");
    state["wall_s"] = 1000.0.into();
    std::fs::write(&state_file, state.to_string()).unwrap();

    let refused = mo_align(&["pareto", "--config", pareto_config(&root).to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    let e = stderr(&refused);
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    assert!(
        e.contains("1 of 4 points not finished")
            && e.contains(&format!("{} (unfinished)", POINTS[3])),
        "{e}"
    );
    assert!(!root.join("pareto/pareto.json").exists());

    let before = adapter_mtimes(&root, &POINTS[..3]);
    let run = sweep(&config, &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(
        stderr(&run).contains("3 up to date, 1 to run"),
        "{}",
        stderr(&run)
    );
    let got = states(&root);
    for (name, state, ran) in &got {
        assert_eq!(state, "done");
        assert_eq!(*ran, name == POINTS[3], "{got:?}");
    }
    // Resumed at step 2: steps 1 and 2 were not trained again.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("resumed from") && text.contains("(step 2)"),
        "{text}"
    );
    let steps: Vec<u64> = std::fs::read_to_string(killed.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64())
        .collect();
    assert_eq!(steps.iter().max(), Some(&4), "{steps:?}");
    assert!(killed.join("adapter_model.safetensors").is_file());
    let row = summary(&root)["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == POINTS[3])
        .cloned()
        .unwrap();
    let seconds = row["train_seconds"].as_f64().unwrap();
    // A lower bound only: how long the resumed segment took is not the test's business.
    assert!(seconds >= 1000.0, "{row}");
    let after = adapter_mtimes(&root, &POINTS[..3]);
    assert_eq!(before, after, "a rerun touched a finished point");
    let _ = std::fs::remove_dir_all(&root);
}
