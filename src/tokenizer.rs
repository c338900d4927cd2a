//! Tokenisation and the ChatML template exactly as Qwen2.5's tokenizer_config.json renders it.
//!
//! Prompts and responses are tokenised as separate segments and their ids concatenated, so no
//! BPE merge crosses a prompt/response boundary: a chosen and a rejected response to the same
//! prompt share byte-identical prompt ids, and every label boundary falls between tokens.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tokenizers::Tokenizer;

pub const DEFAULT_SYSTEM_PROMPT: &str =
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// Which assistant turns of a conversation carry labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssistantTurns {
    /// Every assistant turn.
    All,
    /// Only the first user/assistant exchange (the conversation is cut after it).
    First,
}

/// Token ids with a flag per token: true for tokens the model is trained to predict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelledIds {
    pub ids: Vec<u32>,
    pub labelled: Vec<bool>,
}

impl LabelledIds {
    fn push(&mut self, ids: &[u32], labelled: bool) {
        self.ids.extend_from_slice(ids);
        self.labelled
            .extend(std::iter::repeat_n(labelled, ids.len()));
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn num_labelled(&self) -> usize {
        self.labelled.iter().filter(|&&l| l).count()
    }
}

pub struct ChatTokenizer {
    inner: Tokenizer,
    pub im_start: u32,
    pub im_end: u32,
    pub endoftext: u32,
    /// Padding id (`<|endoftext|>`, as Qwen2.5 pads).
    pub pad_id: u32,
}

impl ChatTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer ({e})", path.display()))?;
        let id = |s: &str| {
            inner.token_to_id(s).with_context(|| {
                format!(
                    "{}: special token {s} is missing (not a Qwen2 tokenizer?)",
                    path.display()
                )
            })
        };
        let endoftext = id("<|endoftext|>")?;
        Ok(Self {
            im_start: id("<|im_start|>")?,
            im_end: id("<|im_end|>")?,
            endoftext,
            pad_id: endoftext,
            inner,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Plain text to ids, no special tokens added (Qwen2.5 has no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenising: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    /// Ids that end an assistant turn.
    pub fn stop_ids(&self) -> Vec<u32> {
        vec![self.im_end, self.endoftext]
    }

    /// The ChatML text transformers' `apply_chat_template` produces for these messages.
    pub fn render(messages: &[Message], add_generation_prompt: bool) -> String {
        let mut out = system_header(messages);
        for m in messages
            .iter()
            .skip(usize::from(starts_with_system(messages)))
        {
            out.push_str(&format!(
                "<|im_start|>{}\n{}<|im_end|>\n",
                m.role, m.content
            ));
        }
        if add_generation_prompt {
            out.push_str("<|im_start|>assistant\n");
        }
        out
    }

    /// The prompt segment: every message rendered, then `<|im_start|>assistant\n`.
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.encode(&Self::render(messages, true))
    }

    /// A response segment: its content, then `<|im_end|>` (the token the model must learn to
    /// stop with). The "\n" the template puts after `<|im_end|>` is not trained.
    pub fn encode_response(&self, content: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(content)?;
        ids.push(self.im_end);
        Ok(ids)
    }

    /// A conversation ending with the assistant's `response`, rendered and tokenised as one
    /// text, exactly as `tokenizer.apply_chat_template(conversation, tokenize=True)` does
    /// (ending `<|im_end|>\n`): what external reward models are trained and scored on.
    pub fn encode_conversation(&self, prompt: &[Message], response: &str) -> Result<Vec<u32>> {
        let mut messages = prompt.to_vec();
        messages.push(Message::new("assistant", response));
        self.encode(&Self::render(&messages, false))
    }

    /// A whole conversation with assistant tokens labelled (content and closing `<|im_end|>`).
    pub fn encode_chat(&self, messages: &[Message], turns: AssistantTurns) -> Result<LabelledIds> {
        let mut out = LabelledIds::default();
        let mut pending = system_header(messages);
        for m in messages
            .iter()
            .skip(usize::from(starts_with_system(messages)))
        {
            if m.role == "assistant" {
                pending.push_str("<|im_start|>assistant\n");
                out.push(&self.encode(&pending)?, false);
                out.push(&self.encode_response(&m.content)?, true);
                if turns == AssistantTurns::First {
                    return Ok(out);
                }
                pending = "\n".to_string();
            } else {
                pending.push_str(&format!(
                    "<|im_start|>{}\n{}<|im_end|>\n",
                    m.role, m.content
                ));
            }
        }
        if out.num_labelled() == 0 {
            bail!("the conversation has no assistant turn");
        }
        Ok(out)
    }
}

fn starts_with_system(messages: &[Message]) -> bool {
    messages.first().is_some_and(|m| m.role == "system")
}

fn system_header(messages: &[Message]) -> String {
    let system = match messages.first() {
        Some(m) if m.role == "system" => m.content.as_str(),
        _ => DEFAULT_SYSTEM_PROMPT,
    };
    format!("<|im_start|>system\n{system}<|im_end|>\n")
}
