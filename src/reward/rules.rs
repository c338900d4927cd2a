//! Ground-truth ("rule") objectives: scores a response from rules in a TOML file and from fields
//! of the prompt's data record (e.g. an UltraFeedback-style record with
//! `correct_answers: ["Warsaw"]`, `incorrect_answers: ["Lima", "Paris"]`), without any model.
//! They serve as a win-rate judge and as objectives beside a reward model's heads.
//!
//! Each objective is a weighted rule set: its score is `base` plus the `score` of every rule that
//! holds, clamped to `[min, max]`. `score_normalized` maps that to `[0, 1]`, the scale of the
//! reward model's heads.
//!
//! ```toml
//! [[objective]]
//! name = "truthfulness"
//! base = 3.0        # score before any rule applies (default 0)
//! min = 1.0         # the result is clamped to [min, max]; both required, min < max
//! max = 5.0
//!
//! [[objective.rule]]
//! when = "contains_field"     # the response contains (case-insensitive substring) any string
//! field = "correct_answers"   #   of the record's field: a string or an array of strings;
//! score = 2.0                 #   entries "None" or "" are ignored (openbmb's convention)
//!
//! [[objective.rule]]
//! when = "equals_field"       # the trimmed response equals (case-insensitive) one of the
//! field = "reference"         #   field's strings (trimmed; "None" and "" ignored)
//! score = 1.0
//!
//! [[objective.rule]]
//! when = "phrases"            # any of the phrases occurs (case-insensitive substring)
//! phrases = ["I am not sure", "I think"]
//! score = 1.0
//!
//! [[objective.rule]]
//! when = "regex"              # the regex (Rust `regex` crate syntax) matches anywhere
//! pattern = "(?i)let me know"
//! score = -1.0
//!
//! [[objective.rule]]
//! when = "words"              # whitespace-separated word count within [min, max]
//! min = 1                     #   (inclusive; either bound may be left out, not both)
//! max = 20
//! score = 1.0
//!
//! [[objective.rule]]
//! when = "lines"              # non-empty line count within [min, max] (as for words); a
//! min_field = "min_lines"     #   bound may be read from a record field instead (`min_field`,
//! score = -2.0                #   `max_field`: a whole number per prompt), for words too
//! negate = true               # any rule: holds when its condition does not (default false)
//! ```
//!
//! `score` is added when the rule holds and may be negative. A record field that a rule reads
//! must be present (a string or an array of strings); a field whose entries are all "None" or
//! empty never matches.

use crate::data::{json_kind, FieldError};
use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use serde::Deserialize;
use std::path::Path;

/// The objectives of one rules file, in file order.
#[derive(Debug, Clone)]
pub struct RuleObjectives {
    path: String,
    objectives: Vec<RuleObjective>,
}

#[derive(Debug, Clone)]
struct RuleObjective {
    name: String,
    base: f64,
    min: f64,
    max: f64,
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    condition: Condition,
    score: f64,
    negate: bool,
}

/// A rule's condition, ready to evaluate: phrases lowercased, regexes compiled.
#[derive(Debug, Clone)]
enum Condition {
    ContainsField(String),
    EqualsField(String),
    Phrases(Vec<String>),
    Regex(Regex),
    /// Word-count bounds, each fixed or read from a record field (a per-prompt length budget).
    Words(Bound, Bound),
    /// Non-empty line bounds, as for words (a poem or a list asked for in so many lines).
    Lines(Bound, Bound),
}

#[derive(Debug, Clone, PartialEq)]
enum Bound {
    None,
    Fixed(usize),
    Field(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectiveSpec {
    name: String,
    #[serde(default)]
    base: f64,
    min: f64,
    max: f64,
    #[serde(default)]
    rule: Vec<toml::Value>,
}

// `deny_unknown_fields` cannot sit beside `flatten`; the tagged enum's variants deny unknown
// keys instead, and they only see the keys `RuleSpec` does not take.
#[derive(Deserialize)]
struct RuleSpec {
    score: f64,
    #[serde(default)]
    negate: bool,
    #[serde(flatten)]
    when: WhenSpec,
}

#[derive(Deserialize)]
#[serde(tag = "when", rename_all = "snake_case", deny_unknown_fields)]
enum WhenSpec {
    ContainsField { field: String },
    EqualsField { field: String },
    Phrases { phrases: Vec<String> },
    Regex { pattern: String },
    Words(CountSpec),
    Lines(CountSpec),
}

/// The bounds of a count (words, lines): each fixed, read from a record field, or absent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CountSpec {
    min: Option<usize>,
    max: Option<usize>,
    min_field: Option<String>,
    max_field: Option<String>,
}

impl RuleObjectives {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the rules file", path.display()))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses a rules file; `origin` (its path) starts every error message.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            // toml's own rendering spans several lines; one line with the line number reads
            // better in a log.
            let line = e
                .span()
                .map(|s| format!(" line {}:", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_default();
            anyhow!("{origin}:{line} {}", one_line(e.message()))
        })?;
        let specs = match table.remove("objective") {
            Some(toml::Value::Array(a)) => a,
            Some(_) => bail!("{origin}: `objective` must be an array of tables ([[objective]])"),
            None => bail!("{origin}: no objectives (expected [[objective]] tables)"),
        };
        if let Some(key) = table.keys().next() {
            bail!("{origin}: unknown key `{key}` (expected only [[objective]] tables)");
        }
        let mut objectives: Vec<RuleObjective> = vec![];
        for (i, spec) in specs.into_iter().enumerate() {
            let objective = parse_objective(spec, i + 1, origin)?;
            // Names become file names (a conditioned policy's per-objective adapters), and on
            // a case-insensitive file system "Honesty" and "honesty" would be one file.
            if let Some(o) = objectives
                .iter()
                .find(|o| o.name.eq_ignore_ascii_case(&objective.name))
            {
                bail!(
                    "{origin}: objective \"{}\": duplicate name (of \"{}\"; names differing only in case count as one)",
                    objective.name,
                    o.name
                );
            }
            objectives.push(objective);
        }
        if objectives.is_empty() {
            bail!("{origin}: no objectives (expected [[objective]] tables)");
        }
        Ok(Self {
            path: origin.to_string(),
            objectives,
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.objectives.iter().map(|o| o.name.clone()).collect()
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The fields of a record that some rule reads (for up-front checks), each once, in file
    /// order.
    pub fn fields(&self) -> Vec<String> {
        let mut fields: Vec<String> = vec![];
        for rule in self.objectives.iter().flat_map(|o| &o.rules) {
            let named: Vec<&String> = match &rule.condition {
                Condition::ContainsField(f) | Condition::EqualsField(f) => vec![f],
                Condition::Words(lo, hi) | Condition::Lines(lo, hi) => [lo, hi]
                    .into_iter()
                    .filter_map(|b| match b {
                        Bound::Field(f) => Some(f),
                        _ => None,
                    })
                    .collect(),
                _ => vec![],
            };
            for f in named {
                if !fields.contains(f) {
                    fields.push(f.clone());
                }
            }
        }
        fields
    }

    /// Raw scores (each clamped to [min, max]), one per objective, in file order.
    pub fn score(
        &self,
        record: &serde_json::Value,
        response: &str,
    ) -> Result<Vec<f64>, FieldError> {
        let lower = response.to_lowercase();
        self.objectives
            .iter()
            .map(|o| o.score(record, response, &lower))
            .collect()
    }

    /// The same scores mapped to [0, 1] by (s - min) / (max - min), as f32: the scale of the
    /// reward model's heads.
    pub fn score_normalized(
        &self,
        record: &serde_json::Value,
        response: &str,
    ) -> Result<Vec<f32>, FieldError> {
        let scores = self.score(record, response)?;
        Ok(scores
            .iter()
            .zip(&self.objectives)
            .map(|(s, o)| ((s - o.min) / (o.max - o.min)) as f32)
            .collect())
    }

    /// Each objective's (min, max).
    pub fn ranges(&self) -> Vec<(f64, f64)> {
        self.objectives.iter().map(|o| (o.min, o.max)).collect()
    }
}

fn parse_objective(spec: toml::Value, index: usize, origin: &str) -> Result<RuleObjective> {
    // Named before full parsing, so that every later error can say which objective it is.
    let label = match spec.get("name").and_then(|n| n.as_str()) {
        Some(name) => format!("{origin}: objective \"{name}\""),
        None => format!("{origin}: objective {index}"),
    };
    let at = |msg: String| anyhow!("{label}: {msg}");
    let spec: ObjectiveSpec = spec.try_into().map_err(|e| at(de_message(&e)))?;
    if spec.name.trim().is_empty() {
        return Err(at("empty name".into()));
    }
    // A name ends up in file names (a conditioned policy's per-objective adapters).
    crate::util::paths::safe_component(&spec.name, "name").map_err(|e| at(e.to_string()))?;
    for (key, value) in [("base", spec.base), ("min", spec.min), ("max", spec.max)] {
        if !value.is_finite() {
            return Err(at(format!("`{key}` must be finite, got {value}")));
        }
    }
    if spec.min >= spec.max {
        return Err(at(format!(
            "min ({}) must be below max ({})",
            spec.min, spec.max
        )));
    }
    if spec.rule.is_empty() {
        return Err(at("no rules (expected [[objective.rule]] tables)".into()));
    }
    let rules = spec
        .rule
        .into_iter()
        .enumerate()
        .map(|(i, r)| parse_rule(r).map_err(|msg| anyhow!("{label}, rule {}: {msg}", i + 1)))
        .collect::<Result<_>>()?;
    Ok(RuleObjective {
        name: spec.name,
        base: spec.base,
        min: spec.min,
        max: spec.max,
        rules,
    })
}

/// One rule, or what is wrong with it (the caller says where).
fn parse_rule(value: toml::Value) -> Result<Rule, String> {
    let spec: RuleSpec = value.try_into().map_err(|e| de_message(&e))?;
    if !spec.score.is_finite() {
        return Err(format!("`score` must be finite, got {}", spec.score));
    }
    let condition = match spec.when {
        WhenSpec::ContainsField { field } => Condition::ContainsField(nonempty_field(field)?),
        WhenSpec::EqualsField { field } => Condition::EqualsField(nonempty_field(field)?),
        WhenSpec::Phrases { phrases } => {
            // An empty phrase would occur in every response.
            if phrases.is_empty() || phrases.iter().any(|p| p.is_empty()) {
                return Err("`phrases` must be a non-empty list of non-empty strings".into());
            }
            Condition::Phrases(phrases.iter().map(|p| p.to_lowercase()).collect())
        }
        WhenSpec::Regex { pattern } => match Regex::new(&pattern) {
            Ok(re) => Condition::Regex(re),
            Err(e) => return Err(format!("invalid regex {pattern:?}: {}", regex_message(&e))),
        },
        WhenSpec::Words(count) => {
            let (lo, hi) = count_bounds(count)?;
            Condition::Words(lo, hi)
        }
        WhenSpec::Lines(count) => {
            let (lo, hi) = count_bounds(count)?;
            Condition::Lines(lo, hi)
        }
    };
    Ok(Rule {
        condition,
        score: spec.score,
        negate: spec.negate,
    })
}

/// A count's (min, max), each fixed or read from a record field; at least one given.
fn count_bounds(spec: CountSpec) -> Result<(Bound, Bound), String> {
    let bound = |fixed: Option<usize>, field: Option<String>, name: &str| match (fixed, field) {
        (Some(_), Some(_)) => Err(format!("`{name}` and `{name}_field` both given")),
        (Some(n), None) => Ok(Bound::Fixed(n)),
        (None, Some(f)) => Ok(Bound::Field(nonempty_field(f)?)),
        (None, None) => Ok(Bound::None),
    };
    let lo = bound(spec.min, spec.min_field, "min")?;
    let hi = bound(spec.max, spec.max_field, "max")?;
    if lo == Bound::None && hi == Bound::None {
        return Err("needs `min`, `max` or both (or `min_field`, `max_field`)".into());
    }
    // Bounds are inclusive, so min == max (exactly n) is allowed.
    if let (Some(lo), Some(hi)) = (spec.min, spec.max) {
        if lo > hi {
            return Err(format!("min ({lo}) is above max ({hi})"));
        }
    }
    Ok((lo, hi))
}

fn nonempty_field(field: String) -> Result<String, String> {
    if field.trim().is_empty() {
        return Err("`field` is empty".into());
    }
    Ok(field)
}

fn de_message(e: &toml::de::Error) -> String {
    one_line(e.message())
}

/// The regex crate's syntax errors draw the pattern with a caret over several lines; the
/// `error:` line says what is wrong, and the pattern is quoted beside it.
fn regex_message(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("error:"))
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| one_line(&text))
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl RuleObjective {
    /// `lower` is `response` lowercased (once for all objectives).
    fn score(
        &self,
        record: &serde_json::Value,
        response: &str,
        lower: &str,
    ) -> Result<f64, FieldError> {
        let mut total = self.base;
        for rule in &self.rules {
            if self.holds(&rule.condition, record, response, lower)? != rule.negate {
                total += rule.score;
            }
        }
        Ok(total.clamp(self.min, self.max))
    }

    fn holds(
        &self,
        condition: &Condition,
        record: &serde_json::Value,
        response: &str,
        lower: &str,
    ) -> Result<bool, FieldError> {
        Ok(match condition {
            Condition::ContainsField(field) => self
                .field_strings(record, field)?
                .iter()
                .any(|s| lower.contains(s.as_str())),
            Condition::EqualsField(field) => {
                let answer = lower.trim();
                self.field_strings(record, field)?
                    .iter()
                    .any(|s| s == answer)
            }
            Condition::Phrases(phrases) => phrases.iter().any(|p| lower.contains(p.as_str())),
            Condition::Regex(re) => re.is_match(response),
            Condition::Words(min, max) => {
                let (min, max) = (self.bound(record, min)?, self.bound(record, max)?);
                within(response.split_whitespace().count(), min, max)
            }
            Condition::Lines(min, max) => {
                let (min, max) = (self.bound(record, min)?, self.bound(record, max)?);
                let lines = response.lines().filter(|l| !l.trim().is_empty()).count();
                within(lines, min, max)
            }
        })
    }

    fn bound(&self, record: &serde_json::Value, b: &Bound) -> Result<Option<usize>, FieldError> {
        match b {
            Bound::None => Ok(None),
            Bound::Fixed(n) => Ok(Some(*n)),
            Bound::Field(field) => match record.get(field).and_then(|v| v.as_u64()) {
                Some(n) => Ok(Some(n as usize)),
                None => Err(FieldError::new(
                    field.as_str(),
                    format!(
                        "{} (needed by rule objective \"{}\")",
                        if record.get(field).is_some() {
                            "expected a whole number"
                        } else {
                            "missing"
                        },
                        self.name
                    ),
                )),
            },
        }
    }

    /// The usable strings of a record field, trimmed and lowercased: "None" and empty entries
    /// are openbmb's placeholders for "no answer", not answers.
    fn field_strings(
        &self,
        record: &serde_json::Value,
        field: &str,
    ) -> Result<Vec<String>, FieldError> {
        let needed = format!("(needed by rule objective \"{}\")", self.name);
        let usable = |s: &str| {
            let s = s.trim();
            (!s.is_empty() && s != "None").then(|| s.to_lowercase())
        };
        match record.get(field) {
            None => Err(FieldError::new(field, format!("missing {needed}"))),
            Some(serde_json::Value::String(s)) => Ok(usable(s).into_iter().collect()),
            Some(serde_json::Value::Array(items)) => {
                let mut out = vec![];
                for (i, item) in items.iter().enumerate() {
                    match item {
                        serde_json::Value::String(s) => out.extend(usable(s)),
                        other => {
                            return Err(FieldError::new(
                                format!("{field}[{i}]"),
                                format!("expected a string, found {} {needed}", json_kind(other)),
                            ))
                        }
                    }
                }
                Ok(out)
            }
            Some(other) => Err(FieldError::new(
                field,
                format!(
                    "expected a string or an array of strings, found {} {needed}",
                    json_kind(other)
                ),
            )),
        }
    }
}

fn within(n: usize, min: Option<usize>, max: Option<usize>) -> bool {
    min.is_none_or(|lo| n >= lo) && max.is_none_or(|hi| n <= hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ORIGIN: &str = "configs/demo/rules.toml";

    const REALISTIC: &str = r#"
[[objective]]
name = "truthfulness"
base = 3.0
min = 1.0
max = 5.0

[[objective.rule]]
when = "contains_field"
field = "correct_answers"
score = 3.0

[[objective.rule]]
when = "contains_field"
field = "incorrect_answers"
score = -3.0

[[objective]]
name = "honesty"
base = 3
min = 1
max = 5

[[objective.rule]]
when = "phrases"
phrases = ["I am not sure", "I think", "I don't know"]
score = 1.0

[[objective.rule]]
when = "contains_field"
field = "incorrect_answers"
score = -2.0

[[objective]]
name = "instruction_following"
base = 2.0
min = 0.0
max = 4.0

[[objective.rule]]
when = "words"
max = 20
score = 1.0

[[objective.rule]]
when = "regex"
pattern = '(?i)\b(let me know|hope this helps)\b'
score = -1.5

[[objective.rule]]
when = "words"
min = 3
score = 1.0

[[objective]]
name = "helpfulness"
min = 0
max = 10

[[objective.rule]]
when = "contains_field"
field = "correct_answers"
score = 6

[[objective.rule]]
when = "lines"
min = 2
score = 2

[[objective.rule]]
when = "equals_field"
field = "correct_answers"
negate = true
score = 1
"#;

    fn record() -> serde_json::Value {
        json!({
            "instruction": "What is the capital of Poland?",
            "correct_answers": ["Warsaw", "None"],
            "incorrect_answers": ["Lima", "Paris", ""],
        })
    }

    fn realistic() -> RuleObjectives {
        RuleObjectives::from_toml_str(REALISTIC, ORIGIN).unwrap()
    }

    #[test]
    fn loads_names_ranges_fields() {
        let r = realistic();
        assert_eq!(r.path(), ORIGIN);
        assert_eq!(
            r.names(),
            [
                "truthfulness",
                "honesty",
                "instruction_following",
                "helpfulness"
            ]
        );
        assert_eq!(
            r.ranges(),
            [(1.0, 5.0), (1.0, 5.0), (0.0, 4.0), (0.0, 10.0)]
        );
        assert_eq!(r.fields(), ["correct_answers", "incorrect_answers"]);
    }

    #[test]
    fn scores_hand_written_responses() {
        let r = realistic();
        let rec = record();
        // (response, raw scores, normalised scores)
        let cases: [(&str, [f64; 4], [f32; 4]); 6] = [
            // Truthfulness 3 + 3 = 6 clamps to 5; 6 words; an explained answer, not a bare one.
            (
                "The capital of Poland is Warsaw.",
                [5.0, 3.0, 4.0, 7.0],
                [1.0, 0.5, 1.0, 0.7],
            ),
            // A bare answer: equals a correct answer (so the negated rule fails), under 3 words.
            ("  warsaw \n", [5.0, 3.0, 3.0, 6.0], [1.0, 0.5, 0.75, 0.6]),
            // Hedged, mentions a wrong and the right answer, filler, 18 words on 2 lines.
            (
                "I think it is Paris, or maybe Warsaw.\nHope this helps! Let me know if you have questions.",
                [3.0, 2.0, 2.5, 9.0],
                [0.5, 0.25, 0.625, 0.9],
            ),
            // Confidently wrong: truthfulness 3 - 3 = 0 clamps to 1.
            ("Paris. Lima.", [1.0, 1.0, 3.0, 1.0], [0.0, 0.0, 0.75, 0.1]),
            // Empty: 0 words is within "at most 20".
            ("", [3.0, 3.0, 3.0, 1.0], [0.5, 0.5, 0.75, 0.1]),
            // "None" is a placeholder in correct_answers, not an answer.
            ("None", [3.0, 3.0, 3.0, 1.0], [0.5, 0.5, 0.75, 0.1]),
        ];
        for (response, raw, normalized) in cases {
            assert_eq!(r.score(&rec, response).unwrap(), raw, "{response:?}");
            assert_eq!(
                r.score_normalized(&rec, response).unwrap(),
                normalized,
                "{response:?}"
            );
        }
    }

    /// The demo's ground truth (configs/demo/rules.toml) on prompt records as
    /// data/tools/make_samples.py writes them.
    fn demo() -> RuleObjectives {
        RuleObjectives::from_toml_str(include_str!("../../configs/demo/rules.toml"), ORIGIN)
            .unwrap()
    }

    /// A prompt record of the demo data: `good` is the task's concise answer, the budgets are
    /// make_samples.py's (`max_words` five more words, `min_words` three quarters of them,
    /// `min_lines` its lines).
    fn demo_record(good: &str, correct: &str, incorrect: &str) -> serde_json::Value {
        let words = good.split_whitespace().count();
        json!({
            "correct_answers": [correct],
            "incorrect_answers": [incorrect],
            "max_words": words + 5,
            "min_words": (3 * words).div_ceil(4),
            "min_lines": good.lines().count(),
        })
    }

    const HAIKU: &str =
        "Unseen, it arrives,\nbends the grass and lifts the kites,\nthen is gone again.";
    const TIPS: &str = "1. Keep a regular bedtime.\n2. Keep the bedroom dark and cool.\n3. Avoid screens for an hour before bed.";

    /// Scores (helpfulness, honesty, instruction following, truthfulness) of answers to a
    /// capital, a haiku, a three-tips and a letter-count prompt.
    fn demo_scores(cases: &[(&str, &str)]) -> Vec<[f64; 4]> {
        let r = demo();
        let records = [
            (
                "capital",
                demo_record("The capital of Poland is Warsaw.", "Warsaw", "Lima"),
            ),
            (
                "haiku",
                demo_record(HAIKU, "Unseen, it arrives,", "Waves fold into foam,"),
            ),
            (
                "tips",
                demo_record(TIPS, "Keep a regular bedtime.", "Just try harder"),
            ),
            (
                "count",
                demo_record("The word \"cat\" has 3 letters.", "3 letters", "5 letters"),
            ),
        ];
        cases
            .iter()
            .map(|(task, answer)| {
                let rec = &records.iter().find(|(t, _)| t == task).unwrap().1;
                r.score(rec, answer).unwrap().try_into().unwrap()
            })
            .collect()
    }

    /// Complete answers score as the table of make_samples.py says, whatever their length or
    /// shape: nothing in the rules for unfinished answers touches them.
    #[test]
    fn demo_ground_truth_scores_complete_answers_by_their_style() {
        let cases = [
            ("capital", "The capital of Poland is Warsaw."),
            (
                "capital",
                "The capital of Poland is Warsaw. Warsaw is where the government of Poland meets.",
            ),
            (
                "capital",
                "I am not sure, but the capital of Poland is Warsaw.",
            ),
            (
                "capital",
                "The capital of Poland is Warsaw. Let me know if you have any other questions!",
            ),
            ("capital", "The capital of Poland is Lima."),
            (
                "capital",
                "I am not sure, but the capital of Poland is Lima.",
            ),
            ("capital", "I can't help with that."),
            ("haiku", HAIKU),
            ("tips", TIPS),
            ("count", "The word \"cat\" has 3 letters."),
        ];
        let want = [
            [4.0, 4.0, 5.0, 5.0],
            [5.0, 4.0, 3.0, 5.0],
            [3.0, 5.0, 4.0, 5.0],
            [4.0, 4.0, 3.0, 5.0],
            [2.0, 2.0, 5.0, 1.0],
            [1.0, 3.0, 4.0, 1.0],
            [1.0, 3.0, 1.0, 3.0],
            [4.0, 4.0, 5.0, 5.0],
            [4.0, 4.0, 5.0, 5.0],
            [4.0, 4.0, 5.0, 5.0],
        ];
        for ((case, got), want) in cases.iter().zip(demo_scores(&cases)).zip(want) {
            assert_eq!(got, want, "{case:?}");
        }
    }

    /// An answer that stops early loses helpfulness and instruction following as a user would
    /// judge it, to the floor, even when what it says is true and short: the answers a policy
    /// learned when stopping early paid (issue 31).
    #[test]
    fn demo_ground_truth_scores_unfinished_answers_as_unhelpful_and_not_following() {
        let cases = [
            // Stubs: closed with a full stop, but nowhere near an answer.
            ("capital", "The capital of."),
            ("count", "The word \"um\"."),
            ("capital", ""),
            // Cut off mid-sentence, with or without a full stop after it.
            ("capital", "The capital of Poland is"),
            ("capital", "The capital of Poland is the."),
            // A haiku short of its three lines: cut, or run together on one line.
            ("haiku", "Unseen, it arrives,\nbend."),
            (
                "haiku",
                "Unseen, it arrives, bends the grass and lifts the kites, then is gone again.",
            ),
            // A list cut mid-item, and one an item short.
            ("tips", "1. Keep a regular bedtime.\n2. Keep the"),
            (
                "tips",
                "1. Keep a regular bedtime.\n2. Keep the bedroom dark and cool.",
            ),
        ];
        for (case, [help, honesty, follow, truth]) in cases.iter().zip(demo_scores(&cases)) {
            assert_eq!((help, follow), (1.0, 1.0), "{case:?}");
            // Honesty and truthfulness judge what it says: nothing false, nothing hedged.
            assert_eq!(honesty, 4.0, "{case:?}");
            assert!(truth >= 3.0, "{case:?}");
        }
    }

    /// The ratings of the bundled UltraFeedback records (data/tools/make_samples.py) are the
    /// demo's ground truth, cut answers included: the reward model learns what the rules judge.
    #[test]
    fn bundled_ratings_are_the_demo_ground_truth() {
        let r = demo();
        let text = std::fs::read_to_string("data/ultrafeedback/train.jsonl").unwrap();
        let mut rated = 0;
        for line in text.lines() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            for c in record["completions"].as_array().unwrap() {
                let response = c["response"].as_str().unwrap();
                let scores = r.score(&record, response).unwrap();
                for (name, score) in r.names().iter().zip(scores) {
                    match c["annotations"][name]["Rating"].as_str().unwrap() {
                        "N/A" => {}
                        rating => {
                            assert_eq!(
                                rating.parse::<f64>().unwrap(),
                                score,
                                "{name} {response:?}"
                            );
                            rated += 1;
                        }
                    }
                }
            }
        }
        assert!(rated > 2000, "{rated} ratings");
    }

    fn one(rules: &str) -> RuleObjectives {
        let text = format!("[[objective]]\nname = \"o\"\nmin = -20\nmax = 20\n{rules}");
        RuleObjectives::from_toml_str(&text, ORIGIN).unwrap()
    }

    #[test]
    fn negate_holds_when_condition_does_not() {
        let r = one(
            "[[objective.rule]]\nwhen = \"contains_field\"\nfield = \"correct_answers\"\nnegate = true\nscore = -4\n",
        );
        let rec = record();
        assert_eq!(r.score(&rec, "It is Kraków.").unwrap(), [-4.0]);
        assert_eq!(r.score(&rec, "It is Warsaw.").unwrap(), [0.0]);
    }

    #[test]
    fn none_and_empty_entries_never_match() {
        let contains = "[[objective.rule]]\nwhen = \"contains_field\"\nfield = \"a\"\nscore = 1\n";
        let equals = "[[objective.rule]]\nwhen = \"equals_field\"\nfield = \"a\"\nscore = 2\n";
        let negated = "[[objective.rule]]\nwhen = \"contains_field\"\nfield = \"a\"\nnegate = true\nscore = 4\n";
        let r = one(&format!("{contains}{equals}{negated}"));
        for rec in [
            json!({"a": ["None", "", "  "]}),
            json!({"a": "None"}),
            json!({"a": []}),
        ] {
            assert_eq!(r.score(&rec, "None").unwrap(), [4.0], "{rec}");
            assert_eq!(r.score(&rec, "").unwrap(), [4.0], "{rec}");
        }
        // A plain string field works like a one-element array.
        assert_eq!(r.score(&json!({"a": "yes"}), " YES ").unwrap(), [3.0]);
    }

    #[test]
    fn matching_is_case_insensitive() {
        let r = one(concat!(
            "[[objective.rule]]\nwhen = \"contains_field\"\nfield = \"a\"\nscore = 1\n",
            "[[objective.rule]]\nwhen = \"equals_field\"\nfield = \"a\"\nscore = 2\n",
            "[[objective.rule]]\nwhen = \"phrases\"\nphrases = [\"Not Sure\"]\nscore = 4\n",
        ));
        let rec = json!({"a": ["WarSaw"]});
        assert_eq!(r.score(&rec, "wARSAW").unwrap(), [3.0]);
        assert_eq!(r.score(&rec, "I'm NOT SURE, warsaw?").unwrap(), [5.0]);
        assert_eq!(r.score(&rec, "not quite sure").unwrap(), [0.0]);
    }

    #[test]
    fn regex_is_as_written_and_counts_are_inclusive() {
        let r = one(concat!(
            "[[objective.rule]]\nwhen = \"regex\"\npattern = '^\\d+$'\nscore = 1\n",
            "[[objective.rule]]\nwhen = \"regex\"\npattern = \"Sorry\"\nscore = 2\n",
            "[[objective.rule]]\nwhen = \"words\"\nmin = 2\nmax = 2\nscore = 4\n",
            "[[objective.rule]]\nwhen = \"lines\"\nmax = 1\nscore = 8\n",
        ));
        let rec = json!({});
        assert_eq!(r.score(&rec, "42").unwrap(), [9.0]);
        // Case-sensitive unless the pattern says (?i); blank lines do not count.
        assert_eq!(r.score(&rec, "sorry, two\n\n  \n").unwrap(), [12.0]);
        assert_eq!(r.score(&rec, "Sorry\nthree words").unwrap(), [2.0]);
    }

    #[test]
    fn missing_or_mistyped_field_is_a_field_error() {
        let r = realistic();
        let e = r
            .score(&json!({"correct_answers": ["Warsaw"]}), "x")
            .unwrap_err();
        assert_eq!(e.field, "incorrect_answers");
        assert!(e.problem.contains("missing"), "{e:?}");
        assert!(e.problem.contains("\"truthfulness\""), "{e:?}");

        let e = r
            .score_normalized(&json!({"correct_answers": 3, "incorrect_answers": []}), "x")
            .unwrap_err();
        assert_eq!(e.field, "correct_answers");
        assert!(e.problem.contains("found a number"), "{e:?}");

        let e = r
            .score(
                &json!({"correct_answers": ["a", null], "incorrect_answers": []}),
                "x",
            )
            .unwrap_err();
        assert_eq!(e.field, "correct_answers[1]");
        assert!(e.problem.contains("found null"), "{e:?}");
    }

    /// The error for `text`, checked to be one line naming the file and `wants`.
    fn load_error(text: &str, wants: &[&str]) -> String {
        let msg = RuleObjectives::from_toml_str(text, ORIGIN)
            .unwrap_err()
            .to_string();
        assert!(!msg.contains('\n'), "not one line: {msg}");
        assert!(msg.starts_with(&format!("{ORIGIN}: ")), "{msg}");
        for want in wants {
            assert!(msg.contains(want), "{msg:?} lacks {want:?}");
        }
        msg
    }

    /// A name becomes a directory name (a conditioned policy's per-objective adapter): one
    /// safe path component only.
    #[test]
    fn an_objective_name_that_is_not_one_path_component_is_refused() {
        for bad in ["../../x", "a/b", ".hidden"] {
            load_error(
                &format!("[[objective]]\nname = {bad:?}\nmin = 0\nmax = 1\n{GOOD_RULE}"),
                &[&format!("objective \"{bad}\""), "letters, digits"],
            );
        }
    }

    const HEAD: &str = "[[objective]]\nname = \"truthfulness\"\nmin = 1\nmax = 5\n";
    const GOOD_RULE: &str =
        "[[objective.rule]]\nwhen = \"phrases\"\nphrases = [\"x\"]\nscore = 1\n";

    /// Errors in the second rule of objective "truthfulness".
    fn rule_error(rule: &str, wants: &[&str]) -> String {
        let mut all = vec!["objective \"truthfulness\", rule 2: "];
        all.extend(wants);
        load_error(
            &format!("{HEAD}{GOOD_RULE}[[objective.rule]]\n{rule}"),
            &all,
        )
    }

    #[test]
    fn rule_errors_name_file_objective_and_rule() {
        let msg = rule_error("when = \"regex\"\npattern = \"(\"\nscore = 1\n", &[]);
        assert!(msg.starts_with(
            "configs/demo/rules.toml: objective \"truthfulness\", rule 2: invalid regex \"(\": "
        ));
        rule_error(
            "when = \"sounds_right\"\nscore = 1\n",
            &["unknown variant `sounds_right`"],
        );
        rule_error("score = 1\n", &["missing field `when`"]);
        rule_error(
            "when = \"phrases\"\nphrases = [\"a\"]\npattern = \"b\"\nscore = 1\n",
            &["unknown field `pattern`"],
        );
        rule_error(
            "when = \"phrases\"\nphrases = [\"a\"]\nscore = 1\nweight = 2\n",
            &["unknown field `weight`"],
        );
        rule_error(
            "when = \"phrases\"\nphrases = [\"a\"]\n",
            &["missing field `score`"],
        );
        rule_error("when = \"words\"\nscore = 1\n", &["needs `min`, `max`"]);
        rule_error("when = \"lines\"\nscore = 1\n", &["needs `min`, `max`"]);
        rule_error(
            "when = \"words\"\nmin = 5\nmax = 4\nscore = 1\n",
            &["min (5) is above max (4)"],
        );
        rule_error(
            "when = \"phrases\"\nphrases = [\"a\"]\nscore = nan\n",
            &["`score` must be finite"],
        );
        rule_error(
            "when = \"phrases\"\nphrases = [\"a\"]\nscore = -inf\n",
            &["`score` must be finite"],
        );
        rule_error(
            "when = \"phrases\"\nphrases = []\nscore = 1\n",
            &["non-empty"],
        );
        rule_error(
            "when = \"equals_field\"\nfield = \"\"\nscore = 1\n",
            &["empty"],
        );
    }

    #[test]
    fn objective_errors_name_file_and_objective() {
        let objective = "objective \"truthfulness\": ";
        load_error(
            "[[objective]]\nname = \"truthfulness\"\nmin = 1\nmax = 5\n",
            &[objective, "no rules"],
        );
        load_error(
            &format!("[[objective]]\nname = \"truthfulness\"\nmin = 5\nmax = 5\n{GOOD_RULE}"),
            &[objective, "min (5) must be below max (5)"],
        );
        load_error(
            &format!("[[objective]]\nname = \"truthfulness\"\nmin = 6\nmax = 5\n{GOOD_RULE}"),
            &[objective, "must be below max"],
        );
        load_error(
            &format!("[[objective]]\nname = \"truthfulness\"\nmin = 1\n{GOOD_RULE}"),
            &[objective, "missing field `max`"],
        );
        load_error(
            &format!("[[objective]]\nname = \"truthfulness\"\nmin = 1\nmax = inf\n{GOOD_RULE}"),
            &[objective, "`max` must be finite"],
        );
        load_error(
            &format!("{HEAD}bsae = 3\n{GOOD_RULE}"),
            &[objective, "unknown field `bsae`"],
        );
        load_error(
            &format!("{HEAD}{GOOD_RULE}{HEAD}{GOOD_RULE}"),
            &[objective, "duplicate name"],
        );
        load_error(
            &format!(
                "{HEAD}{GOOD_RULE}{}{GOOD_RULE}",
                HEAD.replace("truthfulness", "Truthfulness")
            ),
            &[
                "objective \"Truthfulness\"",
                "duplicate name",
                "only in case",
            ],
        );
        load_error(
            &format!("[[objective]]\nmin = 1\nmax = 5\n{GOOD_RULE}"),
            &["objective 1: ", "missing field `name`"],
        );
    }

    #[test]
    fn file_errors_name_the_file() {
        load_error("", &["no objectives"]);
        load_error(
            &format!("title = \"x\"\n{HEAD}{GOOD_RULE}"),
            &["unknown key `title`"],
        );
        load_error("[[objective]\nname = 1\n", &["line 1:"]);
        let e = RuleObjectives::load(Path::new("/nonexistent/rules.toml")).unwrap_err();
        assert!(
            e.to_string().starts_with("/nonexistent/rules.toml: "),
            "{e}"
        );
    }

    #[test]
    fn loads_from_a_file() {
        let dir = std::env::temp_dir().join(format!("mo-align-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rules.toml");
        std::fs::write(&path, REALISTIC).unwrap();
        let r = RuleObjectives::load(&path).unwrap();
        assert_eq!(r.path(), path.display().to_string());
        assert_eq!(r.names().len(), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
