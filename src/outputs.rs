//! Where commands write: the rules every command that writes goes through, in one place.
//!
//! 1. An output may not be, contain, or lie inside anything the command reads (`check`). A
//!    command's inputs are every existing path its resolved config names (`config_inputs`:
//!    models, adapters, data files with globs expanded, reward models, rules files), plus what
//!    its flags name.
//! 2. An existing output file or directory is replaced only with `--force` (`check`).
//! 3. A run directory is claimed (locked) before anything is decided, and nothing is written
//!    into it until the run has been validated and starts (`RunDir::commit`): a refused or
//!    failed run leaves the directory as it found it, and removes it if it made it.
//! 4. A directory that holds a run is never trained over silently (`RunDir::claim`): a fresh
//!    run needs `--force`, `--resume` needs a checkpoint or an unfinished run, and a finished run
//!    (its final artifact present, checkpoints or not) is not restarted.

use crate::util::io::{resolved_path, RunLock};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// What a command reads, named for the messages.
#[derive(Debug, Default, Clone)]
pub struct Inputs(Vec<(String, PathBuf)>);

impl Inputs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `path` (named `what`) when it exists (a Hub id or a file yet to be made is no
    /// path an output could overwrite).
    pub fn add(&mut self, what: &str, path: impl AsRef<Path>) -> &mut Self {
        let p = path.as_ref();
        if !p.as_os_str().is_empty() && p.exists() {
            self.0.push((what.to_string(), p.to_path_buf()));
        }
        self
    }

    /// Every existing path the resolved config (TOML text) names, except its own output and
    /// cache directories; data-file globs are expanded.
    pub fn from_config(resolved: &str) -> Result<Self> {
        let mut inputs = Self::new();
        for (key, path) in config_inputs(resolved)? {
            inputs.add(&key, path);
        }
        Ok(inputs)
    }

    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.0.iter().map(|(_, p)| p.as_path())
    }
}

/// Config keys whose values are where the command writes, not what it reads.
const OUTPUT_KEYS: [&str; 3] = ["output_dir", "cache_dir", "out"];

/// Every existing path named in a resolved config (TOML text), as (key, path), with `*` globs in
/// file names expanded to the files they match; output and cache keys are left out.
pub fn config_inputs(resolved: &str) -> Result<Vec<(String, PathBuf)>> {
    fn walk(v: &toml::Value, key: &str, out: &mut Vec<(String, PathBuf)>) {
        match v {
            toml::Value::String(s) if !OUTPUT_KEYS.contains(&key) && !s.is_empty() => {
                let name = Path::new(s)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if name.contains('*') {
                    if let Ok(files) = crate::data::source::resolve_files(s) {
                        out.extend(files.into_iter().map(|f| (key.to_string(), f)));
                    }
                } else if Path::new(s).exists() {
                    out.push((key.to_string(), PathBuf::from(s)));
                }
            }
            toml::Value::Array(a) => a.iter().for_each(|x| walk(x, key, out)),
            toml::Value::Table(t) => t.iter().for_each(|(k, x)| walk(x, k, out)),
            _ => {}
        }
    }
    let value: toml::Value = toml::from_str(resolved).context("reading a resolved config")?;
    let mut out = vec![];
    walk(&value, "", &mut out);
    Ok(out)
}

/// Feeds input `p` into `d`: a file by its contents (name, size and modification time above
/// 64 MB), a directory by its top-level weights and JSON files, so a retrained upstream stage
/// or an edited data file changes it.
fn digest_input(d: &mut crate::util::digest::Digest, p: &Path) -> Result<()> {
    if p.is_file() {
        d.file(p)?;
        return Ok(());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(p)
        .with_context(|| format!("{}: cannot list", p.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| {
            f.is_file()
                && matches!(
                    f.extension().and_then(|x| x.to_str()),
                    Some("safetensors" | "json")
                )
        })
        .collect();
    files.sort();
    for f in files {
        d.file(&f)?;
    }
    Ok(())
}

/// What each input of a resolved config is, by content: (key, path, digest) per input
/// (`config_inputs`, globs expanded).
pub fn input_digests(resolved: &str) -> Result<Vec<(String, String, String)>> {
    let mut out = vec![];
    for (key, p) in config_inputs(resolved)? {
        let mut d = crate::util::digest::Digest::default();
        digest_input(&mut d, &p)?;
        out.push((key, p.display().to_string(), d.hex()));
    }
    Ok(out)
}

/// One digest of every input of a resolved config (the pipeline's "up to date" check). For a
/// config without globs it is the digest earlier versions recorded, so their finished stages
/// still count as up to date.
pub fn inputs_digest(resolved: &str) -> Result<String> {
    let mut d = crate::util::digest::Digest::default();
    for (_, p) in config_inputs(resolved)? {
        d.str(&p.display().to_string());
        digest_input(&mut d, &p)?;
    }
    Ok(d.hex())
}

/// Where a run records its inputs' digests (`input_digests`) when it starts.
pub const INPUTS_RECORD: &str = "inputs.json";

/// Refuses to resume the run in `dir` when an input it started from has changed since (a data
/// file edited, a glob that now matches another file, a retrained adapter). A run recorded
/// before inputs were recorded is not checked.
pub fn check_inputs_unchanged(dir: &Path, resolved: &str) -> Result<()> {
    let path = dir.join(INPUTS_RECORD);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let recorded: Vec<(String, String, String)> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not an inputs record", path.display()))?;
    let now = input_digests(resolved)?;
    for (key, p, digest) in &recorded {
        match now.iter().find(|(_, q, _)| q == p) {
            Some((_, _, d)) if d == digest => {}
            Some(_) => bail!(
                "{}: --resume, but {key} {p} has changed since the run started; restore it, or start a new train.output_dir",
                dir.display()
            ),
            None => bail!(
                "{}: --resume, but {key} {p} is no longer an input (moved, removed, or no longer matched); restore it, or start a new train.output_dir",
                dir.display()
            ),
        }
    }
    if let Some((key, p, _)) = now
        .iter()
        .find(|(_, q, _)| !recorded.iter().any(|(_, r, _)| r == q))
    {
        bail!(
            "{}: --resume, but {key} now also reads {p}, which the run did not start from; remove it, or start a new train.output_dir",
            dir.display()
        );
    }
    Ok(())
}

/// How `out` overlaps `input` once both are resolved: it "is", "contains" or "lies inside"
/// it, or neither (`None`). Paths that do not exist yet compare by their resolved ancestors.
pub fn overlap(out: &Path, input: &Path) -> Option<&'static str> {
    let (o, i) = (resolved_path(out), resolved_path(input));
    if o == i {
        Some("is")
    } else if i.starts_with(&o) {
        Some("contains")
    } else if o.starts_with(&i) {
        Some("lies inside")
    } else {
        None
    }
}

/// Refuses a cache directory (`cache_dir` keys of a resolved config) that is, or lies inside,
/// something the command reads: caches are written there. A cache holding an input is fine
/// (a model kept under the cache root).
pub fn check_cache_dirs(resolved: &str, inputs: &Inputs) -> Result<()> {
    fn walk(v: &toml::Value, key: &str, out: &mut Vec<(String, String)>) {
        match v {
            toml::Value::String(s) if key.ends_with("cache_dir") && !s.is_empty() => {
                out.push((key.to_string(), s.clone()))
            }
            toml::Value::Table(t) => t.iter().for_each(|(k, x)| walk(x, k, out)),
            _ => {}
        }
    }
    let mut dirs = vec![];
    walk(&toml::from_str(resolved)?, "", &mut dirs);
    for (key, dir) in dirs {
        for (name, input) in &inputs.0 {
            if matches!(overlap(Path::new(&dir), input), Some("is" | "lies inside")) {
                bail!(
                    "{key} {dir}: is or lies inside the {name} {}, which this command reads; choose a cache directory of its own",
                    input.display()
                );
            }
        }
    }
    Ok(())
}

/// How an output may already exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// A file: replaced only with `--force`.
    File,
    /// A directory the command fills (a merged model, a tiny checkpoint): a non-empty one is
    /// replaced only with `--force`.
    Dir,
    /// A run directory: its state is `RunDir::claim`'s business, not replaced here.
    RunDir,
}

/// Rules 1 and 2 for one output (`flag` names it in messages): refuses an output that is,
/// contains or lies inside an input, and an existing one without `force`.
pub fn check(
    out: &Path,
    flag: &str,
    existing: Existing,
    inputs: &Inputs,
    force: bool,
) -> Result<()> {
    for (name, input) in &inputs.0 {
        let Some(how) = overlap(out, input) else {
            continue;
        };
        bail!(
            "{flag} {}: {how} the {name} {}, which this command reads; choose an output of its own",
            out.display(),
            input.display()
        );
    }
    match existing {
        Existing::File if out.is_dir() => {
            bail!("{flag} {}: is a directory, not a file", out.display())
        }
        Existing::File if out.exists() && !force => bail!(
            "{flag} {}: exists; pass --force to replace it, or choose another path",
            out.display()
        ),
        Existing::Dir | Existing::RunDir if out.exists() && !out.is_dir() => {
            bail!("{flag} {}: exists and is not a directory", out.display())
        }
        Existing::Dir if !force && std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) => {
            bail!(
                "{flag} {}: exists and is not empty; pass --force to replace it, or choose another directory",
                out.display()
            )
        }
        _ => Ok(()),
    }
}

/// The files a finished run leaves, one per kind of run (adapter, full model, reward head).
pub const FINAL_ARTIFACTS: [&str; 3] = [
    "adapter_model.safetensors",
    "model.safetensors",
    crate::reward::HEAD_FILE,
];

/// The file every started run writes first; its presence means the directory holds a run.
pub const RUN_RECORD: &str = "config.resolved.toml";

/// Where a weight-conditioned run with `mode = "adapter"` writes its per-objective adapters.
pub const BLOCKS_DIR: &str = "objectives";

/// Whether an entry of a run directory is one a run writes (its record, logs, plots,
/// checkpoints, final artifacts, caches and temporary files). `--force` replaces only these:
/// a file the user put there is never deleted.
pub fn run_made(name: &str) -> bool {
    const NAMES: [&str; 31] = [
        crate::util::io::LOCK_FILE,
        RUN_RECORD,
        INPUTS_RECORD,
        "metrics.jsonl",
        "config.changes.jsonl",
        "data_report.json",
        "eval_report.json",
        "rm_report.json",
        "trainer_state.json",
        "timing.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "model.safetensors",
        "model.safetensors.index.json",
        "optimizer.safetensors",
        "reward_head.safetensors",
        "reward_model.json",
        "conditioning.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "summary.json",
        "summary.md",
        "pareto.json",
        "pareto.md",
        "pipeline_inputs.digest",
        "pipeline_train_seconds",
    ];
    NAMES.contains(&name)
        || matches!(name, "checkpoints" | BLOCKS_DIR)
        || name.ends_with(".svg")
        || name.starts_with("events.out.tfevents")
        || name.starts_with("generations")
        || (name.starts_with('.') && (name.contains(".tmp-") || name.contains(".old-")))
        || (name.ends_with(".safetensors")
            && (name.starts_with("reference-")
                || name.starts_with("rm-")
                || name.starts_with("model-")))
}

/// The entries of `dir` a run does not write (`run_made`), sorted.
fn foreign_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !run_made(n))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Removes a file or a whole directory.
fn remove_entry(p: &Path) -> Result<()> {
    let removed = if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    };
    removed.with_context(|| format!("{}: cannot remove", p.display()))
}

/// Removes the checkpoints a run saved (`checkpoint-*`, and `.checkpoint-*` left half-written or
/// set aside) and the folder once empty; anything else a user put there stays, named in a note.
fn remove_checkpoints(dir: &Path) -> Result<()> {
    let mut kept = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let p = entry.path();
        if !crate::train::checkpoint::saved_by_run(&name) {
            kept.push(name);
            continue;
        }
        remove_entry(&p)?;
    }
    if kept.is_empty() {
        std::fs::remove_dir(dir).with_context(|| format!("{}: cannot remove", dir.display()))?;
    } else {
        kept.sort();
        eprintln!(
            "note: {}: kept {} (not written by mo-align)",
            dir.display(),
            kept.join(", ")
        );
    }
    Ok(())
}

/// How a command runs in its run directory.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunMode {
    /// Continue the run in the directory (from its newest checkpoint).
    pub resume: bool,
    /// Replace whatever run the directory holds.
    pub force: bool,
    /// A report, not a training run (pipeline summary, Pareto report): a new report rewrites
    /// its files over the old ones (keeping the caches it reuses), and there is nothing to
    /// resume.
    pub report: bool,
}

/// What a claimed run directory is about to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Nothing of a run: a fresh start.
    Fresh,
    /// A run to continue from its newest checkpoint.
    Resume,
    /// A run killed before its first checkpoint, restarted on `--resume` (there is nothing to
    /// continue, and nothing finished to lose).
    Restart,
    /// A run that `--force` replaces: its files go when the new run commits.
    Replace,
}

/// A run's output directory, locked against a second run for as long as this value lives.
/// Nothing is written into it before `commit` but the lock file; a run that fails before
/// committing removes the directory if it created it.
pub struct RunDir {
    pub path: PathBuf,
    pub state: RunState,
    created_root: Option<PathBuf>,
    lock_existed: bool,
    committed: bool,
    /// Files to write at `commit` (name, bytes), and JSON lines to append (name, line).
    pending: Vec<(String, Vec<u8>)>,
    appends: Vec<(String, serde_json::Value)>,
    /// The resolved config whose inputs `commit` records (a run that does not resume).
    record_inputs_of: Option<String>,
    _lock: RunLock,
}

impl RunDir {
    /// Rules 1, 3 and 4: checks `output_dir` against `inputs`, locks it, and decides what the
    /// run may do there.
    pub fn claim(output_dir: &Path, flag: &str, inputs: &Inputs, mode: RunMode) -> Result<Self> {
        if output_dir.as_os_str().is_empty() {
            bail!("{flag} is empty: name the directory the run writes to");
        }
        check(output_dir, flag, Existing::RunDir, inputs, mode.force)?;
        // The topmost directory this claim creates (the output or an ancestor), removed again
        // if the run never starts; and whether the lock file is new.
        let created_root = {
            let mut root = None;
            let mut cur = Some(output_dir);
            while let Some(c) = cur.filter(|c| !c.as_os_str().is_empty() && !c.exists()) {
                root = Some(c.to_path_buf());
                cur = c.parent();
            }
            root
        };
        let lock_existed = output_dir.join(crate::util::io::LOCK_FILE).exists();
        let lock = RunLock::acquire(output_dir)?;
        let mut dir = RunDir {
            path: output_dir.to_path_buf(),
            state: RunState::Fresh,
            created_root,
            lock_existed,
            committed: false,
            pending: vec![],
            appends: vec![],
            record_inputs_of: None,
            _lock: lock,
        };
        dir.state = dir.decide(flag, mode)?;
        Ok(dir)
    }

    fn decide(&self, flag: &str, mode: RunMode) -> Result<RunState> {
        let p = &self.path;
        if mode.report {
            // A report rewrites its own files (and keeps its caches for the next run).
            return Ok(RunState::Fresh);
        }
        // A run is known by its record (written first when a run starts), not by its files: a
        // model or adapter directory from elsewhere has the same file names.
        let holds_run = p.join(RUN_RECORD).is_file() || p.join("metrics.jsonl").is_file();
        // A directory of anything else is never trained into, with or without --force: the
        // run would mix into it, and --force would delete what it cannot tell apart.
        if !holds_run {
            let mut present: Vec<String> = std::fs::read_dir(p)
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| {
                            n != crate::util::io::LOCK_FILE
                                && !(n.starts_with('.') && n.contains(".tmp-"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            present.sort();
            if !present.is_empty() {
                let shown: Vec<&str> = present.iter().take(3).map(String::as_str).collect();
                bail!(
                    "{flag} {}: holds files that are not a mo-align run ({}{}); choose an empty or new directory",
                    p.display(),
                    shown.join(", "),
                    if present.len() > 3 { ", ..." } else { "" }
                );
            }
        }
        let checkpoint = crate::train::checkpoint::latest(p)?.is_some();
        let finished = FINAL_ARTIFACTS.iter().find(|f| p.join(f).is_file());
        Ok(match (mode.force, mode.resume, checkpoint, finished, holds_run) {
            (true, _, _, _, true) => RunState::Replace,
            (true, _, _, _, false) | (false, _, _, _, false) => RunState::Fresh,
            (false, true, true, _, _) => RunState::Resume,
            (false, true, false, Some(f), _) => bail!(
                "{flag} {}: holds a finished run ({f}) and no checkpoint to resume; pass --force to train it again, or choose another {flag}",
                p.display()
            ),
            (false, true, false, None, _) => RunState::Restart,
            (false, false, true, _, _) => bail!(
                "{flag} {}: an earlier run's checkpoint is here; pass --resume to continue it, --force to replace the run, or choose another {flag}",
                p.display()
            ),
            (false, false, false, Some(f), _) => bail!(
                "{flag} {}: holds a finished run ({f}); pass --force to replace it, or choose another {flag}",
                p.display()
            ),
            (false, false, false, None, _) => bail!(
                "{flag} {}: holds an earlier run that never saved a checkpoint; pass --resume to restart it, --force to replace it, or choose another {flag}",
                p.display()
            ),
        })
    }

    /// A file for `commit` to write (replacing an earlier one queued under the same name).
    pub fn queue(&mut self, name: &str, bytes: Vec<u8>) {
        self.pending.retain(|(n, _)| n != name);
        self.pending.push((name.to_string(), bytes));
    }

    /// Records the inputs of `resolved` (`INPUTS_RECORD`) at `commit`, when they are all there
    /// (a stage may make its own input, such as a tiny model, while it loads).
    pub fn record_inputs(&mut self, resolved: String) {
        self.record_inputs_of = Some(resolved);
    }

    /// A JSON line for `commit` to append to `name`.
    pub fn queue_line(&mut self, name: &str, line: serde_json::Value) {
        self.appends.push((name.to_string(), line));
    }

    /// Starts writing: with `Replace`, removes the old run's files first (what a run writes,
    /// `run_made`, but the lock this process holds; anything else stays, named in a note); then
    /// writes the queued files atomically and appends the queued lines. Call once everything
    /// the run needs is loaded and validated; a second call writes what was queued since.
    pub fn commit(&mut self) -> Result<()> {
        if self.state == RunState::Replace {
            let kept = foreign_entries(&self.path);
            if !kept.is_empty() {
                eprintln!(
                    "note: {}: kept {} (not written by mo-align)",
                    self.path.display(),
                    kept.join(", ")
                );
            }
            for entry in std::fs::read_dir(&self.path)
                .with_context(|| format!("{}: cannot list", self.path.display()))?
            {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name == crate::util::io::LOCK_FILE || !run_made(&name) {
                    continue;
                }
                let p = entry.path();
                if name == "checkpoints" && p.is_dir() {
                    remove_checkpoints(&p)?;
                } else {
                    remove_entry(&p)?;
                }
            }
            self.state = RunState::Fresh;
        }
        if let Some(resolved) = self.record_inputs_of.take() {
            let digests = input_digests(&resolved)?;
            self.queue(INPUTS_RECORD, serde_json::to_vec_pretty(&digests)?);
        }
        for (name, bytes) in std::mem::take(&mut self.pending) {
            crate::util::io::write_atomic(&self.path.join(name), &bytes)?;
        }
        for (name, line) in std::mem::take(&mut self.appends) {
            crate::util::io::JsonlWriter::append(&self.path.join(name))?.write(&line)?;
        }
        self.committed = true;
        Ok(())
    }

    pub fn committed(&self) -> bool {
        self.committed
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // A run that never committed wrote nothing but the lock: a directory it made goes (with
        // the parents it made), and a lock file it added to an existing directory goes.
        if self.committed {
            return;
        }
        let only_lock = std::fs::read_dir(&self.path).is_ok_and(|d| {
            d.filter_map(|e| e.ok())
                .all(|e| e.file_name() == crate::util::io::LOCK_FILE)
        });
        match &self.created_root {
            Some(root) if only_lock => {
                let _ = std::fs::remove_dir_all(&self.path);
                let mut cur = self.path.parent();
                while let Some(c) = cur.filter(|c| c.starts_with(root)) {
                    if std::fs::remove_dir(c).is_err() {
                        break;
                    }
                    cur = c.parent();
                }
            }
            None if !self.lock_existed => {
                let _ = std::fs::remove_file(self.path.join(crate::util::io::LOCK_FILE));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("mo-align-outputs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn an_output_may_not_be_contain_or_lie_inside_an_input() {
        let root = scratch("overlap");
        std::fs::create_dir_all(root.join("model")).unwrap();
        std::fs::write(root.join("data.jsonl"), "{}").unwrap();
        let mut inputs = Inputs::new();
        inputs
            .add("model", root.join("model"))
            .add("data", root.join("data.jsonl"));
        for (out, how) in [
            (root.join("model"), "is"),
            (root.clone(), "contains"),
            (root.join("model/sub"), "lies inside"),
            (root.join("data.jsonl"), "is"),
        ] {
            let e = check(&out, "--out", Existing::Dir, &inputs, true).unwrap_err();
            assert!(e.to_string().contains(how), "{e}");
        }
        check(&root.join("other"), "--out", Existing::Dir, &inputs, false).unwrap();
        // An existing file or non-empty directory needs --force.
        std::fs::write(root.join("out.json"), "x").unwrap();
        assert!(check(
            &root.join("out.json"),
            "--out",
            Existing::File,
            &Inputs::new(),
            false
        )
        .is_err());
        check(
            &root.join("out.json"),
            "--out",
            Existing::File,
            &Inputs::new(),
            true,
        )
        .unwrap();
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_run_that_never_commits_leaves_nothing_and_a_finished_run_is_kept() {
        let root = scratch("rundir");
        let out = root.join("run");
        let mode = RunMode::default();
        {
            let dir = RunDir::claim(&out, "train.output_dir", &Inputs::new(), mode).unwrap();
            assert_eq!(dir.state, RunState::Fresh);
        }
        assert!(
            !out.exists(),
            "a failed first run left its directory behind"
        );
        {
            let mut dir = RunDir::claim(&out, "train.output_dir", &Inputs::new(), mode).unwrap();
            dir.queue(RUN_RECORD, b"x".to_vec());
            dir.commit().unwrap();
            std::fs::write(out.join("adapter_model.safetensors"), b"w").unwrap();
        }
        for mode in [
            mode,
            RunMode {
                resume: true,
                ..mode
            },
        ] {
            let e = RunDir::claim(&out, "train.output_dir", &Inputs::new(), mode)
                .err()
                .unwrap();
            assert!(e.to_string().contains("finished run"), "{e}");
        }
        assert!(out.join("adapter_model.safetensors").is_file());
        // --force replaces it, but only once the new run commits.
        let force = RunMode {
            force: true,
            ..mode
        };
        {
            let dir = RunDir::claim(&out, "train.output_dir", &Inputs::new(), force).unwrap();
            assert_eq!(dir.state, RunState::Replace);
        }
        assert!(
            out.join("adapter_model.safetensors").is_file(),
            "an uncommitted --force run removed the old one"
        );
        let mut dir = RunDir::claim(&out, "train.output_dir", &Inputs::new(), force).unwrap();
        dir.queue(RUN_RECORD, b"y".to_vec());
        dir.commit().unwrap();
        assert!(!out.join("adapter_model.safetensors").exists());
        drop(dir);
        // Checkpoints go with the run; a file the user put beside them stays.
        let saved = out.join("checkpoints/checkpoint-0000010");
        std::fs::create_dir_all(&saved).unwrap();
        std::fs::write(saved.join("trainer_state.json"), b"{}").unwrap();
        std::fs::write(out.join("checkpoints/notes.txt"), b"mine").unwrap();
        let mut dir = RunDir::claim(&out, "train.output_dir", &Inputs::new(), force).unwrap();
        dir.queue(RUN_RECORD, b"z".to_vec());
        dir.commit().unwrap();
        assert!(!saved.exists(), "--force kept the old run's checkpoint");
        assert_eq!(
            std::fs::read(out.join("checkpoints/notes.txt")).unwrap(),
            b"mine"
        );
        drop(dir);
        let _ = std::fs::remove_dir_all(&root);
    }

    /// The pipeline's "up to date" digest and a run's inputs record see what a glob matches:
    /// one more matching file changes them.
    #[test]
    fn a_glob_that_matches_one_more_file_changes_the_inputs_digest() {
        let root = scratch("glob");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("a-1.jsonl"), "{}").unwrap();
        let resolved = format!(
            "[data]\ntrain_files = [{:?}]\n[train]\noutput_dir = {:?}\n",
            root.join("a-*.jsonl").to_str().unwrap(),
            root.to_str().unwrap()
        );
        let before = inputs_digest(&resolved).unwrap();
        assert_eq!(
            input_digests(&resolved).unwrap().len(),
            1,
            "output_dir is not an input"
        );
        std::fs::write(root.join("a-2.jsonl"), "{}").unwrap();
        assert_ne!(inputs_digest(&resolved).unwrap(), before);
        assert_eq!(input_digests(&resolved).unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(&root);
    }
}
