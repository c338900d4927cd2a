//! `mo-align merge --gguf`: the GGUF file read back with candle's GGUF reader holds the merged
//! weights (f32: exactly; f16 / q8_0: within their rounding), llama.cpp's metadata and the
//! whole tokenizer. Checked against transformers' GGUF loader by benches/peer/check_gguf.py.

mod common;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device};
use common::*;
use mo_align::model::loader::load_pretrained;
use mo_align::model::{ForwardCtx, Qwen};
use std::path::Path;

fn read(path: &Path) -> (Content, std::fs::File) {
    let mut f = std::fs::File::open(path).unwrap();
    (Content::read(&mut f).unwrap(), f)
}

/// llama.cpp's tensor names (its convert_hf_to_gguf.py tensor map for Qwen2 / Qwen3), written
/// out here apart from the exporter's own table, so a wrong entry there cannot pass.
fn llama_cpp_name(hf: &str) -> String {
    let table = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
        (".self_attn.q_proj.", ".attn_q."),
        (".self_attn.k_proj.", ".attn_k."),
        (".self_attn.v_proj.", ".attn_v."),
        (".self_attn.o_proj.", ".attn_output."),
        (".self_attn.q_norm.", ".attn_q_norm."),
        (".self_attn.k_norm.", ".attn_k_norm."),
        (".mlp.gate_proj.", ".ffn_gate."),
        (".mlp.up_proj.", ".ffn_up."),
        (".mlp.down_proj.", ".ffn_down."),
        (".input_layernorm.", ".attn_norm."),
        (".post_attention_layernorm.", ".ffn_norm."),
    ];
    let mut name = hf.replace("model.layers.", "blk.");
    for (from, to) in table {
        name = name.replace(from, to);
    }
    name
}

/// The model the GGUF file holds, built from its dequantised tensors under `like`'s config.
fn model_from_gguf(path: &Path, like: &Qwen) -> Qwen {
    let (content, mut f) = read(path);
    Qwen::build(like.config.clone(), |name, shape| {
        let g = llama_cpp_name(name);
        let t = content
            .tensor(&mut f, &g, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{g}: {e}"))
            .dequantize(&Device::Cpu)?;
        assert_eq!(t.dims(), shape, "{g}");
        Ok(t)
    })
    .unwrap()
}

fn mean_logprob(model: &Qwen, ids: &[u32]) -> f64 {
    let input =
        mo_align::model::input::ModelInput::right_padded(&[ids.to_vec()], 0, &Device::Cpu).unwrap();
    let hidden = model.forward(&input, ForwardCtx::EVAL, None).unwrap();
    let rows: Vec<u32> = (0..ids.len() as u32 - 1).collect();
    let h = mo_align::model::lm_head::gather_rows(&hidden, &rows).unwrap();
    model
        .token_logprobs(&h, &ids[1..], false)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

#[test]
fn gguf_export_holds_the_merged_model_and_its_tokenizer() {
    for tiny in Tiny::BOTH {
        let root = scratch("gguf");
        let adapter = root.join("sft");
        sft_lora_30_steps(tiny.dir(), &adapter);
        let merged = |kind: &str| {
            let out = root.join(format!("merged-{kind}"));
            mo_align::recipes::merge::run(
                tiny.dir().to_str().unwrap(),
                &adapter,
                &out,
                "f32",
                false,
                Some(kind),
            )
            .unwrap();
            out
        };
        let reference = load_pretrained(
            tiny.dir().to_str().unwrap(),
            Some(&adapter),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let ids = tiny.seqs()[0].clone();
        let want = mean_logprob(&reference.model, &ids);
        let base = mean_logprob(&tiny.load(DType::F32).model, &ids);
        assert!(
            (want - base).abs() > 1e-3,
            "{tiny:?}: the adapter changes nothing"
        );
        for (kind, tol) in [("f32", 1e-6), ("f16", 1e-2), ("q8_0", 5e-2)] {
            let out = merged(kind);
            let path = out.join(format!("model-{kind}.gguf"));
            let got = mean_logprob(&model_from_gguf(&path, &reference.model), &ids);
            assert!(
                (got - want).abs() < tol,
                "{tiny:?} {kind}: mean log-prob {got} vs base + adapter {want}"
            );
            // The HF checkpoint is written beside it, as without --gguf.
            assert!(out.join("model.safetensors").is_file());
        }

        // Metadata llama.cpp reads, and the tokenizer in full.
        let (content, _) = read(&root.join("merged-f32/model-f32.gguf"));
        // Version 3, as llama.cpp's own converter writes.
        assert!(matches!(
            content.magic,
            candle_core::quantized::gguf_file::VersionedMagic::GgufV3
        ));
        let m = &content.metadata;
        let s = |k: &str| m[k].to_string().unwrap().clone();
        let u = |k: &str| m[k].to_u32().unwrap();
        let c = &reference.model.config;
        let arch = match tiny {
            Tiny::Qwen2 => "qwen2",
            Tiny::Qwen3 => "qwen3",
        };
        assert_eq!(s("general.architecture"), arch);
        assert_eq!(
            u(&format!("{arch}.block_count")) as usize,
            c.num_hidden_layers
        );
        assert_eq!(
            u(&format!("{arch}.attention.head_count_kv")) as usize,
            c.num_key_value_heads
        );
        assert_eq!(
            u(&format!("{arch}.attention.key_length")) as usize,
            c.head_dim
        );
        assert_eq!(s("tokenizer.ggml.model"), "gpt2");
        let tokens = m["tokenizer.ggml.tokens"].to_vec().unwrap();
        assert_eq!(tokens.len(), c.vocab_size);
        let tok = &reference.tokenizer;
        for (i, t) in tokens.iter().enumerate().take(tok.vocab_size()) {
            let text = t.to_string().unwrap();
            assert_eq!(
                tok.decode(&[i as u32], false).unwrap(),
                decode_byte_level(text),
                "token {i}"
            );
        }
        let types = m["tokenizer.ggml.token_type"].to_vec().unwrap();
        let kind = |id: u32| match &types[id as usize] {
            Value::I32(k) => *k,
            other => panic!("{other:?}"),
        };
        assert_eq!(kind(tok.im_end), 3, "<|im_end|> is a control token");
        assert_eq!(kind(tok.encode("the").unwrap()[0]), 1);
        // Embedding rows beyond the tokenizer are padding: UNUSED, as llama.cpp's converter
        // types them.
        assert!(
            c.vocab_size > tok.vocab_size(),
            "the tiny model has padding rows"
        );
        for (id, t) in tokens.iter().enumerate().skip(tok.vocab_size()) {
            assert_eq!(kind(id as u32), 5, "padding token {id}");
            assert_eq!(t.to_string().unwrap(), &format!("[PAD{id}]"));
        }
        assert!(!m["tokenizer.ggml.merges"].to_vec().unwrap().is_empty());
        assert_eq!(u("tokenizer.ggml.eos_token_id"), tok.im_end);
        assert_eq!(u("tokenizer.ggml.padding_token_id"), tok.pad_id);
        let template = s("tokenizer.chat_template");
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tiny.dir().join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(template, config["chat_template"].as_str().unwrap());
    }
}

/// A byte-level BPE token's text (GPT-2's printable byte alphabet) as the bytes it stands for
/// (printable ASCII, and so the special tokens' text, maps to itself).
fn decode_byte_level(text: &str) -> String {
    let mut table = std::collections::HashMap::new();
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
        table.insert(c, b as u8);
    }
    let bytes: Vec<u8> = text.chars().map(|c| table[&c]).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A bad --gguf type is refused before anything is written.
#[test]
fn an_unknown_gguf_type_is_refused_with_the_choices() {
    let root = scratch("gguf-bad");
    let out = root.join("out");
    let e = mo_align::recipes::merge::run(
        tiny_dir().to_str().unwrap(),
        &root,
        &out,
        "f32",
        false,
        Some("q4_k"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("q4_k") && e.contains("q8_0"), "{e}");
    assert!(!out.exists());
}

/// The merge's plan (`QwenConfig::weight_shapes`) is every weight the model holds, in
/// `named_weights` order, for both families.
#[test]
fn the_weight_plan_lists_every_weight_of_the_model() {
    for tiny in [Tiny::Qwen2, Tiny::Qwen3] {
        let loaded = tiny.load(DType::F32);
        let got: Vec<(String, Vec<usize>)> = loaded
            .model
            .named_weights()
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect();
        assert_eq!(loaded.model.config.weight_shapes(), got);
    }
}

/// A merged checkpoint split into shards (with transformers' index) holds the same weights as
/// one file, and both equal base + adapter merged in memory.
#[test]
fn a_sharded_merge_equals_the_single_file_merge() {
    let root = scratch("merge-shards");
    let model = tiny_dir().to_str().unwrap().to_string();
    let adapter = golden_dir().join("adapter");
    let one = root.join("one");
    let sharded = root.join("sharded");
    mo_align::recipes::merge::run(&model, &adapter, &one, "f32", false, None).unwrap();
    mo_align::recipes::merge::run_sharded(&model, &adapter, &sharded, "f32", false, None, 200_000)
        .unwrap();
    let shards: Vec<_> = std::fs::read_dir(&sharded)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with("model-").then_some(n)
        })
        .collect();
    assert!(shards.len() > 2, "{shards:?}");
    assert!(sharded.join("model.safetensors.index.json").is_file());
    assert!(!sharded.join("model.safetensors").exists());
    let load = |p: &Path| {
        mo_align::model::loader::load_pretrained(
            p.to_str().unwrap(),
            None,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let mut in_memory =
        mo_align::model::loader::load_pretrained(&model, Some(&adapter), DType::F32, &Device::Cpu)
            .unwrap();
    in_memory.model.merge_lora().unwrap();
    let want = in_memory.model.named_weights();
    for got in [load(&one), load(&sharded)] {
        for ((n, a), (_, b)) in want.iter().zip(got.model.named_weights()) {
            let d = (a - &b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "{n}");
        }
    }
}

/// merge streams: its peak memory stays well under one f32 copy of the model (the merge
/// that loaded the model whole needed several copies).
#[test]
fn merge_memory_stays_under_one_copy_of_the_model() {
    let root = scratch("merge-memory");
    let base = root.join("base");
    let spec = mo_align::model::tiny::TinySpec {
        hidden_size: 512,
        intermediate_size: 2048,
        num_hidden_layers: 12,
        num_attention_heads: 8,
        num_key_value_heads: 8,
        ..Default::default()
    };
    mo_align::model::tiny::write_tiny_checkpoint_of(&base, 0, &spec).unwrap();
    let cfg = spec.config().unwrap();
    let f32_bytes = cfg
        .weight_shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() * 4)
        .sum::<usize>();
    // A rank-4 adapter on every q_proj and down_proj.
    let lora = mo_align::model::LoraConfig {
        r: 4,
        alpha: 8.0,
        target_modules: vec!["q_proj".into(), "down_proj".into()],
        ..Default::default()
    };
    let mut tensors = vec![];
    for i in 0..cfg.num_hidden_layers {
        for (m, out, inp) in [("self_attn.q_proj", 512, 512), ("mlp.down_proj", 512, 2048)] {
            let a = candle_core::Tensor::randn(0f32, 0.1, (4, inp), &Device::Cpu).unwrap();
            let b = candle_core::Tensor::randn(0f32, 0.1, (out, 4), &Device::Cpu).unwrap();
            tensors.push((format!("model.layers.{i}.{m}"), a, b));
        }
    }
    let adapter = root.join("adapter");
    mo_align::model::peft::write_peft_adapter(&adapter, &lora, base.to_str().unwrap(), &tensors)
        .unwrap();
    let out = std::process::Command::new(bin())
        .args(["merge", "--model"])
        .arg(&base)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(root.join("merged"))
        .args(["--gguf", "q8_0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let peak_mb: f64 = err
        .split("peak memory ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no peak memory reported: {err}"));
    let model_mb = f32_bytes as f64 / 1e6;
    assert!(
        peak_mb < model_mb / 2.0,
        "merge peaked at {peak_mb} MB for a model of {model_mb:.0} MB in f32"
    );
}
