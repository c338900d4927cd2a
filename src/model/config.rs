//! `config.json` of a Qwen2 / Qwen2.5 or Qwen3 checkpoint, as written by transformers 4
//! (top-level `rope_theta`) or transformers 5 (`rope_parameters`, `sliding_window: null`,
//! `dtype`, `layer_types`).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// The most positions a config may declare (see `QwenConfig::validate`).
pub const MAX_POSITIONS: usize = 1 << 21;

/// The decoder family. Qwen3 is Qwen2's decoder with an RMSNorm over each query and key head
/// before the rotary embedding, no q/k/v biases, and a `head_dim` of its own (Qwen3-0.6B:
/// 16 heads of 128 on a 1024-wide model).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Qwen2,
    Qwen3,
}

impl Family {
    /// The names users write (`--arch`, `model.tiny.arch`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "qwen2" | "qwen2.5" => Ok(Family::Qwen2),
            "qwen3" => Ok(Family::Qwen3),
            other => bail!("unknown model family `{other}` (expected qwen2 or qwen3)"),
        }
    }

    /// The causal-LM class name transformers writes in `architectures`.
    pub fn causal_lm(self) -> &'static str {
        match self {
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    pub fn model_type(self) -> &'static str {
        match self {
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// The family of an `architectures` entry (`Qwen3ForSequenceClassification` -> Qwen3).
    fn of_architecture(arch: &str) -> Option<Self> {
        [Family::Qwen2, Family::Qwen3].into_iter().find(|f| {
            let base = f.causal_lm().trim_end_matches("ForCausalLM");
            ["ForCausalLM", "ForSequenceClassification", "Model"]
                .iter()
                .any(|suffix| arch == format!("{base}{suffix}"))
        })
    }

    fn of_model_type(model_type: &str) -> Option<Self> {
        [Family::Qwen2, Family::Qwen3]
            .into_iter()
            .find(|f| f.model_type() == model_type)
    }

    /// Whether the attention normalises each query and key head (Qwen3's `q_norm` / `k_norm`).
    pub fn has_qk_norm(self) -> bool {
        self == Family::Qwen3
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QwenConfig {
    #[serde(default)]
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Biases on q/k/v (Qwen2 always; Qwen3's `attention_bias`, false in every release).
    #[serde(default = "yes")]
    pub attention_bias: bool,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
}

fn yes() -> bool {
    true
}

impl QwenConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read model config", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_json(&value).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let archs: Vec<&str> = v
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let family = match archs.iter().find_map(|a| Family::of_architecture(a)) {
            Some(f) => f,
            None if archs.is_empty() => match Family::of_model_type(model_type) {
                Some(f) => f,
                None => bail!("unsupported model_type `{model_type}`: mo-align loads Qwen2 / Qwen2.5 and Qwen3 (dense) checkpoints"),
            },
            None => bail!(
                "unsupported architecture {:?} (model_type `{model_type}`): mo-align loads Qwen2 / Qwen2.5 and Qwen3 (dense) checkpoints",
                archs
            ),
        };
        let usize_field = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .with_context(|| format!("field `{k}` is missing or not a non-negative integer"))
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        let num_key_value_heads = match v.get("num_key_value_heads") {
            Some(Value::Null) | None => num_attention_heads,
            Some(_) => usize_field("num_key_value_heads")?,
        };
        let head_dim = match v.get("head_dim") {
            Some(Value::Null) | None => hidden_size / num_attention_heads.max(1),
            Some(_) => usize_field("head_dim")?,
        };
        // transformers 5 moves rope_theta into rope_parameters; 4.x keeps it at the top level.
        let rope = v.get("rope_parameters").filter(|r| !r.is_null());
        let rope_theta = v
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                rope.and_then(|r| r.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10_000.0);
        let scaling = v.get("rope_scaling").filter(|r| !r.is_null()).or(rope);
        if let Some(kind) = scaling
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str)
        {
            if kind != "default" {
                bail!("rope scaling type `{kind}` is not supported (only the default rope)");
            }
        }
        let use_sliding = v
            .get("use_sliding_window")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if use_sliding {
            bail!("use_sliding_window = true is not supported");
        }
        // transformers 5 lists each layer's attention; only full attention is implemented.
        if let Some(kinds) = v.get("layer_types").and_then(Value::as_array) {
            if let Some(k) = kinds
                .iter()
                .filter_map(Value::as_str)
                .find(|k| *k != "full_attention")
            {
                bail!("layer_types: `{k}` layers are not supported (only full_attention)");
            }
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                bail!("hidden_act `{act}` is not supported (Qwen2 uses silu)");
            }
        }
        let eos_token_id = match v.get("eos_token_id") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|x| x as u32)
                .collect(),
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            _ => vec![],
        };
        let attention_bias = match family {
            Family::Qwen2 => true,
            Family::Qwen3 => v
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        let cfg = Self {
            family,
            attention_bias,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(32768) as usize,
            rope_theta,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: v
                .get("bos_token_id")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            eos_token_id,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0
            || self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim == 0 {
            bail!("head_dim {} must be even and positive", self.head_dim);
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        // The rotary tables hold every position: bounded so that a mistyped size is an error,
        // not an allocation abort. Qwen2.5's longest (the 1M-token models) is 1,010,000.
        if self.max_position_embeddings > MAX_POSITIONS {
            bail!(
                "max_position_embeddings {} is beyond the {MAX_POSITIONS} positions mo-align supports",
                self.max_position_embeddings
            );
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!(
                "rope_theta must be a finite number > 0, got {}",
                self.rope_theta
            );
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            bail!(
                "rms_norm_eps must be a finite number > 0, got {}",
                self.rms_norm_eps
            );
        }
        Ok(())
    }

    /// The config as transformers 4 writes it. Used by `init-tiny`.
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        let mut v = serde_json::json!({
            "architectures": [self.family.causal_lm()],
            "model_type": self.family.model_type(),
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": if self.eos_token_id.len() == 1 { serde_json::json!(self.eos_token_id[0]) } else { serde_json::json!(self.eos_token_id) },
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "sliding_window": null,
            "use_sliding_window": false,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": match dtype { "f32" => "float32", "bf16" => "bfloat16", "f16" => "float16", d => d },
            "use_cache": true,
            "vocab_size": self.vocab_size,
        });
        if self.family == Family::Qwen3 {
            v["attention_bias"] = self.attention_bias.into();
            v["head_dim"] = self.head_dim.into();
        }
        v
    }

    /// Shape of a decoder-layer tensor given its name within the layer (`mlp.up_proj.weight`).
    pub fn tensor_shape(&self, leaf: &str) -> Vec<usize> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        match leaf {
            "self_attn.q_proj.weight" => vec![q, h],
            "self_attn.q_proj.bias" => vec![q],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
            "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => vec![kv],
            "self_attn.o_proj.weight" => vec![h, q],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![i, h],
            "mlp.down_proj.weight" => vec![h, i],
            "self_attn.q_norm.weight" | "self_attn.k_norm.weight" => vec![self.head_dim],
            _ => vec![h],
        }
    }

    /// Every weight of the model as (Hugging Face name, shape), in the order
    /// `Qwen::named_weights` lists them: what a checkpoint of this config holds.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (v, h) = (self.vocab_size, self.hidden_size);
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        let mut leaves: Vec<String> = vec![
            "input_layernorm.weight".into(),
            "post_attention_layernorm.weight".into(),
        ];
        if self.family.has_qk_norm() {
            leaves.extend([
                "self_attn.q_norm.weight".into(),
                "self_attn.k_norm.weight".into(),
            ]);
        }
        // The order of `DecoderLayer::linears`, each weight followed by its bias.
        for module in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            leaves.push(format!("{module}.weight"));
            let qkv = matches!(
                module,
                "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj"
            );
            if self.attention_bias && qkv {
                leaves.push(format!("{module}.bias"));
            }
        }
        for i in 0..self.num_hidden_layers {
            for leaf in &leaves {
                out.push((format!("model.layers.{i}.{leaf}"), self.tensor_shape(leaf)));
            }
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, h]));
        }
        out
    }

    /// Number of base-model parameters (the tied embedding counted once).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let bias = usize::from(self.attention_bias);
        let qk_norm = if self.family.has_qk_norm() {
            2 * self.head_dim
        } else {
            0
        };
        let attn = h * q + 2 * h * kv + bias * (q + 2 * kv) + q * h + qk_norm;
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        embed + self.num_hidden_layers * layer + h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
            "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
            "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": true, "hidden_act": "silu", "eos_token_id": 151643
        })
    }

    #[test]
    fn transformers4_layout() {
        let mut v = base();
        v["rope_theta"] = serde_json::json!(1_000_000.0);
        v["sliding_window"] = serde_json::json!(32768);
        let c = QwenConfig::from_json(&v).unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.num_parameters(), 494_032_768);
    }

    #[test]
    fn transformers5_layout() {
        let mut v = base();
        v["rope_parameters"] =
            serde_json::json!({"rope_theta": 1_000_000.0, "rope_type": "default"});
        v["sliding_window"] = Value::Null;
        v["dtype"] = serde_json::json!("bfloat16");
        let c = QwenConfig::from_json(&v).unwrap();
        assert_eq!(c.rope_theta, 1e6);
    }

    /// Qwen3-0.6B's config.json (transformers 4.51).
    fn qwen3_06b() -> Value {
        serde_json::json!({
            "architectures": ["Qwen3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
            "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 40960,
            "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16,
            "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
            "rope_scaling": null, "rope_theta": 1_000_000, "sliding_window": null,
            "tie_word_embeddings": true, "use_sliding_window": false, "vocab_size": 151936
        })
    }

    #[test]
    fn qwen3_has_its_own_head_dim_and_no_attention_bias() {
        let c = QwenConfig::from_json(&qwen3_06b()).unwrap();
        assert_eq!(c.family, Family::Qwen3);
        assert!(!c.attention_bias);
        // 16 heads of 128 on a 1024-wide model: head_dim is not hidden / heads.
        assert_eq!(
            (c.head_dim, c.num_attention_heads, c.hidden_size),
            (128, 16, 1024)
        );
        assert_eq!(c.tensor_shape("self_attn.q_proj.weight"), vec![2048, 1024]);
        assert_eq!(c.tensor_shape("self_attn.k_norm.weight"), vec![128]);
        // The 0.6B's published count: 0.44B without the embedding, 0.6B with it.
        assert_eq!(c.num_parameters(), 596_049_920);
        // A classifier checkpoint of the family (Skywork-Reward-V2-Qwen3) is Qwen3 too.
        let mut v = qwen3_06b();
        v["architectures"] = serde_json::json!(["Qwen3ForSequenceClassification"]);
        assert_eq!(QwenConfig::from_json(&v).unwrap().family, Family::Qwen3);
        // And the family round-trips through the config init-tiny writes.
        let back = QwenConfig::from_json(&c.to_hf_json("bf16")).unwrap();
        assert_eq!(back, c);
        let q2 = QwenConfig::from_json(&base()).unwrap();
        assert_eq!((q2.family, q2.attention_bias), (Family::Qwen2, true));
    }

    #[test]
    fn rejects_qwen3_moe_and_sliding_layers() {
        let mut v = qwen3_06b();
        v["architectures"] = serde_json::json!(["Qwen3MoeForCausalLM"]);
        let e = QwenConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("Qwen3MoeForCausalLM"), "{e}");
        let mut v = qwen3_06b();
        v["layer_types"] = serde_json::json!(["full_attention", "sliding_attention"]);
        let e = QwenConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("sliding_attention"), "{e}");
    }

    #[test]
    fn rejects_other_architectures_and_scaling() {
        let mut v = base();
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        let e = QwenConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("LlamaForCausalLM"), "{e}");
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
        assert!(QwenConfig::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("yarn"));
    }
}
