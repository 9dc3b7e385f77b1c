//! Run directories on disk: a run staged under `<out>.partial/` and renamed when complete
//! ([`StagedRun`]), a finished training run read back ([`TrainedRun`]), its metrics and ranks
//! files, and the per-stage wall times of a job (`stages.json`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{json, Map, Value};

use crate::config::JobConfig;
use crate::data::{prepared, Dataset};
use crate::eval::RANKS;
use crate::eval::{self, bootstrap, Evaluation};
use crate::io::{read_json, write_json};
use crate::rec::ModelKind;

/// Metrics of one split as a flat JSON object, with 95% bootstrap intervals for the @10 metrics.
pub fn metrics_json(ev: &Evaluation, resamples: usize, seed: u64) -> Map<String, Value> {
    let mut m = Map::new();
    for (k, v) in &ev.metrics {
        m.insert(k.clone(), json!(v));
    }
    for (key, f) in [("ndcg@10", eval::ndcg_at as fn(usize, usize) -> f64), ("recall@10", eval::recall_at)] {
        let per_user: Vec<f64> = ev.ranks.iter().map(|&r| f(r, 10)).collect();
        let (lo, hi) = bootstrap::mean_ci95(&per_user, resamples, seed);
        m.insert(format!("{key}_ci95"), json!([lo, hi]));
    }
    m
}

/// Write `ranks.json` into `out`: each user's rank of the held-out item on test and valid (what
/// `curec compare` reads).
pub fn write_ranks(out: &Path, test: &Evaluation, valid: &Evaluation) -> anyhow::Result<()> {
    write_json(&out.join(RANKS), &json!({"test": test.ranks, "valid": valid.ranks}))
}

/// A run written into `<out>.partial/` and renamed to `<out>/` only when complete, so a killed
/// retrain never leaves a folder whose metrics describe other weights. A folder holding a
/// finished run of another config is refused rather than overwritten.
pub struct StagedRun {
    pub tmp: std::path::PathBuf,
    out: std::path::PathBuf,
}

impl StagedRun {
    pub fn new(out: &Path, cfg: &JobConfig) -> anyhow::Result<Self> {
        let config = out.join("config.toml");
        if out.join("metrics.json").is_file() {
            if let Ok(saved) = std::fs::read_to_string(&config) {
                anyhow::ensure!(
                    crate::config::same_config(&saved, cfg),
                    "{}: holds a finished run of another config; choose another --out or delete it",
                    out.display()
                );
            }
        }
        // The whole folder is replaced on commit: refuse one that holds anything else.
        const RUN_FILES: [&str; 6] =
            ["model.safetensors", "history.json", RANKS, "config.toml", "metrics.json", "report.html"];
        for e in std::fs::read_dir(out).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            anyhow::ensure!(
                RUN_FILES.contains(&n.as_str()) || (n.starts_with("eval-") && n.ends_with(".json")),
                "{}: not empty and not a training run ({n}); choose another --out",
                out.display()
            );
        }
        let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "run".into());
        let tmp = out.with_file_name(format!("{name}.partial"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create run directory", tmp.display()))?;
        Ok(Self { tmp, out: out.to_path_buf() })
    }

    /// Move the finished run into place (an older run there is replaced).
    pub fn commit(self) -> anyhow::Result<()> {
        let old = self.out.with_file_name(format!(
            "{}.replaced",
            self.out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
        ));
        if self.out.exists() {
            if old.exists() {
                std::fs::remove_dir_all(&old)?;
            }
            std::fs::rename(&self.out, &old).with_context(|| format!("{}: cannot replace", self.out.display()))?;
        }
        std::fs::rename(&self.tmp, &self.out)
            .with_context(|| format!("{}: cannot move into place", self.out.display()))?;
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        Ok(())
    }
}

/// A run written by `curec train`: its metrics, model kind, dataset and resolved config.
pub struct TrainedRun {
    pub metrics: Value,
    pub kind: ModelKind,
    pub ds: Dataset,
    pub cfg: JobConfig,
    /// The prepared interactions `ds` was built from (timestamps included), from the same read.
    pub log: Vec<crate::data::preprocess::Interaction>,
}

impl TrainedRun {
    /// Read `run/metrics.json` and `run/config.toml` and the dataset (`data_dir`, or the one the run
    /// was trained on). The run's checkpoint holds every weight, so a warm-start source
    /// (`curec.init_tower`) is neither read again nor needed.
    pub fn open(run: &Path, data_dir: Option<&Path>) -> anyhow::Result<Self> {
        let path = run.join("metrics.json");
        let metrics: Value = read_json(&path)?;
        let kind = metrics["model"]
            .as_str()
            .and_then(ModelKind::parse)
            .with_context(|| format!("{}: no known 'model' key", path.display()))?;
        let data_dir: PathBuf = match data_dir {
            Some(d) => d.to_path_buf(),
            None => metrics["data"]
                .as_str()
                .map(PathBuf::from)
                .with_context(|| format!("{}: no 'data' key; pass --data", path.display()))?,
        };
        let mut cfg = JobConfig::load(Some(&run.join("config.toml")), &[])?;
        cfg.curec.init_tower = None;
        // Features from one of the run's own snapshots that is gone (pruned, or removed for a
        // torn manifest): the newest complete snapshot instead.
        if let Some(f) = cfg.curec.features.clone() {
            let root = run.join("snapshots");
            if f.parent() == Some(root.as_path()) && !f.join(crate::replay::snapshot::MANIFEST).is_file() {
                if let Some((_, newest)) = crate::replay::snapshot::complete(&root).pop() {
                    tracing::warn!("{}: snapshot gone, reading features from {}", f.display(), newest.display());
                    cfg.curec.features = Some(newest);
                }
            }
        }
        let (ds, log) = prepared::read_dataset_and_log(&data_dir)?;
        Ok(Self { metrics, kind, ds, cfg, log })
    }
}

/// Stage wall times of a job: `<out>/stages.json` maps each stage run (not reused) to seconds.
pub const STAGES: &str = "stages.json";

/// Add the seconds since `t0` under `stage` to `<out>/stages.json`.
pub fn record_stage(out: &Path, stage: &str, t0: std::time::Instant) -> anyhow::Result<()> {
    let path = out.join(STAGES);
    let mut v: Value = read_json(&path).unwrap_or_else(|_| json!({}));
    if let Some(m) = v.as_object_mut() {
        m.insert(stage.to_string(), json!((t0.elapsed().as_secs_f64() * 10.0).round() / 10.0));
    }
    write_json(&path, &v)
}
