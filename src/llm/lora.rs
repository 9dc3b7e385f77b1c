//! LoRA adapters: `y = x Wᵀ + b + (α/r) · (x Aᵀ) Bᵀ`, with A seeded Kaiming-uniform and B zero, so
//! a fresh adapter leaves the model unchanged. The base weights stay plain tensors (frozen); only
//! A and B are `Var`s. The reference policy for the KL term is the same model run with adapters off.
//! Saved and loaded as safetensors with PEFT's names (`….q_proj.lora_A.weight`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::rng::rng_for;

/// The projections an adapter can attach to.
pub const ALL_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Projection names (see [`ALL_TARGETS`]).
    pub targets: Vec<String>,
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 8, alpha: 16.0, targets: ALL_TARGETS.iter().map(|s| s.to_string()).collect(), seed: 2024 }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("lora.rank: expected a positive integer");
        }
        for t in &self.targets {
            if !ALL_TARGETS.contains(&t.as_str()) {
                bail!("lora.targets: unknown projection '{t}', expected one of {}", ALL_TARGETS.join(", "));
            }
        }
        Ok(())
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// One adapter: A is rank × in, B is out × rank.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
}

impl Adapter {
    /// Seeded by (seed, index of the projection in the model) so that adding a target elsewhere
    /// does not change this one.
    pub fn new(cfg: &LoraConfig, index: u64, d_in: usize, d_out: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let mut rng = rng_for(cfg.seed, 0x10a, index);
        let bound = 1.0 / (d_in as f32).sqrt();
        let a: Vec<f32> = (0..cfg.rank * d_in).map(|_| rng.random_range(-bound..bound)).collect();
        let a = Tensor::from_vec(a, (cfg.rank, d_in), dev)?.to_dtype(dtype)?;
        let b = Tensor::zeros((d_out, cfg.rank), dtype, dev)?;
        Ok(Self { a: Var::from_tensor(&a)?, b: Var::from_tensor(&b)?, scale: cfg.scale() })
    }

    /// The low-rank update for 2-D input rows (the scale applied to the rank-wide product, the
    /// smallest tensor on the way).
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        Ok((x.matmul(&self.a.as_tensor().t()?)? * self.scale)?.matmul(&self.b.as_tensor().t()?)?)
    }
}

/// Write adapters (name prefix → adapter) plus the config as safetensors metadata.
pub fn save(path: &Path, cfg: &LoraConfig, adapters: &[(String, &Adapter)]) -> Result<()> {
    let mut data: Vec<(String, Tensor)> = Vec::with_capacity(2 * adapters.len());
    for (name, a) in adapters {
        data.push((format!("{name}.lora_A.weight"), a.a.as_tensor().to_dtype(DType::F32)?));
        data.push((format!("{name}.lora_B.weight"), a.b.as_tensor().to_dtype(DType::F32)?));
    }
    let meta: HashMap<String, String> = [("lora".to_string(), serde_json::to_string(cfg)?)].into();
    let tmp = crate::io::tmp_path(path);
    safetensors::serialize_to_file(data.iter().map(|(k, v)| (k.as_str(), v)), Some(meta), &tmp)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Name prefix → (A, B) as read from an adapter file.
pub type AdapterTensors = HashMap<String, (Tensor, Tensor)>;

/// Read adapters written by [`save`]: the config and name prefix → (A, B).
pub fn load(path: &Path) -> Result<(LoraConfig, AdapterTensors)> {
    let shown = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("{shown}: cannot read"))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).with_context(|| format!("{shown}: not safetensors"))?;
    let cfg: LoraConfig = match meta.metadata().as_ref().and_then(|m| m.get("lora")) {
        Some(s) => serde_json::from_str(s).with_context(|| format!("{shown}: bad 'lora' metadata"))?,
        None => bail!("{shown}: expected a LoRA adapter file (no 'lora' metadata)"),
    };
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)?;
    let mut out = AdapterTensors::new();
    for (k, a) in &tensors {
        if let Some(prefix) = k.strip_suffix(".lora_A.weight") {
            let b = tensors
                .get(&format!("{prefix}.lora_B.weight"))
                .with_context(|| format!("{shown}: {prefix} has lora_A but no lora_B"))?;
            out.insert(prefix.to_string(), (a.clone(), b.clone()));
        }
    }
    Ok((cfg, out))
}
