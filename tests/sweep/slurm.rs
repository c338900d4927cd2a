//! The Slurm backend: the array script `--dry-run` prints (no Slurm needed), a real run
//! against the single-node Slurm of `scripts/slurm-local.sh` (skipped where `sbatch` is not on
//! the PATH), both in directories whose names hold a space, and a cluster with accounting
//! played by stand-in client commands (runs everywhere).

use super::*;

const SLURM: &str = "[slurm]\ngpus_per_job = 0\ntime = \"00:10:00\"\npoll_seconds = 1\n";

/// The script part of `--dry-run`'s output.
fn dry_run_script(config: &Path, more: &[&str]) -> Output {
    let mut args = vec!["sweep", "--config", config.to_str().unwrap(), "--dry-run"];
    args.extend(["--set", "sweep.backend=\"slurm\""]);
    args.extend(more);
    mo_align(&args)
}

#[test]
fn the_slurm_script_quotes_paths_with_spaces() {
    let root = scratch("sweep slurm dry");
    let config = sweep_config(&root, &format!("{SLURM}setup = [\"export A_B=1\"]\n"));
    let o = dry_run_script(&config, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let script = &out[out.find("#!/bin/bash").expect("no script")..];
    let dir = root.join("sweep");
    let want = format!("#SBATCH --output=\"{}/slurm/%A_%a.out\"", dir.display());
    assert!(script.contains(&want), "{script}");
    assert!(script.contains("#SBATCH --array=\"0-3\""), "{script}");
    let logs = format!("'{}/logs'/\"$point\".log", dir.display());
    assert!(script.contains(&logs), "{script}");
    // setup runs before `set -u`.
    let (setup, unset) = (script.find("export A_B=1"), script.find("set -u"));
    assert!(setup < unset, "{script}");
    let check = Command::new("bash")
        .args(["-n", "-c", script])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(!dir.exists(), "--dry-run wrote the sweep");

    // Options that map tasks to points are the sweep's own.
    let o = dry_run_script(&config, &["--set", "slurm.extra_args=[\"--array=0-9\"]"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("slurm.extra_args `--array=0-9` sets --array") && e.contains("sweep.toml"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_slurm_sweep_finishes_every_point_and_a_rerun_follows_its_job() {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("sbatch").is_file()));
    if !on_path {
        eprintln!(
            "skipped: sbatch is not on the PATH (scripts/slurm-local.sh starts a local Slurm)"
        );
        return;
    }
    let root = scratch("sweep slurm");
    let config = sweep_config(&root, SLURM);
    let args = [
        "sweep",
        "--config",
        config.to_str().unwrap(),
        "--quiet",
        "--set",
        "sweep.backend=\"slurm\"",
    ];
    // The first sweep is killed once it has submitted its job; the job runs on, and a rerun
    // follows it rather than submitting its points again.
    let first_log = root.join("first-sweep.log");
    let mut first = Command::new(bin())
        .args(args)
        .current_dir(repo_root())
        .stderr(std::fs::File::create(&first_log).unwrap())
        .spawn()
        .unwrap();
    let jobs = root.join("sweep/slurm/jobs.jsonl");
    // Wait for the submission, not for a time: a first sweep that ends without submitting
    // fails the test with its exit status.
    while !std::fs::read_to_string(&jobs).is_ok_and(|s| s.ends_with('\n')) {
        if let Some(status) = first.try_wait().unwrap() {
            let submitted = std::fs::read_to_string(&jobs).is_ok_and(|s| s.ends_with('\n'));
            assert!(
                submitted,
                "the first sweep ended ({status}) without submitting a job (is Slurm running? scripts/slurm-local.sh starts it): {}",
                std::fs::read_to_string(&first_log).unwrap_or_default()
            );
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let run = mo_align(&args);
    let e = stderr(&run);
    eprintln!("{e}");
    assert!(run.status.success(), "{e}");
    let recorded = std::fs::read_to_string(&jobs).unwrap();
    assert_eq!(
        recorded.lines().count(),
        1,
        "the rerun submitted again: {recorded}"
    );
    let s = summary(&root);
    assert_eq!(s["backend"], "slurm");
    assert!(states(&root).iter().all(|(_, st, _)| st == "done"), "{s}");
    if e.contains("following it rather than submitting") {
        assert_eq!(s["jobs"].as_array().unwrap().len(), 1, "{s}");
    }
    let script = std::fs::read_to_string(root.join("sweep/slurm/array.sh")).unwrap();
    assert!(script.contains("#SBATCH --time=\"00:10:00\""), "{script}");

    let o = mo_align(&[
        "pareto",
        "--config",
        pareto_config(&root).to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("pareto/pareto.json")).unwrap())
            .unwrap();
    let policies = report["policies"].as_array().unwrap();
    let names: Vec<&str> = policies
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["fixed-seed1", "fixed-seed2"]);
    for p in policies {
        assert_eq!(p["weightings"].as_array().unwrap().len(), 2, "{p}");
        assert_eq!(p["adapters"].as_array().unwrap().len(), 2, "{p}");
    }
    let _ = std::fs::remove_dir_all(&root);
}

/// Writes an executable script `name` into `dir`.
fn fake_command(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/bash\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A cluster with accounting, played by three scripts: `sbatch` records each script it is
/// given and runs the tasks `run-N` lists (as nodes would) before printing job 900 + N;
/// `squeue` no longer knows any job; `sacct` prints `sacct-JOB` (what the cluster recorded).
/// Runs everywhere (CI included): it needs no Slurm.
#[test]
fn tasks_slurm_ended_are_named_with_its_state_and_a_rerun_submits_only_them() {
    let root = scratch("sweep slurm accounting");
    let fake = root.join("fake-bin");
    std::fs::create_dir_all(&fake).unwrap();
    fake_command(
        &fake,
        "sbatch",
        r#"dir=$(dirname "$0")
script="${@: -1}"
n=$(ls "$dir"/submitted-*.sh 2>/dev/null | wc -l)
cp "$script" "$dir/submitted-$n.sh"
for t in $(cat "$dir/run-$n" 2>/dev/null); do
    SLURM_ARRAY_TASK_ID=$t bash "$script" || exit 1
done
echo $((900 + n))
"#,
    );
    fake_command(
        &fake,
        "squeue",
        "echo 'slurm_load_jobs error: Invalid job id specified' >&2\nexit 1\n",
    );
    fake_command(
        &fake,
        "sacct",
        r#"while [ $# -gt 0 ]; do [ "$1" = -j ] && job=$2; shift; done
cat "$(dirname "$0")/sacct-$job" 2>/dev/null || true
"#,
    );
    let write = |name: &str, text: &str| std::fs::write(fake.join(name), text).unwrap();
    // The first array: task 0 runs; Slurm ended the other three.
    write("run-0", "0");
    write(
        "sacct-900",
        "900_0|COMPLETED\n900_1|OUT_OF_MEMORY\n900_2|TIMEOUT\n900_3|CANCELLED by 1000\n",
    );
    // The rerun's array (the three points left): every task runs.
    write("run-1", "0 1 2");
    write(
        "sacct-901",
        "901_0|COMPLETED\n901_1|COMPLETED\n901_2|COMPLETED\n",
    );

    let config = sweep_config(&root, SLURM);
    let path = std::env::join_paths(std::iter::once(fake.clone()).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let run = || {
        Command::new(bin())
            .args(["sweep", "--config", config.to_str().unwrap(), "--quiet"])
            .args(["--set", "sweep.backend=\"slurm\""])
            .env("PATH", &path)
            .current_dir(repo_root())
            .output()
            .unwrap()
    };

    let first = run();
    assert!(!first.status.success(), "{}", stderr(&first));
    let e = stderr(&first);
    let last = e.trim().lines().last().unwrap_or_default();
    assert!(
        last.contains("3 of 4 points did not finish")
            && last.contains(&format!("{} (Slurm: OUT_OF_MEMORY)", POINTS[1]))
            && last.contains(&format!("{} (Slurm: TIMEOUT)", POINTS[2]))
            && last.contains(&format!("{} (Slurm: CANCELLED)", POINTS[3])),
        "{e}"
    );
    let s = summary(&root);
    let rows: Vec<(String, String)> = s["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["state"].as_str().unwrap().to_string(),
                p["scheduler_state"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect();
    let want = [
        ("done", "COMPLETED"),
        ("failed", "OUT_OF_MEMORY"),
        ("failed", "TIMEOUT"),
        ("failed", "CANCELLED"),
    ];
    assert_eq!(
        rows,
        want.map(|(a, b)| (a.to_string(), b.to_string())),
        "{s}"
    );

    let second = run();
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(states(&root).iter().all(|(_, st, _)| st == "done"));
    // The rerun's array holds exactly the three points Slurm ended, in order.
    let script = std::fs::read_to_string(fake.join("submitted-1.sh")).unwrap();
    assert!(script.contains("#SBATCH --array=\"0-2\""), "{script}");
    let want = format!("points=('{}' '{}' '{}')", POINTS[1], POINTS[2], POINTS[3]);
    assert!(script.contains(&want), "{script}");
    assert!(!fake.join("submitted-2.sh").exists());
    let jobs = std::fs::read_to_string(root.join("sweep/slurm/jobs.jsonl")).unwrap();
    let ids: Vec<String> = jobs
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["job"].to_string())
        .collect();
    assert_eq!(ids, ["\"900\"", "\"901\""], "{jobs}");
    let _ = std::fs::remove_dir_all(&root);
}
