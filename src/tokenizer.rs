//! Tokenisation and the ChatML templates exactly as Qwen2.5's and Qwen3's tokenizer_config.json
//! render them.
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

/// The chat template a tokenizer renders with, read from its `tokenizer_config.json` (or
/// `chat_template.jinja`, where transformers 5 saves it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatTemplate {
    /// Qwen2.5's ChatML: Qwen's default system prompt when the conversation has none.
    Qwen25,
    /// Qwen3's ChatML: no default system prompt, and the final assistant turn opens with a
    /// thinking block. mo-align generates and trains with thinking disabled: a prompt ends
    /// `<|im_start|>assistant\n<think>\n\n</think>\n\n`, as the template renders it with
    /// `enable_thinking=False`, which is also how it renders a finished conversation's last
    /// answer. Earlier answers carry no block, as the template drops past reasoning.
    Qwen3,
}

impl ChatTemplate {
    /// The template of the tokenizer at `tokenizer_json`: Qwen3's if its chat template (or,
    /// lacking one, its vocabulary) has the `<think>` tag, Qwen2.5's otherwise.
    fn detect(tokenizer_json: &Path, inner: &Tokenizer) -> Self {
        let dir = tokenizer_json.parent().unwrap_or(Path::new("."));
        let from_config = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("chat_template").map(|t| t.to_string()));
        let text = std::fs::read_to_string(dir.join("chat_template.jinja"))
            .ok()
            .or(from_config);
        let thinks = match text {
            Some(t) => t.contains("<think>"),
            None => inner.token_to_id("<think>").is_some(),
        };
        if thinks {
            ChatTemplate::Qwen3
        } else {
            ChatTemplate::Qwen25
        }
    }
}

/// A rendered conversation in pieces: template text, and the assistant answers SFT trains on
/// (each followed by its `<|im_end|>`).
enum Piece {
    Text(String),
    Answer(String),
}

pub struct ChatTokenizer {
    inner: Tokenizer,
    pub template: ChatTemplate,
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
            template: ChatTemplate::detect(path, &inner),
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

    /// The ChatML text transformers' `apply_chat_template` produces for these messages (with
    /// `enable_thinking=False` under Qwen3's template).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        self.pieces(messages, add_generation_prompt)
            .into_iter()
            .map(|p| match p {
                Piece::Text(t) => t,
                Piece::Answer(a) => format!("{a}<|im_end|>"),
            })
            .collect()
    }

    fn pieces(&self, messages: &[Message], add_generation_prompt: bool) -> Vec<Piece> {
        let has_system = starts_with_system(messages);
        let mut out = vec![];
        match (self.template, messages.first()) {
            (_, Some(m)) if has_system => out.push(Piece::Text(format!(
                "<|im_start|>system\n{}<|im_end|>\n",
                m.content
            ))),
            (ChatTemplate::Qwen25, _) => out.push(Piece::Text(format!(
                "<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
            ))),
            (ChatTemplate::Qwen3, _) => {}
        }
        // Qwen3 keeps a thinking block only after the last real user query (not a tool reply).
        let last_query = messages.iter().rposition(|m| {
            m.role == "user"
                && !(m.content.starts_with("<tool_response>")
                    && m.content.ends_with("</tool_response>"))
        });
        for (i, m) in messages.iter().enumerate().skip(usize::from(has_system)) {
            if m.role != "assistant" {
                out.push(Piece::Text(format!(
                    "<|im_start|>{}\n{}<|im_end|>\n",
                    m.role, m.content
                )));
                continue;
            }
            let mut head = "<|im_start|>assistant\n".to_string();
            let mut answer = m.content.clone();
            if self.template == ChatTemplate::Qwen3 {
                let (reasoning, content) = split_reasoning(&m.content);
                answer = content.to_string();
                let last = i + 1 == messages.len();
                let after_query = i > last_query.unwrap_or(messages.len() - 1);
                if after_query && (last || !reasoning.is_empty()) {
                    head.push_str(&format!(
                        "<think>\n{}\n</think>\n\n",
                        reasoning.trim_matches('\n')
                    ));
                    answer = answer.trim_start_matches('\n').to_string();
                }
            }
            out.push(Piece::Text(head));
            out.push(Piece::Answer(answer));
            out.push(Piece::Text("\n".into()));
        }
        if add_generation_prompt {
            out.push(Piece::Text(self.generation_prompt().into()));
        }
        out
    }

    /// What opens the assistant's turn when it is to answer.
    fn generation_prompt(&self) -> &'static str {
        match self.template {
            ChatTemplate::Qwen25 => "<|im_start|>assistant\n",
            ChatTemplate::Qwen3 => "<|im_start|>assistant\n<think>\n\n</think>\n\n",
        }
    }

    /// The prompt segment: every message rendered, then the generation prompt
    /// (`<|im_start|>assistant\n`, and Qwen3's empty thinking block).
    pub fn encode_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        self.encode(&self.render(messages, true))
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
        self.encode(&self.render(&messages, false))
    }

    /// A whole conversation with assistant tokens labelled (content and closing `<|im_end|>`),
    /// rendered as the template renders it (cut after the first answer under `First`).
    pub fn encode_chat(&self, messages: &[Message], turns: AssistantTurns) -> Result<LabelledIds> {
        let messages = match turns {
            AssistantTurns::All => messages,
            AssistantTurns::First => match messages.iter().position(|m| m.role == "assistant") {
                Some(i) => &messages[..=i],
                None => messages,
            },
        };
        let mut out = LabelledIds::default();
        let mut pending = String::new();
        for piece in self.pieces(messages, false) {
            match piece {
                Piece::Text(t) => pending.push_str(&t),
                Piece::Answer(a) => {
                    out.push(&self.encode(&pending)?, false);
                    out.push(&self.encode_response(&a)?, true);
                    pending.clear();
                }
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

/// An answer's `<think>` reasoning and its content, split as Qwen3's template splits them:
/// reasoning before the first `</think>` (after any `<think>`), content after the last.
fn split_reasoning(text: &str) -> (&str, &str) {
    match (text.find("</think>"), text.rfind("</think>")) {
        (Some(first), Some(last)) => {
            let before = text[..first].trim_end_matches('\n');
            let reasoning = before
                .rsplit("<think>")
                .next()
                .unwrap_or(before)
                .trim_start_matches('\n');
            let content = text[last + "</think>".len()..].trim_start_matches('\n');
            (reasoning, content)
        }
        _ => ("", text),
    }
}
