//! The small commands: redraw plots, write a tiny checkpoint, convert a data file.

use super::evaluate::report::EvalReport;
use super::pipeline::summary::PipelineSummary;
use crate::objectives::reward_head::RewardModelReport;
use anyhow::Result;
use std::path::Path;

/// `mo-align plot RUN_DIR [--png]`.
pub fn plot(run_dir: &Path, png: bool) -> Result<()> {
    if !run_dir.is_dir() {
        anyhow::bail!("{}: no such directory", run_dir.display());
    }
    let mut written = crate::plot::plot_run(run_dir, png)?;
    let rm_report = run_dir.join("rm_report.json");
    if rm_report.is_file() {
        written.extend(RewardModelReport::read(&rm_report)?.write_chart(run_dir, png)?);
    }
    // A report's charts, drawn from its typed values as read back.
    let eval_report = run_dir.join("eval_report.json");
    if eval_report.is_file() {
        written.extend(EvalReport::read(&eval_report)?.write_chart(&eval_report, run_dir, png)?);
    }
    let summary = run_dir.join("summary.json");
    if summary.is_file() {
        written.extend(PipelineSummary::read(&summary)?.write_charts(run_dir, png)?);
    }
    if written.is_empty() {
        anyhow::bail!(
            "{}: nothing to plot (no metrics.jsonl, summary.json or pareto.json here)",
            run_dir.display()
        );
    }
    for p in written {
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// `mo-align init-tiny --out DIR [--seed N] [--arch qwen2|qwen3] [--force]`: an existing,
/// non-empty --out is replaced only with --force, and then as a whole (written beside it and
/// renamed into place).
pub fn init_tiny(out: &Path, seed: u64, arch: &str, force: bool) -> Result<()> {
    use crate::model::config::Family;
    use crate::model::tiny::TinySpec;
    let spec = match Family::parse(arch)? {
        Family::Qwen2 => TinySpec::default(),
        Family::Qwen3 => TinySpec::qwen3(),
    };
    let outputs = crate::outputs::Existing::Dir;
    crate::outputs::check(out, "--out", outputs, &crate::outputs::Inputs::new(), force)?;
    let dir = crate::util::io::AtomicDir::new(out)?;
    crate::model::tiny::write_tiny_checkpoint_of(dir.path(), seed, &spec)?;
    dir.commit()?;
    eprintln!(
        "wrote a tiny {} checkpoint to {}",
        spec.arch.causal_lm(),
        out.display()
    );
    Ok(())
}

/// `mo-align convert-data IN.jsonl OUT.parquet [--force]`.
pub fn convert_data(input: &Path, output: &Path, force: bool) -> Result<()> {
    let mut inputs = crate::outputs::Inputs::new();
    inputs.add("input", input);
    crate::outputs::check(
        output,
        "OUTPUT",
        crate::outputs::Existing::File,
        &inputs,
        force,
    )?;
    let rows = crate::data::source::jsonl_to_parquet(input, output)?;
    eprintln!("wrote {rows} rows to {}", output.display());
    Ok(())
}
