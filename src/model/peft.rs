//! PEFT adapter files: `adapter_config.json` and `adapter_model.safetensors` as PEFT, vLLM and
//! transformers read and write them.

use super::lora::LoraConfig;
use crate::util::io::{safetensors_bytes, write_atomic};
use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// PEFT's adapter_config.json (the fields PEFT, vLLM and transformers read).
pub fn peft_config_json(cfg: &LoraConfig, base_model: &str) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "bias": "none",
        "use_rslora": cfg.use_rslora,
        "use_dora": false,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
        "auto_mapping": null,
    })
}

/// PEFT tensor key of a LoRA matrix: `base_model.model.<module>.lora_A.weight`.
pub fn peft_key(module_path: &str, which: char) -> String {
    format!("base_model.model.{module_path}.lora_{which}.weight")
}

/// Reads adapter_config.json into our LoraConfig, rejecting what we cannot reproduce exactly.
pub fn read_peft_config(dir: &Path) -> anyhow::Result<LoraConfig> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read adapter config", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let ctx = |field: &str| format!("{}: field `{field}`", path.display());
    let peft_type = v
        .get("peft_type")
        .and_then(|x| x.as_str())
        .unwrap_or("LORA");
    if peft_type != "LORA" {
        bail!(
            "{}: peft_type `{peft_type}` is not supported (LORA only)",
            ctx("peft_type")
        );
    }
    for (flag, what) in [("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out")] {
        if v.get(flag).and_then(|x| x.as_bool()).unwrap_or(false) {
            bail!("{}: {what} adapters are not supported", ctx(flag));
        }
    }
    if let Some(b) = v.get("bias").and_then(|x| x.as_str()) {
        if b != "none" {
            bail!(
                "{}: bias = `{b}` is not supported (\"none\" only)",
                ctx("bias")
            );
        }
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if v.get(k)
            .and_then(|x| x.as_object())
            .is_some_and(|m| !m.is_empty())
        {
            bail!("{}: per-module ranks/alphas are not supported", ctx(k));
        }
    }
    if v.get("modules_to_save").is_some_and(|m| !m.is_null()) {
        bail!(
            "{}: modules_to_save is not supported",
            ctx("modules_to_save")
        );
    }
    let r = v
        .get("r")
        .and_then(|x| x.as_u64())
        .with_context(|| ctx("r"))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(|x| x.as_f64())
        .with_context(|| ctx("lora_alpha"))?;
    let target_modules = match v.get("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(|s| s.rsplit('.').next().unwrap_or(s).to_string())
            })
            .collect::<Option<Vec<_>>>()
            .with_context(|| ctx("target_modules"))?,
        Some(serde_json::Value::String(s)) => {
            bail!(
                "{}: a regex target (`{s}`) is not supported; list module names",
                ctx("target_modules")
            )
        }
        _ => bail!("{}: missing", ctx("target_modules")),
    };
    let cfg = LoraConfig {
        r,
        alpha,
        dropout: v
            .get("lora_dropout")
            .and_then(|x| x.as_f64())
            .unwrap_or(0.0) as f32,
        target_modules,
        use_rslora: v
            .get("use_rslora")
            .and_then(|x| x.as_bool())
            .unwrap_or(false),
        init_from: None,
    };
    cfg.validate().with_context(|| path.display().to_string())?;
    Ok(cfg)
}

/// Reads adapter_model.safetensors: module path -> (A, B). Keys with PEFT's adapter name
/// (`lora_A.default.weight`) are accepted too.
pub fn read_peft_tensors(
    dir: &Path,
    device: &Device,
) -> anyhow::Result<HashMap<String, (Tensor, Tensor)>> {
    let path = dir.join("adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&path, device)
        .with_context(|| format!("{}: cannot read adapter weights", path.display()))?;
    let mut a_map = HashMap::new();
    let mut b_map = HashMap::new();
    for (key, t) in tensors {
        // x * 0 is 0 for every finite x and NaN otherwise: one reduction finds NaN and inf,
        // which would otherwise flow silently into merged weights and reported scores.
        let finite = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|d| d.affine(0.0, 0.0))
            .and_then(|d| d.sum_all())
            .and_then(|d| d.to_scalar::<f32>())
            .map(|v| v == 0.0)
            .with_context(|| format!("{}: tensor `{key}`", path.display()))?;
        if !finite {
            bail!(
                "{}: tensor `{key}` holds NaN or infinite values (a diverged run?); refusing to use it",
                path.display()
            );
        }
        let k = key.replace(".default.weight", ".weight");
        let k = k.strip_prefix("base_model.model.").unwrap_or(&k);
        if let Some(m) = k.strip_suffix(".lora_A.weight") {
            a_map.insert(m.to_string(), t);
        } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
            b_map.insert(m.to_string(), t);
        } else {
            bail!(
                "{}: tensor `{key}` is not a LoRA A/B matrix",
                path.display()
            );
        }
    }
    let mut out = HashMap::new();
    for (m, a) in a_map {
        let b = b_map
            .remove(&m)
            .with_context(|| format!("{}: `{m}` has lora_A but no lora_B", path.display()))?;
        out.insert(m, (a, b));
    }
    if let Some(m) = b_map.keys().next() {
        bail!("{}: `{m}` has lora_B but no lora_A", path.display());
    }
    Ok(out)
}

/// Writes adapter_config.json and adapter_model.safetensors (atomically, each file).
pub fn write_peft_adapter(
    dir: &Path,
    cfg: &LoraConfig,
    base_model: &str,
    tensors: &[(String, Tensor, Tensor)],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (module, a, b) in tensors {
        map.insert(peft_key(module, 'A'), a.to_dtype(DType::F32)?);
        map.insert(peft_key(module, 'B'), b.to_dtype(DType::F32)?);
    }
    let bytes = safetensors_bytes(
        &map,
        Some(HashMap::from([("format".to_string(), "pt".to_string())])),
    )?;
    write_atomic(&dir.join("adapter_model.safetensors"), &bytes)?;
    let cfg_json = serde_json::to_string_pretty(&peft_config_json(cfg, base_model))?;
    write_atomic(&dir.join("adapter_config.json"), cfg_json.as_bytes())?;
    Ok(())
}
