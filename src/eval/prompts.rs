//! Reading evaluation inputs: prompts to answer, and (prompt, response) records to score.

use crate::data::chat::parse_messages;
use crate::data::preference::split_reply;
use crate::data::source::read_records;
use crate::data::{str_field, FieldError};
use crate::tokenizer::Message;
use anyhow::{bail, Result};

/// (prompt messages, response) of a record: `{prompt, response}` strings or `{messages}` whose
/// last message is the assistant's reply.
pub fn prompt_and_response(v: &serde_json::Value) -> Result<(Vec<Message>, String), FieldError> {
    if v.get("messages").is_some() {
        return split_reply(v.get("messages"), "messages", None);
    }
    let prompt = str_field(v, "prompt", "")?;
    split_reply(v.get("response"), "response", Some(prompt))
}

/// The prompt of a record: `prompt` (string), or `messages` / `chosen` without a final
/// assistant reply.
pub fn prompt_of(v: &serde_json::Value) -> Result<Vec<Message>, FieldError> {
    if let Some(serde_json::Value::String(p)) = v.get("prompt") {
        return Ok(vec![Message::new("user", p)]);
    }
    let field = if v.get("messages").is_some() {
        "messages"
    } else {
        "chosen"
    };
    let mut msgs = parse_messages(v.get(field), field)?;
    if msgs.last().is_some_and(|m| m.role == "assistant") {
        msgs.pop();
    }
    if !msgs.iter().any(|m| m.role == "user") {
        return Err(FieldError::new(field, "no user message"));
    }
    Ok(msgs)
}

/// A held-out prompt with the record it came from: rule judges read the record's fields
/// (reference answers, length budgets), and their errors name its file and line.
#[derive(Debug, Clone)]
pub struct PromptRecord {
    pub messages: Vec<Message>,
    pub record: serde_json::Value,
    /// `file:line` (or `file:row`) of the record.
    pub loc: String,
}

/// Reads prompts (see `prompt_of`) from a file spec (local, glob, or `hf://datasets/...`), at
/// most `max` of them.
pub fn read_prompts(spec: &str, max: Option<usize>) -> Result<Vec<Vec<Message>>> {
    Ok(read_prompt_records(spec, max)?
        .into_iter()
        .map(|p| p.messages)
        .collect())
}

/// `read_prompts`, keeping each prompt's record.
pub fn read_prompt_records(spec: &str, max: Option<usize>) -> Result<Vec<PromptRecord>> {
    let mut out = vec![];
    'files: for path in crate::data::source::resolve_files(spec)? {
        for rec in read_records(&path)? {
            let v = rec
                .value
                .map_err(|why| anyhow::anyhow!("{}: {why}", rec.loc))?;
            let messages = prompt_of(&v)
                .map_err(|e| anyhow::anyhow!("{}: field `{}`: {}", rec.loc, e.field, e.problem))?;
            out.push(PromptRecord {
                messages,
                record: v,
                loc: rec.loc.to_string(),
            });
            if max.is_some_and(|m| out.len() >= m) {
                break 'files;
            }
        }
    }
    if out.is_empty() {
        bail!("{spec}: no prompts");
    }
    Ok(out)
}
