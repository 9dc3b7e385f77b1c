//! What `curec replay` and a resident ingestion session both set up around the correction
//! dataflow: the LLM corrector's factory (the reward model and encoder loaded on worker 0), the
//! per-epoch log, and the embedding caches a run's snapshots reuse.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use serde_json::json;

use crate::pipeline::models::build_curec;
use crate::rec::Model;
use crate::replay::graph::CorrectorFactory;
use crate::replay::llm_corrector::{LlmCorrector, LlmSetup};
use crate::replay::policy::Corrector;
use crate::replay::EpochMetrics;
use crate::run_dir::TrainedRun;
/// Copy the embedding caches of `from` into `to` where `to` has none (texts are keyed by hash).
pub fn seed_caches(from: &Path, to: &Path) -> Result<()> {
    for e in std::fs::read_dir(from).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("embeddings-") && name.ends_with(".parquet") && !to.join(&name).exists() {
            std::fs::copy(e.path(), to.join(&name)).with_context(|| format!("{}: cannot copy", e.path().display()))?;
        }
    }
    Ok(())
}

/// Prints the live line per epoch and appends it (with timings) to `epochs.jsonl`.
pub fn epoch_logger(log: PathBuf, total_epochs: usize, done_before: usize) -> crate::replay::board::EpochHook {
    let t0 = Instant::now();
    let count = Mutex::new(0usize);
    Box::new(move |m: &EpochMetrics, epoch_secs: f64| {
        let mut n = count.lock().expect("logger lock");
        *n += 1;
        let secs = t0.elapsed().as_secs_f64();
        let left = total_epochs.saturating_sub(done_before + *n);
        let eta = secs / *n as f64 * left as f64;
        let tps = m.generated_tokens as f64 / epoch_secs.max(1e-9);
        let f = |x: Option<f64>| x.map_or("—".into(), |v| format!("{v:.4}"));
        // A resident session (`total_epochs` 0) has no end to count down to.
        let (of, eta) = match total_epochs {
            0 => (String::new(), String::new()),
            t => (format!(" ({}/{t})", done_before + *n), format!(", ETA {eta:.0} s")),
        };
        tracing::info!(
            "epoch {}{of}: {} interactions, {} reasons, reward {}, kl {}, {tps:.0} tok/s{eta}",
            m.epoch,
            m.interactions,
            m.reasons_written,
            f(m.mean_reward()),
            f(m.mean_kl())
        );
        let mut line = serde_json::to_value(m).unwrap_or_default();
        line["seconds_since_start"] = json!(secs);
        line["seconds"] = json!(epoch_secs);
        let _ = crate::features::store::append_log(&log, &[line]);
    })
}

pub fn llm_factory(setup: LlmSetup, rm: PathBuf, data: PathBuf) -> CorrectorFactory {
    Arc::new(move |index: usize, _peers: usize| -> Result<Option<Box<dyn Corrector>>> {
        if index != 0 {
            return Ok(None);
        }
        let TrainedRun { ds, cfg, .. } = TrainedRun::open(&rm, Some(&data))?;
        let mut model = build_curec(&ds, &cfg, &Device::Cpu)?;
        model.load(&rm.join("model.safetensors"))?;
        let encoder = crate::embed::load(&cfg.curec.encoder, &Device::Cpu)?;
        Ok(Some(Box::new(LlmCorrector::new(setup.clone(), model, encoder)?)))
    })
}
