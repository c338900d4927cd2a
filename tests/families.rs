//! Every stage on a tiny Qwen3 base (head_dim twice hidden / heads, q/k norms, no q/k/v biases,
//! Qwen3's chat template): the same recipes, files and commands as on Qwen2. The numbers of the
//! Qwen3 decoder are checked against transformers in tests/model.rs; here, that each stage runs,
//! moves its adapter the way its objective says, and writes files the next stage reads.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn cli(args: &[&str]) -> Output {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "mo-align {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap()
}

fn losses(dir: &Path) -> Vec<f64> {
    metrics(dir)
        .iter()
        .filter_map(|l| l["loss"].as_f64())
        .collect()
}

#[test]
fn every_stage_runs_on_a_tiny_qwen3() {
    let base = Tiny::Qwen3.dir().to_str().unwrap();
    let root = scratch("qwen3-stages");
    let p = |s: &str| root.join(s).to_str().unwrap().to_string();
    let model = format!("model.path={base:?}");
    let cache = format!("train.cache_dir={:?}", p("cache"));

    // SFT with LoRA: the loss falls.
    sft_lora_30_steps(Tiny::Qwen3.dir(), &root.join("sft"));
    let adapter_cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("sft/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(adapter_cfg["peft_type"], "LORA");

    // The reward model on the SFT backbone: its MSE falls.
    let adapter = format!("model.adapter={:?}", p("sft"));
    mo_align::recipes::train_rm::run(
        Some(Path::new("configs/demo/train-rm.toml")),
        &[
            model.clone(),
            adapter.clone(),
            format!("train.output_dir={:?}", p("rm")),
            cache.clone(),
        ],
        flags(false, true),
    )
    .unwrap();
    let rm = losses(&root.join("rm"));
    assert!(
        rm.last().unwrap() < &(rm[0] * 0.8),
        "Qwen3 reward head MSE did not fall: {rm:?}"
    );

    // Preference stages: DPO's loss falls below ln 2 (its value at step 0); hybrid DPO with the
    // reward model, and reward-weighted likelihood with the rules, move their adapters.
    let stage = |out: &str, extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            model.clone(),
            adapter.clone(),
            format!("train.output_dir={:?}", p(out)),
            cache.clone(),
            "train.max_steps=10".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    mo_align::recipes::dpo::run_dpo(
        Some(Path::new("configs/demo/dpo.toml")),
        &stage("dpo", &[]),
        flags(false, true),
    )
    .unwrap();
    let dpo = losses(&root.join("dpo"));
    assert!(dpo.last().unwrap() < &0.69, "Qwen3 DPO loss {dpo:?}");
    let rm_path = format!("hybrid.reward_model={:?}", p("rm"));
    mo_align::recipes::dpo::run_hybrid(
        Some(Path::new("configs/demo/hybrid-dpo.toml")),
        &stage("hybrid", &[&rm_path]),
        flags(false, true),
    )
    .unwrap();
    mo_align::recipes::reward_weighted::run(
        Some(Path::new("configs/demo/reward-weighted.toml")),
        &stage(
            "rw",
            &[
                "reward.reward_model=\"\"",
                "reward.rules=\"configs/demo/rules.toml\"",
            ],
        ),
        flags(false, true),
    )
    .unwrap();
    // Online GRPO on a reward the tiny model sometimes earns (an "e" in the completion), so
    // groups differ and the advantage is not zero.
    let toy = root.join("toy.toml");
    std::fs::write(
        &toy,
        "[[objective]]\nname = \"has_e\"\nbase = 0.0\nmin = 0.0\nmax = 1.0\n[[objective.rule]]\nwhen = \"regex\"\npattern = \"e\"\nscore = 1.0\n",
    )
    .unwrap();
    mo_align::recipes::grpo::run(
        Some(Path::new("configs/demo/grpo.toml")),
        &[
            model.clone(),
            adapter.clone(),
            format!("train.output_dir={:?}", p("grpo")),
            format!("grpo.rules={:?}", toy.to_str().unwrap()),
            "data.max_samples=8".into(),
            "grpo.num_generations=4".into(),
            "grpo.max_new_tokens=8".into(),
            "train.max_steps=2".into(),
        ],
        flags(false, true),
    )
    .unwrap();
    for s in ["dpo", "hybrid", "rw", "grpo"] {
        assert!(
            lora_b_norm(&root.join(s)) > 0.0,
            "Qwen3 {s}: the adapter did not move"
        );
        assert!(losses(&root.join(s)).iter().all(|l| l.is_finite()), "{s}");
    }

    // A soup of two preference adapters on the Pareto report, judged by the rules.
    let pareto_cfg = root.join("pareto.toml");
    std::fs::write(
        &pareto_cfg,
        format!(
            r#"
[pareto]
output_dir = {out:?}
model = {base:?}
prompts = "data/ultrafeedback_binarized/test_prefs.jsonl"
max_prompts = 3
judge = "rules:configs/demo/rules.toml"
objectives = ["helpfulness", "honesty"]
grid = 1
gen_batch_size = 3
device = "cpu"
[sampling]
max_new_tokens = 6
temperature = 0.0
[[policy]]
name = "soup"
soup = [{dpo:?}, {rw:?}]
"#,
            out = p("pareto"),
            dpo = p("dpo"),
            rw = p("rw"),
        ),
    )
    .unwrap();
    mo_align::recipes::pareto::run(Some(&pareto_cfg), &[], true, false).unwrap();
    let front: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("pareto/pareto.json")).unwrap())
            .unwrap();
    assert_eq!(
        front["policies"][0]["weightings"].as_array().unwrap().len(),
        2,
        "grid 1 over two objectives: the two vertices"
    );
    // The same config again rewrites its own report; another config needs --force to
    // replace it, and a refused run leaves the report as it was.
    mo_align::recipes::pareto::run(Some(&pareto_cfg), &[], true, false).unwrap();
    let before = std::fs::read(root.join("pareto/pareto.json")).unwrap();
    let e =
        mo_align::recipes::pareto::run(Some(&pareto_cfg), &["pareto.grid=2".into()], true, false)
            .unwrap_err()
            .to_string();
    assert!(
        e.contains("pareto.grid: 1 -> 2") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(root.join("pareto/pareto.json")).unwrap(),
        before
    );

    // Merge: a Qwen3 checkpoint whose NLL equals base + adapter's.
    cli(&[
        "merge",
        "--model",
        base,
        "--adapter",
        &p("sft"),
        "--out",
        &p("merged"),
    ]);
    let merged_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("merged/config.json")).unwrap())
            .unwrap();
    assert_eq!(merged_cfg["architectures"][0], "Qwen3ForCausalLM");
    let text = root.join("text.txt");
    std::fs::write(
        &text,
        "The capital of France is Paris. Water boils at 100 degrees.",
    )
    .unwrap();
    let nll = |model: &str, adapter: Option<&str>| -> f64 {
        let mut args = vec!["eval", "--device", "cpu", "--json", "--model", model];
        if let Some(a) = adapter {
            args.extend(["--adapter", a]);
        }
        args.extend(["--perplexity", text.to_str().unwrap()]);
        json_of(&cli(&args))["nll_per_token"].as_f64().unwrap()
    };
    let (with_adapter, merged) = (nll(base, Some(&p("sft"))), nll(&p("merged"), None));
    assert!(
        (with_adapter - merged).abs() < 1e-4,
        "merged {merged} vs adapter {with_adapter}"
    );
    assert!((with_adapter - nll(base, None)).abs() > 1e-3);

    // `generate --chat` answers after Qwen3's empty thinking block: its greedy tokens are those
    // of the library's greedy decoding from that prompt, and not those from Qwen2.5's.
    let g = json_of(&cli(&[
        "generate",
        "--model",
        base,
        "--adapter",
        &p("sft"),
        "--chat",
        "--prompt",
        "Name a colour.",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        "--device",
        "cpu",
        "--json",
    ]));
    let got = json_u32s(&g["token_ids"]);
    let loaded = mo_align::model::loader::load_pretrained(
        base,
        Some(&root.join("sft")),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let tok = &loaded.tokenizer;
    let user = [mo_align::tokenizer::Message::new("user", "Name a colour.")];
    let prompt = tok.encode_prompt(&user).unwrap();
    assert!(tok
        .decode(&prompt, false)
        .unwrap()
        .ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    let greedy = |prompt: Vec<u32>| {
        let sampling = mo_align::generate::SamplingConfig {
            max_new_tokens: 8,
            temperature: 0.0,
            ..Default::default()
        };
        mo_align::generate::generate(
            &loaded.model,
            &[prompt],
            &[0],
            &sampling,
            &tok.stop_ids(),
            tok.pad_id,
            mo_align::model::ForwardCtx::EVAL,
        )
        .unwrap()
        .remove(0)
    };
    assert_eq!(got, greedy(prompt.clone()));
    let qwen25_style = tok
        .encode(&format!(
            "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
            mo_align::tokenizer::DEFAULT_SYSTEM_PROMPT
        ))
        .unwrap();
    assert_ne!(prompt, qwen25_style);

    // A win rate judged by a Qwen3ForSequenceClassification reward model.
    let score = Tensor::randn(0f32, 1.0, (1, 64), &Device::Cpu).unwrap();
    let judge = classifier_checkpoint_on(Tiny::Qwen3, "qwen3-judge", &score);
    let report = root.join("win.json");
    cli(&[
        "eval",
        "--device",
        "cpu",
        "--model",
        base,
        "--adapter",
        &p("dpo"),
        "--win-rate",
        "--prompts",
        "data/ultrafeedback_binarized/test_prefs.jsonl",
        "--max-prompts",
        "4",
        "--baseline",
        base,
        "--judge",
        judge.to_str().unwrap(),
        "--max-new-tokens",
        "6",
        "--report",
        report.to_str().unwrap(),
    ]);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["win_rate"]["overall"]["n"], 4, "{r}");
    assert!(r["win_rate"]["overall"]["win_rate"].is_number(), "{r}");
}

/// Switching `model.tiny.arch` (the demo's one key for a Qwen3 base) never reuses a tiny
/// checkpoint written for the other family.
#[test]
fn a_tiny_base_of_the_other_family_is_refused_not_reused() {
    use mo_align::model::tiny::{check_made_for, TinySpec};
    check_made_for(Tiny::Qwen2.dir(), &TinySpec::default()).unwrap();
    check_made_for(Tiny::Qwen3.dir(), &TinySpec::qwen3()).unwrap();
    let e = check_made_for(Tiny::Qwen2.dir(), &TinySpec::qwen3())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Qwen2ForCausalLM") && e.contains("Qwen3ForCausalLM"),
        "{e}"
    );
    let e = check_made_for(
        Tiny::Qwen3.dir(),
        &TinySpec {
            arch: mo_align::model::config::Family::Qwen3,
            ..TinySpec::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("another shape"), "{e}");
}
