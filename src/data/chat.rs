//! Chat records (SmolTalk / smol-smoltalk `messages`, or any file with that column) turned
//! into SFT examples: ChatML ids with assistant tokens labelled.

use super::{json_kind, str_field, DataConfig, DataReport, FieldError, Parsed, Truncation};
use crate::tokenizer::{ChatTokenizer, LabelledIds, Message};

const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Validates a list of `{role, content}` messages at `path` (e.g. `messages`, `chosen`).
pub fn parse_messages(
    v: Option<&serde_json::Value>,
    path: &str,
) -> Result<Vec<Message>, FieldError> {
    let arr = match v {
        None => return Err(FieldError::new(path, "missing")),
        Some(serde_json::Value::Array(a)) => a,
        Some(other) => {
            return Err(FieldError::new(
                path,
                format!("expected a list of messages, found {}", json_kind(other)),
            ))
        }
    };
    if arr.is_empty() {
        return Err(FieldError::new(path, "empty list of messages"));
    }
    let mut out = Vec::with_capacity(arr.len());
    for (i, m) in arr.iter().enumerate() {
        let here = format!("{path}[{i}]");
        if !m.is_object() {
            return Err(FieldError::new(
                here,
                format!(
                    "expected a {{role, content}} object, found {}",
                    json_kind(m)
                ),
            ));
        }
        let role = str_field(m, "role", &here)?;
        if !ROLES.contains(&role) {
            return Err(FieldError::new(
                format!("{here}.role"),
                format!("unknown role `{role}` (expected system, user or assistant)"),
            ));
        }
        if role == "system" && i != 0 {
            return Err(FieldError::new(
                format!("{here}.role"),
                "a system message is only allowed first",
            ));
        }
        let content = str_field(m, "content", &here)?;
        out.push(Message::new(role, content));
    }
    Ok(out)
}

/// Tokenises one chat record for SFT, applying max_length and truncation.
pub fn sft_example(
    v: &serde_json::Value,
    tok: &ChatTokenizer,
    cfg: &DataConfig,
    report: &mut DataReport,
) -> Parsed<LabelledIds> {
    let field = cfg.messages_field.as_str();
    let msgs = match parse_messages(v.get(field), field) {
        Ok(m) => m,
        Err(e) => return Parsed::Bad(e),
    };
    if !msgs.iter().any(|m| m.role == "assistant") {
        return Parsed::Bad(FieldError::new(field, "no assistant message to train on"));
    }
    let first_assistant = msgs.iter().position(|m| m.role == "assistant");
    let first_user = msgs.iter().position(|m| m.role == "user");
    if first_user.is_none_or(|u| Some(u) > first_assistant) {
        return Parsed::Bad(FieldError::new(
            field,
            "the first assistant message comes before any user message",
        ));
    }
    let mut ex = match tok.encode_chat(&msgs, cfg.assistant_turns) {
        Ok(ex) => ex,
        Err(e) => return Parsed::Bad(FieldError::new(field, e.to_string())),
    };
    if ex.len() > cfg.max_length {
        match cfg.truncation {
            Truncation::Drop => return Parsed::TooLong,
            Truncation::Truncate => {
                ex.ids.truncate(cfg.max_length);
                ex.labelled.truncate(cfg.max_length);
                if ex.labelled.iter().skip(1).all(|l| !l) {
                    return Parsed::TooLong;
                }
                report.truncated += 1;
            }
        }
    }
    Parsed::Ok(ex)
}
