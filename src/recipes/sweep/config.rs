//! The sweep's config: which stage it runs from which base config (`[sweep]`), the axes it
//! expands (`[axes]`), and how its points run (`[local]`, `[slurm]`).

use serde::{Deserialize, Serialize};

/// Where the points run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// On this machine, `local.parallel` points at a time.
    #[default]
    Local,
    /// As one Slurm array job, one task per point.
    Slurm,
}

impl Backend {
    /// Its name in the config.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Slurm => "slurm",
        }
    }
}

/// The `[sweep]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweepSection {
    /// The training subcommand every point runs: sft, train-rm, dpo, hybrid-dpo,
    /// reward-weighted or grpo.
    pub stage: String,
    /// That stage's config, shared by every point (its `train.output_dir` is replaced by the
    /// point's own directory).
    pub base: String,
    /// The sweep's directory: one run directory per point, `sweep.json`, `summary.{md,json}`,
    /// `logs/`, `slurm/`.
    pub output_dir: String,
    pub backend: Backend,
    /// `--set` overrides applied to every point (e.g. `train.device="cuda"`).
    pub overrides: Vec<String>,
}

impl Default for SweepSection {
    fn default() -> Self {
        Self {
            stage: String::new(),
            base: String::new(),
            output_dir: "runs/sweep".into(),
            backend: Backend::Local,
            overrides: vec![],
        }
    }
}

/// The `[local]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalSection {
    /// Points run at once; each gets one GPU through `CUDA_VISIBLE_DEVICES` when above 1.
    pub parallel: usize,
    /// The GPU of each slot (default: exactly the devices `CUDA_VISIBLE_DEVICES` lists when it
    /// is set, none when it is set empty; else 0, 1, ...).
    pub gpus: Vec<String>,
}

impl Default for LocalSection {
    fn default() -> Self {
        Self {
            parallel: 1,
            gpus: vec![],
        }
    }
}

/// The `[slurm]` section: what each array task asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlurmSection {
    /// `--partition` (empty: the cluster's default partition).
    pub partition: String,
    /// `--account` (empty: the user's default account).
    pub account: String,
    /// GPUs per task (`--gres=gpu:N`; 0 asks for none).
    pub gpus_per_job: usize,
    /// `--cpus-per-task` (0: the cluster's default).
    pub cpus_per_task: usize,
    /// `--mem` (e.g. "32G"; empty: the cluster's default).
    pub mem: String,
    /// `--time` limit per task (e.g. "04:00:00"; empty: the partition's default).
    pub time: String,
    pub job_name: String,
    /// More `#SBATCH` options, one per entry (e.g. "--qos=high", "--constraint=a100"); not
    /// --array, --output, --chdir or --job-name, through which each task finds its point.
    pub extra_args: Vec<String>,
    /// Shell lines run before each point (e.g. "module load cuda/12.4"), before `set -u`.
    pub setup: Vec<String>,
    /// The mo-align binary on the compute nodes (default: this one, which must then be on a
    /// filesystem the nodes share, as the sweep directory must).
    pub binary: String,
    /// Seconds between `squeue` polls while following the job.
    pub poll_seconds: u64,
    /// At most this many of the array's tasks run at once (`--array=0-N%K`; 0: no limit), as
    /// `local.parallel` does on one machine: a fair share of a shared partition.
    pub max_running: usize,
}

impl Default for SlurmSection {
    fn default() -> Self {
        Self {
            partition: String::new(),
            account: String::new(),
            gpus_per_job: 1,
            cpus_per_task: 0,
            mem: String::new(),
            time: String::new(),
            job_name: "mo-align-sweep".into(),
            extra_args: vec![],
            setup: vec![],
            binary: String::new(),
            poll_seconds: 10,
            max_running: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SweepConfig {
    pub sweep: SweepSection,
    /// `weights` (a list of weightings) or `simplex = N` (every weighting in steps of 1/N),
    /// `seed` (a list: `train.seed`), and any `"section.key" = [values]`.
    pub axes: toml::Table,
    pub local: LocalSection,
    pub slurm: SlurmSection,
}
