//! openbmb/UltraFeedback records: an instruction and completions rated per aspect ("1".."5" as
//! strings, "N/A" allowed), turned into reward-model examples with targets (r - 1) / 4 and a
//! mask for missing ratings.

use super::{json_kind, str_field, DataConfig, DataReport, FieldError, Parsed};
use crate::tokenizer::{ChatTokenizer, Message};

/// The four fine-grained UltraFeedback aspects, in the order the reward model predicts them.
pub const DEFAULT_OBJECTIVES: [&str; 4] = [
    "helpfulness",
    "truthfulness",
    "instruction_following",
    "honesty",
];

#[derive(Debug, Clone, PartialEq)]
pub struct RatedResponse {
    /// ChatML prompt + response ids (the response ends with `<|im_end|>` unless truncated).
    pub ids: Vec<u32>,
    pub prompt_len: usize,
    /// (rating - 1) / 4 per objective; 0 where masked.
    pub targets: Vec<f32>,
    /// 1 where the rating exists, 0 for "N/A".
    pub mask: Vec<f32>,
}

/// Normalised rating: "1".."5" (or a number) -> (r - 1) / 4; "N/A" -> None.
fn parse_rating(v: Option<&serde_json::Value>, field: &str) -> Result<Option<f32>, FieldError> {
    let r = match v {
        None => return Err(FieldError::new(field, "missing")),
        Some(serde_json::Value::String(s)) if s.trim().eq_ignore_ascii_case("n/a") => {
            return Ok(None)
        }
        Some(serde_json::Value::String(s)) => s.trim().parse::<f32>().map_err(|_| {
            FieldError::new(
                field,
                format!("expected a rating \"1\"..\"5\" or \"N/A\", found \"{s}\""),
            )
        })?,
        Some(serde_json::Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN) as f32,
        Some(serde_json::Value::Null) => return Ok(None),
        Some(other) => {
            return Err(FieldError::new(
                field,
                format!("expected a rating, found {}", json_kind(other)),
            ))
        }
    };
    if !(1.0..=5.0).contains(&r) {
        return Err(FieldError::new(
            field,
            format!("rating {r} is outside 1..5"),
        ));
    }
    Ok(Some((r - 1.0) / 4.0))
}

/// All rated completions of one record (completions with no rating at all are left out).
pub fn rated_responses(
    v: &serde_json::Value,
    tok: &ChatTokenizer,
    objectives: &[String],
    cfg: &DataConfig,
    report: &mut DataReport,
) -> Parsed<Vec<RatedResponse>> {
    let instruction = match str_field(v, "instruction", "") {
        Ok(s) => s,
        Err(e) => return Parsed::Bad(e),
    };
    let completions = match v.get("completions") {
        Some(serde_json::Value::Array(a)) => a,
        None => return Parsed::Bad(FieldError::new("completions", "missing")),
        Some(other) => {
            return Parsed::Bad(FieldError::new(
                "completions",
                format!("expected a list, found {}", json_kind(other)),
            ))
        }
    };
    let prompt = match tok.encode_prompt(&[Message::new("user", instruction)]) {
        Ok(p) => p,
        Err(e) => return Parsed::Bad(FieldError::new("instruction", e.to_string())),
    };
    if prompt.len() >= cfg.max_length {
        return Parsed::TooLong;
    }
    let mut out = vec![];
    for (i, c) in completions.iter().enumerate() {
        let here = format!("completions[{i}]");
        let response = match str_field(c, "response", &here) {
            Ok(r) => r,
            Err(e) => return Parsed::Bad(e),
        };
        let (mut targets, mut mask) = (vec![], vec![]);
        for obj in objectives {
            let field = format!("{here}.annotations.{obj}.Rating");
            let rating = c
                .get("annotations")
                .and_then(|a| a.get(obj))
                .and_then(|a| a.get("Rating"));
            match parse_rating(rating, &field) {
                Ok(Some(t)) => {
                    targets.push(t);
                    mask.push(1.0);
                }
                Ok(None) => {
                    targets.push(0.0);
                    mask.push(0.0);
                }
                Err(e) => return Parsed::Bad(e),
            }
        }
        if mask.iter().all(|&m| m == 0.0) {
            continue;
        }
        let mut ids = prompt.clone();
        match tok.encode_response(response) {
            Ok(r) => ids.extend(r),
            Err(e) => {
                return Parsed::Bad(FieldError::new(format!("{here}.response"), e.to_string()))
            }
        }
        if ids.len() > cfg.max_length {
            if cfg.truncation == super::Truncation::Drop {
                report.too_long_dropped += 1;
                continue;
            }
            ids.truncate(cfg.max_length);
            report.truncated += 1;
        }
        out.push(RatedResponse {
            ids,
            prompt_len: prompt.len(),
            targets,
            mask,
        });
    }
    Parsed::Ok(out)
}
