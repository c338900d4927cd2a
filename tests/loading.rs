//! Checkpoint loading: local directories, shards, the Hub cache, both config layouts, and the
//! one-line errors (exit code 2) for every broken input.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use mo_align::util::io::safetensors_bytes;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

fn copy_tiny(name: &str) -> std::path::PathBuf {
    let dir = scratch(name);
    for f in std::fs::read_dir(tiny_dir()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    dir
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap()
}

fn write_weights(path: &Path, w: &HashMap<String, Tensor>) {
    std::fs::write(path, safetensors_bytes(w, None).unwrap()).unwrap();
}

fn text_file() -> &'static Path {
    // Written once: tests run in parallel, and a shared scratch dir would be wiped under them.
    static FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let p = scratch("text").join("t.txt");
        std::fs::write(
            &p,
            "The quick brown fox jumps over the lazy dog. Water boils at 100 degrees.",
        )
        .unwrap();
        p
    })
}

/// Runs `mo-align eval --perplexity` and returns (exit code, stdout, stderr).
fn eval(model: &str, envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args([
        "eval",
        "--device",
        "cpu",
        "--json",
        "--model",
        model,
        "--perplexity",
    ])
    .arg(text_file());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(stderr: &str, needles: &[&str]) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "error line lacks `{n}`: {stderr}");
    }
}

fn nll(stdout: &str) -> f64 {
    serde_json::from_str::<serde_json::Value>(stdout).unwrap()["nll_per_token"]
        .as_f64()
        .unwrap()
}

#[test]
fn missing_tensor_is_one_line_naming_file_and_tensor() {
    let dir = copy_tiny("missing-tensor");
    let mut w = weights(&dir);
    w.remove("model.layers.1.mlp.up_proj.weight");
    write_weights(&dir.join("model.safetensors"), &w);
    let (code, _, err) = eval(dir.to_str().unwrap(), &[]);
    assert_eq!(code, 2);
    assert_one_line_error(
        &err,
        &[
            "model.safetensors",
            "model.layers.1.mlp.up_proj.weight",
            "missing",
        ],
    );
}

#[test]
fn wrong_shape_is_one_line_naming_file_tensor_and_shapes() {
    let dir = copy_tiny("wrong-shape");
    let mut w = weights(&dir);
    w.insert(
        "model.layers.0.self_attn.k_proj.weight".into(),
        Tensor::zeros((3, 64), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    write_weights(&dir.join("model.safetensors"), &w);
    let (code, _, err) = eval(dir.to_str().unwrap(), &[]);
    assert_eq!(code, 2);
    assert_one_line_error(
        &err,
        &[
            "model.safetensors",
            "model.layers.0.self_attn.k_proj.weight",
            "[3, 64]",
            "[32, 64]",
        ],
    );
}

#[test]
fn missing_file_unknown_architecture_and_bad_paths() {
    let dir = copy_tiny("missing-file");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let (code, _, err) = eval(dir.to_str().unwrap(), &[]);
    assert_eq!(code, 2);
    assert_one_line_error(&err, &["tokenizer.json", "missing"]);

    let dir = copy_tiny("llama");
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("Qwen2ForCausalLM", "LlamaForCausalLM");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let (code, _, err) = eval(dir.to_str().unwrap(), &[]);
    assert_eq!(code, 2);
    assert_one_line_error(&err, &["config.json", "LlamaForCausalLM"]);

    let (code, _, err) = eval("./no/such/dir", &[]);
    assert_eq!(code, 2);
    assert_one_line_error(&err, &["./no/such/dir"]);
}

#[test]
fn hub_offline_uses_the_cache_or_says_it_is_not_cached() {
    let home = scratch("hf-home");
    let home_s = home.to_str().unwrap();
    let (code, _, err) = eval(
        "Qwen/Qwen2.5-0.5B",
        &[("HF_HOME", home_s), ("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(code, 2);
    assert_one_line_error(
        &err,
        &[
            "Qwen/Qwen2.5-0.5B",
            "config.json",
            "not in the Hub cache",
            "HF_HUB_OFFLINE",
        ],
    );

    // The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}.
    let repo = home.join("hub/models--tiny-org--tiny-qwen");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for f in std::fs::read_dir(tiny_dir()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), snap.join(f.file_name())).unwrap();
    }
    let (code, out, err) = eval(
        "tiny-org/tiny-qwen",
        &[("HF_HOME", home_s), ("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(code, 0, "{err}");
    let (_, local, _) = eval(tiny_dir().to_str().unwrap(), &[]);
    assert_eq!(nll(&out), nll(&local));
}

#[test]
fn sharded_checkpoint_and_transformers5_config_load_identically() {
    let (code, local, err) = eval(tiny_dir().to_str().unwrap(), &[]);
    assert_eq!(code, 0, "{err}");
    let dir = copy_tiny("sharded");
    let w = weights(&dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (k, t) in w {
        let shard = if k.contains("layers.1") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        map.insert(k.clone(), shard.into());
        if k.contains("layers.1") {
            b.insert(k, t)
        } else {
            a.insert(k, t)
        };
    }
    write_weights(&dir.join("model-00001-of-00002.safetensors"), &a);
    write_weights(&dir.join("model-00002-of-00002.safetensors"), &b);
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    // transformers 5 layout: rope under rope_parameters, sliding_window null, dtype key.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let theta = cfg["rope_theta"].clone();
    cfg.as_object_mut().unwrap().remove("rope_theta");
    cfg.as_object_mut().unwrap().remove("torch_dtype");
    cfg["rope_parameters"] = serde_json::json!({"rope_theta": theta, "rope_type": "default"});
    cfg["dtype"] = "float32".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let (code, out, err) = eval(dir.to_str().unwrap(), &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(nll(&out), nll(&local));

    // A shard listed in the index but absent is named.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let (code, _, err) = eval(dir.to_str().unwrap(), &[]);
    assert_eq!(code, 2);
    assert_one_line_error(&err, &["model-00002-of-00002.safetensors", "missing"]);
}
