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
    if max == Some(0) {
        bail!("{spec}: max_prompts is 0: there would be nothing to answer");
    }
    let mut out = vec![];
    'files: for path in crate::data::source::resolve_files(spec)? {
        for rec in read_records(&path)? {
            let v = rec
                .value
                .map_err(|why| anyhow::anyhow!("{}: {why}", rec.loc))?;
            let messages = prompt_of(&v).map_err(|e| anyhow::anyhow!("{}: {e}", rec.loc))?;
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

/// The most positions kept free after a prompt: room for a conditioned policy's weights line
/// and the start of an answer.
pub const ANSWER_ROOM: usize = 64;

/// The prompts every model in `models` (directories or Hub ids) can answer: a prompt whose
/// encoding leaves fewer than `room` (at most `ANSWER_ROOM`, at least 1) of the smallest
/// context's positions free is skipped with a warning naming its record, rather than failing
/// the whole run inside the model; answers stop at the context's end. Returns the kept prompts
/// and how many were skipped; refuses when none is left.
pub fn prompts_that_fit(
    prompts: Vec<PromptRecord>,
    models: &[&str],
    room: usize,
) -> Result<(Vec<PromptRecord>, usize)> {
    let mut context = usize::MAX;
    let mut tokenizer = None;
    for m in models {
        let files = crate::model::loader::resolve(m)?;
        let cfg = crate::model::QwenConfig::from_file(&files.config)?;
        context = context.min(cfg.max_position_embeddings);
        if tokenizer.is_none() {
            tokenizer = Some(crate::tokenizer::ChatTokenizer::from_file(
                &files.tokenizer,
            )?);
        }
    }
    let Some(tok) = tokenizer else {
        return Ok((prompts, 0));
    };
    let limit = context.saturating_sub(room.clamp(1, ANSWER_ROOM));
    let total = prompts.len();
    let mut kept = Vec::with_capacity(total);
    for p in prompts {
        let n = tok.encode_prompt(&p.messages)?.len();
        if n > limit {
            eprintln!(
                "warning: {}: the prompt is {n} tokens, more than the {limit} a model with {context} positions can answer after: skipped",
                p.loc
            );
            continue;
        }
        kept.push(p);
    }
    if kept.is_empty() {
        bail!("none of the {total} prompts fits in {context} positions with room for an answer");
    }
    let skipped = total - kept.len();
    Ok((kept, skipped))
}
