//! `mo-align generate`: KV-cache decoding of one prompt, plain or in the chat template.

use super::ModelOptions;
use crate::generate::{generate, SamplingArgs};
use crate::model::ctx::ForwardCtx;
use crate::model::loader::{load_soup, select_device};
use crate::model::parse_dtype;
use crate::objectives::conditioning::{parse_weights, ConditioningInfo, ConditioningMode};
use std::path::Path;
use crate::tokenizer::Message;
use anyhow::{bail, Context, Result};
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
    let conditioning = match &args.weights {
        Some(w) => {
            let info = ConditioningInfo::find(args.model.adapter.as_deref(), args.model.spec())?;
            let weights = parse_weights(w).context("--weights")?;
            let line = info.line(&weights)?;
            Some((info, weights, line))
        }
        None => None,
    };
    let loaded = match &conditioning {
        // Weights gate the adapter's blocks: the policy at w is their soup.
        Some((info, w, _)) if info.mode() == ConditioningMode::Adapter => {
            let dir = args.model.adapter.as_deref().unwrap_or(Path::new(args.model.spec()));
            let blocks = info.block_dirs(dir);
            let blocks: Vec<&Path> = blocks.iter().map(|b| b.as_path()).collect();
            load_soup(
                args.model.spec(),
                None,
                &blocks,
                w,
                parse_dtype(&args.model.dtype)?,
                &select_device(&args.model.device)?,
            )?
        }
        _ => args.model.load()?,
    };
    let sampling = args.sampling.resolve(loaded.generation_config().as_ref());
    sampling.validate()?;
    let tok = &loaded.tokenizer;
    let line = conditioning.as_ref().map(|(info, _, line)| (info, line.clone()));
    let (prompt_ids, stop) = if args.chat || line.is_some() {
        let mut msgs = vec![];
        if let Some(s) = &args.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &args.prompt));
        if let Some((info, line)) = &line {
            if info.mode() == ConditioningMode::Prompt {
                msgs = info.place(&msgs, line);
            }
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
        let json = serde_json::json!({"text": text, "token_ids": ids, "sampling": sampling, "conditioning": line.map(|l| l.1)});
        println!("{json}");
    } else {
        println!("{text}");
    }
    Ok(())
}
