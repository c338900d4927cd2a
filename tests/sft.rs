//! The SFT stage end to end on the tiny model and bundled data: learning, gradient
//! accumulation, exact resume after SIGKILL / SIGTERM, PEFT files, precisions, NaN handling.

mod common;

use mo_align::train::events::{read_scalar_events, scalars_of, EVENTS_FILE};

use candle_core::{DType, Device, Tensor};
use common::*;
use mo_align::model::ctx::ForwardCtx;
use mo_align::model::loader::{apply_adapter, load_pretrained};
use mo_align::recipes::sft;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Overrides that point the demo config at the shared tiny model and a fresh output dir.
fn demo_overrides(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        format!("model.path={:?}", tiny_dir().to_str().unwrap()),
        format!("train.output_dir={:?}", out.to_str().unwrap()),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn demo_config() -> &'static Path {
    Path::new("configs/demo/sft-lora.toml")
}

fn adapter_tensors(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn loss_decreases_and_outputs_are_written() {
    let out = scratch("sft-learns");
    let o = sft::run(
        Some(demo_config()),
        &demo_overrides(&out, &["train.max_steps=60", "train.eval_every=30"]),
        flags(false, true),
    )
    .unwrap();
    assert_eq!(o.steps, 60);
    let m = metrics(&out);
    let train: Vec<f64> = m.iter().filter_map(|l| l["loss"].as_f64()).collect();
    let eval: Vec<f64> = m.iter().filter_map(|l| l["eval_loss"].as_f64()).collect();
    assert!(
        train.last().unwrap() < &(train[0] - 0.5),
        "training loss did not fall: {train:?}"
    );
    assert!(
        eval.len() == 2 && eval[1] < eval[0],
        "eval loss did not fall: {eval:?}"
    );
    for key in ["step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"] {
        assert!(m[0].get(key).is_some(), "metrics line lacks {key}");
    }
    for f in [
        "config.resolved.toml",
        "adapter_config.json",
        "adapter_model.safetensors",
        "data_report.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // The resolved config is a complete, loadable config.
    let again: sft::SftConfig =
        mo_align::util::config::load(Some(&out.join("config.resolved.toml")), &[]).unwrap();
    assert_eq!(again.stage.train.max_steps, Some(60));
}

/// Same examples per optimizer step either way; the loss and the (pre-clipping) gradient norm
/// of every step must agree. Adam's update divides by sqrt(v), which amplifies float noise on
/// near-zero gradient coordinates, so weights are compared at the scale of one update (lr).
#[test]
fn gradient_accumulation_equals_a_bigger_batch() {
    let common = [
        "train.max_steps=3",
        "lora.dropout=0.0",
        "data.group_by_length=false",
        "train.eval_every=1000",
        "train.warmup_ratio=0.0",
        "train.log_every=1",
    ];
    let a = scratch("accum-big");
    let b = scratch("accum-4x1");
    let mut oa = common.to_vec();
    oa.extend(["train.batch_size=4", "train.grad_accum=1"]);
    let mut ob = common.to_vec();
    ob.extend(["train.batch_size=1", "train.grad_accum=4"]);
    sft::run(
        Some(demo_config()),
        &demo_overrides(&a, &oa),
        flags(false, true),
    )
    .unwrap();
    sft::run(
        Some(demo_config()),
        &demo_overrides(&b, &ob),
        flags(false, true),
    )
    .unwrap();
    let (ma, mb) = (metrics(&a), metrics(&b));
    for (x, y) in ma.iter().zip(&mb).filter(|(x, _)| x.get("loss").is_some()) {
        for key in ["loss", "grad_norm"] {
            let (u, v) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(
                (u - v).abs() <= 1e-5 * u.abs(),
                "step {}: {key} {u} (batch 4) vs {v} (4 x batch 1)",
                x["step"]
            );
        }
    }
    assert_eq!(ma.iter().filter(|l| l.get("loss").is_some()).count(), 3);
    let (ta, tb) = (adapter_tensors(&a), adapter_tensors(&b));
    assert_eq!(ta.len(), tb.len());
    let lr = 3e-3f32;
    for (k, x) in &ta {
        let d = tensor_max_diff(x, &tb[k]);
        assert!(
            d <= 1e-2 * lr as f64,
            "{k}: accumulated and big-batch adapters differ by {d}"
        );
    }
}

fn run_cli(out: &Path, extra: &[&str], resume: bool) -> std::process::Child {
    let mut cmd = Command::new(bin());
    cmd.args(["sft", "--quiet", "--config"]).arg(demo_config());
    for o in demo_overrides(out, extra) {
        cmd.arg("--set").arg(o);
    }
    if resume {
        cmd.arg("--resume");
    }
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    cmd.spawn().unwrap()
}

/// Waits until metrics.jsonl holds a step after the newest checkpoint: steps the resumed run
/// will log again, which must then appear once.
fn wait_for_a_line_past_the_checkpoint(out: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ckpt = mo_align::train::checkpoint::latest(out)
            .unwrap()
            .and_then(|p| {
                p.file_name()?
                    .to_string_lossy()
                    .trim_start_matches("checkpoint-")
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        let logged = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|l| l["step"].as_u64())
            .max()
            .unwrap_or(0);
        if logged > ckpt {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no line past a checkpoint in time"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn wait_for_checkpoint(out: &Path, min_step: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let latest = mo_align::train::checkpoint::latest(out).unwrap();
        if let Some(p) = latest {
            let step: u64 = p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .trim_start_matches("checkpoint-")
                .parse()
                .unwrap();
            if step >= min_step {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint at step {min_step} in time"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn killed_and_resumed_run_ends_bit_identical() {
    let extra = [
        "train.max_steps=40",
        "train.save_every=3",
        "train.keep_checkpoints=2",
        "train.eval_every=20",
        // Lines between checkpoints, so the killed run has logged steps the resume replays.
        "train.log_every=2",
    ];
    let whole = scratch("resume-whole");
    let whole_run = run_cli(&whole, &extra, false).wait_with_output().unwrap();
    assert!(whole_run.status.success());
    let whole_err = whole_run.stderr;

    let killed = scratch("resume-killed");
    let mut child = run_cli(&killed, &extra, false);
    wait_for_checkpoint(&killed, 9);
    wait_for_a_line_past_the_checkpoint(&killed);
    child.kill().unwrap(); // SIGKILL: no chance to save anything
    child.wait().unwrap();
    assert!(
        !killed.join("adapter_model.safetensors").exists(),
        "the run finished before it was killed"
    );
    let out = run_cli(&killed, &extra, true).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = std::fs::read(whole.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed adapter differs from the uninterrupted one");
    // The log windows survive the kill: every logged loss and gradient norm (each a mean over
    // the steps since the previous line) equals the uninterrupted run's, and so does the final
    // "loss X -> Y" summary.
    let logged = |dir: &Path| -> Vec<(u64, String, String)> {
        metrics(dir)
            .iter()
            .filter(|l| l.get("loss").is_some())
            .map(|l| {
                let v = |k: &str| l[k].to_string();
                (l["step"].as_u64().unwrap(), v("loss"), v("grad_norm"))
            })
            .collect()
    };
    assert_eq!(
        logged(&whole),
        logged(&killed),
        "log windows differ after resume"
    );
    let summary = |stderr: &[u8]| -> String {
        let text = String::from_utf8_lossy(stderr).into_owned();
        let line = text
            .lines()
            .find(|l| l.starts_with("sft done"))
            .unwrap_or("")
            .to_string();
        line.split(", loss ")
            .nth(1)
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(
        summary(&whole_err),
        summary(&out.stderr),
        "final loss summary differs"
    );
    // Metrics were not duplicated by the replayed steps.
    let steps: Vec<u64> = metrics(&killed)
        .iter()
        .filter(|l| l.get("loss").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    let mut sorted = steps.clone();
    sorted.dedup();
    assert_eq!(steps, sorted);
    // The TensorBoard events hold the same scalars as metrics.jsonl, each step once, after the
    // kill as in the uninterrupted run (wall times aside).
    for dir in [&whole, &killed] {
        let events = read_scalar_events(&dir.join(EVENTS_FILE)).unwrap();
        let want: Vec<(i64, Vec<(String, f32)>)> = metrics(dir)
            .iter()
            .map(|l| (l["step"].as_i64().unwrap(), scalars_of(l)))
            .collect();
        let got: Vec<(i64, Vec<(String, f32)>)> =
            events.into_iter().map(|e| (e.step, e.values)).collect();
        assert_eq!(
            got,
            want,
            "{}: events differ from metrics.jsonl",
            dir.display()
        );
    }
    assert_eq!(
        std::fs::read_dir(killed.join("checkpoints"))
            .unwrap()
            .count(),
        2,
        "keep_checkpoints=2"
    );
}

#[test]
fn sigterm_saves_a_checkpoint_and_resume_finishes_identically() {
    let extra = [
        "train.max_steps=400",
        "train.save_every=1000",
        "train.eval_every=1000",
        "train.keep_checkpoints=1",
    ];
    let whole = scratch("term-whole");
    assert!(run_cli(&whole, &extra, false).wait().unwrap().success());
    let out = scratch("term");
    let child = run_cli(&out, &extra, false);
    // Wait until it is training (metrics are being written), then ask it to stop.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.join("metrics.jsonl").is_file()
        || std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .is_empty()
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    unsafe_kill_term(child.id());
    let res = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(130), "{err}");
    assert!(err.contains("--resume"), "{err}");
    assert!(mo_align::train::checkpoint::latest(&out).unwrap().is_some());
    assert!(run_cli(&out, &extra, true).wait().unwrap().success());
    assert!(
        std::fs::read(whole.join("adapter_model.safetensors")).unwrap()
            == std::fs::read(out.join("adapter_model.safetensors")).unwrap()
    );
}

fn unsafe_kill_term(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn peft_files_have_peft_names_shapes_and_config_and_reload_to_the_same_logprobs() {
    let out = scratch("peft-files");
    sft::run(
        Some(demo_config()),
        &demo_overrides(
            &out,
            &[
                "train.max_steps=5",
                "lora.r=4",
                "lora.target_modules=[\"q_proj\",\"v_proj\",\"down_proj\"]",
            ],
        ),
        flags(false, true),
    )
    .unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["task_type"], "CAUSAL_LM");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 16.0);
    assert_eq!(cfg["bias"], "none");
    assert_eq!(cfg["fan_in_fan_out"], false);
    assert_eq!(cfg["use_rslora"], false);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "down_proj"])
    );
    assert_eq!(cfg["base_model_name_or_path"], tiny_dir().to_str().unwrap());
    let t = adapter_tensors(&out);
    assert_eq!(t.len(), 2 * 3 * 2);
    let a = &t["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"];
    let b = &t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"];
    assert_eq!((a.dims(), b.dims()), (&[4usize, 64][..], &[32usize, 4][..]));
    assert_eq!(
        t["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].dims(),
        &[4, 128]
    );
    assert!(t.values().all(|x| x.dtype() == DType::F32));

    // Loading the files back gives the trained model's log-probs.
    let mut trained =
        load_pretrained(tiny_dir().to_str().unwrap(), None, DType::F32, &Device::Cpu).unwrap();
    apply_adapter(&mut trained.model, &out).unwrap();
    let via_cli = load_pretrained(
        tiny_dir().to_str().unwrap(),
        Some(&out),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let ids: Vec<u32> = trained
        .tokenizer
        .encode("The capital of France is Paris.")
        .unwrap();
    let seqs = vec![(
        ids.clone(),
        (0..ids.len()).map(|i| i > 0).collect::<Vec<_>>(),
    )];
    let x = mo_align::eval::sequence_nll(&trained.model, &seqs, ForwardCtx::EVAL).unwrap();
    let y = mo_align::eval::sequence_nll(&via_cli.model, &seqs, ForwardCtx::EVAL).unwrap();
    let base = mo_align::eval::sequence_nll(&via_cli.model, &seqs, ForwardCtx::REFERENCE).unwrap();
    assert_eq!(x, y);
    assert!(
        (x.nll - base.nll).abs() > 1e-4,
        "the adapter changes nothing"
    );
}

#[test]
fn half_precisions_train_and_f16_uses_loss_scaling() {
    for dtype in ["bf16", "f16"] {
        let out = scratch(&format!("sft-{dtype}"));
        let o = sft::run(
            Some(demo_config()),
            &demo_overrides(
                &out,
                &[
                    &format!("train.dtype=\"{dtype}\""),
                    "train.max_steps=20",
                    "train.log_every=5",
                    "train.eval_every=1000",
                ],
            ),
            flags(false, true),
        )
        .unwrap();
        let m = metrics(&out);
        let losses: Vec<f64> = m.iter().filter_map(|l| l["loss"].as_f64()).collect();
        assert!(losses.iter().all(|l| l.is_finite()), "{dtype}: {losses:?}");
        assert!(
            o.last_loss.unwrap() < o.first_loss.unwrap(),
            "{dtype}: loss did not fall"
        );
        assert_eq!(
            m[0].get("loss_scale").is_some(),
            dtype == "f16",
            "{dtype}: loss_scale logged only for f16"
        );
        // LoRA weights stay f32 whatever the base dtype.
        assert!(adapter_tensors(&out)
            .values()
            .all(|t| t.dtype() == DType::F32));
    }
}

#[test]
fn diverging_run_stops_with_a_clear_message_and_never_checkpoints_nan() {
    let out = scratch("sft-nan");
    let err = sft::run(
        Some(demo_config()),
        &demo_overrides(
            &out,
            &[
                "train.lr=1e30",
                "train.max_steps=60",
                "train.save_every=1",
                "train.max_bad_steps=3",
                "train.max_grad_norm=0.0",
                "train.warmup_ratio=0.0",
            ],
        ),
        flags(false, true),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("consecutive steps had a non-finite loss"),
        "{err}"
    );
    for entry in std::fs::read_dir(out.join("checkpoints")).unwrap() {
        for (k, t) in adapter_tensors(&entry.unwrap().path()) {
            let finite = t
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .is_finite();
            assert!(finite, "{k} is not finite in a checkpoint");
        }
    }
}

#[test]
fn existing_run_needs_resume_flag() {
    let out = scratch("sft-exists");
    sft::run(
        Some(demo_config()),
        &demo_overrides(&out, &["train.max_steps=2"]),
        flags(false, true),
    )
    .unwrap();
    let e = sft::run(
        Some(demo_config()),
        &demo_overrides(&out, &["train.max_steps=2"]),
        flags(false, true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--resume"), "{e}");
    // Resuming a finished run does no further steps.
    let o = sft::run(
        Some(demo_config()),
        &demo_overrides(&out, &["train.max_steps=2"]),
        flags(true, true),
    )
    .unwrap();
    assert_eq!(o.steps, 2);
}

/// Activation checkpointing changes memory, not results: same losses and gradient norms.
#[test]
fn recomputing_layers_trains_identically() {
    let common = [
        "train.max_steps=3",
        "train.log_every=1",
        "train.eval_every=1000",
        "lora.dropout=0.1",
    ];
    let (a, b) = (scratch("ckpt-off"), scratch("ckpt-on"));
    sft::run(
        Some(demo_config()),
        &demo_overrides(&a, &common),
        flags(false, true),
    )
    .unwrap();
    let mut on = common.to_vec();
    on.push("train.recompute_layers=true");
    sft::run(
        Some(demo_config()),
        &demo_overrides(&b, &on),
        flags(false, true),
    )
    .unwrap();
    let (ma, mb) = (metrics(&a), metrics(&b));
    for (x, y) in ma.iter().zip(&mb).filter(|(x, _)| x.get("loss").is_some()) {
        for key in ["loss", "grad_norm"] {
            let (u, v) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(
                (u - v).abs() <= 1e-5 * u.abs(),
                "step {}: {key} {u} vs {v} with recomputation",
                x["step"]
            );
        }
    }
}
