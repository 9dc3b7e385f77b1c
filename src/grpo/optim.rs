//! AdamW (decoupled weight decay) over candle `Var`s, global-norm gradient clipping, and the
//! cosine schedule with linear warm-up. The optimizer state is saved beside the adapters so a
//! resumed run continues exactly where the killed one stopped.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // PyTorch/TRL defaults.
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

pub struct AdamW {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far.
    pub t: usize,
    cfg: AdamWConfig,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, cfg: AdamWConfig) -> Result<Self> {
        let zeros = |v: &Var| Tensor::zeros(v.shape(), DType::F32, v.device());
        let m = vars.iter().map(zeros).collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars.iter().map(zeros).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { vars, m, v, t: 0, cfg })
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// One update with `grads[i]` for `vars[i]` (f32, same shape).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        anyhow::ensure!(grads.len() == self.vars.len(), "one gradient per variable");
        self.t += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for (i, g) in grads.iter().enumerate() {
            self.m[i] = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mhat = (&self.m[i] / bc1)?;
            let vhat = (&self.v[i] / bc2)?;
            let update = (mhat / (vhat.sqrt()? + c.eps)?)?;
            let var = &self.vars[i];
            let w = var.as_tensor().to_dtype(DType::F32)?;
            let w = ((&w * (1.0 - lr * c.weight_decay))? - (update * lr)?)?;
            var.set(&w.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Save moments and step count (safetensors).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut data: Vec<(String, Tensor)> = Vec::with_capacity(2 * self.m.len());
        for i in 0..self.m.len() {
            data.push((format!("m.{i}"), self.m[i].clone()));
            data.push((format!("v.{i}"), self.v[i].clone()));
        }
        let meta: HashMap<String, String> = [("t".to_string(), self.t.to_string())].into();
        safetensors::serialize_to_file(data.iter().map(|(k, v)| (k.as_str(), v)), Some(meta), path)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(())
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let shown = path.display();
        let bytes = std::fs::read(path).with_context(|| format!("{shown}: cannot read"))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).with_context(|| format!("{shown}: not safetensors"))?;
        let t = meta.metadata().as_ref().and_then(|m| m.get("t")).and_then(|s| s.parse().ok());
        self.t = t.with_context(|| format!("{shown}: no step count"))?;
        let dev = self.vars.first().map(|v| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let tensors = candle_core::safetensors::load_buffer(&bytes, &dev)?;
        for i in 0..self.m.len() {
            let get = |k: String| tensors.get(&k).cloned().with_context(|| format!("{shown}: missing {k}"));
            let (m, v) = (get(format!("m.{i}"))?, get(format!("v.{i}"))?);
            anyhow::ensure!(
                m.dims() == self.m[i].dims(),
                "{shown}: m.{i} has shape {:?}, expected {:?}",
                m.dims(),
                self.m[i].dims()
            );
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Scale `grads` so their global L2 norm is at most `max` (no-op when `max <= 0`); returns the
/// norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if max > 0.0 && norm > max {
        let s = max / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

/// Learning rate at update `step` (0-based) of `total`: linear warm-up over `warmup` updates,
/// then cosine decay to zero.
pub fn cosine_lr(base: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_first_step_moves_by_lr_times_sign() {
        let v = Var::from_tensor(&Tensor::new(&[1f32, -2.0, 0.5], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![v.clone()], AdamWConfig { weight_decay: 0.1, ..Default::default() }).unwrap();
        let g = Tensor::new(&[0.3f32, -4.0, 0.0], &Device::Cpu).unwrap();
        opt.step(&[g], 0.01).unwrap();
        let w: Vec<f32> = v.as_tensor().to_vec1().unwrap();
        // w·(1 − lr·wd) − lr·m̂/(√v̂ + eps), with m̂/√v̂ = sign(g) after one step.
        let want = [1.0 * 0.999 - 0.01, -2.0 * 0.999 + 0.01, 0.5 * 0.999];
        for (a, b) in w.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{w:?}");
        }
    }

    #[test]
    fn clipping_and_schedule() {
        let mut g = vec![Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap()];
        assert!((clip_grad_norm(&mut g, 1.0).unwrap() - 5.0).abs() < 1e-6);
        let v: Vec<f32> = g[0].to_vec1().unwrap();
        assert!((v[0] - 0.6).abs() < 1e-5 && (v[1] - 0.8).abs() < 1e-5);
        assert!((cosine_lr(1.0, 0, 10, 2) - 0.5).abs() < 1e-12);
        assert!((cosine_lr(1.0, 2, 10, 2) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(1.0, 6, 10, 2) - 0.5).abs() < 1e-12);
        assert!(cosine_lr(1.0, 10, 10, 2).abs() < 1e-12);
    }
}
