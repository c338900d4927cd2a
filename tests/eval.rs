//! Evaluation, generation, export, plots and the demo pipeline on the tiny model.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use mo_align::eval::judge::Judge;
use mo_align::eval::load_for_eval;
use mo_align::eval::prompts::{read_prompt_records, read_prompts};
use mo_align::eval::win_rate::{answer_prompts, judge_answers, win_rate_eval};
use mo_align::generate::SamplingConfig;
use mo_align::model::ctx::ForwardCtx;
use mo_align::tokenizer::Message;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Copies the demo configs into `root`, pointing every path under runs/demo at `root`.
fn demo_configs(root: &Path) -> PathBuf {
    let cfg_dir = root.join("configs");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    for f in [
        "base",
        "sft",
        "train-rm",
        "dpo",
        "hybrid-dpo",
        "hybrid-dpo-helpfulness",
        "modpo-honesty",
        "hybrid-dpo-conditioned",
        "grpo",
        "pareto",
        "pipeline",
        "reward-weighted",
        "rules",
    ] {
        let text = std::fs::read_to_string(format!("configs/demo/{f}.toml")).unwrap();
        let text = text
            .replace("runs/demo/", &format!("{}/", root.display()))
            .replace("configs/demo/", &format!("{}/", cfg_dir.display()));
        std::fs::write(cfg_dir.join(format!("{f}.toml")), text).unwrap();
    }
    cfg_dir
}

/// The question a generated answer answers: the last message of its prompt.
fn question(prompt: &serde_json::Value) -> &str {
    prompt.as_array().unwrap().last().unwrap()["content"]
        .as_str()
        .unwrap()
}

/// The demo pipeline as a user runs it (default seeds, every stage), judged by the task's
/// ground truth: the rule objectives of configs/demo/rules.toml.
#[test]
fn demo_pipeline_moves_each_stage_the_way_its_objective_says() {
    let root = scratch("pipeline");
    let cfg = demo_configs(&root);
    mo_align::recipes::pipeline::run(Some(&cfg.join("pipeline.toml")), &[], flags(false, true))
        .unwrap();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("pipeline/summary.json")).unwrap())
            .unwrap();
    let stages = summary["stages"].as_array().unwrap();
    let names: Vec<&str> = stages
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "sft",
            "dpo",
            "hybrid-dpo",
            "hybrid-dpo-helpfulness",
            "modpo-honesty",
            "hybrid-dpo-conditioned",
            "grpo"
        ]
    );
    let judged = |stage: &str, judge: &str| -> serde_json::Value {
        stages.iter().find(|s| s["stage"] == stage).unwrap()["judged"][judge].clone()
    };
    let objective = |stage: &str, name: &str| -> f64 {
        let j = summary["judges"].as_array().unwrap();
        let rules = j.iter().find(|j| j["key"] == "rules").unwrap();
        let k = rules["objectives"]
            .as_array()
            .unwrap()
            .iter()
            .position(|o| o == name)
            .unwrap();
        judged(stage, "rules")["mean_objectives"][k]
            .as_f64()
            .unwrap()
    };
    let rate = |stage: &str, vs: &str| judged(stage, "rules")[vs]["win_rate"].as_f64().unwrap();
    for s in stages {
        for judge in ["rules", "reward_model"] {
            let w = &s["judged"][judge]["vs_base"];
            let n = w["wins"].as_u64().unwrap()
                + w["ties"].as_u64().unwrap()
                + w["losses"].as_u64().unwrap();
            assert_eq!(n, 80, "{}", s["stage"]);
        }
        assert_eq!(s["samples"].as_array().unwrap().len(), 3);
    }

    // The reward model learned the ratings: each objective's held-out predictions correlate
    // with the ground truth, and it ranks held-out pairs well above chance.
    let report = &summary["reward_model"]["report"];
    for (name, v) in report["validation"].as_object().unwrap() {
        let r = v["pearson"].as_f64().unwrap();
        assert!(r > 0.8, "reward model {name}: Pearson r {r}");
    }
    let acc = report["ranking"]["composite_accuracy"].as_f64().unwrap();
    assert!(acc > 0.8, "reward model ranking accuracy {acc}");

    // SFT beats the base; DPO and hybrid DPO (equal weights) beat SFT, by the ground truth.
    let check = |stage: &str, vs: &str, floor: f64| {
        let r = rate(stage, vs);
        assert!(r > floor, "{stage} {vs}: rule-judged win rate {r}");
    };
    check("sft", "vs_base", 0.62);
    check("dpo", "vs_previous", 0.58);
    check("hybrid-dpo", "vs_previous", 0.56);
    // The two judges agree in direction on every stage: none wins against SFT by one and loses
    // by more than 10 points by the other (a policy that games the rules, say by stopping early,
    // wins by the rules and loses by the reward model).
    for s in &stages[1..] {
        let stage = s["stage"].as_str().unwrap();
        let by = |judge: &str| {
            s["judged"][judge]["vs_previous"]["win_rate"]
                .as_f64()
                .unwrap()
        };
        let (rules, rm) = (by("rules"), by("reward_model"));
        assert!(
            !(rules > 0.5 && rm < 0.4 || rm > 0.5 && rules < 0.4),
            "{stage} against sft: rules {rules}, reward model {rm}"
        );
    }
    // The weighted objective moves with the weights, by what the weighting controls: the style
    // its objective rewards. All weight on helpfulness (hybrid) gives detailed answers (longer
    // than the concise answer plus five words) and the most helpful ones; all weight on honesty
    // (MODPO) keeps hedges the others drop. Honesty's score also moves with the share of wrong
    // answers, which any stage may get by chance (on another seed MODPO's honesty mean is below
    // DPO's), so for honesty only the hedge is asserted.
    let more = |name: &str, favoured: &str, other: &str, margin: f64| {
        let (a, b) = (objective(favoured, name), objective(other, name));
        assert!(a > b + margin, "{name}: {favoured} {a} vs {other} {b}");
    };
    more(
        "helpfulness",
        "hybrid-dpo-helpfulness",
        "modpo-honesty",
        0.05,
    );
    more("helpfulness", "hybrid-dpo-helpfulness", "dpo", 0.0);
    let max_words: std::collections::HashMap<String, usize> =
        std::fs::read_to_string("data/ultrafeedback_binarized/test_prefs.jsonl")
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|r| {
                let words = r["max_words"].as_u64().unwrap() as usize;
                (r["prompt"].as_str().unwrap().to_string(), words)
            })
            .collect();
    let hedged = |answer: &str| {
        let a = answer.to_lowercase();
        ["i am not sure", "i think", "maybe"]
            .iter()
            .any(|p| a.contains(p))
    };
    let detailed =
        |prompt: &str, answer: &str| answer.split_whitespace().count() > max_words[prompt];
    // How many of a stage's answers (prompt, answer) are in a style.
    let count = |stage: &str, style: &dyn Fn(&str, &str) -> bool| -> usize {
        std::fs::read_to_string(root.join(format!("pipeline/generations-{stage}.jsonl")))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|g| style(question(&g["prompt"]), g["model_answer"].as_str().unwrap()))
            .count()
    };
    for other in ["dpo", "modpo-honesty"] {
        let (a, b) = (
            count("hybrid-dpo-helpfulness", &detailed),
            count(other, &detailed),
        );
        assert!(
            a >= b + 5,
            "detailed answers: hybrid-dpo-helpfulness {a}, {other} {b}"
        );
    }
    for other in ["dpo", "hybrid-dpo-helpfulness"] {
        let (a, b) = (
            count("modpo-honesty", &|_, a| hedged(a)),
            count(other, &|_, a| hedged(a)),
        );
        assert!(a >= b + 2, "hedged answers: modpo-honesty {a}, {other} {b}");
    }

    // Online GRPO on the ground-truth objectives (equal weights) raises what it is rewarded
    // for, their mean, above SFT's and above offline hybrid DPO's. Which objective pays for the
    // others depends on the trajectory (summation order moves it between machines): at equal
    // weights the method promises the mean, not each objective.
    let composite = |stage: &str| -> f64 {
        [
            "helpfulness",
            "honesty",
            "instruction_following",
            "truthfulness",
        ]
        .iter()
        .map(|o| objective(stage, o))
        .sum::<f64>()
            / 4.0
    };
    assert!(
        composite("grpo") > composite("sft") + 0.1,
        "ground-truth mean: grpo {} vs sft {}",
        composite("grpo"),
        composite("sft")
    );
    assert!(
        composite("grpo") > composite("hybrid-dpo"),
        "ground-truth mean: grpo {} vs hybrid-dpo {}",
        composite("grpo"),
        composite("hybrid-dpo")
    );

    // Wall-time curves: every kept checkpoint judged by the ground truth against its training
    // seconds. Each starts at SFT's score, its last point is the finished stage (the same
    // answers as the table's), and GRPO's score rises over its run.
    let curve = |stage: &str| -> Vec<(f64, f64)> {
        summary["curves"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["stage"] == stage)
            .unwrap_or_else(|| panic!("no curve for {stage}"))["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["elapsed_s"].as_f64().unwrap(),
                    p["mean_total"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    for stage in ["hybrid-dpo", "grpo"] {
        let c = curve(stage);
        assert!(c.len() >= 4, "{stage}: {c:?}");
        assert!(c.windows(2).all(|w| w[1].0 > w[0].0), "{stage}: {c:?}");
        assert!((c[0].1 - composite("sft")).abs() < 1e-4, "{stage}: {c:?}");
        let last = c.last().unwrap().1;
        assert!((last - composite(stage)).abs() < 1e-4, "{stage}: {c:?}");
    }
    let g = curve("grpo");
    assert!(g.last().unwrap().1 > g[0].1 + 0.1, "grpo curve {g:?}");

    // One conditioned policy moves with the weights it is given: at all weight on helpfulness
    // it gives more detailed and more helpful answers than at all weight on instruction
    // following, and the other way round for instruction following; across the 35-weighting
    // grid, instruction following rises with its weight.
    let pareto: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("pareto/pareto.json")).unwrap())
            .unwrap();
    let conditioned = &pareto["policies"][0];
    assert_eq!(conditioned["weightings"].as_array().unwrap().len(), 35);
    let weighting = |w: [f64; 4]| -> &serde_json::Value {
        conditioned["weightings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["weights"] == serde_json::json!(w))
            .unwrap()
    };
    let at = |w: [f64; 4], k: usize| -> f64 { weighting(w)["means"][k].as_f64().unwrap() };
    let detailed_at = |w: [f64; 4]| -> usize {
        let path = weighting(w)["generations"].as_str().unwrap();
        let answers: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        answers["answers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| detailed(question(&a["prompt"]), a["answer"].as_str().unwrap()))
            .count()
    };
    let (help, follow) = ([1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]);
    assert!(
        detailed_at(help) >= detailed_at(follow) + 10,
        "detailed answers at w=help {} vs w=instruction_following {}",
        detailed_at(help),
        detailed_at(follow)
    );
    assert!(
        at(help, 0) > at(follow, 0) + 0.15,
        "helpfulness at w=help {} vs w=instruction_following {}",
        at(help, 0),
        at(follow, 0)
    );
    assert!(
        at(follow, 2) > at(help, 2) + 0.1,
        "instruction following at w=instruction_following {} vs w=help {}",
        at(follow, 2),
        at(help, 2)
    );
    let rho = conditioned["spearman"][2].as_f64().unwrap();
    assert!(rho > 0.5, "instruction following vs its weight: rho {rho}");

    // Reward-weighted training moves toward its target: all weight on instruction following
    // (the reward model's third head, target 1) raises that objective's ground-truth score
    // above SFT's, on the same prompts with the same decoding.
    mo_align::recipes::reward_weighted::run(
        Some(&cfg.join("reward-weighted.toml")),
        &["reward.weights=[0.0, 0.0, 1.0, 0.0]".into()],
        flags(false, true),
    )
    .unwrap();
    let records =
        read_prompt_records("data/ultrafeedback_binarized/test_prefs.jsonl", Some(80)).unwrap();
    let messages: Vec<Vec<Message>> = records.iter().map(|r| r.messages.clone()).collect();
    let sampling: SamplingConfig = serde_json::from_value(summary["sampling"].clone()).unwrap();
    let rw = load_for_eval(
        root.join("sft").to_str().unwrap(),
        None,
        Some(&root.join("reward-weighted")),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let answers = answer_prompts(&rw, &messages, &sampling, 16).unwrap();
    let rules = Judge::load(
        &format!("rules:{}", cfg.join("rules.toml").display()),
        &[],
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let verdicts = judge_answers(&rules, &records, &answers, 16).unwrap();
    let k = rules
        .objectives()
        .iter()
        .position(|o| o == "instruction_following")
        .unwrap();
    let rw_score = verdicts.iter().map(|v| v.objectives[k] as f64).sum::<f64>() / 80.0;
    let sft_score = objective("sft", "instruction_following");
    assert!(
        rw_score > sft_score + 0.3,
        "instruction following: reward-weighted {rw_score} vs sft {sft_score}"
    );

    let md = std::fs::read_to_string(root.join("pipeline/summary.md")).unwrap();
    for needle in [
        "| sft |",
        "| dpo |",
        "| modpo-honesty |",
        "| base |",
        "ground truth",
        "Pearson r",
        "## Pareto front",
        "| conditioned | conditioned | 35 |",
    ] {
        assert!(md.contains(needle), "summary.md lacks {needle}");
    }
    // Every stage drew its plots, and each is well-formed SVG with drawn content.
    let plots = [
        "base/loss.svg",
        "sft/loss.svg",
        "rm/rm_objectives.svg",
        "dpo/dpo_rewards.svg",
        "dpo/dpo_accuracy.svg",
        "modpo-honesty/explicit_reward.svg",
        "pipeline/stage_objectives_rules.svg",
        "pipeline/stage_objectives_reward_model.svg",
        "pipeline/win_rates.svg",
        "pareto/pareto_pairs.svg",
        "pareto/pareto_parallel.svg",
    ];
    for p in plots {
        let text = std::fs::read_to_string(root.join(p)).unwrap_or_else(|_| panic!("{p} missing"));
        let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{p}: not XML: {e}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg", "{p}");
        let drawn = doc
            .descendants()
            .filter(|n| matches!(n.tag_name().name(), "polyline" | "rect" | "path" | "circle"))
            .count();
        assert!(drawn > 3, "{p}: nothing drawn");
    }
    // A second run trains nothing again: every stage is up to date, and reports the time it
    // took when it trained.
    let seconds = |summary: &serde_json::Value| -> Vec<(String, f64)> {
        summary["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["stage"].as_str().unwrap().to_string(),
                    s["train_seconds"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let first: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("pipeline/summary.json")).unwrap())
            .unwrap();
    let before = std::fs::read(root.join("dpo/adapter_model.safetensors")).unwrap();
    mo_align::recipes::pipeline::run(Some(&cfg.join("pipeline.toml")), &[], flags(false, true))
        .unwrap();
    assert_eq!(
        before,
        std::fs::read(root.join("dpo/adapter_model.safetensors")).unwrap()
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("pipeline/summary.json")).unwrap())
            .unwrap();
    assert!(summary["stages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["skipped"] == true));
    for ((stage, was), (_, now)) in seconds(&first).into_iter().zip(seconds(&summary)) {
        assert!(
            was > 0.5 && (was - now).abs() < 2e-3,
            "{stage}: trained in {was} s, reported {now} s"
        );
    }
    // A curve naming no stage is refused before anything runs, naming the stages there are.
    let err = mo_align::recipes::pipeline::run(
        Some(&cfg.join("pipeline.toml")),
        &["eval.curves=[\"grpo2\"]".into()],
        flags(false, true),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`grpo2`") && err.contains("hybrid-dpo-conditioned, grpo"),
        "{err}"
    );
    // An input changed since (the SFT model the reward model read): that stage is refused, and
    // nothing is trained again or removed.
    let gc = root.join("sft/generation_config.json");
    let text = std::fs::read_to_string(&gc).unwrap();
    std::fs::write(&gc, text.replacen('{', "{\"temperature\": 0.5, ", 1)).unwrap();
    let err = match mo_align::recipes::pipeline::run(
        Some(&cfg.join("pipeline.toml")),
        &[],
        flags(false, true),
    ) {
        Ok(()) => panic!("a stage whose input changed was reused"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("inputs that have changed")
            && err.contains(&root.join("rm").display().to_string()),
        "{err}"
    );
    assert!(root.join("rm/reward_head.safetensors").is_file());
}

/// A scratch directory with a reward model trained on the tiny model in `<root>/rm`.
fn scratch_with_trained_rm(name: &str) -> std::path::PathBuf {
    let root = scratch(name);
    let cfg = demo_configs(&root);
    let model = format!("model.path={:?}", tiny_dir().to_str().unwrap());
    mo_align::recipes::train_rm::run(
        Some(&cfg.join("train-rm.toml")),
        &[model, "model.adapter=\"\"".into(), "train.epochs=2".into()],
        flags(false, true),
    )
    .unwrap();
    root
}

fn prompts() -> Vec<Vec<Message>> {
    read_prompts("data/ultrafeedback_binarized/test_prefs.jsonl", Some(6)).unwrap()
}

#[test]
fn identical_answers_tie_and_win_half() {
    let root = scratch_with_trained_rm("rm-for-judge");
    let judge = Judge::load(
        root.join("rm").to_str().unwrap(),
        &[],
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let a = load_for_eval(
        tiny_dir().to_str().unwrap(),
        None,
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let b = load_for_eval(
        tiny_dir().to_str().unwrap(),
        None,
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let sampling = SamplingConfig {
        max_new_tokens: 10,
        temperature: 0.8,
        top_p: 0.9,
        seed: 5,
        ..SamplingConfig::default()
    };
    let records =
        read_prompt_records("data/ultrafeedback_binarized/test_prefs.jsonl", Some(6)).unwrap();
    let (report, gens) = win_rate_eval(&a, None, &b, &judge, &records, &sampling, 4, 0.0).unwrap();
    assert_eq!(
        (
            report.overall.wins,
            report.overall.ties,
            report.overall.losses
        ),
        (0, 6, 0)
    );
    assert_eq!(report.overall.win_rate, 0.5);
    assert_eq!(report.overall.mean_reward_diff, 0.0);
    assert!(gens
        .iter()
        .all(|g| g.model_answer == g.baseline_answer && g.decoding == sampling));
    for (_, v) in report.per_objective {
        assert_eq!(v["ties"], 6);
    }
}

#[test]
fn batched_chat_generation_equals_one_by_one() {
    let m = load_for_eval(
        tiny_dir().to_str().unwrap(),
        None,
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let ps = prompts();
    for sampling in [
        SamplingConfig {
            max_new_tokens: 16,
            ..SamplingConfig::default()
        },
        SamplingConfig {
            max_new_tokens: 16,
            temperature: 0.9,
            top_k: 50,
            top_p: 0.95,
            repetition_penalty: 1.1,
            seed: 9,
        },
    ] {
        let batched = answer_prompts(&m, &ps, &sampling, 4).unwrap();
        for (i, p) in ps.iter().enumerate() {
            // One-by-one with the same per-prompt random stream (its index in the file).
            let tok = &m.tokenizer;
            let ids = tok.encode_prompt(p).unwrap();
            let out = mo_align::generate::generate(
                &m.model,
                &[ids],
                &[i as u64],
                &sampling,
                &tok.stop_ids(),
                tok.pad_id,
                ForwardCtx::EVAL,
            )
            .unwrap();
            let end = out[0]
                .iter()
                .position(|t| tok.stop_ids().contains(t))
                .unwrap_or(out[0].len());
            assert_eq!(
                batched[i],
                tok.decode(&out[0][..end], true).unwrap(),
                "prompt {i}, {sampling:?}"
            );
        }
    }
}

/// A directory's files and their bytes, to show a command left it untouched.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// `merge --out` never deletes or overwrites what it reads, nor a foreign directory unless
/// --force; with --force a foreign directory is replaced by a complete export.
#[test]
fn merge_refuses_outputs_that_would_destroy_data() {
    let root = scratch("merge-guard");
    let model = root.join("model");
    let adapter = root.join("sft-run");
    for (from, to) in [
        (tiny_dir().to_path_buf(), &model),
        (golden_dir().join("adapter"), &adapter),
    ] {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(&from).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
            }
        }
    }
    std::fs::write(adapter.join("metrics.jsonl"), "{\"step\": 1}\n").unwrap();
    let before = (snapshot(&model), snapshot(&adapter));
    let merge = |out: &Path, force: bool| {
        mo_align::recipes::merge::run(model.to_str().unwrap(), &adapter, out, "f32", force, None)
    };
    for (out, why) in [
        (adapter.clone(), "is the adapter"),
        (model.clone(), "is the model"),
        (model.join("merged"), "lies inside the model"),
        (root.clone(), "contains the adapter"),
    ] {
        for force in [false, true] {
            let e = merge(&out, force).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("--out"), "{e}");
        }
    }
    assert!(
        before == (snapshot(&model), snapshot(&adapter)),
        "an input was modified"
    );
    let foreign = root.join("notes");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("keep.txt"), "mine").unwrap();
    let e = merge(&foreign, false).unwrap_err().to_string();
    assert!(e.contains("not empty") && e.contains("--force"), "{e}");
    assert_eq!(
        std::fs::read_to_string(foreign.join("keep.txt")).unwrap(),
        "mine"
    );
    merge(&foreign, true).unwrap();
    assert!(foreign.join("model.safetensors").is_file() && !foreign.join("keep.txt").exists());
    // An empty directory is fine without --force; no temporary directory is left behind.
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    merge(&empty, false).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn merged_export_reloads_and_matches_base_plus_adapter() {
    let out = scratch("merged").join("model");
    let adapter = golden_dir().join("adapter");
    mo_align::recipes::merge::run(
        tiny_dir().to_str().unwrap(),
        &adapter,
        &out,
        "f32",
        false,
        None,
    )
    .unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing from the merged export");
    }
    let with_adapter = load_for_eval(
        tiny_dir().to_str().unwrap(),
        None,
        Some(&adapter),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let merged =
        load_for_eval(out.to_str().unwrap(), None, None, DType::F32, &Device::Cpu).unwrap();
    assert!(!merged.model.has_lora());
    let ids = with_adapter
        .tokenizer
        .encode("The capital of France is Paris. Water boils at 100 degrees.")
        .unwrap();
    let seqs = vec![(
        ids.clone(),
        (0..ids.len()).map(|i| i > 0).collect::<Vec<_>>(),
    )];
    let a = mo_align::eval::sequence_nll(&with_adapter.model, &seqs, ForwardCtx::EVAL).unwrap();
    let b = mo_align::eval::sequence_nll(&merged.model, &seqs, ForwardCtx::EVAL).unwrap();
    assert!(
        (a.nll - b.nll).abs() / a.tokens as f64 <= 1e-5,
        "{} vs {}",
        a.nll,
        b.nll
    );
    // The config keeps the tied embeddings: no lm_head tensor is written.
    let t = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(!t.contains_key("lm_head.weight"));
}

/// The tiny checkpoint as an HF Qwen2ForSequenceClassification with score head `score` [1, H].
fn classifier_checkpoint(name: &str, score: &Tensor) -> PathBuf {
    classifier_checkpoint_on(Tiny::Qwen2, name, score)
}

/// An external reward model scores what transformers' `apply_chat_template(conversation,
/// tokenize=True)` renders (ending `<|im_end|>\n`): the same token ids and the same scores as
/// transformers' Qwen2ForSequenceClassification and Qwen3ForSequenceClassification, each with
/// its own chat template (golden files from benches/peer/golden_judge.py).
#[test]
fn sequence_classifier_judge_matches_transformers() {
    for tiny in Tiny::BOTH {
        sequence_classifier_judge_matches(tiny);
    }
}

fn sequence_classifier_judge_matches(tiny: Tiny) {
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny.judge_golden()).unwrap()).unwrap();
    let score: Vec<f32> = json_f64s(&g["score_weight"])
        .iter()
        .map(|x| *x as f32)
        .collect();
    let n = score.len();
    let dir = classifier_checkpoint_on(
        tiny,
        "seqcls-golden",
        &Tensor::from_vec(score, (1, n), &Device::Cpu).unwrap(),
    );
    let judge = Judge::load(dir.to_str().unwrap(), &[], DType::F32, &Device::Cpu).unwrap();
    let items: Vec<(Vec<Message>, String)> = g["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|conv| {
            let msgs: Vec<Message> = serde_json::from_value(conv.clone()).unwrap();
            let (reply, prompt) = msgs.split_last().unwrap();
            (prompt.to_vec(), reply.content.clone())
        })
        .collect();
    for (i, (prompt, reply)) in items.iter().enumerate() {
        let ids = judge
            .tokenizer()
            .unwrap()
            .encode_conversation(prompt, reply)
            .unwrap();
        assert_eq!(
            ids,
            json_u32s(&g["ids"][i]),
            "{tiny:?} conversation {i}: token ids differ"
        );
    }
    let got = judge.score(&items, 2).unwrap();
    for (i, v) in got.iter().enumerate() {
        let want = g["scores"][i].as_f64().unwrap();
        assert!(
            (v.total - want).abs() < 1e-4,
            "{tiny:?} conversation {i}: {} vs transformers {want}",
            v.total
        );
    }
}

#[test]
fn hf_sequence_classifier_judge_scores_the_last_token() {
    let score = Tensor::randn(0f32, 1.0, (1, 64), &Device::Cpu).unwrap();
    let dir = classifier_checkpoint("seqcls", &score);

    let judge = Judge::load(dir.to_str().unwrap(), &[], DType::F32, &Device::Cpu).unwrap();
    let items = vec![(vec![Message::new("user", "Hi")], "Hello there!".to_string())];
    let v = judge.score(&items, 2).unwrap();
    // By hand: the final hidden state at the last token of the ChatML sequence, times w.
    let base = load_for_eval(
        tiny_dir().to_str().unwrap(),
        None,
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    // What apply_chat_template(tokenize=True) gives: the whole conversation, ending with
    // <|im_end|> and the template's newline.
    let text = format!(
        "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there!<|im_end|>\n",
        mo_align::tokenizer::DEFAULT_SYSTEM_PROMPT
    );
    let ids = base.tokenizer.encode(&text).unwrap();
    assert_eq!(
        *ids.last().unwrap(),
        base.tokenizer.encode("\n").unwrap()[0]
    );
    let f = mo_align::reward::features::last_token_features(
        &base.model,
        &[&ids],
        1,
        ForwardCtx::EVAL,
        &|_| {},
    )
    .unwrap();
    let want = f
        .matmul(&score.t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0] as f64;
    assert!((v[0].total - want).abs() < 1e-5, "{} vs {want}", v[0].total);
}

#[test]
fn eval_cli_combines_modes_in_one_run() {
    let root = scratch_with_trained_rm("eval-cli");
    let score_in = root.join("score.jsonl");
    std::fs::write(&score_in, "{\"prompt\": \"Hi\", \"response\": \"Hello!\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"2+2?\"}, {\"role\": \"assistant\", \"content\": \"4\"}]}\n").unwrap();
    let (score_out, report, gens) = (
        root.join("scored.jsonl"),
        root.join("report.json"),
        root.join("gens.jsonl"),
    );
    let out = Command::new(bin())
        .args([
            "eval",
            "--device",
            "cpu",
            "--model",
            tiny_dir().to_str().unwrap(),
            "--adapter",
        ])
        .arg(golden_dir().join("adapter"))
        .args([
            "--sft-data",
            "data/smoltalk/test.jsonl",
            "--preferences",
            "data/ultrafeedback_binarized/test_prefs.jsonl",
        ])
        .arg("--reward-model")
        .arg(root.join("rm"))
        .arg("--score")
        .arg(&score_in)
        .arg("--output")
        .arg(&score_out)
        .args([
            "--win-rate",
            "--prompts",
            "data/ultrafeedback_binarized/test_prefs.jsonl",
            "--max-prompts",
            "4",
            "--max-new-tokens",
            "8",
        ])
        .args([
            "--baseline",
            tiny_dir().to_str().unwrap(),
            "--judge",
            root.join("rm").to_str().unwrap(),
        ])
        .arg("--generations-out")
        .arg(&gens)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    for k in ["chat NLL", "preferences", "win rate"] {
        assert!(table.contains(k), "table lacks {k}: {table}");
    }
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(r["sft_data"]["nll_per_token"].as_f64().unwrap() > 0.0);
    assert_eq!(r["preferences"]["pairs"], 80);
    assert!(r["preferences"]["reward_model"]["honesty"]["accuracy"]
        .as_f64()
        .is_some());
    assert_eq!(r["win_rate"]["overall"]["n"], 4);
    assert_eq!(r["scored"], 2);
    let scored: Vec<serde_json::Value> = std::fs::read_to_string(&score_out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(scored.len(), 2);
    assert!(
        scored[1]["scores"]["helpfulness"].as_f64().is_some() && scored[1]["messages"].is_array()
    );
    assert_eq!(std::fs::read_to_string(&gens).unwrap().lines().count(), 4);
    assert!(
        root.join("report_objectives.svg").is_file(),
        "the eval bar chart is drawn next to the report"
    );
}

/// `--judge rules:FILE` scores from each prompt record's fields; a prompt file without the
/// fields the rules read is named with its line.
#[test]
fn rule_judge_scores_from_the_prompt_records() {
    let root = scratch("rules-judge");
    // Each run writes its own report: eval refuses to overwrite one it did not write.
    let run = |prompts: &Path, report: &str| {
        Command::new(bin())
            .args(["eval", "--device", "cpu", "--model"])
            .arg(tiny_dir())
            .args(["--win-rate", "--prompts"])
            .arg(prompts)
            .args(["--max-prompts", "4", "--max-new-tokens", "6", "--baseline"])
            .arg(tiny_dir())
            .args(["--judge", "rules:configs/demo/rules.toml", "--report"])
            .arg(root.join(report))
            .output()
            .unwrap()
    };
    let out = run(
        Path::new("data/ultrafeedback_binarized/test_prefs.jsonl"),
        "report.json",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        r["win_rate"]["objectives"],
        serde_json::json!([
            "helpfulness",
            "honesty",
            "instruction_following",
            "truthfulness"
        ])
    );
    // The same model answers both sides: every prompt ties.
    assert_eq!(r["win_rate"]["overall"]["ties"], 4);
    let bare = root.join("bare.jsonl");
    std::fs::write(&bare, "{\"prompt\": \"What color is coal?\"}\n").unwrap();
    let out = run(&bare, "bare-report.json");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bare.jsonl line 1") && err.contains("max_words") && err.lines().count() == 1,
        "{err}"
    );
}

/// A prompt the model cannot answer within its context is skipped with a warning naming its
/// record; the other prompts are judged, and the report counts the skipped one.
#[test]
fn a_prompt_beyond_the_context_is_skipped_and_named() {
    let root = scratch("long-prompt");
    let prompts = root.join("prompts.jsonl");
    let long = "word ".repeat(6000);
    std::fs::write(
        &prompts,
        [
            serde_json::json!({"prompt": "Say hi."}),
            serde_json::json!({"prompt": long}),
            serde_json::json!({"prompt": "Say bye."}),
        ]
        .iter()
        .map(|v| format!("{v}\n"))
        .collect::<String>(),
    )
    .unwrap();
    let rules = root.join("rules.toml");
    std::fs::write(
        &rules,
        "[[objective]]\nname = \"has_e\"\nbase = 0.0\nmin = 0.0\nmax = 1.0\n[[objective.rule]]\nwhen = \"regex\"\npattern = \"e\"\nscore = 1.0\n",
    )
    .unwrap();
    let report = root.join("report.json");
    let out = Command::new(bin())
        .args(["eval", "--device", "cpu", "--model"])
        .arg(tiny_dir())
        .args(["--win-rate", "--prompts"])
        .arg(&prompts)
        .args(["--max-new-tokens", "4", "--baseline"])
        .arg(tiny_dir())
        .arg("--judge")
        .arg(format!("rules:{}", rules.display()))
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("prompts.jsonl line 2: the prompt is") && err.contains("skipped"),
        "{err}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["prompts_skipped_too_long"], 1);
    assert_eq!(r["win_rate"]["overall"]["n"], 2);
}

/// A batch whose long prompt reaches the end of the context while a short one is still
/// answering: the long answer stops at the last position and the short one goes on (the
/// finished row's padding used to walk past the context and fail the whole batch).
#[test]
fn an_answer_stops_at_the_end_of_the_context_without_failing_the_batch() {
    let loaded = load_tiny(DType::F32);
    let context = loaded.model.config.max_position_embeddings;
    let short = vec![5u32, 6, 7];
    let long: Vec<u32> = (0..context - 8).map(|i| 10 + (i % 50) as u32).collect();
    let cfg = SamplingConfig {
        max_new_tokens: 20,
        temperature: 0.0,
        ..SamplingConfig::default()
    };
    let out = mo_align::generate::generate(
        &loaded.model,
        &[short, long],
        &[0, 1],
        &cfg,
        &[],
        loaded.tokenizer.pad_id,
        ForwardCtx::EVAL,
    )
    .unwrap();
    assert_eq!(out[0].len(), 20, "the short prompt answers in full");
    assert_eq!(out[1].len(), 8, "the long one fills the context and stops");
}
