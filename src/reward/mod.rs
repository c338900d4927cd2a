//! The multi-objective reward model: a frozen backbone (the base model, optionally with the SFT
//! adapter merged) as feature extractor, and a linear head predicting one normalised rating per
//! objective from the final hidden state at the last token of the ChatML prompt + response.
//!
//! Files: `reward_head.safetensors` (`score.weight` [K, H], `score.bias` [K], and the feature
//! standardisation `feature_mean` / `feature_std` [H]) and `reward_model.json` (objective names,
//! rating normalisation, the backbone the head expects).

pub mod features;
pub mod rules;
pub mod vector;

use crate::model::Qwen;
use crate::train::trainable::Trainable;
use crate::util::io::{safetensors_bytes, write_atomic, write_json_atomic};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// What the reward head reads from its frozen backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureSet {
    /// The final hidden state at the last token of prompt + response (the usual reward-model feature): [H].
    #[default]
    LastToken,
    /// That, the mean final hidden state over the response tokens, and the backbone's own
    /// log-likelihood of the response (mean, min and sum of its token log-probs): [2H + 3].
    /// A wrong fact stated fluently looks like a right one at the last token; it is the token
    /// the backbone finds unlikely. On the demo task this lifts the held-out Pearson r of
    /// truthfulness from 0.64 to 0.86 and of honesty from 0.72 to 0.90.
    LastMeanLogprob,
}

impl FeatureSet {
    pub fn dim(self, hidden: usize) -> usize {
        match self {
            FeatureSet::LastToken => hidden,
            FeatureSet::LastMeanLogprob => 2 * hidden + 3,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            FeatureSet::LastToken => "final hidden state (after the last RMSNorm) at the last token of ChatML prompt + response",
            FeatureSet::LastMeanLogprob => "final hidden state at the last token, mean final hidden state over the response tokens, and the mean, min and sum of the backbone's response token log-probs",
        }
    }
}

pub const HEAD_FILE: &str = "reward_head.safetensors";
pub const INFO_FILE: &str = "reward_model.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardModelInfo {
    pub objectives: Vec<String>,
    /// How targets were made from ratings.
    pub rating_normalisation: String,
    /// The backbone the head was trained on: model path or Hub id, and adapter merged into it.
    pub backbone_model: String,
    pub backbone_adapter: Option<String>,
    /// The same paths made absolute when train-rm ran (local paths only), so the reward model
    /// is found from any working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone_model_abs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone_adapter_abs: Option<String>,
    /// `Qwen2::fingerprint` of the backbone (base + adapter merged) the head was trained on,
    /// exact in `backbone_dtype`, and rounded to bf16 (for a backbone run in another dtype).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone_fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone_fingerprint_bf16: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone_dtype: Option<String>,
    pub hidden_size: usize,
    pub feature: String,
    /// Which features the head reads (`last_token` for heads written before the choice).
    #[serde(default)]
    pub feature_set: FeatureSet,
}

pub struct RewardHead {
    pub info: RewardModelInfo,
    pub weight: Var,
    pub bias: Var,
    pub feature_mean: Tensor,
    pub feature_std: Tensor,
}

impl RewardHead {
    /// A zero head (predicts `initial` for every objective) with the given standardisation.
    pub fn new(
        info: RewardModelInfo,
        feature_mean: Tensor,
        feature_std: Tensor,
        initial: &[f32],
    ) -> Result<Self> {
        let dev = feature_mean.device().clone();
        let k = info.objectives.len();
        anyhow::ensure!(
            initial.len() == k,
            "initial values for {} objectives, head has {k}",
            initial.len()
        );
        Ok(Self {
            weight: Var::zeros(
                (k, info.feature_set.dim(info.hidden_size)),
                DType::F32,
                &dev,
            )?,
            bias: Var::from_tensor(&Tensor::new(initial, &dev)?)?,
            info,
            feature_mean,
            feature_std,
        })
    }

    /// Scores [N, K] from features [N, H].
    pub fn predict(&self, features: &Tensor) -> Result<Tensor> {
        let x = features
            .broadcast_sub(&self.feature_mean)?
            .broadcast_div(&self.feature_std)?;
        Ok(crate::model::matmul::matmul_t(&x, self.weight.as_tensor())?
            .broadcast_add(self.bias.as_tensor())?)
    }

    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let info = RewardModelInfo::load(dir)?;
        let head_path = dir.join(HEAD_FILE);
        let t = candle_core::safetensors::load(&head_path, device)
            .with_context(|| format!("{}: cannot read", head_path.display()))?;
        let get = |k: &str, shape: &[usize]| -> Result<Tensor> {
            let x = t
                .get(k)
                .with_context(|| format!("{}: tensor `{k}` is missing", head_path.display()))?;
            if x.dims() != shape {
                bail!(
                    "{}: tensor `{k}` has shape {:?}, expected {shape:?}",
                    head_path.display(),
                    x.dims()
                );
            }
            Ok(x.to_dtype(DType::F32)?)
        };
        let (k, h) = (
            info.objectives.len(),
            info.feature_set.dim(info.hidden_size),
        );
        let head = Self {
            weight: Var::from_tensor(&get("score.weight", &[k, h])?)?,
            bias: Var::from_tensor(&get("score.bias", &[k])?)?,
            feature_mean: get("feature_mean", &[h])?,
            feature_std: get("feature_std", &[h])?,
            info,
        };
        Ok(head)
    }

    /// A digest of the head's files, for caches of its scores.
    pub fn digest(dir: &Path) -> Result<crate::util::digest::Digest> {
        let mut d = crate::util::digest::Digest::default();
        d.file(&dir.join(INFO_FILE))?.file(&dir.join(HEAD_FILE))?;
        Ok(d)
    }
}

impl Trainable for RewardHead {
    fn vars(&self) -> Vec<(String, Var)> {
        vec![
            ("score.weight".into(), self.weight.clone()),
            ("score.bias".into(), self.bias.clone()),
        ]
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let tensors = HashMap::from([
            ("score.weight".to_string(), self.weight.as_tensor().clone()),
            ("score.bias".to_string(), self.bias.as_tensor().clone()),
            ("feature_mean".to_string(), self.feature_mean.clone()),
            ("feature_std".to_string(), self.feature_std.clone()),
        ]);
        write_atomic(&dir.join(HEAD_FILE), &safetensors_bytes(&tensors, None)?)?;
        write_json_atomic(&dir.join(INFO_FILE), &self.info)
    }

    fn load(&self, dir: &Path) -> Result<()> {
        let saved = Self::load(dir, self.weight.device())?;
        self.weight.set(saved.weight.as_tensor())?;
        self.bias.set(saved.bias.as_tensor())?;
        Ok(())
    }
}

impl RewardModelInfo {
    /// The description in the reward-model directory `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(INFO_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: cannot read (not a reward model directory?)",
                path.display()
            )
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a reward model description", path.display()))
    }

    /// The backbone to load, as (model, adapter): each recorded path as written when it exists
    /// from here, else its absolute form recorded at training; a model that is neither may be
    /// a Hub id. A local path found in neither form is an error naming `reward_model.json`.
    pub fn backbone_paths(&self, dir: &Path) -> Result<(String, Option<String>)> {
        let info = dir.join(INFO_FILE);
        let find = |field: &str, recorded: &str, abs: Option<&str>, may_be_hub: bool| {
            if Path::new(recorded).exists() {
                return Ok(recorded.to_string());
            }
            if let Some(a) = abs.filter(|a| Path::new(a).exists()) {
                return Ok(a.to_string());
            }
            if may_be_hub && crate::model::loader::looks_like_repo(recorded) {
                return Ok(recorded.to_string());
            }
            let cwd = std::env::current_dir().unwrap_or_default();
            let also = abs
                .map(|a| format!(", nor its absolute form {a}"))
                .unwrap_or_default();
            bail!(
                "{}: {field} `{recorded}` is not found from {}{also} (a relative path is relative to where train-rm ran); run from there or correct the path",
                info.display(),
                cwd.display()
            )
        };
        let model = find(
            "backbone_model",
            &self.backbone_model,
            self.backbone_model_abs.as_deref(),
            true,
        )?;
        let adapter = match self.backbone_adapter.as_deref().filter(|a| !a.is_empty()) {
            Some(a) => Some(find(
                "backbone_adapter",
                a,
                self.backbone_adapter_abs.as_deref(),
                false,
            )?),
            None => None,
        };
        Ok((model, adapter))
    }
}

/// `path` made absolute when it names something local, for `RewardModelInfo`'s `_abs` fields.
pub fn absolute_if_local(path: &str) -> Option<String> {
    std::fs::canonicalize(path)
        .ok()
        .map(|p| p.display().to_string())
}

impl RewardHead {
    /// Refuses a backbone other than the one the head was trained on: its features would be
    /// meaningless to the head. `what` names the model for the message. Heads written before
    /// fingerprints were recorded are checked by hidden size only.
    pub fn check_backbone(&self, dir: &Path, model: &Qwen, what: &str) -> Result<()> {
        if model.config.hidden_size != self.info.hidden_size {
            bail!(
                "{}: the head expects hidden size {}, {what} has {}",
                dir.display(),
                self.info.hidden_size,
                model.config.hidden_size
            );
        }
        let (want, got) = match self.backbone_fingerprints_comparable(model)? {
            Some(pair) => pair,
            None => return Ok(()),
        };
        if got != want {
            let adapter = self
                .info
                .backbone_adapter
                .as_deref()
                .map(|a| format!(" + adapter {a}"))
                .unwrap_or_default();
            bail!(
                "{}: the reward model was trained on {}{adapter}; {what} is a different model (weights fingerprint {got}, expected {want}), so its scores would be meaningless; score with that backbone (omit --model, or pass it and its adapter as --model/--base-adapter)",
                dir.display(),
                self.info.backbone_model
            );
        }
        Ok(())
    }

    /// (recorded, computed) fingerprints at a precision both models share: exact in the same
    /// dtype, bf16-rounded across f32/bf16. `None` where nothing comparable was recorded (older
    /// heads) or f16 is involved (f16 rounding differs from bf16's).
    fn backbone_fingerprints_comparable(&self, model: &Qwen) -> Result<Option<(String, String)>> {
        let dtype = crate::model::dtype::dtype_name(model.dtype);
        let info = &self.info;
        if info.backbone_dtype.as_deref() == Some(dtype) {
            if let Some(exact) = &info.backbone_fingerprint {
                return Ok(Some((exact.clone(), model.fingerprint(false)?)));
            }
        }
        let f16 = dtype == "f16" || info.backbone_dtype.as_deref() == Some("f16");
        match (&info.backbone_fingerprint_bf16, f16) {
            (Some(rounded), false) => Ok(Some((rounded.clone(), model.fingerprint(true)?))),
            _ => Ok(None),
        }
    }

    /// Whether `model` is the head's backbone, when that can be told (see `check_backbone`).
    pub fn is_backbone(&self, model: &Qwen) -> Result<Option<bool>> {
        Ok(self
            .backbone_fingerprints_comparable(model)?
            .map(|(want, got)| want == got))
    }

    /// The backbone the head was trained on, loaded from its recorded path and adapter and
    /// checked against the recorded fingerprint (files changed since training are refused).
    pub fn load_backbone(
        &self,
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<crate::model::loader::Loaded> {
        let (model, adapter) = self.info.backbone_paths(dir)?;
        let loaded = crate::model::loader::load_merged(
            &model,
            adapter.as_deref().map(Path::new),
            dtype,
            device,
        )
        .with_context(|| format!("{}: its backbone", dir.join(INFO_FILE).display()))?;
        self.check_backbone(dir, &loaded.model, "its recorded backbone as found now")?;
        Ok(loaded)
    }
}

/// Per-feature mean and standard deviation (std floored at 1e-6) of [N, H] features.
pub fn feature_stats(features: &Tensor) -> Result<(Tensor, Tensor)> {
    let mean = features.mean(0)?;
    let var = features.broadcast_sub(&mean)?.sqr()?.mean(0)?;
    let std = (var + 1e-12)?.sqrt()?.maximum(1e-6)?;
    Ok((mean, std))
}

/// Pearson correlation of two equally long series (NaN when either is constant).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    sxy / (sxx * syy).sqrt()
}

/// Masked mean squared error summed per row: [N] from predictions, targets and masks [N, K].
pub fn masked_sq_error(pred: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok(((pred - targets)?.sqr()? * mask)?.sum(D::Minus1)?)
}
