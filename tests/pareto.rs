//! Rewarded soups and the conditioning contract: what `mo-align pareto` and `--weights` build on.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{scratch, tiny_dir};
use mo_align::model::loader::{load_merged, load_soup};
use mo_align::model::lora::LoraConfig;
use mo_align::model::peft::write_peft_adapter;
use std::path::{Path, PathBuf};

/// A PEFT adapter on the tiny model with random A and B (a fresh adapter's B is zero, which
/// would make every soup equal the base and the test toothless).
fn random_adapter(root: &Path, name: &str, seed: u64) -> PathBuf {
    let loaded = common::load_tiny(DType::F32);
    let cfg = LoraConfig::default();
    let mut tensors = vec![];
    for (i, lin) in loaded.model.linears().enumerate() {
        let (out, inp) = (lin.out_features(), lin.in_features());
        let dev = &Device::Cpu;
        let mut rng = mo_align::util::rng::stream_rng(seed, i as u64);
        let a = mo_align::util::rng::normal_vec(&mut rng, cfg.r * inp, 0.1);
        let b = mo_align::util::rng::normal_vec(&mut rng, out * cfg.r, 0.1);
        tensors.push((
            lin.path.clone(),
            Tensor::from_vec(a, (cfg.r, inp), dev).unwrap(),
            Tensor::from_vec(b, (out, cfg.r), dev).unwrap(),
        ));
    }
    let dir = root.join(name);
    write_peft_adapter(&dir, &cfg, tiny_dir().to_str().unwrap(), &tensors).unwrap();
    dir
}

fn weights_of(dir: Option<&Path>, soup: Option<(&[&Path], &[f64])>) -> Vec<(String, Vec<f32>)> {
    let spec = tiny_dir().to_str().unwrap();
    let loaded = match soup {
        Some((adapters, w)) => load_soup(spec, None, adapters, w, DType::F32, &Device::Cpu),
        None => load_merged(spec, dir, DType::F32, &Device::Cpu),
    }
    .unwrap();
    loaded
        .model
        .named_weights()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn a_soup_at_a_vertex_is_exactly_that_adapter_and_mixes_deltas_linearly() {
    let root = scratch("soup");
    let a = random_adapter(&root, "a", 1);
    let b = random_adapter(&root, "b", 2);
    let both: [&Path; 2] = [&a, &b];
    let base = weights_of(None, None);
    let only_a = weights_of(Some(&a), None);
    let only_b = weights_of(Some(&b), None);
    assert_ne!(only_a, base, "the adapters must change the weights");
    // Bit for bit: the other adapter at weight 0 adds nothing.
    assert_eq!(weights_of(None, Some((&both, &[1.0, 0.0]))), only_a);
    assert_eq!(weights_of(None, Some((&both, &[0.0, 1.0]))), only_b);
    // In between, the deltas mix linearly: soup(0.25, 0.75) - base = 0.25 da + 0.75 db.
    let mixed = weights_of(None, Some((&both, &[0.25, 0.75])));
    let mut worst = 0f32;
    for (((m, w0), wa), wb) in mixed.iter().zip(&base).zip(&only_a).zip(&only_b) {
        for i in 0..m.1.len() {
            let want = w0.1[i] + 0.25 * (wa.1[i] - w0.1[i]) + 0.75 * (wb.1[i] - w0.1[i]);
            worst = worst.max((m.1[i] - want).abs());
        }
    }
    assert!(worst < 1e-5, "soup is not linear in the deltas: {worst}");
    assert!(load_soup(
        tiny_dir().to_str().unwrap(),
        None,
        &both,
        &[1.0],
        DType::F32,
        &Device::Cpu
    )
    .is_err());
}

/// `mo-align pareto` on the tiny model: a soup, per-weighting adapters and a conditioned
/// adapter, judged by the demo's rules; a second run only scores (generations are cached).
#[test]
fn pareto_reports_every_policy_and_reuses_its_generations() {
    use mo_align::objectives::conditioning::{ConditioningConfig, ConditioningInfo, INFO_FILE};
    let root = scratch("pareto");
    let names: Vec<String> = [
        "helpfulness",
        "honesty",
        "instruction_following",
        "truthfulness",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let adapters: Vec<PathBuf> = (0..4)
        .map(|i| random_adapter(&root, &format!("a{i}"), 10 + i))
        .collect();
    let info = ConditioningInfo::new(names.clone(), &ConditioningConfig::default()).unwrap();
    std::fs::write(
        adapters[0].join(INFO_FILE),
        serde_json::to_string(&info).unwrap(),
    )
    .unwrap();
    let list = |v: &[PathBuf]| {
        let q: Vec<String> = v
            .iter()
            .map(|p| format!("{:?}", p.to_str().unwrap()))
            .collect();
        format!("[{}]", q.join(", "))
    };
    let config = format!(
        r#"
[pareto]
output_dir = {out:?}
model = {model:?}
prompts = "data/ultrafeedback_binarized/test_prefs.jsonl"
max_prompts = 3
judge = "rules:configs/demo/rules.toml"
grid = 1
gen_batch_size = 3
device = "cpu"
[sampling]
max_new_tokens = 6
temperature = 0.0
[[policy]]
name = "conditioned"
conditioned = {cond:?}
[[policy]]
name = "separate"
adapters = {sep}
adapter_weights = [[1, 0, 0, 0], [0, 1, 0, 0]]
[[policy]]
name = "soup"
soup = {soup}
"#,
        out = root.join("report").to_str().unwrap(),
        model = tiny_dir().to_str().unwrap(),
        cond = adapters[0].to_str().unwrap(),
        sep = list(&adapters[..2]),
        soup = list(&adapters),
    );
    let cfg = root.join("pareto.toml");
    std::fs::write(&cfg, config).unwrap();
    let run = || {
        std::process::Command::new(common::bin())
            .args(["pareto", "--quiet", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("report/pareto.json")).unwrap())
            .unwrap();
    let policies = report["policies"].as_array().unwrap();
    let counts: Vec<usize> = policies
        .iter()
        .map(|p| p["weightings"].as_array().unwrap().len())
        .collect();
    assert_eq!(
        counts,
        [4, 2, 4],
        "grid 1 is the 4 vertices; separate has 2"
    );
    for p in policies {
        let hv = p["hypervolume"].as_f64().unwrap();
        assert!(hv.is_finite() && hv >= 0.0, "{p}");
        assert!(p["front_size"].as_u64().unwrap() >= 1);
        for w in p["weightings"].as_array().unwrap() {
            assert_eq!(w["means"].as_array().unwrap().len(), 4);
        }
    }
    assert_eq!(report["shared_weightings"].as_array().unwrap().len(), 2);
    for f in ["pareto.md", "pareto_pairs.svg", "pareto_parallel.svg"] {
        assert!(root.join("report").join(f).is_file(), "{f}");
    }
    let line = std::fs::read_to_string(
        root.join("report/generations/conditioned/w=0.00-1.00-0.00-0.00.json"),
    )
    .unwrap();
    assert!(line.contains(
        "Objective weights: helpfulness=0.00, honesty=1.00, instruction_following=0.00, truthfulness=0.00"
    ));
    let stamp = |p: &str| {
        std::fs::metadata(root.join("report/generations").join(p))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = stamp("soup/w=1.00-0.00-0.00-0.00.json");
    let again = run();
    assert!(again.status.success());
    assert_eq!(
        before,
        stamp("soup/w=1.00-0.00-0.00-0.00.json"),
        "cached generations were redone"
    );
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("report/pareto.json")).unwrap())
            .unwrap();
    assert_eq!(
        again["policies"][2]["weightings"],
        policies[2]["weightings"]
    );

    // A soup takes one adapter per objective.
    let bad = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("soup = {}", list(&adapters)),
        &format!("soup = {}", list(&adapters[..3])),
    );
    std::fs::write(&cfg, bad).unwrap();
    let refused = run();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("one adapter per objective (4), got 3"),
        "{err}"
    );
}
