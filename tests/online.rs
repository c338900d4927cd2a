//! Online policy optimisation (`mo-align grpo`) on the tiny model: what moves the adapter and
//! what does not.

mod common;

use common::{flags, lora_b_norm, metrics, scratch, tiny_dir};
use std::path::Path;

fn run(root: &Path, out: &str, rules: &Path, extra: &[&str]) -> std::path::PathBuf {
    run_with(root, out, rules, extra, false)
}

fn run_with(
    root: &Path,
    out: &str,
    rules: &Path,
    extra: &[&str],
    resume: bool,
) -> std::path::PathBuf {
    let dir = root.join(out);
    let mut sets = vec![
        format!("model.path={:?}", tiny_dir().to_str().unwrap()),
        format!("train.output_dir={:?}", dir.to_str().unwrap()),
        format!("grpo.rules={:?}", rules.to_str().unwrap()),
        "data.max_samples=32".to_string(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    mo_align::recipes::grpo::run(
        Some(Path::new("configs/demo/grpo.toml")),
        &sets,
        flags(resume, true),
    )
    .unwrap();
    dir
}

/// A reward the random tiny model sometimes earns: the completion contains an "e".
fn toy_rules(root: &Path) -> std::path::PathBuf {
    let p = root.join("toy.toml");
    std::fs::write(
        &p,
        "[[objective]]\nname = \"has_e\"\nbase = 0.0\nmin = 0.0\nmax = 1.0\n[[objective.rule]]\nwhen = \"regex\"\npattern = \"e\"\nscore = 1.0\n",
    )
    .unwrap();
    p
}

#[test]
fn a_group_that_cannot_differ_has_zero_advantage_and_leaves_the_adapter_where_it_was() {
    let root = scratch("grpo-zero");
    let rules = toy_rules(&root);
    // A group of one has nothing to be compared with: refused before anything is written.
    let refused = mo_align::recipes::grpo::run(
        Some(Path::new("configs/demo/grpo.toml")),
        &[
            format!("model.path={:?}", tiny_dir().to_str().unwrap()),
            format!("train.output_dir={:?}", root.join("one").to_str().unwrap()),
            format!("grpo.rules={:?}", rules.to_str().unwrap()),
            "grpo.num_generations=1".to_string(),
        ],
        flags(false, true),
    )
    .unwrap_err()
    .to_string();
    assert!(refused.contains("grpo.num_generations"), "{refused}");
    assert!(!root.join("one").exists(), "a refused run left a directory");
    // A reward every completion earns alike: every advantage is 0.
    let flat = root.join("flat.toml");
    std::fs::write(
        &flat,
        "[[objective]]\nname = \"flat\"\nbase = 0.0\nmin = 0.0\nmax = 1.0\n[[objective.rule]]\nwhen = \"regex\"\npattern = \"^\"\nscore = 0.5\n",
    )
    .unwrap();
    let dir = run(
        &root,
        "flat",
        &flat,
        &[
            "grpo.max_new_tokens=6",
            "train.max_steps=3",
            "train.eval_every=3",
        ],
    );
    assert_eq!(lora_b_norm(&dir), 0.0, "a zero advantage moved the adapter");
    // With a group of four, the same run moves it.
    let dir = run(
        &root,
        "four",
        &rules,
        &[
            "grpo.max_new_tokens=6",
            "train.max_steps=3",
            "train.eval_every=3",
        ],
    );
    assert!(lora_b_norm(&dir) > 0.0);
    let m = metrics(&dir);
    for key in [
        "reward",
        "reward_std",
        "rewards/has_e/mean",
        "frac_reward_zero_std",
        "kl",
        "clip_ratio",
        "completions/mean_length",
    ] {
        assert!(m.iter().any(|l| l.get(key).is_some()), "no {key} logged");
    }
}

#[test]
fn policy_gradient_raises_a_toy_reward() {
    let root = scratch("grpo-toy");
    let rules = toy_rules(&root);
    let dir = run(
        &root,
        "toy",
        &rules,
        &[
            "grpo.max_new_tokens=3",
            "grpo.num_generations=8",
            "train.max_steps=40",
            "train.eval_every=20",
            "train.lr=2e-2",
            "train.warmup_ratio=0.0",
        ],
    );
    let evals: Vec<f64> = metrics(&dir)
        .iter()
        .filter_map(|l| l["eval_reward"].as_f64())
        .collect();
    let train: Vec<f64> = metrics(&dir)
        .iter()
        .filter_map(|l| l["reward"].as_f64())
        .collect();
    let (first, last) = (train[0], *train.last().unwrap());
    assert!(
        last > first + 0.15,
        "the rewarded letter did not become likelier: reward {train:?}, eval {evals:?}"
    );
}

#[test]
fn a_reused_batch_clips_its_ratio_and_a_run_resumed_mid_cycle_is_exact() {
    let root = scratch("grpo-reuse");
    let rules = toy_rules(&root);
    let extra = [
        "grpo.max_new_tokens=4",
        "grpo.num_iterations=2",
        "grpo.epsilon=0.01",
        "train.max_steps=4",
        "train.log_every=1",
        "train.save_every=1",
        "train.keep_checkpoints=10",
        "train.lr=5e-2",
        "train.warmup_ratio=0.0",
    ];
    let dir = run(&root, "whole", &rules, &extra);
    let m = metrics(&dir);
    let train: Vec<&serde_json::Value> = m.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(train.len(), 4);
    // Steps 1 and 3 sample (ratio 1: nothing clipped); steps 2 and 4 reuse those samples after
    // an update at lr 5e-2, so ratios leave 1 +- 0.01 and some are clipped.
    let clip: Vec<f64> = train
        .iter()
        .map(|l| l["clip_ratio"].as_f64().unwrap())
        .collect();
    assert_eq!((clip[0], clip[2]), (0.0, 0.0), "{clip:?}");
    assert!(clip[1] > 0.0 && clip[3] > 0.0, "{clip:?}");
    // The reused step reports its batch's rewards again.
    assert_eq!(train[0]["reward"], train[1]["reward"]);
    assert!(dir.join("timing.json").is_file());

    // Killed after step 1, in the middle of a cycle: the resumed run reuses the kept samples.
    let whole = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    for step in 2..=4 {
        std::fs::remove_dir_all(dir.join(format!("checkpoints/checkpoint-{step:07}"))).unwrap();
    }
    std::fs::remove_file(dir.join("adapter_model.safetensors")).unwrap();
    run_with(&root, "whole", &rules, &extra, true);
    assert!(
        whole == std::fs::read(dir.join("adapter_model.safetensors")).unwrap(),
        "the run resumed mid-cycle differs from the uninterrupted one"
    );
}

/// Two objectives no completion can both meet: it has an "e", or it has none.
fn opposed_rules(root: &Path) -> std::path::PathBuf {
    let p = root.join("opposed.toml");
    std::fs::write(
        &p,
        "[[objective]]\nname = \"has_e\"\nbase = 0.0\nmin = 0.0\nmax = 1.0\n[[objective.rule]]\nwhen = \"regex\"\npattern = \"e\"\nscore = 1.0\n\n\
         [[objective]]\nname = \"no_e\"\nbase = 1.0\nmin = 0.0\nmax = 1.0\n[[objective.rule]]\nwhen = \"regex\"\npattern = \"e\"\nscore = -1.0\n",
    )
    .unwrap();
    p
}

/// The share of sampled completions with an "e" from the conditioned policy in `dir` at
/// `weights` (its blocks merged at w, as `generate --weights` loads it).
fn e_rate(dir: &Path, weights: &[f64]) -> f64 {
    use mo_align::generate::SamplingConfig;
    use mo_align::tokenizer::Message;
    let policy = mo_align::eval::load_policy_at(
        tiny_dir().to_str().unwrap(),
        None,
        Some(dir),
        Some(
            &mo_align::objectives::weighting::Weighting::new(weights.to_vec(), "weights").unwrap(),
        ),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let questions = [
        "What is the capital of France?",
        "Name a colour.",
        "Say hi.",
        "Count to three.",
    ];
    let prompts: Vec<Vec<Message>> = questions
        .iter()
        .flat_map(|q| std::iter::repeat_n(policy.prompt(&[Message::new("user", q)]), 16))
        .collect();
    let cfg = SamplingConfig {
        max_new_tokens: 3,
        temperature: 0.7,
        top_p: 1.0,
        top_k: 0,
        repetition_penalty: 1.0,
        seed: 11,
    };
    let answers =
        mo_align::eval::win_rate::answer_prompts(&policy.loaded, &prompts, &cfg, prompts.len())
            .unwrap();
    answers.iter().filter(|a| a.contains('e')).count() as f64 / answers.len() as f64
}

#[test]
fn a_block_conditioned_policy_follows_the_weights_it_is_given() {
    let root = scratch("grpo-conditioned");
    let rules = opposed_rules(&root);
    // Three training seeds: at this learning rate a run now and then wanders for most of its 60
    // steps (on one of five seeds tried, either decoder), so the claim is the mean over seeds,
    // with the direction on every one.
    let mut gaps = vec![];
    for seed in [None, Some(1), Some(2)] {
        let seed_set = seed.map(|s| format!("train.seed={s}"));
        let mut extra = vec![
            "grpo.max_new_tokens=3",
            "grpo.num_generations=8",
            "train.max_steps=60",
            "train.eval_every=60",
            "train.lr=2e-2",
            "train.warmup_ratio=0.0",
            "conditioning.enabled=true",
            "conditioning.mode=\"adapter\"",
        ];
        extra.extend(seed_set.as_deref());
        let name = format!("cond-{}", seed.unwrap_or(0));
        let dir = run(&root, &name, &rules, &extra);
        let info = mo_align::objectives::conditioning::ConditioningInfo::require(&dir).unwrap();
        assert_eq!(info.objectives, ["has_e", "no_e"]);
        for b in info.block_dirs(&dir).unwrap() {
            assert!(b.join("adapter_model.safetensors").is_file(), "{b:?}");
        }
        let (at_e, at_no_e) = (e_rate(&dir, &[1.0, 0.0]), e_rate(&dir, &[0.0, 1.0]));
        assert!(
            at_e > at_no_e,
            "seed {seed:?}: the policy at w = has_e writes an \"e\" in {at_e:.2} of completions, at w = no_e in {at_no_e:.2}"
        );
        gaps.push(at_e - at_no_e);
    }
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    assert!(
        mean > 0.3,
        "the share of completions with an \"e\" at w = has_e exceeds w = no_e's by {gaps:?} (mean {mean:.2})"
    );
    // Stated in the prompt instead: the run trains and records the line to state, no blocks.
    let dir = run(
        &root,
        "prompt",
        &rules,
        &[
            "grpo.max_new_tokens=3",
            "train.max_steps=2",
            "train.eval_every=2",
            "conditioning.enabled=true",
        ],
    );
    let info = mo_align::objectives::conditioning::ConditioningInfo::require(&dir).unwrap();
    assert!(info.blocks.is_empty() && info.example.starts_with("Objective weights: has_e=0.50"));
}
