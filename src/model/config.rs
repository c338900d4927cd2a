//! `config.json` of a Qwen2 checkpoint, as written by transformers 4 (top-level `rope_theta`)
//! or transformers 5 (`rope_parameters`, `sliding_window: null`, `dtype`).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Vec<u32>,
}

impl Qwen2Config {
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
        let known = [
            "Qwen2ForCausalLM",
            "Qwen2ForSequenceClassification",
            "Qwen2Model",
        ];
        if !(archs.iter().any(|a| known.contains(a)) || (archs.is_empty() && model_type == "qwen2"))
        {
            bail!(
                "unsupported architecture {:?} (model_type `{model_type}`): mo-align loads Qwen2 / Qwen2.5 checkpoints only",
                archs
            );
        }
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
        let cfg = Self {
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

    fn validate(&self) -> Result<()> {
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
        Ok(())
    }

    /// The config as transformers 4 writes it (with `rope_parameters` too, so 5.x reads it
    /// without a warning). Used by `init-tiny` and `merge`.
    pub fn to_hf_json(&self, dtype: &str) -> Value {
        serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
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
        })
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
            _ => vec![h],
        }
    }

    /// Number of base-model parameters (the tied embedding counted once).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attn = h * q + q + 2 * (h * kv + kv) + q * h;
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
        let c = Qwen2Config::from_json(&v).unwrap();
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
        let c = Qwen2Config::from_json(&v).unwrap();
        assert_eq!(c.rope_theta, 1e6);
    }

    #[test]
    fn rejects_other_architectures_and_scaling() {
        let mut v = base();
        v["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        let e = Qwen2Config::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("LlamaForCausalLM"), "{e}");
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
        assert!(Qwen2Config::from_json(&v)
            .unwrap_err()
            .to_string()
            .contains("yarn"));
    }
}
