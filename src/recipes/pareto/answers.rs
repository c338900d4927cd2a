//! Each policy's answers at each weighting: the model it is there, loaded (a conditioned
//! adapter once for all its weightings), and its generations cached per (policy, weighting) on
//! what they depend on, so a re-run only scores.

use super::config::ParetoConfig;
use super::plan::{Job, Plan};
use crate::eval::load_for_eval;
use crate::eval::prompts::PromptRecord;
use crate::eval::win_rate::answer_prompts;
use crate::generate::SamplingConfig;
use crate::model::loader::{load_soup, Loaded};
use crate::objectives::conditioning::{ConditioningInfo, ConditioningMode};
use crate::objectives::weighting::quantise;
use crate::tokenizer::Message;
use crate::util::digest::Digest;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How a policy answers at one weighting.
enum Variant<'a> {
    /// The conditioned adapter, reading `line`.
    Conditioned {
        adapter: &'a str,
        info: &'a ConditioningInfo,
        line: String,
    },
    /// An adapter trained for this weighting.
    Adapter(&'a str),
    /// The soup at these weights (a Rewarded soup, or an adapter-conditioned policy's blocks).
    Soup(Vec<String>),
}

/// A generations file: the answers of one policy at one weighting, and the key of what they
/// were generated from.
#[derive(Debug, Serialize, Deserialize)]
struct Generations {
    key: String,
    policy: String,
    weights: Vec<f64>,
    /// The line a conditioned policy read.
    conditioning: Option<String>,
    sampling: SamplingConfig,
    answers: Vec<Answer>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    prompt: Vec<Message>,
    answer: String,
    /// Where the prompt's record is (`file:line`).
    source: String,
}

/// Answers jobs, keeping the conditioned policy loaded last for its next weighting.
pub struct Answerer<'a> {
    cfg: &'a ParetoConfig,
    plan: &'a Plan,
    /// The report's directory.
    out: &'a Path,
    pub sampling: SamplingConfig,
    /// What every generation depends on besides the policy: the base checkpoint's files.
    base_key: String,
    conditioned_model: Option<(usize, Loaded)>,
}

impl<'a> Answerer<'a> {
    pub fn new(cfg: &'a ParetoConfig, plan: &'a Plan, out: &'a Path) -> Result<Self> {
        let p = &cfg.pareto;
        let files = crate::model::loader::resolve(&p.model)?;
        // Decoding: the flags over the base model's own defaults, one setting for every policy.
        let defaults = std::fs::read_to_string(files.dir().join("generation_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let sampling = cfg.sampling.resolve(defaults.as_ref());
        sampling.validate()?;
        let adapter = p.base_adapter.as_deref().map(Path::new);
        let base_key = crate::cache::model_digest(&files, adapter, &p.dtype)?.hex();
        Ok(Self {
            cfg,
            plan,
            out,
            sampling,
            base_key,
            conditioned_model: None,
        })
    }

    /// Where a job's generations are kept.
    pub fn path(&self, job: &Job) -> PathBuf {
        self.out
            .join("generations")
            .join(&self.cfg.policy[job.policy].name)
            .join(format!("{}.json", weights_tag(job.weights.values())))
    }

    /// The job's answers, one per prompt: cached when generated under the same key, else
    /// generated and cached.
    pub fn answers(&mut self, job: &Job) -> Result<Vec<String>> {
        let path = self.path(job);
        let variant = self.variant(job)?;
        let key = self.key(&variant, job.weights.values())?;
        if let Some(answers) = cached_answers(&path, &key) {
            return Ok(answers);
        }
        let answers = self.generate(job, &variant)?;
        let prompts = &self.plan.prompts;
        let record = Generations {
            key,
            policy: self.cfg.policy[job.policy].name.clone(),
            weights: job.weights.values().to_vec(),
            conditioning: match variant {
                Variant::Conditioned { line, .. } => Some(line),
                _ => None,
            },
            sampling: self.sampling.clone(),
            answers: prompts
                .iter()
                .zip(&answers)
                .map(|(r, a)| Answer {
                    prompt: r.messages.clone(),
                    answer: a.clone(),
                    source: r.loc.clone(),
                })
                .collect(),
        };
        crate::util::io::write_json_atomic(&path, &record)?;
        Ok(answers)
    }

    fn variant(&self, job: &Job) -> Result<Variant<'a>> {
        let (cfg, plan): (&'a ParetoConfig, &'a Plan) = (self.cfg, self.plan);
        let pol = &cfg.policy[job.policy];
        Ok(if let Some(info) = &plan.infos[job.policy] {
            if info.mode() == ConditioningMode::Adapter {
                let blocks = info.block_dirs(Path::new(&pol.conditioned))?;
                Variant::Soup(blocks.iter().map(|b| b.display().to_string()).collect())
            } else {
                Variant::Conditioned {
                    adapter: &pol.conditioned,
                    line: info.line(&job.weights)?,
                    info,
                }
            }
        } else if !pol.adapters.is_empty() {
            let j = pol
                .adapter_weights
                .iter()
                .position(|x| quantise(x) == job.weights.values())
                .expect("jobs come from adapter_weights");
            Variant::Adapter(&pol.adapters[j])
        } else {
            Variant::Soup(pol.soup.clone())
        })
    }

    fn generate(&mut self, job: &Job, variant: &Variant) -> Result<Vec<String>> {
        let (p, plan) = (&self.cfg.pareto, self.plan);
        let base_adapter = p.base_adapter.as_deref().map(Path::new);
        let (dtype, device) = (plan.dtype, &plan.device);
        match variant {
            Variant::Conditioned {
                adapter,
                info,
                line,
            } => {
                let i = job.policy;
                if self.conditioned_model.as_ref().is_none_or(|(j, _)| *j != i) {
                    // Free the previous policy before loading the next.
                    drop(self.conditioned_model.take());
                    let m = load_for_eval(
                        &p.model,
                        base_adapter,
                        Some(Path::new(adapter)),
                        dtype,
                        device,
                    )?;
                    self.conditioned_model = Some((i, m));
                }
                let (_, m) = self.conditioned_model.as_ref().expect("loaded above");
                let msgs: Vec<Vec<Message>> = plan
                    .prompts
                    .iter()
                    .map(|r| info.place(&r.messages, line))
                    .collect();
                answer_prompts(m, &msgs, &self.sampling, p.gen_batch_size)
            }
            Variant::Adapter(a) => {
                let m = load_for_eval(&p.model, base_adapter, Some(Path::new(a)), dtype, device)?;
                answer_prompts(&m, &plain(&plan.prompts), &self.sampling, p.gen_batch_size)
            }
            Variant::Soup(adapters) => {
                let dirs: Vec<&Path> = adapters.iter().map(Path::new).collect();
                let m = load_soup(
                    &p.model,
                    base_adapter,
                    &dirs,
                    job.weights.values(),
                    dtype,
                    device,
                )?;
                answer_prompts(&m, &plain(&plan.prompts), &self.sampling, p.gen_batch_size)
            }
        }
    }

    /// The key of what a job's generations depend on: the base checkpoint, the policy at this
    /// weighting, the prompts and the decoding.
    fn key(&self, variant: &Variant, w: &[f64]) -> Result<String> {
        let p = &self.cfg.pareto;
        let mut d = Digest::default();
        d.str(&self.base_key);
        match variant {
            Variant::Conditioned {
                adapter,
                info,
                line,
            } => {
                d.str("conditioned")
                    .str(line)
                    .str(&format!("{:?}", info.placement));
                adapter_digest(&mut d, adapter)?;
            }
            Variant::Adapter(a) => {
                d.str("adapter");
                adapter_digest(&mut d, a)?;
            }
            Variant::Soup(adapters) => {
                d.str("soup").str(&format!("{w:?}"));
                for a in adapters.iter() {
                    adapter_digest(&mut d, a)?;
                }
            }
        }
        for r in &self.plan.prompts {
            d.str(&serde_json::to_string(&r.messages)?);
        }
        d.str(&serde_json::to_string(&self.sampling)?)
            .str(&p.gen_batch_size.to_string())
            .str(&p.device);
        Ok(d.hex())
    }
}

fn plain(prompts: &[PromptRecord]) -> Vec<Vec<Message>> {
    prompts.iter().map(|r| r.messages.clone()).collect()
}

/// `w=0.50-0.25-0.25-0.00`: a weighting as a file name.
pub fn weights_tag(w: &[f64]) -> String {
    let parts: Vec<String> = w.iter().map(|x| format!("{x:.2}")).collect();
    format!("w={}", parts.join("-"))
}

fn adapter_digest(d: &mut Digest, dir: &str) -> Result<()> {
    d.file(&Path::new(dir).join("adapter_model.safetensors"))?;
    d.file(&Path::new(dir).join("adapter_config.json"))?;
    Ok(())
}

/// The answers cached at `path` when they were generated under `key`.
fn cached_answers(path: &Path, key: &str) -> Option<Vec<String>> {
    let cached: Generations = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    (cached.key == key).then(|| cached.answers.into_iter().map(|a| a.answer).collect())
}
