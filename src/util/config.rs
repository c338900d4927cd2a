//! Configs are data: TOML files with sections, `--set section.key=value` overrides, unknown
//! keys rejected with the nearest valid key suggested, and the resolved config written next to
//! every run's outputs.

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

/// Loads `path` (or an empty config), applies `overrides`, and deserialises into `T`.
///
/// Three steps: the document is deserialised as written, so a wrong value is reported with
/// its line; every key it names must be one `T` knows (checked here rather than by serde, so
/// sections shared through `#[serde(flatten)]` are checked too); then the document is laid
/// over `T::default()` and deserialised again, so a flattened section takes the defaults of
/// the config it is part of (DPO's `[train]` defaults are not SFT's).
pub fn load<T: DeserializeOwned + Serialize + Default>(
    path: Option<&Path>,
    overrides: &[String],
) -> Result<T> {
    let (source, text) = match path {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p)
                .with_context(|| format!("{}: cannot read config", p.display()))?,
        ),
        None => ("(no config file)".to_string(), String::new()),
    };
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{source}: {}", one_line(&e, &text)))?;
    for o in overrides {
        apply_override(&mut table, o)?;
    }
    // Deserialise from text so errors carry the offending line; with overrides the text is the
    // merged document, so the message quotes the line instead of citing a line number.
    let (doc, where_) = if overrides.is_empty() {
        (text, source)
    } else {
        (
            toml::to_string(&table)?,
            format!("{source} (with --set overrides)"),
        )
    };
    let as_written = match toml::from_str::<T>(&doc) {
        Ok(v) => v,
        Err(e) => bail!("{where_}: {}", locate::<T>(&e, &table, &doc, overrides)),
    };
    let known = toml::Table::try_from(&as_written)?;
    let mut merged = toml::Table::try_from(T::default())?;
    check_keys(&table, &known, &merged, "", &doc).map_err(|e| anyhow::anyhow!("{where_}: {e}"))?;
    merge(&mut merged, table);
    Ok(merged.try_into()?)
}

/// Every key of `given` must survive deserialisation (appear in `known`); the suggestion comes
/// from the keys of the same table in `known` and the defaults.
fn check_keys(
    given: &toml::Table,
    known: &toml::Table,
    defaults: &toml::Table,
    at: &str,
    doc: &str,
) -> Result<()> {
    for (key, value) in given {
        let Some(k) = known.get(key) else {
            let mut names: Vec<&str> = known.keys().map(String::as_str).collect();
            names.extend(defaults.keys().map(String::as_str));
            let hint = nearest(key, &names)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            let place = if at.is_empty() {
                "at the top level".to_string()
            } else {
                format!("in [{at}]")
            };
            match key_line(doc, at, key) {
                Some((n, line)) => bail!("line {n} {place}: `{line}`: unknown key `{key}`{hint}"),
                None => bail!("unknown key `{key}` {place}{hint}"),
            }
        };
        if let (toml::Value::Table(g), toml::Value::Table(kt)) = (value, k) {
            let empty = toml::Table::new();
            let d = defaults
                .get(key)
                .and_then(|v| v.as_table())
                .unwrap_or(&empty);
            let path = if at.is_empty() {
                key.clone()
            } else {
                format!("{at}.{key}")
            };
            check_keys(g, kt, d, &path, doc)?;
        }
    }
    Ok(())
}

/// Lays `over` onto `base`: tables merge key by key, every other value replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// `section.key=value`: the value is parsed as TOML (numbers, booleans, arrays, quoted
/// strings), and taken as a bare string when it does not parse.
pub fn apply_override(table: &mut toml::Table, spec: &str) -> Result<()> {
    let (path, raw) = spec
        .split_once('=')
        .with_context(|| format!("--set {spec}: expected SECTION.KEY=VALUE"))?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.len() < 2 || keys.iter().any(|k| k.is_empty()) {
        bail!("--set {spec}: the key must name a section and a key, like train.lr=1e-5");
    }
    let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    // Digits TOML cannot hold are a number out of range, not a string.
    let digits = raw.trim().trim_start_matches(['+', '-']);
    if parsed.is_none() && !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) {
        bail!(
            "--set {spec}: {} is out of range for a 64-bit integer",
            raw.trim()
        );
    }
    let value = parsed.unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut cur = table;
    for k in &keys[..keys.len() - 1] {
        let entry = cur
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .with_context(|| format!("--set {spec}: `{k}` is not a section"))?;
    }
    cur.insert(keys[keys.len() - 1].to_string(), value);
    Ok(())
}

/// Flattens toml's multi-line error into one line: the quoted source line, the message, and a
/// "did you mean" for unknown keys.
fn one_line(e: &toml::de::Error, doc: &str) -> String {
    let msg = e.message().trim().replace('\n', " ");
    let location = e.span().map(|span| {
        let line_no = doc[..span.start.min(doc.len())].matches('\n').count() + 1;
        let line = doc.lines().nth(line_no - 1).unwrap_or("").trim();
        let section = doc
            .lines()
            .take(line_no)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .find(|l| l.trim_start().starts_with('['))
            .map(|l| l.trim().to_string());
        (line_no, line.to_string(), section)
    });
    let hint = did_you_mean(&msg)
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default();
    match location {
        Some((n, line, section)) => {
            let section = section.map(|s| format!(" in {s}")).unwrap_or_default();
            format!("line {n}{section}: `{line}`: {msg}{hint}")
        }
        None => format!("{msg}{hint}"),
    }
}

/// A deserialisation error of a document that parsed, placed at the key it is about.
///
/// Errors inside `#[serde(flatten)]` sections lose their position (serde buffers the section
/// before deserialising it), and toml then points at line 1. Each leaf value is tried alone,
/// laid over `T`'s defaults; the first that fails with the same message is the culprit, and
/// its line is found in the document by section and key.
fn locate<T: DeserializeOwned + Serialize + Default>(
    e: &toml::de::Error,
    table: &toml::Table,
    doc: &str,
    overrides: &[String],
) -> String {
    fn leaves(t: &toml::Table, at: &mut Vec<String>, out: &mut Vec<(Vec<String>, toml::Value)>) {
        for (k, v) in t {
            at.push(k.clone());
            match v {
                toml::Value::Table(inner) => leaves(inner, at, out),
                other => out.push((at.clone(), other.clone())),
            }
            at.pop();
        }
    }
    let Ok(defaults) = toml::Table::try_from(T::default()) else {
        return one_line(e, doc);
    };
    let mut all = vec![];
    leaves(table, &mut vec![], &mut all);
    let culprit = all.into_iter().find(|(path, value)| {
        let mut t = defaults.clone();
        let mut cur = &mut t;
        for k in &path[..path.len() - 1] {
            let entry = cur
                .entry(k.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry.as_table_mut() {
                Some(inner) => cur = inner,
                None => return false,
            }
        }
        cur.insert(path[path.len() - 1].clone(), value.clone());
        matches!(t.try_into::<T>(), Err(e2) if e2.message() == e.message())
    });
    let Some((path, _)) = culprit else {
        return one_line(e, doc);
    };
    let msg = e.message().trim().replace('\n', " ");
    let hint = did_you_mean(&msg)
        .map(|s| format!(" (did you mean `{s}`?)"))
        .unwrap_or_default();
    let dotted = path.join(".");
    if let Some(o) = overrides
        .iter()
        .rev()
        .find(|o| o.split_once('=').map(|(k, _)| k.trim()) == Some(dotted.as_str()))
    {
        return format!("--set {o}: {msg}{hint}");
    }
    let (section, key) = path.split_at(path.len() - 1);
    let section = section.join(".");
    let place = if section.is_empty() {
        "at the top level".to_string()
    } else {
        format!("in [{section}]")
    };
    match key_line(doc, &section, &key[0]) {
        Some((n, line)) => format!("line {n} {place}: `{line}`: {msg}{hint}"),
        None => format!("`{}` {place}: {msg}{hint}", key[0]),
    }
}

/// The line (1-based) and text where `key` is set under `[section]` ("" for the top level),
/// written either in the section or as a dotted key.
fn key_line(doc: &str, section: &str, key: &str) -> Option<(usize, String)> {
    let mut current = String::new();
    for (i, raw) in doc.lines().enumerate() {
        let line = raw.trim();
        if let Some(h) = line.strip_prefix('[') {
            current = h
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .split('.')
                .map(|p| p.trim().trim_matches('"'))
                .collect::<Vec<_>>()
                .join(".");
            continue;
        }
        let Some((k, _)) = line.split_once('=') else {
            continue;
        };
        let k: Vec<&str> = k.split('.').map(|p| p.trim().trim_matches('"')).collect();
        let full = if current.is_empty() {
            k.join(".")
        } else {
            format!("{current}.{}", k.join("."))
        };
        let want = if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        };
        if full == want {
            return Some((i + 1, line.to_string()));
        }
    }
    None
}

/// From serde's "unknown field `x`, expected one of `a`, `b`" (or "expected `a` or `b`"), the
/// valid name closest to `x`.
fn did_you_mean(msg: &str) -> Option<String> {
    let rest = msg
        .strip_prefix("unknown field `")
        .or_else(|| msg.strip_prefix("unknown variant `"))?;
    let (unknown, expected) = rest.split_once('`')?;
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    nearest(unknown, &candidates)
}

/// The candidate closest to `unknown` by edit distance, when it is close enough to be a typo.
fn nearest(unknown: &str, candidates: &[&str]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (levenshtein(unknown, c), *c))
        .filter(|(d, c)| *d <= (c.len().max(unknown.len()) / 2).max(2))
        .min()
        .map(|(_, c)| c.to_string())
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The first three of `changes` (from `changed_keys`) for an error line:
/// "train.lr: 0.001 -> 0.002, ...".
pub fn describe_changes(changes: &[(String, String, String)]) -> String {
    let mut shown: Vec<String> = changes
        .iter()
        .take(3)
        .map(|(k, a, b)| format!("{k}: {a} -> {b}"))
        .collect();
    if changes.len() > 3 {
        shown.push("...".into());
    }
    shown.join(", ")
}

/// The keys whose values differ between two resolved configs, as (`section.key`, old, new)
/// with TOML-written values; keys present on one side only count as changed, except a key the
/// old record lacks whose new value is its value in `defaults` (a resolved default config):
/// a setting added by an upgrade, at the value that reproduces the old behaviour.
pub fn changed_keys(
    old: &str,
    new: &str,
    defaults: Option<&str>,
) -> Result<Vec<(String, String, String)>> {
    let written = |text: &str| -> Result<std::collections::BTreeMap<String, String>> {
        let mut flat = vec![];
        flatten("", &toml::from_str(text)?, &mut flat);
        Ok(flat.into_iter().map(|(k, v)| (k, v.to_string())).collect())
    };
    let (a, b) = (written(old)?, written(new)?);
    let d = defaults.map(written).transpose()?.unwrap_or_default();
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let none = "(unset)".to_string();
    Ok(keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .filter(|k| !(!a.contains_key(*k) && b.contains_key(*k) && b.get(*k) == d.get(*k)))
        .map(|k| {
            let old = a.get(k).unwrap_or(&none).clone();
            let new = b.get(k).unwrap_or(&none).clone();
            (k.clone(), old, new)
        })
        .collect())
}

/// A table's leaves as (`section.key`, value), nested tables as dotted keys, in order.
pub fn flatten(prefix: &str, t: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(inner) => flatten(&key, inner, out),
            other => out.push((key, other.clone())),
        }
    }
}

/// The config as TOML, for `config.resolved.toml`.
pub fn to_toml(cfg: &impl Serialize) -> Result<String> {
    Ok(toml::to_string_pretty(cfg)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Train {
        #[serde(default)]
        lr: f64,
        #[serde(default)]
        batch_size: usize,
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[serde(default = "default_train")]
        train: Train,
    }

    impl Default for Cfg {
        fn default() -> Self {
            Cfg {
                train: default_train(),
            }
        }
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq, Default)]
    #[serde(default)]
    struct Sampling {
        temperature: f64,
        top_k: usize,
    }

    #[derive(Debug, Deserialize, Serialize, PartialEq, Default)]
    #[serde(default)]
    struct Eval {
        prompts: String,
        #[serde(flatten)]
        sampling: Sampling,
    }

    /// A config whose `[eval]` embeds a flattened struct, and whose default differs from the
    /// sections' own defaults.
    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(default)]
    struct Outer {
        eval: Eval,
    }

    impl Default for Outer {
        fn default() -> Self {
            Outer {
                eval: Eval {
                    prompts: "p.jsonl".into(),
                    sampling: Sampling {
                        temperature: 0.7,
                        top_k: 20,
                    },
                },
            }
        }
    }

    fn default_train() -> Train {
        Train {
            lr: 0.0,
            batch_size: 0,
        }
    }

    fn parse(text: &str, overrides: &[&str]) -> Result<Cfg> {
        parse_as(text, overrides)
    }

    fn parse_as<T: DeserializeOwned + Serialize + Default>(
        text: &str,
        overrides: &[&str],
    ) -> Result<T> {
        let dir = std::env::temp_dir().join(format!("mo-align-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("c{}.toml", text.len() + overrides.len()));
        std::fs::write(&p, text).unwrap();
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        load(Some(&p), &o)
    }

    #[test]
    fn unknown_keys_get_a_suggestion_and_a_line() {
        let e = parse("[train]\nlr = 1e-5\nbatch_sise = 2\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3 in [train]"), "{e}");
        assert!(e.contains("did you mean `batch_size`"), "{e}");
        let e = parse("[trian]\nlr = 1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("did you mean `train`"), "{e}");
        let e = parse("", &["train.lrr=3"]).unwrap_err().to_string();
        assert!(
            e.contains("did you mean `lr`") && e.contains("--set"),
            "{e}"
        );
    }

    /// A key an upgrade added is no change when the new record holds its default; at
    /// another value, or a key removed, it is.
    #[test]
    fn a_key_added_at_its_default_is_no_change() {
        let old = "[train]\nlr = 1.0\n";
        let defaults = "[train]\nlr = 0.5\nnew_knob = 3\n";
        let same = changed_keys(old, "[train]\nlr = 1.0\nnew_knob = 3\n", Some(defaults)).unwrap();
        assert!(same.is_empty(), "{same:?}");
        let moved = changed_keys(old, "[train]\nlr = 1.0\nnew_knob = 4\n", Some(defaults)).unwrap();
        assert_eq!(moved.len(), 1);
        let without = changed_keys(old, "[train]\nlr = 1.0\nnew_knob = 3\n", None).unwrap();
        assert_eq!(without.len(), 1);
        let removed = changed_keys("[train]\nlr = 1.0\ngone = 1\n", old, Some(defaults)).unwrap();
        assert_eq!(removed.len(), 1);
    }

    #[test]
    fn overrides_parse_values() {
        let c = parse(
            "[train]\nlr = 1.0\n",
            &["train.lr=2e-5", "train.batch_size=4"],
        )
        .unwrap();
        assert_eq!(
            c.train,
            Train {
                lr: 2e-5,
                batch_size: 4
            }
        );
        let e = parse("[train]\nlr = \"fast\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("lr = \"fast\""), "{e}");
        assert!(parse("", &["lr=3"]).is_err());
    }

    /// Inside a flattened section serde loses the position; the error still names the line
    /// and section of the key it is about.
    #[test]
    fn errors_in_flattened_sections_name_their_line() {
        let e = parse_as::<Outer>(
            "# comment\n[eval]\nprompts = \"p\"\ntop_k = 3\ntemperatur = 0.2\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("line 5 in [eval]: `temperatur = 0.2`: unknown key `temperatur`")
                && e.contains("`temperature`"),
            "{e}"
        );
        let e = parse_as::<Outer>("# c\n[eval]\ntop_k = 3\ntemperature = \"hot\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 4 in [eval]: `temperature = \"hot\"`"),
            "{e}"
        );
        let e = parse_as::<Outer>("# c\n[eval]\ntop_k = -1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3 in [eval]"), "{e}");
    }

    #[test]
    fn flattened_sections_keep_the_outer_defaults_and_refuse_unknown_keys() {
        let o: Outer = parse_as("[eval]\ntemperature = 0.2\n", &[]).unwrap();
        assert_eq!(o.eval.sampling.temperature, 0.2);
        // Not given: the outer config's defaults, not the sections' own.
        assert_eq!(
            (o.eval.prompts.as_str(), o.eval.sampling.top_k),
            ("p.jsonl", 20)
        );
        let e = parse_as::<Outer>("[eval]\ntemperatur = 0.2\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("in [eval]: `temperatur = 0.2`: unknown key `temperatur`")
                && e.contains("`temperature`"),
            "{e}"
        );
        let e = parse_as::<Outer>("[evl]\n", &[]).unwrap_err().to_string();
        assert!(e.contains("did you mean `eval`"), "{e}");
    }
}
