//! A trainer's state on disk: the trainable variables (`trainable.safetensors`) and the
//! optimizer's moments (`optimizer.safetensors`), shared by alignment pretraining's checkpoints
//! and the correction's snapshots.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};

use super::Grpo;

const TRAINABLE: &str = "trainable.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";

/// Write `vars` and `grpo`'s optimizer state into `dir` (which must exist).
pub fn save(dir: &Path, vars: &[(String, Var)], grpo: &mut Grpo) -> Result<()> {
    let path = dir.join(TRAINABLE);
    let data: Vec<(String, Tensor)> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let tmp = crate::io::tmp_path(&path);
    safetensors::serialize_to_file(data.iter().map(|(k, v)| (k.as_str(), v)), None, &tmp)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot write", path.display()))?;
    grpo.optimizer().save(&dir.join(OPTIMIZER))
}

/// Restore what [`save`] wrote: every variable of `vars` by name, and the optimizer state.
pub fn load(dir: &Path, vars: &[(String, Var)], grpo: &mut Grpo) -> Result<()> {
    let path = dir.join(TRAINABLE);
    let dev = vars.first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
    let saved =
        candle_core::safetensors::load(&path, &dev).with_context(|| format!("{}: cannot read", path.display()))?;
    for (name, var) in vars {
        let t = saved.get(name).with_context(|| format!("{}: lacks {name}", path.display()))?;
        var.set(t)?;
    }
    grpo.optimizer().load(&dir.join(OPTIMIZER))
}
