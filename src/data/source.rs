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
        if path.is_dir() {
            bail!("{spec}: is a directory; name a data file (or a glob such as {spec}/*.jsonl)");
        }
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
    let offline = crate::util::hub::offline();
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
    let repo = crate::util::hub::client(cache, spec)?.dataset(repo_id);
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
    let mut index = 0;
    loop {
        index += 1;
        let loc = Location {
            file: file.clone(),
            index,
            is_line: true,
        };
        let line = match read_capped_line(&mut reader, MAX_RECORD_BYTES) {
            Ok(Line::End) => break,
            Ok(Line::Text(l)) => l,
            Ok(Line::TooLong(n)) => {
                out.push(RawRecord {
                    loc,
                    value: Err(format!(
                        "a record of {:.1} MB, over the {} MB a record may hold",
                        n as f64 / 1e6,
                        MAX_RECORD_BYTES / 1_000_000
                    )),
                });
                continue;
            }
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

/// The longest line a JSON Lines record may be: a longer one is reported and skipped while
/// reading, never held (a 30 MB record used to take gigabytes on its way to being dropped as
/// too long for the model).
pub const MAX_RECORD_BYTES: usize = 8_000_000;

enum Line {
    Text(String),
    TooLong(usize),
    End,
}

/// The next line without its newline, keeping at most `cap` bytes of it in memory.
fn read_capped_line(reader: &mut impl BufRead, cap: usize) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let mut total = 0usize;
    let mut seen_any = false;
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        seen_any = true;
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        if total + take <= cap {
            buf.extend_from_slice(&chunk[..take]);
        }
        total += take;
        reader.consume(take + usize::from(done));
        if done {
            break;
        }
    }
    if !seen_any {
        return Ok(Line::End);
    }
    if total > cap {
        return Ok(Line::TooLong(total));
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8(buf)
        .map(Line::Text)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
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

/// Converts a JSON Lines file (or a JSON array; a UTF-8 byte-order mark is skipped, as training
/// skips it) to Parquet, schema inferred from the records, written atomically. Every record must
/// be a JSON object; the first that is not (or a record whose fields conflict with the others'
/// types) is named by its line. An input without records is refused, not written as 0 rows.
pub fn jsonl_to_parquet(input: &Path, output: &Path) -> Result<usize> {
    let records = read_records(input)?;
    let mut values = Vec::with_capacity(records.len());
    let mut locs = Vec::with_capacity(records.len());
    for r in records {
        match r.value {
            Ok(serde_json::Value::Object(m)) => values.push(serde_json::Value::Object(m)),
            Ok(other) => bail!(
                "{}: a record must be a JSON object, not {}",
                r.loc,
                json_kind(&other)
            ),
            Err(e) => bail!("{}: {e}", r.loc),
        }
        locs.push(r.loc);
    }
    if values.is_empty() {
        bail!("{}: holds no records; nothing to convert", input.display());
    }
    let schema = arrow_json::reader::infer_json_schema_from_iterator(values.iter().map(Ok))
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot infer a schema ({})",
                input.display(),
                short(&e.to_string())
            )
        })?;
    let schema = Arc::new(schema);
    let decode = |rows: &[serde_json::Value]| -> std::result::Result<Vec<RecordBatch>, String> {
        let mut d = arrow_json::ReaderBuilder::new(schema.clone())
            .build_decoder()
            .map_err(|e| e.to_string())?;
        d.serialize(rows).map_err(|e| e.to_string())?;
        Ok(d.flush().map_err(|e| e.to_string())?.into_iter().collect())
    };
    let batches = match decode(&values) {
        Ok(b) => b,
        Err(e) => {
            // Name the first record that does not fit the inferred schema.
            let bad = (0..values.len()).find(|&i| decode(&values[i..i + 1]).is_err());
            match bad {
                Some(i) => bail!(
                    "{}: does not fit the fields' types in the other records ({})",
                    locs[i],
                    short(&e)
                ),
                None => bail!("{}: {}", input.display(), short(&e)),
            }
        }
    };
    let mut buf = Vec::new();
    let mut rows = 0;
    {
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, Some(props))?;
        for batch in &batches {
            rows += batch.num_rows();
            w.write(batch)?;
        }
        w.close()?;
    }
    crate::util::io::write_atomic(output, &buf)?;
    Ok(rows)
}

/// A JSON value's kind, for messages (never the value itself, which may be a whole file).
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The first line of a message, at most 200 characters (library errors can quote whole records).
pub(crate) fn short(msg: &str) -> String {
    let line = msg.lines().next().unwrap_or_default();
    if line.chars().count() > 200 {
        format!("{}...", line.chars().take(200).collect::<String>())
    } else {
        line.to_string()
    }
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
