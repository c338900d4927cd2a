//! Evaluation modes of `mo-align eval` beyond perplexity.

use crate::data::chat::parse_messages;
use crate::data::source::read_records;
use crate::data::{str_field, FieldError};
use crate::model::loader::Loaded;
use crate::model::lora::LoraCtx;
use crate::recipes::train_rm::score_sequences;
use crate::reward::RewardHead;
use crate::tokenizer::Message;
use anyhow::{bail, Result};
use std::path::Path;

/// (prompt messages, response) of a record: `{prompt, response}` strings or `{messages}` whose
/// last message is the assistant's reply.
pub fn prompt_and_response(v: &serde_json::Value) -> Result<(Vec<Message>, String), FieldError> {
    if v.get("messages").is_some() {
        let mut msgs = parse_messages(v.get("messages"), "messages")?;
        let last = msgs.len() - 1;
        if msgs[last].role != "assistant" {
            return Err(FieldError::new(
                format!("messages[{last}].role"),
                "the last message must be the assistant's reply",
            ));
        }
        let reply = msgs.pop().map(|m| m.content).unwrap_or_default();
        return Ok((msgs, reply));
    }
    let prompt = str_field(v, "prompt", "")?;
    let response = str_field(v, "response", "")?;
    Ok((vec![Message::new("user", prompt)], response.to_string()))
}

/// Scores every record of `input` with the reward model; writes JSONL (records with a `scores`
/// object per objective) to `output` atomically, or to stdout. Returns the number scored.
pub fn score_file(
    loaded: &Loaded,
    rm_dir: &Path,
    input: &Path,
    output: Option<&Path>,
) -> Result<usize> {
    let head = RewardHead::load(rm_dir, &loaded.model.device)?;
    if head.info.hidden_size != loaded.model.config.hidden_size {
        bail!(
            "{}: the head expects hidden size {}, --model has {}",
            rm_dir.display(),
            head.info.hidden_size,
            loaded.model.config.hidden_size
        );
    }
    let mut records = vec![];
    let mut seqs = vec![];
    for rec in read_records(input)? {
        let v = rec
            .value
            .map_err(|why| anyhow::anyhow!("{}: {why}", rec.loc))?;
        let (prompt, response) = prompt_and_response(&v)
            .map_err(|e| anyhow::anyhow!("{}: field `{}`: {}", rec.loc, e.field, e.problem))?;
        let mut ids = loaded.tokenizer.encode_prompt(&prompt)?;
        ids.extend(loaded.tokenizer.encode_response(&response)?);
        records.push(v);
        seqs.push(ids);
    }
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let scores = if refs.is_empty() {
        vec![]
    } else {
        score_sequences(&loaded.model, &head, &refs, 8, LoraCtx::EVAL)?
    };
    let mut out = String::new();
    for (mut v, s) in records.into_iter().zip(&scores) {
        let obj: serde_json::Map<String, serde_json::Value> = head
            .info
            .objectives
            .iter()
            .zip(s)
            .map(|(k, x)| (k.clone(), (*x as f64).into()))
            .collect();
        v["scores"] = obj.into();
        out.push_str(&serde_json::to_string(&v)?);
        out.push('\n');
    }
    match output {
        Some(p) => crate::io::write_atomic(p, out.as_bytes())?,
        None => print!("{out}"),
    }
    Ok(scores.len())
}
