//! Preference pairs (UltraFeedback-binarized: `chosen` / `rejected` conversations ending in the
//! assistant's reply; or `prompt` / `chosen` / `rejected` strings). The prompt is tokenised once,
//! so chosen and rejected share byte-identical prompt ids; each response is its own segment.

use super::chat::parse_messages;
use super::{json_kind, DataConfig, DataReport, FieldError, Parsed};
use crate::tokenizer::{ChatTokenizer, Message};

#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    /// ChatML prompt ids, ending with `<|im_start|>assistant\n`.
    pub prompt: Vec<u32>,
    /// Response ids, ending with `<|im_end|>` unless truncated.
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub prompt_messages: Vec<Message>,
}

impl PreferencePair {
    /// Tokens in the packed `[prompt | chosen | rejected]` sequence.
    pub fn packed_len(&self) -> usize {
        self.prompt.len() + self.chosen.len() + self.rejected.len()
    }

    /// The two whole sequences, prompt + chosen and prompt + rejected (what a reward model
    /// scores).
    pub fn full_sequences(&self) -> [Vec<u32>; 2] {
        [
            [self.prompt.as_slice(), &self.chosen].concat(),
            [self.prompt.as_slice(), &self.rejected].concat(),
        ]
    }

    /// (prompt, chosen, rejected) token ids, as the pair log-prob pass takes them.
    pub fn ids(&self) -> (&[u32], &[u32], &[u32]) {
        (&self.prompt, &self.chosen, &self.rejected)
    }
}

/// Splits a conversation into (messages before the final reply, the final reply): `v` is a
/// message list ending with the assistant's reply, or a reply string that follows `prompt`.
pub fn split_reply(
    v: Option<&serde_json::Value>,
    field: &str,
    prompt: Option<&str>,
) -> Result<(Vec<Message>, String), FieldError> {
    if let Some(serde_json::Value::String(reply)) = v {
        let prompt = prompt.ok_or_else(|| {
            FieldError::new(
                "prompt",
                "needed (as a string) when chosen/rejected are strings",
            )
        })?;
        return Ok((vec![Message::new("user", prompt)], reply.clone()));
    }
    let mut msgs = parse_messages(v, field)?;
    let last = msgs.len() - 1;
    if msgs[last].role != "assistant" {
        return Err(FieldError::new(
            format!("{field}[{last}].role"),
            "the last message must be the assistant's reply",
        ));
    }
    let reply = msgs.pop().map(|m| m.content).unwrap_or_default();
    if !msgs.iter().any(|m| m.role == "user") {
        return Err(FieldError::new(field, "no user message before the reply"));
    }
    Ok((msgs, reply))
}

/// The chosen and rejected replies of a preference record, as text (what rule objectives
/// read).
pub fn pair_texts(v: &serde_json::Value) -> Result<(String, String), FieldError> {
    let prompt = v.get("prompt").and_then(|p| p.as_str());
    let (_, chosen) = split_reply(v.get("chosen"), "chosen", prompt)?;
    let (_, rejected) = split_reply(v.get("rejected"), "rejected", prompt)?;
    Ok((chosen, rejected))
}

pub fn preference_pair(
    v: &serde_json::Value,
    tok: &ChatTokenizer,
    cfg: &DataConfig,
    report: &mut DataReport,
) -> Parsed<PreferencePair> {
    let prompt_str = match v.get("prompt") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.as_str()),
        Some(other) => {
            return Parsed::Bad(FieldError::new(
                "prompt",
                format!("expected a string, found {}", json_kind(other)),
            ))
        }
    };
    let (chosen_prompt, chosen_text) = match split_reply(v.get("chosen"), "chosen", prompt_str) {
        Ok(x) => x,
        Err(e) => return Parsed::Bad(e),
    };
    let (rejected_prompt, rejected_text) =
        match split_reply(v.get("rejected"), "rejected", prompt_str) {
            Ok(x) => x,
            Err(e) => return Parsed::Bad(e),
        };
    if chosen_prompt != rejected_prompt {
        return Parsed::Bad(FieldError::new(
            "rejected",
            "its conversation before the final reply differs from chosen's",
        ));
    }
    let encoded = (|| -> anyhow::Result<_> {
        Ok((
            tok.encode_prompt(&chosen_prompt)?,
            tok.encode_response(&chosen_text)?,
            tok.encode_response(&rejected_text)?,
        ))
    })();
    let (prompt, mut chosen, mut rejected) = match encoded {
        Ok(x) => x,
        Err(e) => return Parsed::Bad(FieldError::new("(record)", e.to_string())),
    };
    if prompt.len() >= cfg.max_length {
        return Parsed::TooLong;
    }
    let room = cfg.max_length - prompt.len();
    if chosen.len() > room || rejected.len() > room {
        chosen.truncate(room);
        rejected.truncate(room);
        report.truncated += 1;
    }
    if chosen == rejected {
        return Parsed::Identical;
    }
    Parsed::Ok(PreferencePair {
        prompt,
        chosen,
        rejected,
        prompt_messages: chosen_prompt,
    })
}
