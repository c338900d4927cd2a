//! Checkpoints read and written one tensor at a time, for exports whose memory must not grow
//! with the model: a merge holds one weight (and the adapter) at a time, so a 7B model merges
//! on a workstation. Tensors are read with plain file reads rather than a memory map, whose
//! touched pages would count as resident until the process ends.
//!
//! The safetensors layout: an 8-byte little-endian header length, a JSON header mapping each
//! name to {dtype, shape, data_offsets} (offsets relative to the end of the header), then the
//! data. A model over `shard_bytes` is split into `model-0000i-of-0000n.safetensors` with a
//! `model.safetensors.index.json`, as transformers' `save_pretrained` writes it.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// transformers' default `max_shard_size` (5 GB).
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in its file.
    start: u64,
    end: u64,
}

/// The tensors of a checkpoint (one file or a shard index), read one at a time.
pub struct StreamedWeights {
    files: Vec<(PathBuf, File)>,
    entries: HashMap<String, Entry>,
}

/// The bytes of a tensor of `dtype` and `shape`.
fn nbytes(dtype: DType, shape: &[usize]) -> u64 {
    shape.iter().product::<usize>() as u64 * dtype.size_in_bytes() as u64
}

impl StreamedWeights {
    /// Opens the files of `weights` (a safetensors file or a shard index) and reads their
    /// headers; no tensor data is read.
    pub fn open(weights: &Path) -> Result<Self> {
        let mut files = vec![];
        let mut entries = HashMap::new();
        for (i, path) in super::loader::weight_paths(weights)?
            .into_iter()
            .enumerate()
        {
            let mut f =
                File::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
            let bad = |why: String| {
                anyhow::anyhow!("{}: not a valid safetensors file ({why})", path.display())
            };
            let mut len = [0u8; 8];
            f.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
            let n = u64::from_le_bytes(len);
            let size = f.metadata()?.len();
            if n > size.saturating_sub(8) || n > 100_000_000 {
                return Err(bad(format!("header length {n}")));
            }
            let mut header = vec![0u8; n as usize];
            f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
            // The safetensors crate's own header type checks that the offsets are contiguous
            // and fit each tensor's dtype and shape, without overflow.
            let header: safetensors::tensor::Metadata =
                serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
            let data_start = 8 + n;
            for (name, info) in header.tensors() {
                let dtype = DType::try_from(info.dtype)
                    .ok()
                    .filter(|d| d.is_float())
                    .ok_or_else(|| {
                        bad(format!(
                            "tensor `{name}` has dtype {:?}, not a float",
                            info.dtype
                        ))
                    })?;
                let (start, end) = (
                    data_start + info.data_offsets.0 as u64,
                    data_start + info.data_offsets.1 as u64,
                );
                if end > size {
                    return Err(bad(format!(
                        "tensor `{name}` lies beyond the end of the file"
                    )));
                }
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        dtype,
                        shape: info.shape.clone(),
                        start,
                        end,
                    },
                );
            }
            files.push((path, f));
        }
        Ok(Self { files, entries })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The number of decoder layers the checkpoint holds (`model.layers.N.*`).
    pub fn layer_count(&self) -> usize {
        super::loader::layer_count(self.entries.keys())
    }

    /// Reads `name` in its stored dtype onto the CPU, refusing another shape than `shape`.
    pub fn read(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let e = self.entries.get(name).with_context(|| {
            format!("{}: tensor `{name}` is missing", self.files[0].0.display())
        })?;
        let (path, file) = &self.files[e.file];
        if e.shape != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?}, expected {shape:?} from config.json",
                path.display(),
                e.shape
            );
        }
        let mut bytes = vec![0u8; (e.end - e.start) as usize];
        let mut f = file;
        f.seek(SeekFrom::Start(e.start))
            .and_then(|_| f.read_exact(&mut bytes))
            .with_context(|| format!("{}: cannot read tensor `{name}`", path.display()))?;
        Ok(Tensor::from_raw_buffer(
            &bytes,
            e.dtype,
            shape,
            &Device::Cpu,
        )?)
    }
}

struct Shard {
    file: String,
    /// (name, dtype, shape) in the order they are written.
    tensors: Vec<(String, DType, Vec<usize>)>,
}

/// Writes a checkpoint's safetensors file(s) into `dir` tensor by tensor, in name order (as
/// `safetensors_bytes` writes them; `write` refuses another). The caller makes `dir`
/// atomic (an `AtomicDir`); `finish` checks that every planned tensor was written.
pub struct CheckpointWriter {
    dir: PathBuf,
    shards: Vec<Shard>,
    shard: usize,
    next: usize,
    out: Option<BufWriter<File>>,
}

impl CheckpointWriter {
    pub fn create(
        dir: &Path,
        tensors: &[(String, DType, Vec<usize>)],
        shard_bytes: u64,
    ) -> Result<Self> {
        let mut sorted = tensors.to_vec();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut groups: Vec<Vec<(String, DType, Vec<usize>)>> = vec![vec![]];
        let mut in_group = 0u64;
        for t in sorted {
            let b = nbytes(t.1, &t.2);
            if in_group > 0 && in_group + b > shard_bytes {
                groups.push(vec![]);
                in_group = 0;
            }
            in_group += b;
            groups.last_mut().expect("one group").push(t);
        }
        let n = groups.len();
        let shards = groups
            .into_iter()
            .enumerate()
            .map(|(i, tensors)| Shard {
                file: if n == 1 {
                    "model.safetensors".to_string()
                } else {
                    format!("model-{:05}-of-{n:05}.safetensors", i + 1)
                },
                tensors,
            })
            .collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            shard: 0,
            next: 0,
            out: None,
        })
    }

    fn open_shard(&mut self) -> Result<()> {
        let shard = &self.shards[self.shard];
        let path = self.dir.join(&shard.file);
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut offset = 0u64;
        for (name, dtype, shape) in &shard.tensors {
            let len = nbytes(*dtype, shape);
            let st_dtype = safetensors::Dtype::from(*dtype);
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + len]}),
            );
            offset += len;
        }
        let mut text = serde_json::to_vec(&header)?;
        // The data starts 8-byte aligned, as the safetensors crate writes it.
        while !text.len().is_multiple_of(8) {
            text.push(b' ');
        }
        let mut w = BufWriter::new(
            File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?,
        );
        w.write_all(&(text.len() as u64).to_le_bytes())?;
        w.write_all(&text)?;
        self.out = Some(w);
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some(w) = self.out.take() {
            let path = self.dir.join(&self.shards[self.shard].file);
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()
                .with_context(|| format!("{}: cannot write", path.display()))?;
        }
        Ok(())
    }

    /// Writes the next tensor, which must be `name` with its planned dtype and shape.
    pub fn write(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let Some((want, dtype, shape)) = self
            .shards
            .get(self.shard)
            .and_then(|s| s.tensors.get(self.next))
            .cloned()
        else {
            bail!("checkpoint writer: `{name}` is beyond the planned tensors");
        };
        if want != name || t.dtype() != dtype || t.dims() != shape.as_slice() {
            bail!(
                "checkpoint writer: got `{name}` {:?} {:?}, expected `{want}` {dtype:?} {shape:?}",
                t.dtype(),
                t.dims()
            );
        }
        if self.out.is_none() {
            self.open_shard()?;
        }
        let bytes = crate::util::io::tensor_le_bytes(t)?;
        let path = self.dir.join(&self.shards[self.shard].file);
        self.out
            .as_mut()
            .expect("opened above")
            .write_all(&bytes)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        self.next += 1;
        if self.next == self.shards[self.shard].tensors.len() {
            self.close_shard()?;
            self.shard += 1;
            self.next = 0;
        }
        Ok(())
    }

    /// Checks that every tensor was written and, for a sharded checkpoint, writes the index.
    pub fn finish(mut self) -> Result<()> {
        if self.shard != self.shards.len() {
            let missing = &self.shards[self.shard].tensors[self.next].0;
            bail!("checkpoint writer: `{missing}` was never written");
        }
        self.close_shard()?;
        if self.shards.len() > 1 {
            let mut map = BTreeMap::new();
            let mut total = 0u64;
            for s in &self.shards {
                for (name, dtype, shape) in &s.tensors {
                    total += nbytes(*dtype, shape);
                    map.insert(name.clone(), s.file.clone());
                }
            }
            crate::util::io::write_json_atomic(
                &self.dir.join("model.safetensors.index.json"),
                &serde_json::json!({"metadata": {"total_size": total}, "weight_map": map}),
            )?;
        }
        Ok(())
    }
}

/// The peak resident memory of this process so far (Linux `VmHWM`), for reports.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
