//! The Hugging Face Hub, for models and datasets alike: its cache (`HF_HOME`), offline mode
//! (`HF_HUB_OFFLINE=1`) and the download client.

use anyhow::{Context, Result};
use hf_hub::api::sync::{Api, ApiBuilder};
use hf_hub::Cache;

/// Whether `HF_HUB_OFFLINE` asks for the Hub cache only (1/true/yes/on, any case).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// A download client over `cache`, showing progress; `what` names the model or dataset in the
/// error.
pub fn client(cache: Cache, what: &str) -> Result<Api> {
    ApiBuilder::from_cache(cache)
        .with_progress(true)
        .build()
        .with_context(|| format!("{what}: cannot start the Hub client"))
}
