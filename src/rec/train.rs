//! The training shared by every recommender: one optimiser ([`adamw`]), and the loop: epochs,
//! validation NDCG@10 after each, the best checkpoint kept as safetensors, early stopping, and a
//! progress bar on a terminal.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::Model;
use crate::data::{Dataset, Split};
use crate::eval;

/// The optimiser every recommender trains with: AdamW at `lr`, no weight decay, candle's
/// defaults otherwise (β = 0.9, 0.999; ε = 1e-8).
pub fn adamw(vars: Vec<candle_core::Var>, lr: f64) -> candle_core::Result<candle_nn::AdamW> {
    use candle_nn::Optimizer;
    candle_nn::AdamW::new(vars, candle_nn::ParamsAdamW { lr, weight_decay: 0.0, ..Default::default() })
}

#[derive(Debug, Clone)]
pub struct FitConfig {
    pub max_epochs: usize,
    pub patience: usize,
    pub eval_batch: usize,
    pub label: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub loss: Option<f64>,
    pub valid_ndcg10: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FitReport {
    /// Epochs run (including those after the best one, until patience ran out).
    pub epochs: usize,
    pub best_epoch: usize,
    pub best_valid_ndcg10: f64,
    /// Wall time of the whole fit, validation passes included.
    pub train_seconds: f64,
    pub seconds_per_epoch: f64,
    pub history: Vec<EpochLog>,
}

/// Train until validation NDCG@10 stops improving; leaves the best weights loaded and in `best_path`.
pub fn fit(model: &mut dyn Model, ds: &Dataset, cfg: &FitConfig, best_path: &Path) -> anyhow::Result<FitReport> {
    let start = Instant::now();
    let bar = crate::progress::bar(cfg.max_epochs, &cfg.label, "epochs");
    let mut history = Vec::new();
    let mut best = (f64::NEG_INFINITY, 0usize);
    for epoch in 0..cfg.max_epochs.max(1) {
        let t0 = Instant::now();
        let loss = model.train_epoch(ds, epoch)?;
        let valid = eval::evaluate(model, ds, Split::Valid, cfg.eval_batch)?.get("ndcg@10");
        if let Some(l) = loss {
            anyhow::ensure!(l.is_finite(), "{}: training diverged at epoch {epoch} (loss {l})", cfg.label);
        }
        history.push(EpochLog { epoch, loss, valid_ndcg10: valid, seconds: t0.elapsed().as_secs_f64() });
        if valid > best.0 {
            best = (valid, epoch);
            model.save(best_path)?;
        }
        // A model fitted without a loss (Pop counts) logs none.
        let loss_text = loss.map(|l| format!("loss {l:.4} ")).unwrap_or_default();
        bar.set_message(format!("{loss_text}valid ndcg@10 {valid:.4} (best {:.4} @ {})", best.0, best.1));
        bar.inc(1);
        if loss.is_none() || epoch - best.1 >= cfg.patience {
            break;
        }
    }
    bar.finish_and_clear();
    model.load(best_path)?;
    let train_seconds = start.elapsed().as_secs_f64();
    Ok(FitReport {
        epochs: history.len(),
        best_epoch: best.1,
        best_valid_ndcg10: best.0,
        train_seconds,
        seconds_per_epoch: train_seconds / history.len().max(1) as f64,
        history,
    })
}
