//! Data files: both formats give the same examples, and every bad record is reported with
//! file, line/row and field (or counted and skipped).

mod common;

use common::*;
use mo_align::data::{DataConfig, OnBadRecord, Truncation};
use mo_align::tokenizer::ChatTokenizer;
use std::path::{Path, PathBuf};

fn tok() -> ChatTokenizer {
    ChatTokenizer::from_file(&tiny_dir().join("tokenizer.json")).unwrap()
}

fn cfg(files: &[&Path], policy: OnBadRecord) -> DataConfig {
    DataConfig {
        train_files: files
            .iter()
            .map(|p| p.to_str().unwrap().to_string())
            .collect(),
        on_bad_record: policy,
        ..DataConfig::default()
    }
}

const GOOD: &str = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "source": "t"}"#;

/// Writes `good good BAD good` as JSONL; the bad record sits on line 3.
fn jsonl_with(name: &str, bad: &str) -> PathBuf {
    let p = scratch(&format!("bad-records-{name}")).join(format!("{name}.jsonl"));
    std::fs::write(&p, format!("{GOOD}\n{GOOD}\n{bad}\n{GOOD}\n")).unwrap();
    p
}

const CASES: [(&str, &str, &str, &str); 11] = [
    (
        "invalid-json",
        r#"{"messages": [ oops"#,
        "(record)",
        "invalid JSON",
    ),
    (
        "no-messages",
        r#"{"conversation": []}"#,
        "messages",
        "missing",
    ),
    (
        "not-a-list",
        r#"{"messages": "Hi there"}"#,
        "messages",
        "expected a list of messages, found a string",
    ),
    (
        "empty-list",
        r#"{"messages": []}"#,
        "messages",
        "empty list",
    ),
    (
        "not-object",
        r#"{"messages": ["Hi"]}"#,
        "messages[0]",
        "expected a {role, content} object",
    ),
    (
        "no-role",
        r#"{"messages": [{"content": "Hi"}, {"role": "assistant", "content": "x"}]}"#,
        "messages[0].role",
        "missing",
    ),
    (
        "bad-role",
        r#"{"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "x"}]}"#,
        "messages[0].role",
        "unknown role `human`",
    ),
    (
        "content-number",
        r#"{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}"#,
        "messages[0].content",
        "expected a string, found a number",
    ),
    (
        "content-null",
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": null}]}"#,
        "messages[1].content",
        "expected a string, found null",
    ),
    (
        "no-assistant",
        r#"{"messages": [{"role": "user", "content": "Hi"}]}"#,
        "messages",
        "no assistant message",
    ),
    (
        "late-system",
        r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
        "messages[1].role",
        "only allowed first",
    ),
];

#[test]
fn every_bad_jsonl_record_is_named_or_skipped() {
    let t = tok();
    for (name, bad, field, problem) in CASES {
        let p = jsonl_with(name, bad);
        let e = load_sft_data(&cfg(&[&p], OnBadRecord::Error), &t)
            .err()
            .unwrap_or_else(|| panic!("{name}: accepted"))
            .to_string();
        let want = format!("{} line 3: field `{field}`", p.display());
        assert!(e.contains(&want), "{name}: `{e}` lacks `{want}`");
        assert!(e.contains(problem), "{name}: `{e}` lacks `{problem}`");
        assert!(!e.contains('\n'));
        let (train, _, report, _) = load_sft_data(&cfg(&[&p], OnBadRecord::Skip), &t).unwrap();
        assert_eq!(
            (train.len(), report.records, report.bad_skipped),
            (3, 4, 1),
            "{name}"
        );
        assert!(report.bad_examples[0].contains("line 3"));
    }
}

#[test]
fn bad_parquet_rows_and_files_are_named() {
    let t = tok();
    let dir = scratch("bad-parquet");
    // A null content in Parquet (the column is a string, the value missing).
    let src = jsonl_with("pq-null-content", CASES[8].1);
    let pq = dir.join("null.parquet");
    mo_align::data::source::jsonl_to_parquet(&src, &pq).unwrap();
    let e = load_sft_data(&cfg(&[&pq], OnBadRecord::Error), &t)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(&format!(
            "{} row 2: field `messages[1].content`: missing",
            pq.display()
        )),
        "{e}"
    );
    let (train, _, report, _) = load_sft_data(&cfg(&[&pq], OnBadRecord::Skip), &t).unwrap();
    assert_eq!((train.len(), report.bad_skipped), (3, 1));
    // An unknown role inside a Parquet row.
    let src = jsonl_with("pq-bad-role", CASES[6].1);
    let pq = dir.join("role.parquet");
    mo_align::data::source::jsonl_to_parquet(&src, &pq).unwrap();
    let e = load_sft_data(&cfg(&[&pq], OnBadRecord::Error), &t)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("row 2: field `messages[0].role`: unknown role `human`"),
        "{e}"
    );
    // A file whose schema lacks the column, and one whose column has the wrong type.
    let src = dir.join("other.jsonl");
    std::fs::write(&src, "{\"conversation\": \"x\"}\n").unwrap();
    let pq = dir.join("other.parquet");
    mo_align::data::source::jsonl_to_parquet(&src, &pq).unwrap();
    let e = load_sft_data(&cfg(&[&pq], OnBadRecord::Error), &t)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("row 0: field `messages`: missing"), "{e}");
    std::fs::write(&src, "{\"messages\": \"x\"}\n").unwrap();
    mo_align::data::source::jsonl_to_parquet(&src, &pq).unwrap();
    let e = load_sft_data(&cfg(&[&pq], OnBadRecord::Error), &t)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("row 0: field `messages`: expected a list of messages, found a string"),
        "{e}"
    );
    // Not Parquet at all, and a missing file: file-level errors regardless of the policy.
    let junk = dir.join("junk.parquet");
    std::fs::write(&junk, b"PAR1 this is not parquet").unwrap();
    let e = load_sft_data(&cfg(&[&junk], OnBadRecord::Skip), &t)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("junk.parquet") && e.contains("not a valid Parquet file"),
        "{e}"
    );
    let e = load_sft_data(&cfg(&[Path::new("data/nope.jsonl")], OnBadRecord::Skip), &t)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("data/nope.jsonl: no such data file"), "{e}");
}

#[test]
fn json_array_files_report_rows() {
    let p = scratch("json-array").join("a.json");
    std::fs::write(&p, format!("[{GOOD}, {}]", CASES[7].1)).unwrap();
    let e = load_sft_data(&cfg(&[&p], OnBadRecord::Error), &tok())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("a.json row 1: field `messages[0].content`"),
        "{e}"
    );
}

#[test]
fn jsonl_and_parquet_samples_give_identical_examples() {
    let t = tok();
    let j = load_sft_data(
        &cfg(
            &[Path::new("data/smoltalk/train.jsonl")],
            OnBadRecord::Error,
        ),
        &t,
    )
    .unwrap();
    let p = load_sft_data(
        &cfg(
            &[Path::new("data/smoltalk/train.parquet")],
            OnBadRecord::Error,
        ),
        &t,
    )
    .unwrap();
    assert_eq!(j.0.len(), 800);
    assert_eq!(j.0, p.0);
}

#[test]
fn too_long_records_are_dropped_or_truncated_and_counted() {
    let t = tok();
    let files = [Path::new("data/smoltalk/train.jsonl")];
    let mut c = cfg(&files, OnBadRecord::Error);
    c.max_length = 60;
    let (train, _, report, _) = load_sft_data(&c, &t).unwrap();
    assert!(report.too_long_dropped > 0 && report.truncated == 0);
    assert_eq!(train.len() + report.too_long_dropped, 800);
    assert!(train.iter().all(|e| e.len() <= 60));
    c.truncation = Truncation::Truncate;
    let (train, _, report, _) = load_sft_data(&c, &t).unwrap();
    assert!(report.truncated > 0);
    assert_eq!(train.len() + report.too_long_dropped, 800);
    assert!(train
        .iter()
        .all(|e| e.len() <= 60 && e.labelled.iter().any(|&l| l)));
}

#[test]
fn validation_split_and_max_samples_are_deterministic() {
    let t = tok();
    let mut c = cfg(
        &[Path::new("data/smoltalk/train.jsonl")],
        OnBadRecord::Error,
    );
    c.validation_fraction = 0.1;
    c.max_samples = Some(200);
    let (train, val, _, _) = load_sft_data(&c, &t).unwrap();
    assert_eq!((train.len(), val.len()), (180, 20));
    let (train2, val2, _, _) = load_sft_data(&c, &t).unwrap();
    assert_eq!((train, val), (train2, val2));
}

/// A pair whose replies are the same, as written or once truncated, carries no preference:
/// it is skipped and counted, and the other pairs are kept.
#[test]
fn identical_preference_pairs_are_skipped_and_counted() {
    use mo_align::data::load_splits;
    use mo_align::data::preference::preference_pair;
    let t = tok();
    let dir = scratch("identical-pairs");
    let pair = |c: &str, r: &str| {
        serde_json::json!({
            "prompt": "Name a colour.",
            "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": c}],
            "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": r}],
        })
        .to_string()
    };
    let long_a = format!("{} red", "very ".repeat(200));
    let long_b = format!("{} blue", "very ".repeat(200));
    let f = dir.join("pairs.jsonl");
    std::fs::write(
        &f,
        [
            pair("Red.", "Blue."),
            pair("Red.", "Red."),
            pair(&long_a, &long_b),
            pair("Green.", "Green?"),
        ]
        .join("\n"),
    )
    .unwrap();
    let mut c = cfg(&[&f], OnBadRecord::Error);
    c.max_length = 64;
    c.truncation = Truncation::Truncate;
    let s = load_splits(&c, |v, r| preference_pair(v, &t, &c, r)).unwrap();
    // "Red."/"Red." as written; the long pair differs only past the cut.
    assert_eq!(s.train_report.identical_skipped, 2, "{:?}", s.train_report);
    assert_eq!(s.train.len(), 2);
    assert!(s.train.iter().all(|p| p.chosen != p.rejected));
    assert!(s
        .train_report
        .summary()
        .contains("2 with chosen = rejected"));
}
