//! `mo-align generate`: KV-cache decoding of one prompt, plain or in the chat template.

use super::ModelOptions;
use crate::eval::load_policy_at;
use crate::generate::{generate, SamplingArgs};
use crate::model::ctx::ForwardCtx;
use crate::model::dtype::parse_dtype;
use crate::model::loader::select_device;
use crate::objectives::weighting::Weighting;
use crate::tokenizer::Message;
use anyhow::{bail, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct GenerateOptions {
    #[command(flatten)]
    pub model: ModelOptions,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the chat template (with the generation prompt) and stop at <|im_end|>.
    #[arg(long)]
    pub chat: bool,
    /// System prompt for --chat (Qwen's default when omitted).
    #[arg(long)]
    pub system: Option<String>,
    /// Objective weights for a conditioned policy, e.g. 0.7,0.1,0.1,0.1 (in the order of its
    /// conditioning.json); implies --chat.
    #[arg(long)]
    pub weights: Option<String>,
    /// Decoding; unset flags come from the model's generation_config.json.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateOptions) -> Result<()> {
    let weights = match &args.weights {
        Some(w) => Some(Weighting::from_flag(w)?),
        None => None,
    };
    let policy = match &weights {
        Some(w) => Some(load_policy_at(
            args.model.spec(),
            None,
            args.model.adapter.as_deref(),
            Some(w),
            parse_dtype(&args.model.dtype)?,
            &select_device(&args.model.device)?,
        )?),
        None => None,
    };
    let plain;
    let loaded = match &policy {
        Some(p) => &p.loaded,
        None => {
            plain = args.model.load()?;
            &plain
        }
    };
    let sampling = args.sampling.resolve(loaded.generation_config().as_ref());
    sampling.validate()?;
    let tok = &loaded.tokenizer;
    let (prompt_ids, stop) = if args.chat || policy.is_some() {
        let mut msgs = vec![];
        if let Some(s) = &args.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &args.prompt));
        if let Some(p) = &policy {
            msgs = p.prompt(&msgs);
        }
        (tok.encode_prompt(&msgs)?, tok.stop_ids())
    } else {
        (tok.encode(&args.prompt)?, vec![tok.endoftext])
    };
    if prompt_ids.is_empty() {
        bail!("--prompt is empty");
    }
    let out = generate(
        &loaded.model,
        &[prompt_ids],
        &[0],
        &sampling,
        &stop,
        tok.pad_id,
        ForwardCtx::EVAL,
    )?;
    let ids = &out[0];
    let text = tok.decode(ids, true)?;
    if args.json {
        let json = serde_json::json!({"text": text, "token_ids": ids, "sampling": sampling, "conditioning": policy.as_ref().and_then(|p| p.conditioning.as_ref().map(|c| &c.1))});
        println!("{json}");
    } else {
        println!("{text}");
    }
    Ok(())
}
