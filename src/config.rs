//! Job files (`dataflows/*.toml`): one table per stage, unknown keys rejected, and `--set
//! section.key=value` overrides from the command line applied on top. The resolved config is
//! saved beside every run's outputs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::align::PretrainConfig;
use crate::data::preprocess::PrepareConfig;
use crate::features::FeaturesConfig;
use crate::grpo::GrpoConfig;
use crate::llm::LoraConfig;
use crate::rec::bert4rec::Bert4RecConfig;
use crate::rec::curec::CurecConfig;
use crate::rec::kar::KarConfig;
use crate::rec::ncf::NcfConfig;
use crate::rec::sasrec::SasRecConfig;
use crate::replay::ReplayConfig;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    pub prepare: PrepareJob,
    pub preprocess: PrepareConfig,
    pub train: TrainJob,
    pub ncf: NcfConfig,
    pub sasrec: SasRecConfig,
    pub bert4rec: Bert4RecConfig,
    pub kar: KarConfig,
    pub pretrain: PretrainConfig,
    pub grpo: GrpoConfig,
    pub lora: LoraConfig,
    pub features: FeaturesConfig,
    pub curec: CurecConfig,
    pub replay: ReplayConfig,
}

/// Where the raw log is and where the prepared dataset goes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrepareJob {
    pub input: Option<PathBuf>,
    /// `auto` or one of the format names (`ml-1m`, `ml-100k`, `movielens-csv`, `amazon2023`, `generic`).
    pub format: String,
    pub out: Option<PathBuf>,
    /// Name used in reports (default: the input directory's name).
    pub dataset: Option<String>,
}

impl Default for PrepareJob {
    fn default() -> Self {
        PrepareJob { input: None, format: "auto".into(), out: None, dataset: None }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainJob {
    /// Models `curec run` trains, in order.
    pub models: Vec<String>,
    /// Run directory for `curec run` (one sub-directory per model).
    pub out: Option<PathBuf>,
    pub seed: u64,
    /// Users scored per batch during evaluation.
    pub eval_batch: usize,
    /// Bootstrap resamples for the 95% intervals.
    pub bootstrap: usize,
}

impl Default for TrainJob {
    fn default() -> Self {
        TrainJob {
            models: vec!["pop".into(), "ncf".into(), "sasrec".into()],
            out: None,
            seed: 2024,
            eval_batch: 128,
            bootstrap: 1000,
        }
    }
}

impl JobConfig {
    /// Load a job file (or the defaults when `path` is `None`) and apply `section.key=value` overrides.
    pub fn load(path: Option<&Path>, sets: &[String]) -> anyhow::Result<JobConfig> {
        let mut cfg = match path {
            None => JobConfig::default(),
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).with_context(|| format!("{}: cannot read job file", p.display()))?;
                toml::from_str::<JobConfig>(&text).map_err(|e| toml_error(p, &text, &e))?
            }
        };
        if !sets.is_empty() {
            let mut v = toml::Value::try_from(&cfg)?;
            for s in sets {
                apply_set(&mut v, s)?;
                // Deserialize after each override, so that a bad value names its own `--set`.
                JobConfig::deserialize(v.clone())
                    .map_err(|e| anyhow::anyhow!("--set {s}: {}", e.message().replace('\n', " ")))?;
            }
            cfg =
                JobConfig::deserialize(v).map_err(|e| anyhow::anyhow!("--set: {}", e.message().replace('\n', " ")))?;
        }
        match path {
            Some(p) if sets.is_empty() => cfg.validate().map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
            _ => cfg.validate()?,
        }
        Ok(cfg)
    }

    /// The resolved config as TOML, saved beside a run's outputs.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> anyhow::Error {
    let line = e.span().map(|s| 1 + text[..s.start.min(text.len())].matches('\n').count());
    let msg = e.message().replace('\n', " ");
    match line {
        Some(l) => anyhow::anyhow!("{}:{l}: {msg}", path.display()),
        None => anyhow::anyhow!("{}: {msg}", path.display()),
    }
}

/// `sasrec.max_len=50` → set that key; the value is parsed as TOML, or taken as a string.
fn apply_set(root: &mut toml::Value, set: &str) -> anyhow::Result<()> {
    let Some((key, value)) = set.split_once('=') else {
        bail!("--set '{set}': expected section.key=value");
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.len() != 2 {
        bail!("--set '{set}': expected section.key=value (e.g. sasrec.max_len=50)");
    }
    let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {}", value.trim()))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.trim().to_string()));
    let table = root.as_table_mut().expect("config serializes to a table");
    let section = table
        .get_mut(parts[0])
        .and_then(|s| s.as_table_mut())
        .ok_or_else(|| anyhow::anyhow!("--set '{set}': unknown section '{}'", parts[0]))?;
    section.insert(parts[1].to_string(), parsed);
    Ok(())
}

/// Whether a run's saved `config.toml` is `cfg`. Keys a newer curec added (absent from the saved
/// file) count as equal while `cfg` leaves them at their defaults, so adding a setting does not
/// orphan the runs made before it.
pub fn same_config(saved: &str, cfg: &JobConfig) -> bool {
    if saved == cfg.to_toml() {
        return true;
    }
    let parse = |s: &str| s.parse::<toml::Table>().ok();
    let (Some(saved), Some(now), Some(default)) =
        (parse(saved), parse(&cfg.to_toml()), parse(&JobConfig::default().to_toml()))
    else {
        return false;
    };
    fn prune(now: &mut toml::Table, saved: &toml::Table, default: Option<&toml::Table>) {
        now.retain(|k, v| match saved.get(k) {
            Some(_) => true,
            None => default.and_then(|d| d.get(k)) != Some(v),
        });
        for (k, v) in now.iter_mut() {
            if let (toml::Value::Table(t), Some(toml::Value::Table(s))) = (v, saved.get(k)) {
                prune(t, s, default.and_then(|d| d.get(k)).and_then(toml::Value::as_table));
            }
        }
    }
    let mut now = now;
    prune(&mut now, &saved, Some(&default));
    now == saved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_override_and_unknown_keys_fail() {
        let c = JobConfig::load(None, &["sasrec.max_len=50".into(), "train.seed=7".into()]).unwrap();
        assert_eq!(c.sasrec.max_len, 50);
        assert_eq!(c.train.seed, 7);
        let e = JobConfig::load(None, &["sasrec.max_lenn=50".into()]).unwrap_err().to_string();
        assert!(e.contains("max_lenn"), "{e}");
        let e = JobConfig::load(None, &["train.seed=abc".into()]).unwrap_err().to_string();
        assert!(e.starts_with("--set train.seed=abc: invalid type: string \"abc\", expected u64"), "{e}");
        let e = JobConfig::load(None, &["nope.x=1".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown section 'nope'"), "{e}");
    }

    #[test]
    fn every_shipped_job_file_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dataflows");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                JobConfig::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 6, "found {n} job files in {}", dir.display());
        let c = JobConfig::load(Some(&dir.join("sasrec-reference.toml")), &[]).unwrap();
        assert_eq!((c.sasrec.max_len, c.sasrec.stride, c.sasrec.batch_size), (50, 10, 205));
        assert_eq!((c.sasrec.dropout, c.sasrec.patience), (0.5, 20));
    }
}
