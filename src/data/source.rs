//! Records from data files: JSON Lines (or a JSON array) and Parquet, local or on the Hub
//! (`hf://datasets/<org>/<name>/<path>`). Parquet rows become JSON values, so one validator per
//! schema serves both formats, and every record keeps its location for error messages.

use anyhow::{bail, Context, Result};
use arrow_array::RecordBatch;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a record came from: `file line N` (JSONL, 1-based) or `file row N` (Parquet and JSON
/// arrays, 0-based as in pandas and datasets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: Arc<str>,
    pub index: usize,
    pub is_line: bool,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_line {
            write!(f, "{} line {}", self.file, self.index)
        } else {
            write!(f, "{} row {}", self.file, self.index)
        }
    }
}

/// One record, or why it could not even be parsed as JSON.
pub struct RawRecord {
    pub loc: Location,
    pub value: std::result::Result<serde_json::Value, String>,
}

/// Expands a file spec: a local path (a `*` in the file name is a glob), or
/// `hf://datasets/<org>/<name>/<path in repo>` fetched through the Hub cache.
pub fn resolve_files(spec: &str) -> Result<Vec<PathBuf>> {
    if let Some(rest) = spec.strip_prefix("hf://datasets/") {
        return resolve_hub(spec, rest);
    }
    let path = Path::new(spec);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains('*') {
        if !path.is_file() {
            bail!("{spec}: no such data file");
        }
        return Ok(vec![path.to_path_buf()]);
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{spec}: cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file() && glob_match(&name, &p.file_name().unwrap_or_default().to_string_lossy())
        })
        .collect();
    out.sort();
    if out.is_empty() {
        bail!("{spec}: no file matches");
    }
    Ok(out)
}

fn glob_match(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = name;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(pos) => rest = &rest[pos + part.len()..],
                None => return false,
            }
        }
    }
    rest.is_empty()
}

fn resolve_hub(spec: &str, rest: &str) -> Result<Vec<PathBuf>> {
    let mut it = rest.splitn(3, '/');
    let (org, name, file) = match (it.next(), it.next(), it.next()) {
        (Some(o), Some(n), Some(f)) if !f.is_empty() => (o, n, f),
        _ => bail!("{spec}: expected hf://datasets/<org>/<name>/<path in the repo>"),
    };
    let repo_id = format!("{org}/{name}");
    let offline = crate::model::loader::hub_offline();
    let cache = hf_hub::Cache::from_env();
    if offline {
        if file.contains('*') {
            bail!("{spec}: a glob needs the Hub's file list; name the files when HF_HUB_OFFLINE is set");
        }
        let p = cache.dataset(repo_id.clone()).get(file).with_context(|| {
            format!(
                "{spec}: not in the Hub cache {} and HF_HUB_OFFLINE is set",
                cache.path().display()
            )
        })?;
        return Ok(vec![p]);
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(true)
        .build()
        .with_context(|| format!("{spec}: cannot start the Hub client"))?;
    let repo = api.dataset(repo_id);
    let files: Vec<String> = if file.contains('*') {
        let info = repo
            .info()
            .with_context(|| format!("{spec}: cannot list the dataset's files"))?;
        let mut names: Vec<String> = info
            .siblings
            .into_iter()
            .map(|s| s.rfilename)
            .filter(|f| {
                let (fd, fname) = f.rsplit_once('/').unwrap_or(("", f));
                let (pd, pname) = file.rsplit_once('/').unwrap_or(("", file));
                fd == pd && glob_match(pname, fname)
            })
            .collect();
        names.sort();
        names
    } else {
        vec![file.to_string()]
    };
    if files.is_empty() {
        bail!("{spec}: no file in the dataset matches");
    }
    files
        .iter()
        .map(|f| {
            repo.get(f)
                .with_context(|| format!("{spec}: cannot download `{f}`"))
        })
        .collect()
}

/// Reads every record of a file (format by extension: .parquet, else JSON Lines / JSON array).
pub fn read_records(path: &Path) -> Result<Vec<RawRecord>> {
    let file: Arc<str> = path.display().to_string().into();
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
    {
        return read_parquet(path, file);
    }
    let f = std::fs::File::open(path).with_context(|| format!("{file}: cannot open"))?;
    let mut reader = BufReader::new(f);
    let first = reader
        .fill_buf()
        .with_context(|| format!("{file}: cannot read"))?;
    // A UTF-8 byte-order mark (Windows editors, spreadsheet exports) is not part of the JSON.
    if first.starts_with(b"\xEF\xBB\xBF") {
        reader.consume(3);
    }
    let first = reader
        .fill_buf()
        .with_context(|| format!("{file}: cannot read"))?;
    let is_array = first.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    if is_array {
        let mut text = String::new();
        reader
            .read_to_string(&mut text)
            .with_context(|| format!("{file}: not UTF-8 text"))?;
        let values: Vec<serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{file}: not a valid JSON array ({e})"))?;
        return Ok(values
            .into_iter()
            .enumerate()
            .map(|(i, v)| RawRecord {
                loc: Location {
                    file: file.clone(),
                    index: i,
                    is_line: false,
                },
                value: Ok(v),
            })
            .collect());
    }
    let mut out = vec![];
    for (i, line) in reader.lines().enumerate() {
        let loc = Location {
            file: file.clone(),
            index: i + 1,
            is_line: true,
        };
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                out.push(RawRecord {
                    loc,
                    value: Err(format!("unreadable line ({e})")),
                });
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(&line).map_err(|e| format!("invalid JSON ({e})"));
        out.push(RawRecord { loc, value });
    }
    Ok(out)
}

fn read_parquet(path: &Path, file: Arc<str>) -> Result<Vec<RawRecord>> {
    let f = std::fs::File::open(path).with_context(|| format!("{file}: cannot open"))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| anyhow::anyhow!("{file}: not a valid Parquet file ({e})"))?
        .build()
        .map_err(|e| anyhow::anyhow!("{file}: cannot read Parquet ({e})"))?;
    let mut out = vec![];
    for batch in reader {
        let batch = batch.map_err(|e| anyhow::anyhow!("{file}: cannot read Parquet rows ({e})"))?;
        for value in
            batch_to_json(&batch).with_context(|| format!("{file}: cannot convert rows"))?
        {
            let index = out.len();
            out.push(RawRecord {
                loc: Location {
                    file: file.clone(),
                    index,
                    is_line: false,
                },
                value: Ok(value),
            });
        }
    }
    Ok(out)
}

fn batch_to_json(batch: &RecordBatch) -> Result<Vec<serde_json::Value>> {
    let mut buf = Vec::new();
    {
        let mut w = arrow_json::LineDelimitedWriter::new(&mut buf);
        w.write_batches(&[batch])?;
        w.finish()?;
    }
    let text = String::from_utf8(buf)?;
    text.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
}

/// Converts JSON Lines to Parquet (schema inferred from the records), written atomically.
pub fn jsonl_to_parquet(input: &Path, output: &Path) -> Result<usize> {
    use std::io::Seek;
    let f =
        std::fs::File::open(input).with_context(|| format!("{}: cannot open", input.display()))?;
    let mut reader = BufReader::new(f);
    let (schema, _) = arrow_json::reader::infer_json_schema(&mut reader, None)
        .map_err(|e| anyhow::anyhow!("{}: cannot infer a schema ({e})", input.display()))?;
    reader.rewind()?;
    let schema = Arc::new(schema);
    let json = arrow_json::ReaderBuilder::new(schema.clone())
        .build(reader)
        .map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
    let mut buf = Vec::new();
    let mut rows = 0;
    {
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, Some(props))?;
        for batch in json {
            let batch = batch.map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
            rows += batch.num_rows();
            w.write(&batch)?;
        }
        w.close()?;
    }
    crate::io::write_atomic(output, &buf)?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(
            "train-*.parquet",
            "train-00000-of-00002.parquet"
        ));
        assert!(!glob_match("train-*.parquet", "test-00000.parquet"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
    }
}
