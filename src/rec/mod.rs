//! Recommenders in candle: the ID-only baselines (Pop, NCF/NeuMF, SASRec), their training loop with
//! early stopping on validation NDCG@10, and safetensors checkpoints.

pub mod bert4rec;
pub mod curec;
pub mod kar;
pub mod ncf;
pub mod nn;
pub mod pop;
pub mod sasrec;
pub mod train;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::eval::Scorer;

/// Which baseline to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Pop,
    Ncf,
    Sasrec,
    /// Bidirectional SASRec trained as a cloze task (Sun et al., 2019).
    Bert4rec,
    /// The CUREC reward model (needs features from `curec features`).
    Curec,
    /// KAR-style LLM-enhanced SASRec (needs features from `curec features`).
    Kar,
}

impl ModelKind {
    /// Every kind, in the order the CLI lists them.
    pub const ALL: [ModelKind; 6] =
        [ModelKind::Pop, ModelKind::Ncf, ModelKind::Sasrec, ModelKind::Bert4rec, ModelKind::Curec, ModelKind::Kar];

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Pop => "pop",
            ModelKind::Ncf => "ncf",
            ModelKind::Sasrec => "sasrec",
            ModelKind::Bert4rec => "bert4rec",
            ModelKind::Curec => "curec",
            ModelKind::Kar => "kar",
        }
    }
    pub fn parse(s: &str) -> Option<ModelKind> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// A trainable scorer.
pub trait Model: Scorer + Send {
    /// One pass over the training data; the mean loss, or `None` for models fitted in closed form.
    fn train_epoch(&mut self, ds: &Dataset, epoch: usize) -> anyhow::Result<Option<f64>>;
    fn save(&self, path: &Path) -> anyhow::Result<()>;
    fn load(&mut self, path: &Path) -> anyhow::Result<()>;
}

/// A training epoch's loss, averaged over its targets, and the optimisation step that adds to it.
#[derive(Debug, Default)]
pub struct EpochLoss {
    total: f64,
    count: usize,
}

impl EpochLoss {
    /// One step of `opt` on the softmax cross-entropy of `logits` (`targets.len() × classes`).
    pub fn step(
        &mut self,
        opt: &mut candle_nn::AdamW,
        logits: &candle_core::Tensor,
        targets: &[u32],
    ) -> anyhow::Result<()> {
        use candle_nn::Optimizer;
        let loss = crate::ops::cross_entropy(logits, &candle_core::Tensor::new(targets, logits.device())?)?;
        opt.backward_step(&loss)?;
        self.total += loss.to_scalar::<f32>()? as f64 * targets.len() as f64;
        self.count += targets.len();
        Ok(())
    }

    /// The mean over the epoch's targets.
    pub fn mean(&self) -> Option<f64> {
        Some(self.total / self.count.max(1) as f64)
    }
}

/// Save a varmap atomically (temp name, then rename), so a kill never leaves a torn checkpoint.
pub fn save_varmap(varmap: &candle_nn::VarMap, path: &Path) -> anyhow::Result<()> {
    let tmp = crate::io::tmp_path(path);
    varmap.save(&tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Load a checkpoint into an existing varmap, naming the file on failure.
pub fn load_varmap(varmap: &mut candle_nn::VarMap, path: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    varmap.load(path).with_context(|| format!("{}: cannot load checkpoint", path.display()))
}
