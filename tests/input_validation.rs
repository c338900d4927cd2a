//! What a user's inputs meet, each checked through the command line or the recipes: values
//! that would train the wrong way refused at config load, reward models scored only with their
//! own backbone, decoding options validated and the model's generation defaults honoured,
//! whole-context perplexity, TRL's preference metrics, byte-order marks, empty files, one-line
//! errors, and external judges scoring what their template renders.

mod common;

use candle_core::{DType, Device};
use common::*;
use mo_align::model::ctx::ForwardCtx;
use mo_align::model::input::ModelInput;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code 2 and the error as exactly one line (after any warnings) containing every
/// `needle`.
fn refused(o: &Output, needles: &[&str]) {
    let all = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{all}");
    let err: String = all
        .lines()
        .skip_while(|l| l.starts_with("warning:"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {all}");
    assert!(err.starts_with("error: "), "{all}");
    assert!(
        !err.contains("candle_core::error"),
        "a backtrace in the message: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
}

fn tiny() -> &'static str {
    tiny_dir().to_str().unwrap()
}

#[test]
fn values_that_train_the_wrong_way_are_refused_at_config_load() {
    let out = scratch("bad-values");
    let cache = out.join("cache");
    let model = format!("model.path={:?}", tiny());
    let common = |extra: &str| {
        vec![
            "--set".to_string(),
            model.clone(),
            "--set".to_string(),
            format!("train.output_dir={:?}", out.join("run").to_str().unwrap()),
            "--set".to_string(),
            format!("train.cache_dir={:?}", cache.to_str().unwrap()),
            "--set".to_string(),
            extra.to_string(),
        ]
    };
    for (stage, config, set, needles) in [
        ("dpo", "dpo", "dpo.beta=-0.1", vec!["dpo.beta", "> 0"]),
        ("dpo", "dpo", "dpo.beta=0", vec!["dpo.beta"]),
        ("dpo", "dpo", "dpo.beta=nan", vec!["dpo.beta"]),
        (
            "dpo",
            "dpo",
            "dpo.label_smoothing=0.6",
            vec!["label_smoothing", "[0, 0.5)"],
        ),
        (
            "dpo",
            "dpo",
            "train.max_grad_norm=-1",
            vec!["max_grad_norm", ">= 0"],
        ),
        (
            "hybrid-dpo",
            "hybrid-dpo",
            "hybrid.lambda=nan",
            vec!["hybrid.lambda"],
        ),
        (
            "hybrid-dpo",
            "hybrid-dpo",
            "hybrid.weights=[0.5, nan, 0.25, 0.25]",
            vec!["hybrid.weights", "finite"],
        ),
        (
            "hybrid-dpo",
            "hybrid-dpo",
            "hybrid.weights=[1.0, -0.5, 0.25, 0.25]",
            vec!["hybrid.weights", ">= 0"],
        ),
        (
            "reward-weighted",
            "reward-weighted",
            "reward.weights=[0.0, 0.0, 0.0, 0.0]",
            vec!["all zero"],
        ),
        (
            "hybrid-dpo",
            "hybrid-dpo",
            "hybrid.preference_weight=0",
            vec!["preference_weight"],
        ),
        (
            "reward-weighted",
            "reward-weighted",
            "reward.weights=[1.0, nan]",
            vec!["reward.weights"],
        ),
        (
            "hybrid-dpo",
            "hybrid-dpo",
            "hybrid.weights=[0.0, 0.0, 0.0, 0.0]",
            vec!["hybrid.weights", "all zero"],
        ),
        ("dpo", "dpo", "train.max_steps=0", vec!["train.max_steps"]),
        ("dpo", "dpo", "lora.alpha=0", vec!["lora.alpha", "> 0"]),
        ("dpo", "dpo", "lora.alpha=nan", vec!["lora.alpha"]),
        (
            "grpo",
            "grpo",
            "grpo.num_generations=1",
            vec!["num_generations"],
        ),
        (
            "grpo",
            "grpo",
            "grpo.num_generations=1000000000",
            vec!["num_generations", "at most"],
        ),
        ("dpo", "dpo", "train.threads=100000", vec!["train.threads"]),
        ("dpo", "dpo", "lora.r=4294967296", vec!["lora.r", "at most"]),
        (
            "dpo",
            "dpo",
            "train.batch_size=99999999999999999999",
            vec!["out of range"],
        ),
    ] {
        let mut args = vec![
            stage.to_string(),
            "--quiet".into(),
            "--config".into(),
            format!("configs/demo/{config}.toml"),
        ];
        args.extend(common(set));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&run(&refs), &needles);
        // Refused before any frozen work was computed or cached.
        assert!(
            !cache.exists(),
            "{set}: the cache was written before the refusal"
        );
    }
}

#[test]
fn a_run_whose_every_step_was_skipped_does_not_end_as_done() {
    let out = scratch("all-skipped");
    // An f16 loss scale this large overflows every gradient: every step is skipped.
    let o = run(&[
        "sft",
        "--quiet",
        "--config",
        "configs/demo/sft-lora.toml",
        "--set",
        &format!("model.path={:?}", tiny()),
        "--set",
        &format!("train.output_dir={:?}", out.to_str().unwrap()),
        "--set",
        "train.dtype=f16",
        "--set",
        "train.loss_scale_init=1e30",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.max_bad_steps=10",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("all 3 steps were skipped"), "{err}");
    assert!(!err.contains("sft done"), "{err}");
    assert!(!out.join("adapter_model.safetensors").exists());
}

/// One (prompt, response) record for `eval --score`, in `<root>/answers.jsonl`.
fn answers_to_score(root: &Path) -> PathBuf {
    let input = root.join("answers.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"What color is coal?\", \"response\": \"Coal is black.\"}\n",
    )
    .unwrap();
    input
}

/// A reward model trained on the tiny base (no adapter), in `<root>/rm`.
fn trained_rm(root: &Path) -> PathBuf {
    let rm = root.join("rm");
    mo_align::recipes::train_rm::run(
        Some(Path::new("configs/demo/train-rm.toml")),
        &[
            format!("model.path={:?}", tiny()),
            "model.adapter=\"\"".into(),
            format!("train.output_dir={:?}", rm.to_str().unwrap()),
            format!("train.cache_dir={:?}", root.join("cache").to_str().unwrap()),
            "train.epochs=1".into(),
        ],
        flags(false, true),
    )
    .unwrap();
    rm
}

#[test]
fn reward_scores_come_from_the_reward_models_own_backbone() {
    let root = scratch("rm-backbone");
    let rm = trained_rm(&root);
    let input = answers_to_score(&root);
    let score = |extra: &[&str]| {
        let out = root.join(format!("scored-{}.jsonl", extra.len()));
        let mut args = vec![
            "eval",
            "--device",
            "cpu",
            "--score",
            input.to_str().unwrap(),
            "--reward-model",
            rm.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = run(&args);
        (o, out)
    };
    // No --model: the head's recorded backbone.
    let (o, own) = score(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The same backbone named explicitly gives the same scores.
    let (o, named) = score(&["--model", tiny()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&own).unwrap(), std::fs::read(&named).unwrap());
    // Another backbone (the tiny model with an adapter merged) is refused, not scored.
    let adapter = golden_dir().join("adapter");
    let (o, _) = score(&[
        "--model",
        tiny(),
        "--base-adapter",
        adapter.to_str().unwrap(),
    ]);
    refused(&o, &["different model", "fingerprint"]);
}

fn generate_json(model: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "generate",
        "--device",
        "cpu",
        "--model",
        model,
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "4",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn decoding_options_are_validated_and_default_to_the_models_generation_config() {
    for (arg, needle) in [
        ("--temperature=nan", "--temperature"),
        ("--temperature=-1", "--temperature"),
        ("--top-p=1.5", "--top-p"),
        ("--top-p=0", "--top-p"),
        ("--repetition-penalty=0", "--repetition-penalty"),
        ("--repetition-penalty=nan", "--repetition-penalty"),
    ] {
        let o = run(&[
            "generate",
            "--device",
            "cpu",
            "--model",
            tiny(),
            "--prompt",
            "Hi",
            arg,
        ]);
        refused(&o, &[needle]);
    }
    // A checkpoint that ships Qwen2.5-Instruct's decoding defaults.
    let dir = scratch("gen-config");
    for f in std::fs::read_dir(tiny_dir()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let gc = serde_json::json!({"do_sample": true, "temperature": 0.7, "top_p": 0.8,
        "top_k": 20, "repetition_penalty": 1.1});
    std::fs::write(dir.join("generation_config.json"), gc.to_string()).unwrap();
    let model = dir.to_str().unwrap();
    let s = &generate_json(model, &[])["sampling"];
    assert_eq!(
        (
            s["temperature"].as_f64(),
            s["top_p"].as_f64(),
            s["top_k"].as_u64()
        ),
        (Some(0.7), Some(0.8), Some(20))
    );
    assert_eq!(s["repetition_penalty"].as_f64(), Some(1.1));
    // A flag overrides one setting; greedy keeps the model's repetition penalty, as
    // transformers' generate(do_sample=False) does.
    let s = &generate_json(model, &["--temperature", "0"])["sampling"];
    assert_eq!(s["temperature"].as_f64(), Some(0.0));
    assert_eq!(s["repetition_penalty"].as_f64(), Some(1.1));
    let s = &generate_json(model, &["--repetition-penalty", "1.0"])["sampling"];
    assert_eq!(s["repetition_penalty"].as_f64(), Some(1.0));
    // The tiny checkpoint says do_sample false: greedy.
    let s = &generate_json(tiny(), &[])["sampling"];
    assert_eq!(s["temperature"].as_f64(), Some(0.0));
}

#[test]
fn perplexity_uses_the_whole_context_by_default() {
    let dir = scratch("ppl");
    // A text longer than the old 2048-token default window, shorter than the context length.
    let loaded = load_tiny(DType::F32);
    let max = loaded.model.config.max_position_embeddings;
    let license = std::fs::read_to_string("LICENSE").unwrap();
    let mut text = license.clone();
    while loaded.tokenizer.encode(&text).unwrap().len() > 3000 {
        text.truncate(text.len() * 9 / 10);
        while !text.is_char_boundary(text.len()) {
            text.pop();
        }
    }
    let n = loaded.tokenizer.encode(&text).unwrap().len();
    assert!(n > 2048 && n <= max, "{n} tokens");
    let path = dir.join("long.txt");
    std::fs::write(&path, &text).unwrap();
    let nll = |extra: &[&str]| -> f64 {
        let mut args = vec![
            "eval",
            "--device",
            "cpu",
            "--model",
            tiny(),
            "--perplexity",
            path.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["nll_per_token"].as_f64().unwrap()
    };
    let whole = nll(&[]);
    assert_eq!(whole, nll(&["--context", &n.to_string()]));
    assert_ne!(whole, nll(&["--context", "2048"]));
}

/// Without a gradient, long sequences attend in blocks of query positions; the hidden states
/// equal the unblocked computation (taken with a gradient recorded).
#[test]
fn blocked_attention_equals_the_whole_computation() {
    let loaded = load_tiny(DType::F32);
    let m = &loaded.model;
    let ids: Vec<u32> = (0..1500u32).map(|i| (i * 7 + 3) % 1000).collect();
    let input = ModelInput::right_padded(std::slice::from_ref(&ids), 0, &Device::Cpu).unwrap();
    let blocked = m.forward(&input, ForwardCtx::EVAL, None).unwrap();
    // A fresh adapter (B = 0) changes nothing, but makes the forward record a graph.
    let mut lora = load_tiny(DType::F32).model;
    lora.attach_lora(&mo_align::model::LoraConfig::default(), 1)
        .unwrap();
    let whole = lora.forward(&input, train_ctx(), None).unwrap();
    let d = tensor_max_diff(&blocked, &whole.detach());
    assert!(d < 1e-4, "blocked attention differs by {d}");
}

#[test]
fn preference_eval_reports_trls_policy_logps() {
    let o = run(&[
        "eval",
        "--device",
        "cpu",
        "--model",
        tiny(),
        "--adapter",
        golden_dir().join("adapter").to_str().unwrap(),
        "--preferences",
        "data/ultrafeedback_binarized/test_prefs.jsonl",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let p = &v["preferences"];
    for k in ["logps/chosen", "logps/rejected"] {
        assert!(p[k].as_f64().is_some_and(|x| x < 0.0), "{k}: {p}");
    }
}

#[test]
fn a_byte_order_mark_is_accepted_and_an_empty_file_is_named() {
    let dir = scratch("bom");
    let line = std::fs::read_to_string("data/smoltalk/test.jsonl")
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let bom = dir.join("bom.jsonl");
    std::fs::write(&bom, format!("\u{feff}{line}\n")).unwrap();
    let cfg = |f: &Path| mo_align::data::DataConfig {
        train_files: vec![f.to_str().unwrap().to_string()],
        ..Default::default()
    };
    let tok = load_tiny(DType::F32).tokenizer;
    let (train, _, report, _) = load_sft_data(&cfg(&bom), &tok).unwrap();
    assert_eq!((train.len(), report.records), (1, 1));
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let e = load_sft_data(&cfg(&empty), &tok).unwrap_err().to_string();
    assert!(e.contains("empty.jsonl") && e.contains("no records"), "{e}");
}

#[test]
fn a_wrong_shape_adapter_is_one_line() {
    let dir = scratch("bad-adapter");
    let src = golden_dir().join("adapter");
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let cfg_path = dir.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["r"] = 8.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let text = dir.join("t.txt");
    std::fs::write(&text, "Hello there, how are you today?").unwrap();
    let o = run(&[
        "eval",
        "--device",
        "cpu",
        "--model",
        tiny(),
        "--adapter",
        dir.to_str().unwrap(),
        "--perplexity",
        text.to_str().unwrap(),
    ]);
    refused(&o, &["do not fit r=8"]);
}

#[test]
fn an_adapter_trained_on_another_base_is_named_in_a_warning() {
    let dir = scratch("other-base");
    let src = golden_dir().join("adapter");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    let text = dir.join("t.txt");
    std::fs::write(&text, "Hello there, how are you today?").unwrap();
    let mut warned = |base: &str| {
        cfg["base_model_name_or_path"] = base.into();
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
        let o = run(&[
            "eval",
            "--device",
            "cpu",
            "--model",
            tiny(),
            "--adapter",
            dir.to_str().unwrap(),
            "--perplexity",
            text.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o).contains("the adapter was trained on")
    };
    assert!(warned("Qwen/Qwen2.5-7B"));
    assert!(!warned(tiny()));
}

/// An adapter holding NaN (a diverged run), or whose config says alpha is NaN or 0, is refused
/// by every command that reads adapters, before anything is written.
#[test]
fn a_nan_adapter_is_refused_by_eval_and_merge() {
    let root = scratch("nan-adapter");
    let src = golden_dir().join("adapter");
    let text = root.join("t.txt");
    std::fs::write(&text, "Hello there, how are you today?").unwrap();
    let nan = root.join("nan");
    std::fs::create_dir_all(&nan).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        nan.join("adapter_config.json"),
    )
    .unwrap();
    let mut t = candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let key = t.keys().find(|k| k.contains("lora_B")).unwrap().clone();
    let w = &t[&key];
    let mut v = w
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    v[0] = f32::NAN;
    let poisoned = candle_core::Tensor::from_vec(v, w.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(w.dtype())
        .unwrap();
    t.insert(key, poisoned);
    candle_core::safetensors::save(&t, nan.join("adapter_model.safetensors")).unwrap();
    let eval = |adapter: &Path| {
        run(&[
            "eval",
            "--device",
            "cpu",
            "--model",
            tiny(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--perplexity",
            text.to_str().unwrap(),
        ])
    };
    refused(&eval(&nan), &["adapter_model.safetensors", "NaN"]);
    let out = root.join("merged");
    let o = run(&[
        "merge",
        "--model",
        tiny(),
        "--adapter",
        nan.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    refused(&o, &["adapter_model.safetensors", "NaN"]);
    assert!(!out.exists(), "a refused merge wrote its output");
    // alpha NaN or 0 in adapter_config.json.
    for alpha in ["NaN", "0"] {
        let dir = root.join(format!("alpha-{alpha}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            src.join("adapter_model.safetensors"),
            dir.join("adapter_model.safetensors"),
        )
        .unwrap();
        let c = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
        let mut c: serde_json::Value = serde_json::from_str(&c).unwrap();
        c["lora_alpha"] = serde_json::json!(0);
        let mut c = c.to_string();
        if alpha == "NaN" {
            // JSON has no NaN; Python's json writes it bare, and serde_json refuses to read it.
            c = c.replace("\"lora_alpha\":0", "\"lora_alpha\":NaN");
        }
        std::fs::write(dir.join("adapter_config.json"), c).unwrap();
        refused(&eval(&dir), &["adapter_config.json"]);
    }
}

/// A model's config.json with sizes or constants that cannot be right is refused with the
/// file and field, before anything is allocated for it (a huge size used to abort the process
/// in the allocator).
#[test]
fn an_absurd_model_config_is_refused_before_allocating() {
    let root = scratch("absurd-config");
    let text = root.join("t.txt");
    std::fs::write(&text, "Hello there.").unwrap();
    for (key, value, needle) in [
        (
            "max_position_embeddings",
            serde_json::json!(1_000_000_000_000u64),
            "max_position_embeddings",
        ),
        (
            "num_hidden_layers",
            serde_json::json!(1_000_000_000u64),
            "num_hidden_layers is 1000000000",
        ),
        ("rope_theta", serde_json::json!(-5.0), "rope_theta"),
        ("rms_norm_eps", serde_json::json!(-1e-6), "rms_norm_eps"),
        ("vocab_size", serde_json::json!(0), "vocab_size"),
    ] {
        let dir = root.join(key);
        std::fs::create_dir_all(&dir).unwrap();
        for f in std::fs::read_dir(tiny_dir()).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
        let c = dir.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&c).unwrap()).unwrap();
        v[key] = value;
        std::fs::write(&c, v.to_string()).unwrap();
        let o = run(&[
            "eval",
            "--device",
            "cpu",
            "--model",
            dir.to_str().unwrap(),
            "--perplexity",
            text.to_str().unwrap(),
        ]);
        refused(&o, &["config.json", needle]);
    }
}

/// eval flags that would measure nothing.
#[test]
fn eval_refuses_flags_that_measure_nothing() {
    let root = scratch("eval-flags");
    let report = root.join("r.json");
    for (args, needle) in [
        (
            vec![
                "--preferences",
                "data/ultrafeedback_binarized/test_prefs.jsonl",
                "--beta",
                "0",
            ],
            "--beta",
        ),
        (
            vec![
                "--win-rate",
                "--prompts",
                "data/ultrafeedback_binarized/test_prefs.jsonl",
                "--max-prompts",
                "0",
                "--baseline",
                tiny(),
                "--judge",
                "rules:configs/demo/rules.toml",
            ],
            "--max-prompts",
        ),
    ] {
        let mut all = vec!["eval", "--device", "cpu", "--model", tiny(), "--report"];
        all.push(report.to_str().unwrap());
        all.extend(args);
        refused(&run(&all), &[needle]);
        assert!(!report.exists());
    }
}

/// convert-data names the line of a bad record, reads a byte-order mark as training does,
/// refuses an empty input instead of writing an empty Parquet file, and writes nothing when
/// it refuses.
#[test]
fn convert_data_errors_name_the_line_and_write_nothing() {
    let root = scratch("convert-data");
    let convert = |name: &str, text: &[u8]| {
        let input = root.join(format!("{name}.jsonl"));
        std::fs::write(&input, text).unwrap();
        let output = root.join(format!("{name}.parquet"));
        let o = run(&[
            "convert-data",
            input.to_str().unwrap(),
            output.to_str().unwrap(),
        ]);
        (o, output)
    };
    let (o, out) = convert("bad2", b"{\"prompt\": \"a\"}\n{\"prompt\": broken\n");
    refused(&o, &["bad2.jsonl line 2", "invalid JSON"]);
    assert!(!out.exists());
    let (o, out) = convert("empty", b"");
    refused(&o, &["empty.jsonl", "no records"]);
    assert!(!out.exists());
    let (o, out) = convert(
        "bom",
        b"\xef\xbb\xbf{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = mo_align::data::source::read_records(&out).unwrap().len();
    assert_eq!(rows, 2);
}

/// A reward model whose backbone was recorded as a relative path (train-rm run from another
/// directory) is found through the absolute path recorded beside it; where neither exists,
/// the error names reward_model.json and the path.
#[test]
fn a_relative_backbone_path_resolves_from_any_directory() {
    let root = scratch("rm-relative");
    let rm = trained_rm(&root);
    let info_path = rm.join("reward_model.json");
    let mut info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&info_path).unwrap()).unwrap();
    assert!(info["backbone_model_abs"].is_string(), "{info}");
    // As train-rm writes it when run from `root` with model.path = "base".
    let base = root.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for f in std::fs::read_dir(tiny_dir()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, base.join(f.file_name().unwrap())).unwrap();
    }
    info["backbone_model"] = "base".into();
    info["backbone_model_abs"] = base.canonicalize().unwrap().to_str().unwrap().into();
    std::fs::write(&info_path, info.to_string()).unwrap();
    let input = answers_to_score(&root);
    let score = || {
        run(&[
            "eval",
            "--device",
            "cpu",
            "--score",
            input.to_str().unwrap(),
            "--reward-model",
            rm.to_str().unwrap(),
        ])
    };
    let o = score();
    assert!(o.status.success(), "{}", stderr(&o));
    // Recorded before absolute paths were: the relative path alone is not found from here.
    info.as_object_mut().unwrap().remove("backbone_model_abs");
    std::fs::write(&info_path, info.to_string()).unwrap();
    refused(&score(), &["reward_model.json", "backbone_model `base`"]);
}

/// eval's outputs are checked against everything it reads, the reward model's own backbone
/// included, and the chart drawn next to a win-rate report is an output like the report.
#[test]
fn eval_outputs_never_land_in_what_it_reads() {
    let root = scratch("eval-outputs");
    let rm = trained_rm(&root);
    let input = answers_to_score(&root);
    // No --model: the reward model loads its recorded backbone (the tiny model).
    let inside = tiny_dir().join("scored.jsonl");
    let o = run(&[
        "eval",
        "--device",
        "cpu",
        "--score",
        input.to_str().unwrap(),
        "--reward-model",
        rm.to_str().unwrap(),
        "--output",
        inside.to_str().unwrap(),
        "--force",
    ]);
    refused(&o, &["lies inside the reward model's backbone"]);
    assert!(!inside.exists());
    // A chart already where the report's chart goes.
    let dir = root.join("reports");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("new_objectives.svg"), "PRECIOUS").unwrap();
    let win_rate = |force: bool| {
        let mut args = vec![
            "eval",
            "--device",
            "cpu",
            "--model",
            tiny(),
            "--win-rate",
            "--prompts",
            "data/ultrafeedback_binarized/test_prefs.jsonl",
            "--max-prompts",
            "2",
            "--max-new-tokens",
            "4",
            "--baseline",
            tiny(),
            "--judge",
            "rules:configs/demo/rules.toml",
            "--report",
        ];
        let report = dir.join("new.json");
        let report = report.to_str().unwrap().to_string();
        args.push(&report);
        if force {
            args.push("--force");
        }
        run(&args)
    };
    refused(&win_rate(false), &["new_objectives.svg", "--force"]);
    assert_eq!(
        std::fs::read_to_string(dir.join("new_objectives.svg")).unwrap(),
        "PRECIOUS"
    );
    let o = win_rate(true);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn usage_errors_are_one_line_and_help_is_not_an_error() {
    refused(
        &run(&["sft", "--no-such-flag"]),
        &["'--no-such-flag'", "mo-align sft"],
    );
    refused(&run(&["sft", "--config"]), &["--config"]);
    refused(&run(&["no-such-command"]), &["'no-such-command'"]);
    let help = run(&["sft", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage: mo-align sft"));
}
