//! Datasets: reading records (JSONL / Parquet, local or Hub), validating them against the Hub
//! schemas, tokenising, splitting, and planning length-grouped batches.

pub mod batching;
pub mod chat;
pub mod preference;
pub mod ratings;
pub mod source;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
pub use source::json_kind;
use source::{read_records, resolve_files, Location, RawRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBadRecord {
    /// Stop at the first bad record, naming file, line/row and field.
    Error,
    /// Count and report bad records, train on the rest.
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Examples longer than max_length are dropped (and counted).
    Drop,
    /// Examples are cut to max_length (responses lose their end); counted.
    Truncate,
}

/// The `[data]` section shared by every stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Files or `hf://datasets/<org>/<name>/<path>` specs (a `*` in the file name globs).
    pub train_files: Vec<String>,
    /// A separate validation set; when empty, `validation_fraction` of the training records.
    pub validation_files: Vec<String>,
    pub validation_fraction: f64,
    /// Cap on training records (after shuffling), for quick runs.
    pub max_samples: Option<usize>,
    pub max_length: usize,
    pub truncation: Truncation,
    pub shuffle_seed: u64,
    pub on_bad_record: OnBadRecord,
    /// Batch examples of similar length together (less padding).
    pub group_by_length: bool,
    /// SFT: which assistant turns are trained ("first" = the first exchange only).
    pub assistant_turns: crate::tokenizer::AssistantTurns,
    /// Column holding the chat messages.
    pub messages_field: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train_files: vec![],
            validation_files: vec![],
            validation_fraction: 0.0,
            max_samples: None,
            max_length: 1280,
            truncation: Truncation::Drop,
            shuffle_seed: 42,
            on_bad_record: OnBadRecord::Error,
            group_by_length: true,
            assistant_turns: crate::tokenizer::AssistantTurns::All,
            messages_field: "messages".to_string(),
        }
    }
}

/// What happened to the records of one split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataReport {
    pub records: usize,
    pub used: usize,
    pub bad_skipped: usize,
    pub too_long_dropped: usize,
    pub truncated: usize,
    /// Preference pairs whose chosen and rejected replies are the same tokens (as written or
    /// once truncated): their DPO logit is 0 whatever the model, so they only dilute a batch.
    #[serde(default)]
    pub identical_skipped: usize,
    /// The first few skipped records' reasons.
    pub bad_examples: Vec<String>,
}

impl DataReport {
    pub fn summary(&self) -> String {
        let identical = if self.identical_skipped > 0 {
            format!(
                ", {} with chosen = rejected (skipped)",
                self.identical_skipped
            )
        } else {
            String::new()
        };
        format!(
            "{} records: {} used, {} bad (skipped), {} too long (dropped), {} truncated{identical}",
            self.records, self.used, self.bad_skipped, self.too_long_dropped, self.truncated
        )
    }
}

/// Why a record is bad: the field path (e.g. `messages[2].content`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// `field `F`: problem`, the form every message about a record uses after its location.
impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.problem)
    }
}

/// How a record parser handled one record.
pub enum Parsed<T> {
    Ok(T),
    /// Valid but longer than max_length (dropped and counted).
    TooLong,
    /// A preference pair whose two replies are the same (skipped and counted).
    Identical,
    Bad(FieldError),
}

/// Reads all records of `specs` and runs `parse` on each, applying the bad-record policy.
pub fn load_records<T>(
    specs: &[String],
    policy: OnBadRecord,
    mut parse: impl FnMut(&serde_json::Value, &mut DataReport) -> Parsed<T>,
) -> Result<(Vec<(Location, T)>, DataReport)> {
    let mut report = DataReport::default();
    let mut out = vec![];
    for spec in specs {
        for path in resolve_files(spec)? {
            for RawRecord { loc, value } in read_records(&path)? {
                report.records += 1;
                let result = match &value {
                    Ok(v) => parse(v, &mut report),
                    Err(why) => Parsed::Bad(FieldError::new("(record)", why.clone())),
                };
                match result {
                    Parsed::Ok(t) => out.push((loc, t)),
                    Parsed::TooLong => report.too_long_dropped += 1,
                    Parsed::Identical => report.identical_skipped += 1,
                    Parsed::Bad(e) => {
                        let msg = format!("{loc}: {e}");
                        if policy == OnBadRecord::Error {
                            bail!("{msg} (set data.on_bad_record = \"skip\" to skip bad records)");
                        }
                        report.bad_skipped += 1;
                        if report.bad_examples.len() < 5 {
                            report.bad_examples.push(msg);
                        }
                    }
                }
            }
        }
    }
    report.used = out.len();
    Ok((out, report))
}

/// Training and validation examples of one stage, with what happened to the records.
pub struct Splits<T> {
    pub train: Vec<T>,
    pub val: Vec<T>,
    pub train_report: DataReport,
    pub val_report: Option<DataReport>,
}

impl<T> Splits<T> {
    /// Logs the data reports and writes them to `data_report.json` in `out`.
    /// Prints the report and returns the data report file (name, bytes) for the run
    /// directory.
    pub fn report(&self) -> Result<(&'static str, Vec<u8>)> {
        eprintln!("train data: {}", self.train_report.summary());
        for e in &self.train_report.bad_examples {
            eprintln!("  skipped: {e}");
        }
        if let Some(r) = &self.val_report {
            eprintln!("validation data: {}", r.summary());
        }
        eprintln!(
            "{} training / {} validation examples",
            self.train.len(),
            self.val.len()
        );
        let text = serde_json::to_string_pretty(
            &serde_json::json!({"train": self.train_report, "validation": self.val_report}),
        )?;
        Ok(("data_report.json", format!("{text}\n").into_bytes()))
    }
}

/// Reads `data.train_files` (and `validation_files`) with `parse`, then shuffles, caps and
/// splits as the config says.
pub fn load_splits<T>(
    data: &DataConfig,
    parse: impl Fn(&serde_json::Value, &mut DataReport) -> Parsed<T>,
) -> Result<Splits<T>> {
    if data.train_files.is_empty() {
        bail!("data.train_files is empty: name at least one JSONL or Parquet file");
    }
    let (records, train_report) = load_records(&data.train_files, data.on_bad_record, &parse)?;
    usable(&data.train_files, &train_report)?;
    let examples: Vec<T> = records.into_iter().map(|(_, e)| e).collect();
    if data.validation_files.is_empty() {
        let (train, val) = shuffle_cap_split(
            examples,
            data.shuffle_seed,
            data.max_samples,
            data.validation_fraction,
        )?;
        return Ok(Splits {
            train,
            val,
            train_report,
            val_report: None,
        });
    }
    let (train, _) = shuffle_cap_split(examples, data.shuffle_seed, data.max_samples, 0.0)?;
    let (val, val_report) = load_records(&data.validation_files, data.on_bad_record, &parse)?;
    usable(&data.validation_files, &val_report)?;
    Ok(Splits {
        train,
        val: val.into_iter().map(|(_, e)| e).collect(),
        train_report,
        val_report: Some(val_report),
    })
}

/// Refuses data files that gave no usable example, naming them and saying why.
fn usable(files: &[String], report: &DataReport) -> Result<()> {
    if report.used > 0 {
        return Ok(());
    }
    let files = files.join(", ");
    if report.records == 0 {
        bail!("{files}: no records (the file holds no data)");
    }
    bail!(
        "{files}: no usable records ({}); see data.max_length and data.on_bad_record",
        report.summary()
    );
}

/// Shuffles with `seed`, caps at `max_samples`, and splits off `validation_fraction`.
pub fn shuffle_cap_split<T>(
    mut items: Vec<T>,
    seed: u64,
    max_samples: Option<usize>,
    validation_fraction: f64,
) -> Result<(Vec<T>, Vec<T>)> {
    if !(0.0..1.0).contains(&validation_fraction) {
        bail!("data.validation_fraction must be in [0, 1), got {validation_fraction}");
    }
    batching::shuffle(
        &mut items,
        &mut crate::util::rng::stream_rng(seed, 0x5eed_da7a),
    );
    if let Some(n) = max_samples {
        items.truncate(n);
    }
    let n_val = (items.len() as f64 * validation_fraction).round() as usize;
    let val = items.split_off(items.len() - n_val.min(items.len()));
    Ok((items, val))
}

/// Reads `key` of a JSON object as a string, or says which field is wrong.
pub fn str_field<'a>(
    v: &'a serde_json::Value,
    key: &str,
    path: &str,
) -> std::result::Result<&'a str, FieldError> {
    let field = if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    };
    match v.get(key) {
        None => Err(FieldError::new(field, "missing")),
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(FieldError::new(
            field,
            format!("expected a string, found {}", json_kind(other)),
        )),
    }
}
