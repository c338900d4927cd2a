//! `mo-align sft`: LoRA supervised fine-tuning on chat data, loss on assistant tokens only.

use super::stage::AdapterStage;
use super::RunFlags;
use crate::data::chat::sft_example;
use crate::objectives::nll::Nll;
use crate::train::trainer::TrainOutcome;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SftConfig {
    #[serde(flatten)]
    pub stage: AdapterStage,
}

pub fn run(config: Option<&Path>, overrides: &[String], flags: RunFlags) -> Result<TrainOutcome> {
    let cfg: SftConfig = crate::util::config::load(config, overrides)?;
    let run = cfg.stage.start(&cfg, flags)?;
    let (tok, data) = (&run.loaded.tokenizer, &run.stage.data);
    let splits = run.load_data(|v, r| sft_example(v, tok, data, r))?;
    let objective = Nll {
        model: &run.loaded.model,
    };
    run.train(&objective, &splits.train, &splits.val, "sft")
}
