//! TensorBoard event files: the scalars of `metrics.jsonl`, readable by `tensorboard --logdir`.
//!
//! The format is TFRecord framing around `Event` protocol buffers:
//!   record = len: u64 LE | masked_crc32c(len): u32 LE | data | masked_crc32c(data): u32 LE
//!   Event   { 1: wall_time double, 2: step int64, 3: file_version string, 5: summary Summary }
//!   Summary { 1: repeated Value }   Value { 1: tag string, 2: simple_value float }
//! Both messages are small enough to encode by hand; no protobuf crate is needed.
//!
//! Tags follow transformers' TensorBoardCallback: `eval_loss` -> `eval/loss`, everything else
//! under `train/` (`train/loss`, `train/rewards/accuracies`, TRL's names kept).

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One file per run directory, under a fixed name: a fresh run replaces it (as it replaces
/// metrics.jsonl), a resumed one keeps the events up to its checkpoint. "tfevents" in the name
/// is what TensorBoard looks for.
pub const EVENTS_FILE: &str = "events.out.tfevents.mo-align";

/// CRC-32C (Castagnoli), reflected, as TFRecord checksums it.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// TFRecord masks its CRCs so that a CRC of data holding CRCs stays well distributed.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2).
fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// A scalar event as TensorBoard reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarEvent {
    pub wall_time: f64,
    pub step: i64,
    pub values: Vec<(String, f32)>,
}

fn encode_event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = vec![(1 << 3) | 1];
    e.extend_from_slice(&wall_time.to_le_bytes());
    varint(2 << 3, &mut e);
    varint(step as u64, &mut e);
    body(&mut e);
    e
}

fn encode_scalars(ev: &ScalarEvent) -> Vec<u8> {
    encode_event(ev.wall_time, ev.step, |e| {
        let mut summary = vec![];
        for (tag, value) in &ev.values {
            let mut v = vec![];
            bytes_field(1, tag.as_bytes(), &mut v);
            v.push((2 << 3) | 5);
            v.extend_from_slice(&value.to_le_bytes());
            bytes_field(1, &v, &mut summary);
        }
        bytes_field(5, &summary, e);
    })
}

/// The TensorBoard tag of a metrics.jsonl key, as transformers names it.
pub fn tag_of(key: &str) -> String {
    match key.strip_prefix("eval_") {
        Some(rest) => format!("eval/{rest}"),
        None => format!("train/{key}"),
    }
}

/// A metrics line's scalars (every finite number but `step`), under TensorBoard tags. An
/// evaluation line gives its `eval_` values only: the `epoch` and `elapsed_s` it repeats are
/// the training line's, and a tag must not appear twice at one step.
pub fn scalars_of(line: &serde_json::Value) -> Vec<(String, f32)> {
    let Some(map) = line.as_object() else {
        return vec![];
    };
    let eval = map.keys().any(|k| k.starts_with("eval_"));
    map.iter()
        .filter(|(k, _)| k.as_str() != "step" && (!eval || k.starts_with("eval_")))
        .filter_map(|(k, v)| v.as_f64().map(|x| (tag_of(k), x as f32)))
        .filter(|(_, x)| x.is_finite())
        .collect()
}

fn wall_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Appends scalar events to a run's event file, flushing each record so a reader (or a crash)
/// sees whole records only, the last one at worst cut short, which TensorBoard skips.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// Opens `dir`'s event file for a run starting fresh (`keep_to_step` None: the file is
    /// replaced) or resuming at a checkpoint (events after `keep_to_step` are dropped, so the
    /// steps the resumed run logs again appear once). The rewrite is atomic.
    /// `earlier`: the metrics lines kept for a resumed run, written as events when the run
    /// has no event file yet (one started before mo-align wrote them).
    pub fn open(
        dir: &Path,
        keep_to_step: Option<u64>,
        earlier: &[serde_json::Value],
    ) -> Result<Self> {
        let path = dir.join(EVENTS_FILE);
        let kept = match keep_to_step {
            Some(step) if path.exists() => read_scalar_events(&path)?
                .into_iter()
                .filter(|e| e.step >= 0 && e.step as u64 <= step)
                .collect(),
            Some(_) => earlier
                .iter()
                .filter_map(|line| {
                    let step = line.get("step")?.as_i64()?;
                    let values = scalars_of(line);
                    (!values.is_empty()).then(|| ScalarEvent {
                        wall_time: wall_now(),
                        step,
                        values,
                    })
                })
                .collect(),
            None => vec![],
        };
        let mut bytes = frame(&encode_event(wall_now(), 0, |e| {
            bytes_field(3, b"brain.Event:2", e)
        }));
        for ev in &kept {
            bytes.extend(frame(&encode_scalars(ev)));
        }
        crate::util::io::write_atomic(&path, &bytes)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open for appending", path.display()))?;
        Ok(Self { file, path })
    }

    /// Writes a metrics line's scalars at its `step` (lines without one are not events).
    pub fn write_line(&mut self, line: &serde_json::Value) -> Result<()> {
        let Some(step) = line.get("step").and_then(|s| s.as_i64()) else {
            return Ok(());
        };
        let values = scalars_of(line);
        if values.is_empty() {
            return Ok(());
        }
        let ev = ScalarEvent {
            wall_time: wall_now(),
            step,
            values,
        };
        self.file
            .write_all(&frame(&encode_scalars(&ev)))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

/// The scalar events of an event file written here, in order. A record cut short at the end
/// (a crash mid-write) ends the list; a damaged record before it is an error naming its offset.
pub fn read_scalar_events(path: &Path) -> Result<Vec<ScalarEvent>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut out = vec![];
    let mut at = 0usize;
    while at + 12 <= bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let end = at + 12 + len + 4;
        if end > bytes.len() {
            break;
        }
        let crc = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
        let data = &bytes[at + 12..at + 12 + len];
        anyhow::ensure!(
            crc(&bytes[at + 8..at + 12]) == masked_crc(len_bytes)
                && crc(&bytes[at + 12 + len..end]) == masked_crc(data),
            "{}: damaged record at byte {at} (checksum mismatch)",
            path.display()
        );
        if let Some(ev) = decode_scalars(data) {
            out.push(ev);
        }
        at = end;
    }
    Ok(out)
}

/// Protobuf fields of one message: (field number, wire type, payload).
fn fields(mut b: &[u8]) -> Option<Vec<(u32, u8, &[u8])>> {
    fn varint_of(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }
    let mut out = vec![];
    while !b.is_empty() {
        let key = varint_of(&mut b)?;
        let (field, wire) = ((key >> 3) as u32, (key & 7) as u8);
        let n = match wire {
            0 => {
                let start = b;
                varint_of(&mut b)?;
                out.push((field, wire, &start[..start.len() - b.len()]));
                continue;
            }
            1 => 8,
            5 => 4,
            2 => varint_of(&mut b)? as usize,
            _ => return None,
        };
        if n > b.len() {
            return None;
        }
        out.push((field, wire, &b[..n]));
        b = &b[n..];
    }
    Some(out)
}

fn decode_scalars(data: &[u8]) -> Option<ScalarEvent> {
    let mut ev = ScalarEvent {
        wall_time: 0.0,
        step: 0,
        values: vec![],
    };
    let mut has_summary = false;
    for (field, _, payload) in fields(data)? {
        match field {
            1 => ev.wall_time = f64::from_le_bytes(payload.try_into().ok()?),
            2 => {
                let mut v = 0u64;
                for (i, &byte) in payload.iter().enumerate() {
                    v |= ((byte & 0x7f) as u64) << (7 * i);
                }
                ev.step = v as i64;
            }
            5 => {
                has_summary = true;
                for (_, _, value) in fields(payload)? {
                    let (mut tag, mut x) = (String::new(), f32::NAN);
                    for (f, _, p) in fields(value)? {
                        match f {
                            1 => tag = String::from_utf8(p.to_vec()).ok()?,
                            2 => x = f32::from_le_bytes(p.try_into().ok()?),
                            _ => {}
                        }
                    }
                    ev.values.push((tag, x));
                }
            }
            _ => {}
        }
    }
    has_summary.then_some(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value (RFC 3720, B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn tags_are_transformers_names() {
        assert_eq!(tag_of("loss"), "train/loss");
        assert_eq!(tag_of("eval_loss"), "eval/loss");
        assert_eq!(tag_of("rewards/accuracies"), "train/rewards/accuracies");
        assert_eq!(tag_of("eval_rewards/margins"), "eval/rewards/margins");
    }

    #[test]
    fn events_round_trip_and_a_torn_tail_is_skipped() {
        let dir = std::env::temp_dir().join(format!("mo-align-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = EventWriter::open(&dir, None, &[]).unwrap();
        for step in 1..=3 {
            w.write_line(
                &serde_json::json!({"step": step, "epoch": 0.1, "loss": 1.0 / step as f64}),
            )
            .unwrap();
        }
        // An evaluation line gives its eval_ values only (its epoch is the training line's).
        w.write_line(&serde_json::json!({"step": 3, "epoch": 0.1, "eval_loss": 2.5}))
            .unwrap();
        drop(w);
        let path = dir.join(EVENTS_FILE);
        let evs = read_scalar_events(&path).unwrap();
        assert_eq!(evs.iter().map(|e| e.step).collect::<Vec<_>>(), [1, 2, 3, 3]);
        assert!(evs[1].values.contains(&("train/loss".to_string(), 0.5f32)));
        assert!(evs[1].values.contains(&("train/epoch".to_string(), 0.1f32)));
        assert_eq!(evs[3].values, [("eval/loss".to_string(), 2.5f32)]);
        // A crash mid-record: the whole records before it still read.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 7);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_scalar_events(&path).unwrap().len(), 3);
        // Resuming at step 1 keeps step 1 only.
        EventWriter::open(&dir, Some(1), &[]).unwrap();
        let evs = read_scalar_events(&path).unwrap();
        assert_eq!(evs.iter().map(|e| e.step).collect::<Vec<_>>(), [1]);
        // A flipped byte inside a record is reported, not read as data.
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_scalar_events(&path)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
