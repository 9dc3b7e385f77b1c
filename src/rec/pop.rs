//! Pop: score = number of training interactions of the item (the floor every model must beat).

use std::path::Path;

use candle_core::{Device, Tensor};

use super::Model;
use crate::data::{Dataset, Split};
use crate::eval::Scorer;

#[derive(Debug, Clone, Default)]
pub struct Pop {
    counts: Vec<f32>,
}

impl Pop {
    pub fn new(n_items: usize) -> Self {
        Pop { counts: vec![0.0; n_items] }
    }
}

impl Scorer for Pop {
    fn score(&self, _ds: &Dataset, users: &[u32], _split: Split) -> anyhow::Result<Vec<f32>> {
        Ok(users.iter().flat_map(|_| self.counts.iter().copied()).collect())
    }
}

impl Model for Pop {
    fn train_epoch(&mut self, ds: &Dataset, _epoch: usize) -> anyhow::Result<Option<f64>> {
        self.counts = vec![0.0; ds.n_items];
        for seq in &ds.train {
            for &i in seq {
                self.counts[i as usize] += 1.0;
            }
        }
        Ok(None)
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let t = Tensor::new(self.counts.as_slice(), &Device::Cpu)?;
        let tmp = crate::io::tmp_path(path);
        candle_core::safetensors::save(&[("counts".to_string(), t)].into_iter().collect(), &tmp)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut m = candle_core::safetensors::load(path, &Device::Cpu)?;
        let t = m.remove("counts").ok_or_else(|| anyhow::anyhow!("{}: no 'counts' tensor", path.display()))?;
        self.counts = t.to_vec1()?;
        Ok(())
    }
}
