//! The weights each preference pair's loss uses. Without conditioning that is the config's one
//! weighting for every pair. With `[conditioning]`, each pair appears `draws` times per epoch,
//! each time with its own weights, stated to the policy in its system prompt
//! (`objectives::conditioning`), and `conditioning.json` is written beside the adapter. With
//! `mode = "adapter"` the weights gate the adapter's per-objective blocks instead of being
//! written into the prompt, and each block is exported as its own PEFT adapter.

use super::stage::{AdapterStage, StageRun};
use crate::model::lora::LoraConfig;
use crate::model::peft::{read_peft_tensors, write_peft_adapter};
use crate::objectives::conditioning::{
    ConditioningConfig, ConditioningInfo, ConditioningMode, INFO_FILE,
};
use crate::objectives::weighting::Weighting;
use crate::reward::vector::ScoredPair;
use crate::util::rng::mix_seed;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// A pair and the objective weights its loss uses.
#[derive(Debug, Clone)]
pub struct WeightedScoredPair {
    pub scored: ScoredPair,
    pub weights: Weighting,
    /// `mode = "adapter"`: the gates of the adapter's blocks (empty otherwise).
    pub gate: Vec<f32>,
}

/// The stage to run: as configured, or with `mode = "adapter"` its LoRA widened to a shared
/// block and one block per objective, each of rank `lora.r` (rank (k + 1) r, alpha scaled so
/// every block keeps the configured scale s).
pub fn stage_for(
    stage: &AdapterStage,
    cond: &ConditioningConfig,
    k: usize,
) -> Result<AdapterStage> {
    let mut stage = stage.clone();
    if !(cond.enabled && cond.mode == ConditioningMode::Adapter) {
        return Ok(stage);
    }
    if stage
        .lora
        .init_from
        .as_deref()
        .is_some_and(|p| !p.is_empty())
    {
        bail!("conditioning.mode = \"adapter\" trains fresh per-objective blocks; lora.init_from is not supported with it");
    }
    stage.lora = blocks_of(&stage.lora, k + 1);
    Ok(stage)
}

/// `n` blocks of `block` side by side: rank n r, with alpha scaled so the scale s is the same.
fn blocks_of(block: &LoraConfig, n: usize) -> LoraConfig {
    let wide = LoraConfig {
        r: block.r * n,
        alpha: if block.use_rslora {
            block.alpha * (n as f64).sqrt()
        } else {
            block.alpha * n as f64
        },
        ..block.clone()
    };
    debug_assert!((wide.scale() - block.scale()).abs() < 1e-9 * block.scale().abs().max(1.0));
    wide
}

/// `mode = "adapter"`: writes each objective's part of the trained adapter in `run.out` as a
/// plain PEFT adapter (`objectives/<name>/`: the shared block and the objective's block, rank
/// 2 `block.r`, the configured scale).
pub fn export_blocks(run: &StageRun, block: &LoraConfig, info: &ConditioningInfo) -> Result<()> {
    if info.mode() != ConditioningMode::Adapter {
        return Ok(());
    }
    let tensors = read_peft_tensors(&run.out, &Device::Cpu)?;
    let r = block.r;
    let pair = blocks_of(block, 2);
    for (i, rel) in info.blocks.iter().enumerate() {
        let mut parts = vec![];
        for (module, (a, b)) in &tensors {
            let (j, shared) = ((i + 1) * r, 0);
            parts.push((
                module.clone(),
                Tensor::cat(&[a.narrow(0, shared, r)?, a.narrow(0, j, r)?], 0)?,
                Tensor::cat(&[b.narrow(1, shared, r)?, b.narrow(1, j, r)?], 1)?,
            ));
        }
        parts.sort_by(|x, y| x.0.cmp(&y.0));
        write_peft_adapter(
            &run.out.join(rel),
            &pair,
            &super::base_name(&run.stage.model),
            &parts,
        )?;
    }
    Ok(())
}

/// Which split's draws: validation pairs draw from their own stream, once each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
}

/// When `[conditioning]` is on, records how to state weights over `objectives` (the reward
/// vector's line names) to the policy: `conditioning.json` in the run's output directory.
pub fn prepare(
    run: &StageRun,
    cond: &ConditioningConfig,
    objectives: Vec<String>,
) -> Result<Option<ConditioningInfo>> {
    if !cond.enabled {
        return Ok(None);
    }
    let info = ConditioningInfo::new(objectives, cond)?;
    let text = serde_json::to_string_pretty(&info)?;
    run.queue(INFO_FILE, format!("{text}\n").into_bytes());
    Ok(Some(info))
}

/// Every pair with its weights: `fixed` for all without conditioning, else per-draw weights
/// and a prompt re-encoded with the conditioning line (responses truncated to
/// `data.max_length` as the data loader truncates them; a prompt that no longer fits is left
/// out and counted).
pub fn weighted_pairs(
    run: &StageRun,
    cond: &ConditioningConfig,
    info: Option<&ConditioningInfo>,
    fixed: &Weighting,
    pairs: &[ScoredPair],
    split: Split,
) -> Result<Vec<WeightedScoredPair>> {
    let Some(info) = info else {
        return Ok(pairs
            .iter()
            .map(|p| WeightedScoredPair {
                scored: p.clone(),
                weights: fixed.clone(),
                gate: vec![],
            })
            .collect());
    };
    let (seed, draws) = match split {
        Split::Train => (run.stage.train.seed, cond.draws),
        Split::Validation => (mix_seed(run.stage.train.seed, u64::MAX, 1), 1),
    };
    let (tok, max_length) = (&run.loaded.tokenizer, run.stage.data.max_length);
    let k = info.objectives.len();
    let (mut out, mut dropped) = (vec![], 0usize);
    for draw in 0..draws as u64 {
        for (i, p) in pairs.iter().enumerate() {
            let weights = cond.draw(seed, draw, i as u64, &info.objectives)?;
            if info.mode() == ConditioningMode::Adapter {
                out.push(WeightedScoredPair {
                    scored: p.clone(),
                    gate: ConditioningInfo::gate(weights.values(), run.stage.lora.r / (k + 1)),
                    weights,
                });
                continue;
            }
            let line = info.line(&weights)?;
            let mut scored = p.clone();
            let pair = &mut scored.pair;
            pair.prompt_messages = info.place(&pair.prompt_messages, &line);
            pair.prompt = tok.encode_prompt(&pair.prompt_messages)?;
            if pair.prompt.len() >= max_length {
                dropped += 1;
                continue;
            }
            let room = max_length - pair.prompt.len();
            pair.chosen.truncate(room);
            pair.rejected.truncate(room);
            out.push(WeightedScoredPair {
                scored,
                weights,
                gate: vec![],
            });
        }
    }
    if dropped > 0 {
        eprintln!(
            "conditioning: {dropped} {split:?} pairs left out: with the conditioning line their prompt exceeds data.max_length = {max_length}"
        );
    }
    Ok(out)
}
