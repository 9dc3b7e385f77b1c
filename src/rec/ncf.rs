//! NCF / NeuMF (He et al., "Neural Collaborative Filtering", WWW 2017): a GMF branch (element-wise
//! product of user and item embeddings) and an MLP branch over their concatenation, fused by a
//! final linear layer; trained with binary cross-entropy on each positive and `negatives` items
//! sampled uniformly among those the user has not interacted with in training.

use std::collections::HashSet;
use std::path::Path;

use candle_core::{Device, Module, Tensor};
use candle_nn::{AdamW, Linear, Optimizer};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::nn::{bce_with_logits, dropout, Params};
use super::Model;
use crate::data::{Dataset, Split};
use crate::eval::Scorer;
use crate::rng::rng_for;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NcfConfig {
    pub dim: usize,
    /// Hidden sizes of the MLP branch (its input is 2 × dim).
    pub mlp: Vec<usize>,
    pub dropout: f32,
    /// Sampled negatives per positive.
    pub negatives: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub max_epochs: usize,
    pub patience: usize,
}

impl Default for NcfConfig {
    fn default() -> Self {
        NcfConfig {
            dim: 64,
            mlp: vec![128, 64],
            dropout: 0.1,
            negatives: 4,
            lr: 1e-3,
            batch_size: 1024,
            max_epochs: 100,
            patience: 10,
        }
    }
}

pub struct Ncf {
    cfg: NcfConfig,
    n_items: usize,
    seed: u64,
    params: Params,
    user_gmf: Tensor,
    item_gmf: Tensor,
    user_mlp: Tensor,
    item_mlp: Tensor,
    mlp: Vec<Linear>,
    out: Linear,
    opt: AdamW,
}

impl Ncf {
    pub fn new(cfg: &NcfConfig, n_users: usize, n_items: usize, seed: u64, device: &Device) -> anyhow::Result<Self> {
        anyhow::ensure!(cfg.batch_size > 0 && cfg.negatives > 0, "ncf.batch_size and ncf.negatives must be positive");
        let mut p = Params::new(seed, device);
        let d = cfg.dim;
        let user_gmf = p.normal("user_gmf", &[n_users, d], 0.01)?;
        let item_gmf = p.normal("item_gmf", &[n_items, d], 0.01)?;
        let user_mlp = p.normal("user_mlp", &[n_users, d], 0.01)?;
        let item_mlp = p.normal("item_mlp", &[n_items, d], 0.01)?;
        let mut mlp = Vec::new();
        let mut width = 2 * d;
        for (i, &h) in cfg.mlp.iter().enumerate() {
            mlp.push(p.linear(&format!("mlp.{i}"), width, h)?);
            width = h;
        }
        let out = p.linear("out", d + width, 1)?;
        let opt = crate::rec::train::adamw(p.varmap.all_vars(), cfg.lr)?;
        Ok(Ncf { cfg: cfg.clone(), n_items, seed, params: p, user_gmf, item_gmf, user_mlp, item_mlp, mlp, out, opt })
    }

    /// Logits for (user, item) pairs.
    fn forward(&self, users: &[u32], items: &[u32], mut rng: Option<&mut ChaCha8Rng>) -> candle_core::Result<Tensor> {
        let dev = self.user_gmf.device();
        let u = Tensor::new(users, dev)?;
        let i = Tensor::new(items, dev)?;
        let gmf = (self.user_gmf.index_select(&u, 0)? * self.item_gmf.index_select(&i, 0)?)?;
        let mut h = Tensor::cat(&[self.user_mlp.index_select(&u, 0)?, self.item_mlp.index_select(&i, 0)?], 1)?;
        for l in &self.mlp {
            h = dropout(&l.forward(&h)?.relu()?, self.cfg.dropout, rng.as_deref_mut())?;
        }
        self.out.forward(&Tensor::cat(&[gmf, h], 1)?)?.squeeze(1)
    }
}

impl Scorer for Ncf {
    fn score(&self, _ds: &Dataset, users: &[u32], _split: Split) -> anyhow::Result<Vec<f32>> {
        let n = self.n_items as u32;
        let mut out = Vec::with_capacity(users.len() * self.n_items);
        // Bound the pairs per forward pass so the MLP activations stay small.
        let per = (200_000 / self.n_items).max(1);
        for chunk in users.chunks(per) {
            let us: Vec<u32> = chunk.iter().flat_map(|&u| std::iter::repeat_n(u, n as usize)).collect();
            let is: Vec<u32> = chunk.iter().flat_map(|_| 0..n).collect();
            out.extend(self.forward(&us, &is, None)?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

impl Model for Ncf {
    fn train_epoch(&mut self, ds: &Dataset, epoch: usize) -> anyhow::Result<Option<f64>> {
        let mut rng = rng_for(self.seed, 4, epoch as u64);
        let seen: Vec<HashSet<u32>> = ds.train.iter().map(|s| s.iter().copied().collect()).collect();
        let k = self.cfg.negatives;
        let mut pos: Vec<(u32, u32)> =
            ds.train.iter().enumerate().flat_map(|(u, s)| s.iter().map(move |&i| (u as u32, i))).collect();
        pos.shuffle(&mut rng);
        let dev = self.user_gmf.device().clone();
        let (mut total, mut batches) = (0f64, 0usize);
        for (bi, chunk) in pos.chunks(self.cfg.batch_size).enumerate() {
            let mut us = Vec::with_capacity(chunk.len() * (k + 1));
            let mut is = Vec::with_capacity(us.capacity());
            let mut ys = Vec::with_capacity(us.capacity());
            for &(u, i) in chunk {
                us.push(u);
                is.push(i);
                ys.push(1f32);
                // A user who has seen every item has no negatives to draw.
                let k = if seen[u as usize].len() >= self.n_items { 0 } else { k };
                for _ in 0..k {
                    let j = loop {
                        let j = rng.random_range(0..self.n_items as u32);
                        if !seen[u as usize].contains(&j) {
                            break j;
                        }
                    };
                    us.push(u);
                    is.push(j);
                    ys.push(0.0);
                }
            }
            let mut drop_rng = rng_for(self.seed, 5, ((epoch as u64) << 32) | bi as u64);
            let logits = self.forward(&us, &is, Some(&mut drop_rng))?;
            let loss = bce_with_logits(&logits, &Tensor::new(ys.as_slice(), &dev)?)?;
            self.opt.backward_step(&loss)?;
            total += loss.to_scalar::<f32>()? as f64;
            batches += 1;
        }
        Ok(Some(total / batches.max(1) as f64))
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        super::save_varmap(&self.params.varmap, path)
    }

    fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        super::load_varmap(&mut self.params.varmap, path)
    }
}
