//! The small commands: redraw plots, write a tiny checkpoint, convert a data file.

use anyhow::Result;
use std::path::Path;

/// `mo-align plot RUN_DIR [--png]`.
pub fn plot(run_dir: &Path, png: bool) -> Result<()> {
    for p in crate::plot::plot_run(run_dir, png)? {
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// `mo-align init-tiny --out DIR [--seed N]`.
pub fn init_tiny(out: &Path, seed: u64) -> Result<()> {
    crate::model::tiny::write_tiny_checkpoint(out, seed)?;
    eprintln!("wrote a tiny Qwen2 checkpoint to {}", out.display());
    Ok(())
}

/// `mo-align convert-data IN.jsonl OUT.parquet`.
pub fn convert_data(input: &Path, output: &Path) -> Result<()> {
    let rows = crate::data::source::jsonl_to_parquet(input, output)?;
    eprintln!("wrote {rows} rows to {}", output.display());
    Ok(())
}
