//! Preference stages on the tiny model: reference log-probs, DPO at step 0, multi-objective
//! reductions to plain DPO, the reward model, and learning on the demo data.

mod common;

use candle_core::{DType, Device};
use common::*;
use mo_align::data::preference::{preference_pair, PreferencePair};
use mo_align::data::{load_splits, DataConfig, DataReport, Parsed};
use mo_align::kernels::dropout::DropoutRng;
use mo_align::model::ctx::ForwardCtx;
use mo_align::model::input::ModelInput;
use mo_align::model::lora::LoraConfig;
use mo_align::objectives::dpo::{Dpo, DpoConfig, DpoExample};
use mo_align::objectives::hybrid::{
    explicit_terms, explicit_terms_with, Direction, Formulation, HybridConfig,
};
use mo_align::objectives::pair::cached_reference;
use mo_align::objectives::pair::pair_logprobs;
use mo_align::reward::features::ScoredSequence;
use mo_align::reward::FeatureSet;
use mo_align::train::Objective;
use std::path::Path;

fn pairs(n: usize) -> Vec<PreferencePair> {
    let tok =
        mo_align::tokenizer::ChatTokenizer::from_file(&tiny_dir().join("tokenizer.json")).unwrap();
    let cfg = DataConfig {
        train_files: vec!["data/ultrafeedback_binarized/train_prefs.jsonl".into()],
        max_samples: Some(n),
        ..DataConfig::default()
    };
    load_splits(&cfg, |v, r| preference_pair(v, &tok, &cfg, r))
        .unwrap()
        .train
}

fn policy() -> mo_align::model::loader::Loaded {
    let mut l = load_tiny(DType::F32);
    l.model.attach_lora(&LoraConfig::default(), 11).unwrap();
    l
}

fn model_key() -> mo_align::util::digest::Digest {
    mo_align::cache::model_digest(
        &mo_align::model::loader::resolve(tiny_dir().to_str().unwrap()).unwrap(),
        None,
        "f32",
    )
    .unwrap()
}

#[test]
fn precomputed_reference_equals_inline_reference_and_survives_the_cache() {
    let l = policy();
    let ps = pairs(6);
    let dir = scratch("ref-cache");
    let (c1, r1) = cached_reference(&l.model, &model_key(), &ps, &dir, true).unwrap();
    let (c2, r2) = cached_reference(&l.model, &model_key(), &ps, &dir, true).unwrap();
    assert_eq!(
        (&c1, &r1),
        (&c2, &r2),
        "cache hit must return the computed values"
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    // Inline: all six pairs in one batch, adapters disabled.
    let ids: Vec<_> = ps.iter().map(|p| p.ids()).collect();
    let inline = pair_logprobs(&l.model, &ids, ForwardCtx::REFERENCE).unwrap();
    assert_eq!(inline.chosen.to_vec1::<f32>().unwrap(), c1);
    assert_eq!(inline.rejected.to_vec1::<f32>().unwrap(), r1);
}

#[test]
fn packed_pairs_score_exactly_the_response_tokens() {
    let l = load_tiny(DType::F64);
    for p in pairs(3) {
        // Shared prompt: both responses follow byte-identical prompt ids (one copy in the pair).
        assert!(!p.prompt.is_empty() && p.chosen.last() == Some(&l.tokenizer.im_end));
        assert_eq!(
            p.prompt,
            l.tokenizer.encode_prompt(&p.prompt_messages).unwrap()
        );
        let lp = pair_logprobs(
            &l.model,
            &[(&p.prompt, &p.chosen, &p.rejected)],
            ForwardCtx::EVAL,
        )
        .unwrap();
        assert_eq!(
            (lp.chosen_tokens[0], lp.rejected_tokens[0]),
            (p.chosen.len(), p.rejected.len())
        );
        // Each response scored alone as prompt + response, labels on the response only.
        for (resp, got) in [(&p.chosen, &lp.chosen), (&p.rejected, &lp.rejected)] {
            let seq: Vec<u32> = p.prompt.iter().chain(resp.iter()).copied().collect();
            let labelled: Vec<bool> = (0..seq.len()).map(|i| i >= p.prompt.len()).collect();
            let alone =
                mo_align::eval::sequence_nll(&l.model, &[(seq, labelled)], ForwardCtx::EVAL)
                    .unwrap();
            assert_eq!(alone.tokens, resp.len());
            let got = got.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()[0];
            // Pair sums are f32; the f64 model makes everything before that exact.
            assert!(
                (got + alone.nll).abs() < 1e-6 * alone.nll.abs(),
                "packed {got} vs alone {}",
                -alone.nll
            );
        }
    }
}

fn examples(l: &mo_align::model::loader::Loaded, ps: &[PreferencePair]) -> Vec<DpoExample> {
    let dir = scratch("ref-step0");
    let (c, r) = cached_reference(&l.model, &model_key(), ps, &dir, true).unwrap();
    ps.iter()
        .zip(c.into_iter().zip(r))
        .map(|(p, (ref_chosen, ref_rejected))| DpoExample {
            pair: p.clone(),
            ref_chosen,
            ref_rejected,
            offset: 0.0,
            scale: 1.0,
            gate: vec![],
        })
        .collect()
}

#[test]
fn at_step_zero_the_policy_is_the_reference() {
    let l = policy();
    let ex = examples(&l, &pairs(5));
    let batch: Vec<&DpoExample> = ex.iter().collect();
    let dpo = Dpo {
        model: &l.model,
        cfg: DpoConfig::default(),
        explicit: false,
    };
    let dropout = DropoutRng::new(3);
    // As the trainer runs it: adapter gradients into a sink (the fused decoder, which also
    // computed the reference log-probs, so a zero adapter gives exactly the reference).
    let sink = mo_align::model::ctx::GradSink::new();
    for ctx in [
        ForwardCtx::EVAL,
        ForwardCtx::train(&dropout).with_sink(&sink),
    ] {
        let out = dpo.loss(&batch, ctx).unwrap();
        let m: std::collections::HashMap<_, _> = out.metrics.into_iter().collect();
        for k in [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
        ] {
            assert_eq!(m[k], 0.0, "{k} at step 0");
        }
        let loss = out.loss_sum.to_scalar::<f32>().unwrap() / batch.len() as f32;
        assert_eq!(loss, std::f32::consts::LN_2, "sigmoid loss at step 0");
    }
}

#[test]
fn modpo_with_unit_preference_weight_and_zero_lambda_hybrid_are_plain_dpo() {
    let l = policy();
    let mut ex = examples(&l, &pairs(4));
    // Nudge the adapter so the policy differs from the reference.
    for (_, v) in l.model.lora_vars() {
        v.set(&(v.as_tensor() + 0.01).unwrap()).unwrap();
    }
    let batch: Vec<&DpoExample> = ex.iter().collect();
    let dpo = Dpo {
        model: &l.model,
        cfg: DpoConfig::default(),
        explicit: false,
    };
    let plain = dpo
        .loss(&batch, ForwardCtx::EVAL)
        .unwrap()
        .loss_sum
        .to_scalar::<f32>()
        .unwrap();
    let scores = [vec![0.9f32, 0.2, 0.7, 0.4], vec![0.1f32, 0.8, 0.3, 0.6]];
    // All-zero weights are refused in configs (the run would be plain DPO); the algebra
    // behind that message is checked here, below the config check.
    let modpo = HybridConfig {
        formulation: Formulation::Modpo,
        preference_weight: 1.0,
        ..HybridConfig::default()
    };
    let hybrid = HybridConfig {
        formulation: Formulation::Hybrid,
        lambda: 0.0,
        ..HybridConfig::default()
    };
    for (h, w) in [(modpo, [0.0; 4]), (hybrid, [0.25; 4])] {
        for e in ex.iter_mut() {
            (e.offset, e.scale) = explicit_terms_with(&h, &w, &scores[0], &scores[1]).unwrap();
        }
        let batch: Vec<&DpoExample> = ex.iter().collect();
        let got = dpo
            .loss(&batch, ForwardCtx::EVAL)
            .unwrap()
            .loss_sum
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(
            got, plain,
            "{:?} does not reduce to plain DPO",
            h.formulation
        );
    }
    // And the explicit terms themselves, by hand: equal weights, linear: 0.25 * (2.2 - 1.8),
    // subtracted by default (steer), added in the report's literal form (offset).
    for (direction, sign) in [(Direction::Steer, -1.0), (Direction::Offset, 1.0)] {
        let lin = HybridConfig {
            lambda: 2.0,
            direction,
            ..HybridConfig::default()
        };
        let (off, scale) = explicit_terms(&lin, &scores[0], &scores[1]).unwrap();
        assert!(
            (off - sign * 2.0 * 0.25 * (2.2 - 1.8)).abs() < 1e-6 && scale == 1.0,
            "{direction:?}: {off}"
        );
    }
    let m = HybridConfig {
        formulation: Formulation::Modpo,
        weights: vec![0.5, 0.0, 0.0, 0.5],
        preference_weight: 0.5,
        ..HybridConfig::default()
    };
    let (off, scale) = explicit_terms(&m, &scores[0], &scores[1]).unwrap();
    assert!(
        (off - -(0.5 * 0.8 + 0.5 * -0.2)).abs() < 1e-6 && scale == 2.0,
        "{off} {scale}"
    );
}

#[test]
fn bad_preference_records_are_named() {
    let tok =
        mo_align::tokenizer::ChatTokenizer::from_file(&tiny_dir().join("tokenizer.json")).unwrap();
    let cfg = DataConfig::default();
    let cases = [
        (
            r#"{"chosen": [{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#,
            "rejected",
            "missing",
        ),
        (
            r#"{"chosen": [{"role":"user","content":"a"},{"role":"assistant","content":"b"}], "rejected": [{"role":"user","content":"X"},{"role":"assistant","content":"c"}]}"#,
            "rejected",
            "differs",
        ),
        (
            r#"{"chosen": [{"role":"user","content":"a"},{"role":"user","content":"b"}], "rejected": [{"role":"user","content":"a"},{"role":"assistant","content":"c"}]}"#,
            "chosen[1].role",
            "last message",
        ),
        (r#"{"chosen": "b", "rejected": "c"}"#, "prompt", "needed"),
    ];
    for (json, field, problem) in cases {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        match preference_pair(&v, &tok, &cfg, &mut DataReport::default()) {
            Parsed::Bad(e) => assert!(
                e.field == field && e.problem.contains(problem),
                "{json}: {e:?}"
            ),
            _ => panic!("{json}: accepted"),
        }
    }
    let v: serde_json::Value =
        serde_json::from_str(r#"{"prompt": "a", "chosen": "b", "rejected": "c"}"#).unwrap();
    assert!(matches!(
        preference_pair(&v, &tok, &cfg, &mut DataReport::default()),
        Parsed::Ok(_)
    ));
}

fn run_stage(
    f: fn(
        Option<&Path>,
        &[String],
        mo_align::recipes::RunFlags,
    ) -> anyhow::Result<mo_align::train::trainer::TrainOutcome>,
    config: &str,
    sets: &[String],
) -> mo_align::train::trainer::TrainOutcome {
    f(Some(Path::new(config)), sets, flags(false, true)).unwrap()
}

/// The demo chain on the tiny model: SFT -> reward model -> DPO -> hybrid DPO (Chebyshev) ->
/// MODPO -> reward-weighted, each stage reading the previous stage's files.
#[test]
fn demo_chain_runs_and_the_reward_model_learns() {
    let root = scratch("chain");
    let p = |s: &str| root.join(s).to_str().unwrap().to_string();
    let model = format!("model.path={:?}", tiny_dir().to_str().unwrap());
    let cache = format!("{:?}", p("cache"));
    let sft = sft_lora_30_steps(tiny_dir(), &root.join("sft"));
    assert_eq!((sft.steps, sft.skipped_steps), (30, 0));
    let adapter = format!("model.adapter={:?}", p("sft"));
    mo_align::recipes::train_rm::run(
        Some(Path::new("configs/demo/train-rm.toml")),
        &[
            model.clone(),
            adapter.clone(),
            format!("train.output_dir={:?}", p("rm")),
            format!("train.cache_dir={cache}"),
        ],
        flags(false, true),
    )
    .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("rm/reward_model.json")).unwrap())
            .unwrap();
    assert_eq!(
        report["objectives"],
        serde_json::json!([
            "helpfulness",
            "truthfulness",
            "instruction_following",
            "honesty"
        ])
    );
    let m = metrics(&root.join("rm"));
    let losses: Vec<f64> = m.iter().filter_map(|l| l["loss"].as_f64()).collect();
    assert!(
        losses.last().unwrap() < &(losses[0] * 0.8),
        "reward head MSE did not fall: {losses:?}"
    );
    let rm_report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("rm/rm_report.json")).unwrap())
            .unwrap();
    for o in [
        "helpfulness",
        "truthfulness",
        "instruction_following",
        "honesty",
    ] {
        assert!(rm_report["validation"][o]["mse"]
            .as_f64()
            .unwrap()
            .is_finite());
    }
    // The ranking accuracy is recorded over the binarized pairs (at least 20 of them).
    let ranking = &rm_report["ranking"];
    assert!(ranking["pairs"].as_u64().unwrap() >= 20, "{ranking}");
    assert!((0.0..=1.0).contains(&ranking["composite_accuracy"].as_f64().unwrap()));

    let common = |out: &str| {
        vec![
            model.clone(),
            adapter.clone(),
            format!("train.output_dir={:?}", p(out)),
            format!("train.cache_dir={cache}"),
            "train.max_steps=10".into(),
        ]
    };
    run_stage(
        mo_align::recipes::dpo::run_dpo,
        "configs/demo/dpo.toml",
        &common("dpo"),
    );
    let hybrid_sets = |out: &str, extra: &[&str]| {
        let mut v = common(out);
        v.push(format!("hybrid.reward_model={:?}", p("rm")));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    run_stage(
        mo_align::recipes::dpo::run_hybrid,
        "configs/demo/hybrid-dpo.toml",
        &hybrid_sets("hybrid", &[]),
    );
    let m = metrics(&root.join("hybrid"));
    assert!(
        m.iter().any(|l| l.get("explicit/share").is_some()),
        "hybrid runs log the explicit term's share"
    );
    run_stage(
        mo_align::recipes::dpo::run_hybrid,
        "configs/demo/hybrid-dpo.toml",
        &hybrid_sets("modpo", &["hybrid.formulation=\"modpo\""]),
    );
    // Rule objectives beside the reward model's heads (a vector of 4 + 4), and instead of them.
    run_stage(
        mo_align::recipes::dpo::run_hybrid,
        "configs/demo/hybrid-dpo.toml",
        &hybrid_sets(
            "hybrid-rules",
            &["hybrid.rules=\"configs/demo/rules.toml\""],
        ),
    );
    let wrong_count = match mo_align::recipes::dpo::run_hybrid(
        Some(Path::new("configs/demo/hybrid-dpo.toml")),
        &hybrid_sets(
            "hybrid-rules-bad",
            &[
                "hybrid.rules=\"configs/demo/rules.toml\"",
                "hybrid.weights=[1.0, 0.0, 0.0, 0.0]",
            ],
        ),
        flags(false, true),
    ) {
        Ok(_) => panic!("4 weights for an 8-entry reward vector are refused"),
        Err(e) => e,
    };
    assert!(
        format!("{wrong_count:#}").contains("(rules)"),
        "{wrong_count:#}"
    );
    run_stage(
        mo_align::recipes::reward_weighted::run,
        "configs/demo/reward-weighted.toml",
        &[
            model.clone(),
            adapter.clone(),
            format!("train.output_dir={:?}", p("rw")),
            format!("reward.reward_model={:?}", p("rm")),
            format!("train.cache_dir={cache}"),
            "train.max_steps=10".into(),
        ],
    );
    run_stage(
        mo_align::recipes::reward_weighted::run,
        "configs/demo/reward-weighted.toml",
        &[
            model.clone(),
            adapter.clone(),
            format!("train.output_dir={:?}", p("rw-rules")),
            "reward.reward_model=\"\"".into(),
            "reward.rules=\"configs/demo/rules.toml\"".into(),
            format!("train.cache_dir={cache}"),
            "train.max_steps=10".into(),
        ],
    );
    // Weight-conditioned hybrid DPO (pairs labelled by the weighted reward) and reward-weighted
    // training: each records how to state weights to it.
    run_stage(
        mo_align::recipes::dpo::run_hybrid,
        "configs/demo/hybrid-dpo.toml",
        &hybrid_sets(
            "conditioned",
            &[
                "hybrid.reward_model=\"\"",
                "hybrid.rules=\"configs/demo/rules.toml\"",
                "hybrid.preference=\"weighted\"",
                "conditioning.enabled=true",
                "conditioning.draws=2",
            ],
        ),
    );
    run_stage(
        mo_align::recipes::reward_weighted::run,
        "configs/demo/reward-weighted.toml",
        &[
            model.clone(),
            adapter.clone(),
            format!("train.output_dir={:?}", p("rw-conditioned")),
            "reward.reward_model=\"\"".into(),
            "reward.rules=\"configs/demo/rules.toml\"".into(),
            "conditioning.enabled=true".into(),
            "conditioning.placement=\"user\"".into(),
            format!("train.cache_dir={cache}"),
            "train.max_steps=10".into(),
        ],
    );
    for (stage, placement) in [("conditioned", "system"), ("rw-conditioned", "user")] {
        let info = mo_align::objectives::conditioning::ConditioningInfo::load(&root.join(stage))
            .unwrap()
            .unwrap_or_else(|| panic!("{stage}: no conditioning.json"));
        assert_eq!(
            info.objectives,
            [
                "helpfulness",
                "honesty",
                "instruction_following",
                "truthfulness"
            ]
        );
        assert_eq!(format!("{:?}", info.placement).to_lowercase(), placement);
    }
    // The conditioned adapter answers at a weighting; a plain one refuses --weights.
    let generate = |adapter: &str| {
        std::process::Command::new(common::bin())
            .args(["generate", "--model", tiny_dir().to_str().unwrap()])
            .args(["--adapter", &p(adapter), "--prompt", "Name a colour."])
            .args(["--weights", "0.7,0.1,0.1,0.1", "--max-new-tokens", "4"])
            .args(["--device", "cpu", "--json"])
            .output()
            .unwrap()
    };
    let ok = generate("conditioned");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(
        out["conditioning"],
        "Objective weights: helpfulness=0.70, honesty=0.10, instruction_following=0.10, truthfulness=0.10"
    );
    let refused = generate("dpo");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("conditioning.json"),
        "{err}"
    );

    // Every preference stage ran its 10 steps, moved its adapter off zero (B starts at zero),
    // and logged finite losses.
    for stage in [
        "dpo",
        "hybrid",
        "modpo",
        "hybrid-rules",
        "rw",
        "rw-rules",
        "conditioned",
        "rw-conditioned",
    ] {
        let dir = root.join(stage);
        assert!(lora_b_norm(&dir) > 0.0, "{stage}: the adapter did not move");
        let m = metrics(&dir);
        let last_step = m.iter().filter_map(|l| l["step"].as_u64()).max();
        assert_eq!(last_step, Some(10), "{stage}");
        let losses: Vec<f64> = m.iter().filter_map(|l| l["loss"].as_f64()).collect();
        assert!(
            !losses.is_empty() && losses.iter().all(|l| l.is_finite()),
            "{stage}: {losses:?}"
        );
    }
    // DPO starts at ln 2 (policy = reference) and its loss falls within 10 steps.
    let dpo: Vec<f64> = metrics(&root.join("dpo"))
        .iter()
        .filter_map(|l| l["loss"].as_f64())
        .collect();
    assert!(dpo.last().unwrap() < &0.69, "DPO loss {dpo:?}");
}

#[test]
fn cached_reward_features_equal_recomputed_ones() {
    let l = load_tiny(DType::F32);
    let ps = pairs(4);
    let seqs: Vec<Vec<u32>> = ps
        .iter()
        .map(|p| [p.prompt.as_slice(), &p.chosen].concat())
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let scored: Vec<ScoredSequence> = refs
        .iter()
        .zip(&ps)
        .map(|(s, p)| ScoredSequence::new(s, p.prompt.len()))
        .collect();
    let dir = scratch("feature-cache");
    let key = model_key();
    let backbone = (&l.model, FeatureSet::LastToken, &key);
    let a =
        mo_align::reward::features::cached_features(backbone, &scored, 3, &dir, true, "t").unwrap();
    let b =
        mo_align::reward::features::cached_features(backbone, &scored, 3, &dir, true, "t").unwrap();
    let c = mo_align::reward::features::last_token_features(
        &l.model,
        &refs,
        1,
        ForwardCtx::EVAL,
        &|_| {},
    )
    .unwrap();
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    let d = tensor_max_diff(&a, &c);
    assert!(d < 1e-5, "batched features differ from one-by-one by {d}");
    // The last-token feature is the final hidden state at that position.
    let input = ModelInput::right_padded(&seqs[..1], 0, &Device::Cpu).unwrap();
    let h = l.model.forward(&input, ForwardCtx::EVAL, None).unwrap();
    let last = h.get(0).unwrap().get(seqs[0].len() - 1).unwrap();
    assert_eq!(
        last.to_vec1::<f32>().unwrap(),
        c.get(0).unwrap().to_vec1::<f32>().unwrap()
    );
}

/// `last_mean_logprob` features: [last-token state, mean response state, mean / min / sum of
/// the response token log-probs], batched equal to by hand.
#[test]
fn log_likelihood_reward_features_are_what_they_say() {
    let l = load_tiny(DType::F32);
    let ps = pairs(3);
    let seqs: Vec<Vec<u32>> = ps
        .iter()
        .map(|p| [p.prompt.as_slice(), &p.chosen].concat())
        .collect();
    let scored: Vec<ScoredSequence> = seqs
        .iter()
        .zip(&ps)
        .map(|(s, p)| ScoredSequence::new(s, p.prompt.len()))
        .collect();
    let set = FeatureSet::LastMeanLogprob;
    let f = mo_align::reward::features::reward_features(
        &l.model,
        set,
        &scored,
        2,
        ForwardCtx::EVAL,
        &|_| {},
    )
    .unwrap();
    let hdim = l.model.config.hidden_size;
    assert_eq!(f.dims(), [3, set.dim(hdim)]);
    for (i, s) in seqs.iter().enumerate() {
        let start = ps[i].prompt.len();
        let input = ModelInput::right_padded(&seqs[i..i + 1], 0, &Device::Cpu).unwrap();
        let h = l
            .model
            .forward(&input, ForwardCtx::EVAL, None)
            .unwrap()
            .get(0)
            .unwrap();
        let want_mean = h
            .narrow(0, start, s.len() - start)
            .unwrap()
            .mean(0)
            .unwrap();
        let logits = h.matmul(&l.model.output_weight().t().unwrap()).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, 1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let lp: Vec<f32> = (start..s.len())
            .map(|p| logp[p - 1][s[p] as usize])
            .collect();
        let sum: f32 = lp.iter().sum();
        let min = lp.iter().cloned().fold(f32::INFINITY, f32::min);
        let row = f.get(i).unwrap().to_vec1::<f32>().unwrap();
        let last = h.get(s.len() - 1).unwrap().to_vec1::<f32>().unwrap();
        let close = |a: &[f32], b: &[f32], what: &str| {
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(d < 1e-4, "row {i} {what} differs by {d}");
        };
        close(&row[..hdim], &last, "last-token state");
        close(
            &row[hdim..2 * hdim],
            &want_mean.to_vec1::<f32>().unwrap(),
            "mean state",
        );
        close(
            &row[2 * hdim..],
            &[sum / lp.len() as f32, min, sum],
            "log-prob stats",
        );
    }
}

#[test]
fn dpo_overfits_fifty_pairs() {
    let out = scratch("dpo-overfit");
    let model = format!("model.path={:?}", tiny_dir().to_str().unwrap());
    let o = mo_align::recipes::dpo::run_dpo(
        Some(Path::new("configs/demo/dpo.toml")),
        &[
            model,
            "model.adapter=\"\"".into(),
            format!("train.output_dir={:?}", out.to_str().unwrap()),
            format!("train.cache_dir={:?}", out.join("cache").to_str().unwrap()),
            "data.max_samples=50".into(),
            "data.validation_files=[]".into(),
            "train.epochs=30".into(),
            "train.batch_size=5".into(),
            "train.grad_accum=1".into(),
            "train.lr=5e-3".into(),
            "train.log_every=50".into(),
        ],
        flags(false, true),
    )
    .unwrap();
    assert_eq!(o.steps, 300);
    let m = metrics(&out);
    let last = m
        .iter()
        .rev()
        .find(|l| l.get("rewards/accuracies").is_some())
        .unwrap();
    let acc = last["rewards/accuracies"].as_f64().unwrap();
    assert!(
        acc > 0.9,
        "rewards/accuracies on the training pairs only reached {acc}"
    );
    assert!(last["rewards/margins"].as_f64().unwrap() > 0.0);
}
