//! The array job's script: `#SBATCH` options (values in double quotes, as Slurm's own
//! parser reads them, so paths with spaces survive), then the bash that maps the task to its
//! point (every word single-quoted).

use super::super::config::SlurmSection;
use super::super::plan::Plan;
use anyhow::{bail, Context, Result};

/// Tasks per array job: Slurm's default `MaxArraySize` (1001) allows indices 0 to 1000; a
/// sweep with more points to run is submitted as several arrays.
pub const MAX_TASKS: usize = 1000;

/// Options that `extra_args` may not set: the sweep chooses them, and each task finds its
/// point (and its log) through them.
const RESERVED: [(&str, &str); 4] = [
    ("--array", "-a"),
    ("--output", "-o"),
    ("--chdir", "-D"),
    ("--job-name", "-J"),
];

/// Whether option `arg` is `long` (or an abbreviation of it, as sbatch accepts) or `short`.
fn sets(arg: &str, long: &str, short: &str) -> bool {
    match arg.strip_prefix("--") {
        Some(rest) => {
            let name = rest.split(['=', ' ']).next().unwrap_or("");
            !name.is_empty() && long[2..].starts_with(name)
        }
        None => arg.starts_with(short),
    }
}

/// One word for bash.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// One `#SBATCH` value: Slurm's parser reads `"..."` as one word, `\` escaping the next
/// character (a `#` unescaped would start a comment).
fn sbatch_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        if matches!(c, '"' | '\\' | '#') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Refuses `extra_args` that set what the sweep sets, and line breaks anywhere.
pub fn check(plan: &Plan, cfg: &SlurmSection) -> Result<()> {
    let here = plan.source.display();
    for a in &cfg.extra_args {
        if let Some((long, _)) = RESERVED.iter().find(|(long, short)| sets(a, long, short)) {
            bail!(
                "{here}: slurm.extra_args `{a}` sets {long}, which the sweep sets itself (each task finds its point through it); remove it"
            );
        }
    }
    let values = [
        &cfg.job_name,
        &cfg.partition,
        &cfg.account,
        &cfg.mem,
        &cfg.time,
        &cfg.binary,
    ];
    if let Some(v) = values
        .into_iter()
        .chain(&cfg.extra_args)
        .chain(&cfg.setup)
        .find(|v| v.contains('\n') || v.contains('\r'))
    {
        bail!("{here}: [slurm] value {v:?} holds a line break");
    }
    Ok(())
}

/// `--array` for `n` tasks, at most `max_running` at once (0: no limit).
fn array_range(n: usize, max_running: usize) -> String {
    match max_running {
        0 => format!("0-{}", n - 1),
        k => format!("0-{}%{k}", n - 1),
    }
}

/// The array job's script for the points `todo` (indices into the plan; at most
/// `MAX_TASKS`).
pub fn script(
    plan: &Plan,
    cfg: &SlurmSection,
    point_args: &[String],
    todo: &[usize],
) -> Result<String> {
    check(plan, cfg)?;
    let cwd = std::env::current_dir().context("the current directory")?;
    let exe = super::super::binary(&cfg.binary)?;
    let dir = cwd.join(&plan.dir);
    let mut opts = vec![
        ("--job-name", cfg.job_name.clone()),
        ("--array", array_range(todo.len(), cfg.max_running)),
        (
            "--output",
            dir.join("slurm/%A_%a.out").display().to_string(),
        ),
        ("--chdir", cwd.display().to_string()),
        ("--partition", cfg.partition.clone()),
        ("--account", cfg.account.clone()),
        ("--mem", cfg.mem.clone()),
        ("--time", cfg.time.clone()),
    ];
    if cfg.gpus_per_job > 0 {
        opts.push(("--gres", format!("gpu:{}", cfg.gpus_per_job)));
    }
    if cfg.cpus_per_task > 0 {
        opts.push(("--cpus-per-task", cfg.cpus_per_task.to_string()));
    }
    let mut s = String::from("#!/bin/bash\n# Written by mo-align sweep: one task per point.\n");
    for (flag, v) in opts.iter().filter(|(_, v)| !v.is_empty()) {
        s.push_str(&format!("#SBATCH {flag}={}\n", sbatch_quote(v)));
    }
    for o in &cfg.extra_args {
        s.push_str(&format!("#SBATCH {o}\n"));
    }
    // `setup` runs before `set -u`: environment modules and conda scripts read unset
    // variables.
    s.push_str("set -eo pipefail\n");
    for line in &cfg.setup {
        s.push_str(&format!("{line}\n"));
    }
    s.push_str("set -u\n");
    let names: Vec<String> = todo
        .iter()
        .map(|&i| shell_quote(&plan.points[i].name))
        .collect();
    s.push_str(&format!("points=({})\n", names.join(" ")));
    s.push_str("point=${points[$SLURM_ARRAY_TASK_ID]}\n");
    let mut cmd = vec![shell_quote(&exe.display().to_string())];
    cmd.extend(point_args.iter().map(|a| shell_quote(a)));
    cmd.push("--point \"$point\"".into());
    s.push_str(&format!(
        "exec {} >> {}/\"$point\".log 2>&1\n",
        cmd.join(" "),
        shell_quote(&dir.join("logs").display().to_string())
    ));
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_range_throttles_only_when_asked() {
        assert_eq!(array_range(4, 0), "0-3");
        assert_eq!(array_range(4, 2), "0-3%2");
        assert_eq!(array_range(1, 0), "0-0");
    }

    #[test]
    fn sbatch_values_and_reserved_options() {
        assert_eq!(sbatch_quote("/a b/\"c\"#1"), r#""/a b/\"c\"\#1""#);
        assert_eq!(shell_quote("it's"), r#"'it'\''s'"#);
        for a in [
            "--array=0-3",
            "--arr=1",
            "-a 0-3",
            "--output x",
            "-ox",
            "-D/tmp",
            "--job-name=n",
        ] {
            assert!(RESERVED.iter().any(|(l, s)| sets(a, l, s)), "{a}");
        }
        for a in ["--qos=high", "--account=x", "--constraint=a100", "--mem=4G"] {
            assert!(!RESERVED.iter().any(|(l, s)| sets(a, l, s)), "{a}");
        }
    }
}
