//! Files written so that a crash never leaves a half-written output (temp file in the same
//! directory, fsync, rename), and the safetensors serialisation every writer shares.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    }
    let tmp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("{}: cannot write", path.display()));
    }
    Ok(())
}

/// Serialises `value` as pretty JSON and writes it atomically.
pub fn write_json_atomic(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    write_atomic(path, format!("{text}\n").as_bytes())
}

/// Writes a directory atomically: the caller fills a temporary sibling directory, and
/// `commit` renames it into place (replacing an older one).
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

/// Whether process `pid` is running (Linux: `/proc/PID` exists). Elsewhere every process
/// counts as running, so nothing is cleaned up on a guess.
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") && Path::new("/proc/self").exists() {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Cleans up after an `AtomicDir` for `dest` whose process was killed: its temporary
/// directory (`.NAME.tmp-PID`) is removed, and an old destination it had moved aside
/// (`.NAME.old-PID`) is put back when nothing replaced it, removed when something did. Only
/// names of this form whose process is gone are touched: they are mo-align's own.
pub fn clean_stale_siblings(dest: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (dest.parent(), dest.file_name()) else {
        return Ok(());
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Ok(());
    };
    let name = name.to_string_lossy();
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&format!(".{name}.")) else {
            continue;
        };
        let (kind, pid) = match rest.split_once('-') {
            Some((k @ ("tmp" | "old"), pid)) => match pid.parse::<u32>() {
                Ok(pid) => (k, pid),
                Err(_) => continue,
            },
            _ => continue,
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = e.path();
        if kind == "old" && !dest.exists() {
            std::fs::rename(&path, dest).with_context(|| {
                format!("{}: cannot restore to {}", path.display(), dest.display())
            })?;
            eprintln!(
                "note: {}: restored from {} (left by a killed process {pid})",
                dest.display(),
                path.display()
            );
        } else {
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("{}: cannot remove", path.display()))?;
            eprintln!(
                "note: removed {} (left by a killed process {pid})",
                path.display()
            );
        }
    }
    Ok(())
}

impl AtomicDir {
    pub fn new(dest: &Path) -> Result<Self> {
        clean_stale_siblings(dest)?;
        let tmp = temp_path(dest);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)
                .with_context(|| format!("{}: cannot clear", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("{}: cannot create", tmp.display()))?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the finished directory into place. An existing destination (which the caller
    /// has decided may be replaced) is first renamed aside, so a crash at any point leaves
    /// either the old or the new directory under `dest`, never neither, and is removed last.
    pub fn commit(mut self) -> Result<()> {
        let aside = self.dest.with_file_name(format!(
            ".{}.old-{}",
            self.dest
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let had_old = self.dest.exists();
        if had_old {
            std::fs::rename(&self.dest, &aside)
                .with_context(|| format!("{}: cannot replace", self.dest.display()))?;
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.dest) {
            if had_old {
                let _ = std::fs::rename(&aside, &self.dest);
            }
            return Err(e)
                .with_context(|| format!("{}: cannot move into place", self.dest.display()));
        }
        self.committed = true;
        if had_old {
            std::fs::remove_dir_all(&aside)
                .with_context(|| format!("{}: cannot remove", aside.display()))?;
        }
        Ok(())
    }

    /// Moves the finished directory into place unless `dest` exists by then (another process
    /// wrote it first: this one's copy is dropped, and `false` returned). Never replaces.
    pub fn commit_new(mut self) -> Result<bool> {
        match std::fs::rename(&self.tmp, &self.dest) {
            Ok(()) => {
                self.committed = true;
                Ok(true)
            }
            // rename(2) onto a non-empty directory fails: the race was lost.
            Err(_) if self.dest.exists() => Ok(false),
            Err(e) => {
                Err(e).with_context(|| format!("{}: cannot move into place", self.dest.display()))
            }
        }
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// The lock file of a run directory (`RunLock`).
pub const LOCK_FILE: &str = ".mo-align.lock";

/// An exclusive advisory lock on a run's output directory (`.mo-align.lock`), held for the
/// life of the run and released by the OS if the process dies. The holder's PID is written
/// into the lock file so a second run can name it.
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create output directory", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another process".to_string()
                } else {
                    format!("process {holder}")
                };
                bail!(
                    "{}: {who} is running in this output directory; wait for it, or choose another train.output_dir",
                    dir.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("{}: cannot lock", path.display()))
            }
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        file.sync_all()?;
        Ok(Self { _file: file })
    }
}

/// `path` made absolute with symlinks resolved, also when it does not exist yet (its nearest
/// existing ancestor is resolved and the rest appended).
pub fn resolved_path(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut rest = vec![];
    let mut cur = abs.as_path();
    loop {
        if let Ok(real) = cur.canonicalize() {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// Appends JSON lines to a file (metrics). Each line is flushed as written, so a killed run
/// keeps every completed line; a partial last line is never produced by a single write.
pub struct JsonlWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl JsonlWriter {
    pub fn append(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for appending", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn write(&mut self, value: &serde_json::Value) -> Result<()> {
        let line = format!("{}\n", serde_json::to_string(value)?);
        self.file
            .write_all(line.as_bytes())
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

/// Serialises tensors to safetensors bytes (keys sorted, so files are reproducible).
pub fn safetensors_bytes(
    tensors: &HashMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> anyhow::Result<Vec<u8>> {
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    let mut data = Vec::with_capacity(keys.len());
    for k in keys {
        let t = tensors[k].contiguous()?;
        let dtype = match t.dtype() {
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F64 => safetensors::Dtype::F64,
            DType::U32 => safetensors::Dtype::U32,
            DType::I64 => safetensors::Dtype::I64,
            DType::U8 => safetensors::Dtype::U8,
            d => bail!("cannot save dtype {d:?}"),
        };
        let bytes = tensor_le_bytes(&t)?;
        data.push((k.clone(), dtype, t.dims().to_vec(), bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(k, d, s, b)| {
            Ok((
                k.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b)?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(safetensors::serialize(views, metadata)?)
}

/// The tensor's elements as little-endian bytes (safetensors' data layout).
pub(crate) fn tensor_le_bytes(t: &Tensor) -> anyhow::Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U32 => t
            .to_vec1::<u32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        d => bail!("cannot save dtype {d:?}"),
    })
}
