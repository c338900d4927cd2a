//! Weight conditioning: each example draws its own objective weights, the policy
//! sees them in a fixed line of text, and the loss uses exactly the weights that line states.
//!
//! The line is `Objective weights: helpfulness=0.40, honesty=0.10, ...` (`Weighting::line`), in
//! the objectives' order; draws are quantised as the line states them before use.
//! Draws are a pure function of (seed, epoch, example index): batching, resumption and the
//! number of workers do not change which weights an example gets.

use crate::objectives::weighting::{quantise, Weighting, PREFIX};
use crate::tokenizer::Message;
use crate::util::rng::{mix_seed, stream_rng};
use anyhow::{bail, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The file written beside a conditioned adapter: how to state the weights to it.
pub const INFO_FILE: &str = "conditioning.json";

/// The `[conditioning]` section of `hybrid-dpo` and `reward-weighted`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConditioningConfig {
    /// Train one policy for every weighting: each example draws its own weights, sees them in
    /// its system prompt, and its loss uses them.
    pub enabled: bool,
    /// Concentration of the Dirichlet the weights are drawn from: 1 is uniform on the simplex,
    /// below 1 favours weightings near a single objective, above 1 favours balanced ones.
    pub alpha: f64,
    /// Draw uniformly from these weightings instead of the Dirichlet (each is normalised).
    pub weights: Vec<Vec<f64>>,
    /// How many times each training pair appears per epoch, each time with its own draw.
    pub draws: usize,
    /// Where the policy reads the line.
    pub placement: Placement,
    /// How the policy is given its weights.
    pub mode: ConditioningMode,
}

/// How a conditioned policy is given its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConditioningMode {
    /// In the prompt: the conditioning line (Rewards-in-Context, DPA). The policy has to learn
    /// to read it.
    #[default]
    Prompt,
    /// In the adapter: a shared LoRA block plus one block per objective, each of rank
    /// `lora.r`, side by side; every objective block's output is scaled by its objective's
    /// weight, so the update at w is B_0 A_0 + sum_i w_i B_i A_i (a jointly trained Rewarded
    /// soup; Panacea scales singular values the same way). The shared block learns what every
    /// weighting wants, so the objective blocks learn only where they differ. Nothing has to be
    /// read. Objective i exports as one plain PEFT adapter (`objectives/<name>/`: the shared
    /// block and block i, rank 2r), and since the weights sum to 1 the policy at w is exactly
    /// the soup sum_i w_i * adapter_i.
    Adapter,
}

/// Where the conditioning line goes in a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// The system message (a prompt's own system message follows it after a newline).
    #[default]
    System,
    /// The end of the last user message, after a blank line: next to where the answer starts,
    /// for models that learned to pay little heed to system prompts.
    User,
}

impl Default for ConditioningConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            alpha: 1.0,
            weights: vec![],
            draws: 1,
            placement: Placement::System,
            mode: ConditioningMode::Prompt,
        }
    }
}

impl ConditioningConfig {
    /// Refuses settings that draw nothing usable for a reward vector over `objectives`.
    pub fn validate(&self, objectives: &[String]) -> Result<()> {
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!(
                "conditioning.alpha must be a finite number > 0, got {}",
                self.alpha
            );
        }
        // Each draw is one more scored copy of every pair, held in memory.
        if self.draws > 64 {
            bail!("conditioning.draws must be at most 64, got {}", self.draws);
        }
        if self.draws == 0 {
            bail!("conditioning.draws must be at least 1");
        }
        for (i, w) in self.weights.iter().enumerate() {
            let what = format!("conditioning.weights[{i}]");
            Weighting::for_objectives(w.clone(), objectives, &what)?;
        }
        Ok(())
    }

    /// The weights of draw `draw` of example `index` over `objectives` (quantised, summing to
    /// 1.00).
    pub fn draw(
        &self,
        seed: u64,
        draw: u64,
        index: u64,
        objectives: &[String],
    ) -> Result<Weighting> {
        let what = "conditioning draw";
        if self.weights.is_empty() {
            let w = dirichlet_weights(seed, draw, index, objectives.len(), self.alpha);
            return Weighting::for_objectives(w, objectives, what);
        }
        let mut rng = stream_rng(mix_seed(seed, draw, index), 0x6c69_7374);
        let w = self.weights[rng.random_range(0..self.weights.len())].clone();
        Ok(Weighting::for_objectives(w, objectives, what)?.quantised())
    }
}

/// What `conditioning.json` records: enough for `generate`, `eval`, `pareto` and a Python user
/// to state a weighting the way the policy was trained to read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConditioningInfo {
    pub format: String,
    /// The objectives, in the order the line names them.
    pub objectives: Vec<String>,
    /// How the line is written.
    pub template: String,
    /// Where the line goes (`system` or `user`), and in words.
    pub placement: Placement,
    pub placement_note: String,
    /// One line for equal weights, as the policy saw lines in training.
    pub example: String,
    /// How training drew weightings (`alpha`, `weights`, `draws`, `placement`, `mode`).
    pub sampling: ConditioningConfig,
    /// `mode = "adapter"`: the per-objective PEFT adapters, relative to this file's directory,
    /// in the objectives' order; the policy at w merges sum_i w_i * adapter_i.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocks: Vec<String>,
}

impl ConditioningInfo {
    /// The record of a conditioned run over `objectives`; an objective's name becomes its
    /// block's directory name, so each must be one safe path component.
    pub fn new(objectives: Vec<String>, sampling: &ConditioningConfig) -> Result<Self> {
        for o in &objectives {
            crate::util::paths::safe_component(o, "objective name")?;
        }
        let example = Weighting::equal(objectives.len()).line(&objectives);
        Ok(Self {
            format: "mo-align-conditioning/1".to_string(),
            template: format!("{PREFIX}<objective>=<weight>, ... (every objective in order, weights with two decimals summing to 1.00)"),
            placement: sampling.placement,
            placement_note: match sampling.placement {
                Placement::System => "the line is the system message; a prompt's own system message follows it after a newline",
                Placement::User => "the line ends the last user message, after a blank line",
            }
            .to_string(),
            example,
            blocks: match sampling.mode {
                ConditioningMode::Prompt => vec![],
                ConditioningMode::Adapter => objectives
                    .iter()
                    .map(|o| format!("{}/{o}", crate::outputs::BLOCKS_DIR))
                    .collect(),
            },
            objectives,
            sampling: sampling.clone(),
        })
    }

    /// `mode = "adapter"`: the per-objective adapters of the conditioned run in `dir`, each
    /// refused unless it resolves inside `dir` (the paths come from a file).
    pub fn block_dirs(&self, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
        let what = format!("{}: blocks", dir.join(INFO_FILE).display());
        if self.mode() == ConditioningMode::Adapter && self.blocks.len() != self.objectives.len() {
            bail!(
                "{what}: {} blocks for {} objectives {:?}",
                self.blocks.len(),
                self.objectives.len(),
                self.objectives
            );
        }
        self.blocks
            .iter()
            .map(|b| crate::util::paths::inside(dir, b, &what))
            .collect()
    }

    pub fn mode(&self) -> ConditioningMode {
        self.sampling.mode
    }

    /// The gates of the adapter's blocks for `weights`: 1 for the shared block, then each
    /// weight, every gate repeated `rank` times.
    pub fn gate(weights: &[f64], rank: usize) -> Vec<f32> {
        std::iter::once(1.0)
            .chain(weights.iter().copied())
            .flat_map(|w| std::iter::repeat_n(w as f32, rank))
            .collect()
    }

    /// The conditioning written beside the adapter (or model) in `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(INFO_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let info: Self = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a conditioning file", path.display()))?;
        Ok(Some(info))
    }

    /// The conditioning written beside the adapter in `dir`, refusing an adapter without one.
    pub fn require(dir: &Path) -> Result<Self> {
        Self::load(dir)?.with_context(|| {
            format!(
                "{}: no {INFO_FILE}: not a policy trained with [conditioning] enabled = true, so it takes no weights",
                dir.display()
            )
        })
    }

    /// The line stating `weights` (normalised and quantised), refusing a wrong count.
    pub fn line(&self, weights: &Weighting) -> Result<String> {
        weights.check_count(&self.objectives, "weights")?;
        Ok(weights.line(&self.objectives))
    }

    /// `messages` stating `line` where this policy reads it.
    pub fn place(&self, messages: &[Message], line: &str) -> Vec<Message> {
        with_line(messages, line, self.placement)
    }
}

/// `messages` with the conditioning line placed where `placement` says.
pub fn with_line(messages: &[Message], line: &str, placement: Placement) -> Vec<Message> {
    let mut out = messages.to_vec();
    match placement {
        Placement::System => match out.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{line}\n{}", m.content),
            _ => out.insert(0, Message::new("system", line)),
        },
        Placement::User => match out.iter_mut().rev().find(|m| m.role == "user") {
            Some(m) => m.content = format!("{}\n\n{line}", m.content),
            None => out.push(Message::new("user", line)),
        },
    }
    out
}

/// A Dirichlet(alpha, ..., alpha) draw over `k` objectives for example `index` of `epoch`,
/// quantised (see `quantise`).
pub fn dirichlet_weights(seed: u64, epoch: u64, index: u64, k: usize, alpha: f64) -> Vec<f64> {
    let mut rng = stream_rng(mix_seed(seed, epoch, index), 0x6469_7269);
    let g: Vec<f64> = (0..k).map(|_| gamma(&mut rng, alpha)).collect();
    let total: f64 = g.iter().sum();
    quantise(&g.iter().map(|x| x / total).collect::<Vec<_>>())
}

/// Gamma(shape, 1) by Marsaglia and Tsang; shapes below 1 through Gamma(shape + 1) * U^(1/shape).
fn gamma(rng: &mut impl Rng, shape: f64) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, shape + 1.0) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = standard_normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random::<f64>();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    /// conditioning.json is a file: block paths in it resolve inside its run, or are refused.
    #[test]
    fn block_paths_from_the_file_stay_inside_the_run() {
        let cfg = ConditioningConfig {
            mode: ConditioningMode::Adapter,
            ..ConditioningConfig::default()
        };
        let mut info = ConditioningInfo::new(vec!["a".into(), "b".into()], &cfg).unwrap();
        let run = std::path::Path::new("/tmp/some-run");
        assert_eq!(
            info.block_dirs(run).unwrap()[1],
            run.join(crate::outputs::BLOCKS_DIR).join("b")
        );
        for bad in ["../../etc", "/etc", "objectives/../../x"] {
            info.blocks[0] = bad.to_string();
            let e = info.block_dirs(run).unwrap_err().to_string();
            assert!(
                e.contains("not a path inside") && e.contains("conditioning.json"),
                "{e}"
            );
        }
        assert!(ConditioningInfo::new(vec!["../x".into()], &cfg).is_err());
    }

    use super::*;
    use crate::objectives::weighting::{format_line, parse_line};

    fn names() -> Vec<String> {
        let names = "helpfulness honesty instruction_following truthfulness";
        names.split(' ').map(String::from).collect()
    }

    #[test]
    fn dirichlet_draws_are_seeded_per_example_and_sum_to_one() {
        let a = dirichlet_weights(7, 0, 3, 4, 1.0);
        // The same (seed, epoch, index) gives the same weights whatever was drawn before:
        // a resumed run or another batching sees the same conditioning.
        for i in 0..10 {
            dirichlet_weights(7, 0, i, 4, 1.0);
        }
        assert_eq!(a, dirichlet_weights(7, 0, 3, 4, 1.0));
        assert_ne!(a, dirichlet_weights(7, 0, 4, 4, 1.0));
        assert_ne!(a, dirichlet_weights(7, 1, 3, 4, 1.0));
        assert_ne!(a, dirichlet_weights(8, 0, 3, 4, 1.0));
        for i in 0..200 {
            let w = dirichlet_weights(1, 0, i, 4, 0.5);
            let cents: i64 = w.iter().map(|x| (x * 100.0).round() as i64).sum();
            assert_eq!(cents, 100, "{w:?}");
            assert!(w.iter().all(|x| *x >= 0.0));
        }
        // The mean of Dirichlet(alpha) is 1/k on every objective.
        let n = 4000;
        let mut mean = [0.0; 4];
        for i in 0..n {
            for (m, x) in mean.iter_mut().zip(dirichlet_weights(2, 0, i, 4, 1.0)) {
                *m += x / n as f64;
            }
        }
        assert!(mean.iter().all(|m| (m - 0.25).abs() < 0.02), "{mean:?}");
    }

    #[test]
    fn drawn_weights_round_trip_through_the_line() {
        for i in 0..50 {
            let w = dirichlet_weights(3, 0, i, 4, 0.7);
            assert_eq!(parse_line(&format_line(&names(), &w), &names()).unwrap(), w);
        }
    }
}
