//! Full fine-tuning through the shared trainer: every weight learns, the output is a Hugging
//! Face checkpoint mo-align (and transformers) load as a model, a killed run resumes exactly,
//! and the stages that need an adapter refuse it.

mod common;

use candle_core::{DType, Device};
use common::*;
use mo_align::model::ctx::ForwardCtx;
use mo_align::model::loader::load_pretrained;
use mo_align::recipes::sft;
use std::path::Path;

fn overrides(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        format!("model.path={:?}", tiny_dir().to_str().unwrap()),
        format!("train.output_dir={:?}", out.to_str().unwrap()),
        "train.finetune=\"full\"".to_string(),
        "train.lr=1e-3".to_string(),
        "train.eval_every=1000".to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run(out: &Path, extra: &[&str], resume: bool) -> mo_align::train::trainer::TrainOutcome {
    let config = Path::new("configs/demo/sft.toml");
    sft::run(Some(config), &overrides(out, extra), flags(resume, true)).unwrap()
}

/// Mean NLL of the assistant tokens of the first training records under `model_dir`.
fn train_nll(model_dir: &Path) -> f64 {
    let loaded =
        load_pretrained(model_dir.to_str().unwrap(), None, DType::F32, &Device::Cpu).unwrap();
    let data = mo_align::data::DataConfig {
        train_files: vec!["data/smoltalk/train.jsonl".into()],
        max_samples: Some(16),
        max_length: 512,
        ..Default::default()
    };
    let (train, _, _, _) = load_sft_data(&data, &loaded.tokenizer).unwrap();
    let seqs: Vec<(Vec<u32>, Vec<bool>)> = train
        .iter()
        .map(|e| (e.ids.clone(), e.labelled.clone()))
        .collect();
    mo_align::eval::sequence_nll(&loaded.model, &seqs, ForwardCtx::EVAL)
        .unwrap()
        .mean()
}

#[test]
fn full_finetuning_learns_and_writes_a_checkpoint_that_loads_as_a_model() {
    let out = scratch("full-sft");
    let o = run(&out, &["train.max_steps=30", "train.log_every=5"], false);
    assert_eq!((o.steps, o.skipped_steps), (30, 0));
    let (first, last) = (o.first_loss.unwrap(), o.last_loss.unwrap());
    assert!(last < first - 0.5, "loss did not fall: {first} -> {last}");
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(!out.join("adapter_model.safetensors").exists());
    // Every weight moved, and the written model fits its training data better than the base.
    let base =
        candle_core::safetensors::load(tiny_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    let tuned =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(base.len(), tuned.len());
    for (name, t) in &base {
        assert!(
            tensor_max_diff(t, &tuned[name]) > 0.0,
            "{name} did not move"
        );
    }
    let (before, after) = (train_nll(tiny_dir()), train_nll(&out));
    assert!(after < before - 0.5, "NLL {before} -> {after}");
}

#[test]
fn a_full_finetuning_run_resumes_bit_identically() {
    let extra = [
        "train.max_steps=6",
        "train.save_every=2",
        "train.keep_checkpoints=3",
    ];
    let whole = scratch("full-whole");
    run(&whole, &extra, false);
    let resumed = scratch("full-resumed");
    run(&resumed, &extra, false);
    // As if killed after step 4's checkpoint: the later outputs are gone.
    std::fs::remove_dir_all(resumed.join("checkpoints/checkpoint-0000006")).unwrap();
    std::fs::remove_file(resumed.join("model.safetensors")).unwrap();
    let o = run(&resumed, &extra, true);
    assert_eq!(o.steps, 6);
    assert!(
        std::fs::read(whole.join("model.safetensors")).unwrap()
            == std::fs::read(resumed.join("model.safetensors")).unwrap(),
        "the resumed model differs from the uninterrupted one"
    );
}

#[test]
fn stages_whose_reference_is_the_adapterless_policy_refuse_full_finetuning() {
    let out = scratch("full-dpo").join("run");
    let e = mo_align::recipes::dpo::run_dpo(
        Some(Path::new("configs/demo/dpo.toml")),
        &overrides(&out, &[]),
        flags(false, true),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("supported by sft only"), "{e}");
    assert!(!out.exists(), "a refused stage wrote its output directory");
}
