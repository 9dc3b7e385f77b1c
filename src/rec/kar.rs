//! A KAR-style LLM-enhanced baseline (Xi et al., 2023, "Towards Open-World Recommendation with
//! Knowledge Augmentation from Large Language Models"), one of the paper's strongest rows: texts an
//! LLM wrote about items and about users' preferences go through the same encoder as CUREC's, and
//! adaptors turn them into vectors added to a SASRec backbone.
//!
//! - Item knowledge k_i: the mean embedding of the LLM's reasons about item i (the newest
//!   `curec.reasons_per_item`), or of its description when it has none. The item vector is
//!   e_i + W₂ ReLU(W₁ k_i), in the backbone's input and output layer alike.
//! - User preference p_u: the embedding of the user's pattern (zero without one). The user
//!   representation is the SASRec hidden state plus U₂ ReLU(U₁ p_u).
//!
//! KAR's hybrid-expert adaptor is a two-layer MLP here (one expert); the backbone, loss and
//! training are SASRec's (`[sasrec]`), the texts come from `--features` and are encoded with
//! `curec.encoder`. As for CUREC, training targets may have reasons written by their own user
//! in the pooled item vector; at test time no reason of the held-out interaction exists.

use std::path::Path;

use candle_core::{Device, Module, Tensor};
use candle_nn::{AdamW, Linear};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::curec::FeatureBank;
use super::nn::Params;
use super::sasrec::{SasRecConfig, SasRecTower};
use super::Model;
use crate::data::{Dataset, Split};
use crate::eval::Scorer;
use crate::rng::rng_for;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KarConfig {
    /// Hidden width of the item and user adaptors.
    pub hidden: usize,
}

impl Default for KarConfig {
    fn default() -> Self {
        KarConfig { hidden: 128 }
    }
}

pub struct Kar {
    tower: SasRecTower,
    user1: Linear,
    user2: Linear,
    /// `n_users × e` pattern embeddings (zero rows for users without one).
    users: Tensor,
    seed: u64,
    params: Params,
    opt: AdamW,
}

impl Kar {
    /// `reasons`: a bank of the LLM's patterns and reason lists; `descriptions`: a bank whose
    /// lists hold each item's description (the fallback knowledge).
    pub fn new(
        cfg: &KarConfig,
        tower_cfg: &SasRecConfig,
        reasons: &FeatureBank,
        descriptions: &FeatureBank,
        seed: u64,
        device: &Device,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(cfg.hidden > 0, "kar.hidden: expected at least 1");
        let (n_items, e) = (reasons.lists.len(), reasons.dim);
        anyhow::ensure!(descriptions.lists.len() == n_items && descriptions.dim == e, "KAR: the two banks disagree");
        let (pooled, desc) = (reasons.pooled(), descriptions.pooled());
        let mut knowledge = pooled;
        for (i, list) in reasons.lists.iter().enumerate() {
            if list.is_empty() {
                knowledge[i * e..(i + 1) * e].copy_from_slice(&desc[i * e..(i + 1) * e]);
            }
        }
        let mut p = Params::new(seed, device);
        let text = Tensor::from_vec(knowledge, (n_items, e), device)?;
        let tower = SasRecTower::new_augmented(tower_cfg, &text, cfg.hidden, &mut p)?;
        let user1 = p.linear("kar.user1", e, cfg.hidden)?;
        let user2 = p.linear_normal("kar.user2", cfg.hidden, tower_cfg.dim, 0.02)?;
        let n_users = reasons.patterns.len() / e.max(1);
        let users = Tensor::from_vec(reasons.patterns.clone(), (n_users, e), device)?;
        let opt = crate::rec::train::adamw(p.varmap.all_vars(), tower_cfg.lr)?;
        Ok(Kar { tower, user1, user2, users, seed, params: p, opt })
    }

    /// U₂ ReLU(U₁ p_u) for each of `users`: `len × d`.
    fn user_side(&self, users: &[u32]) -> candle_core::Result<Tensor> {
        let p = self.users.index_select(&Tensor::new(users, self.users.device())?, 0)?;
        self.user2.forward(&self.user1.forward(&p)?.relu()?)
    }
}

impl Scorer for Kar {
    fn score(&self, ds: &Dataset, users: &[u32], split: Split) -> anyhow::Result<Vec<f32>> {
        let hist: Vec<Vec<u32>> = users.iter().map(|&u| ds.history(u, split)).collect();
        let max_len = self.tower.cfg.max_len;
        let refs: Vec<&[u32]> = hist.iter().map(|h| &h[h.len().saturating_sub(max_len)..]).collect();
        let h = (self.tower.last_hidden(&refs)? + self.user_side(users)?)?;
        Ok(h.matmul(&self.tower.item_table()?.t()?)?.flatten_all()?.to_vec1()?)
    }
}

impl Model for Kar {
    fn train_epoch(&mut self, ds: &Dataset, epoch: usize) -> anyhow::Result<Option<f64>> {
        let mut windows = self.tower.windows(ds);
        let mut rng = rng_for(self.seed, 31, epoch as u64);
        windows.shuffle(&mut rng);
        let mut epoch_loss = super::EpochLoss::default();
        for (bi, batch) in windows.chunks(self.tower.cfg.batch_size).enumerate() {
            let (inputs, rows, targets) = SasRecTower::batch(ds, batch);
            // The user of each target row, in the order `batch` lists them.
            let row_users: Vec<u32> =
                batch.iter().flat_map(|&(u, a, e, first)| std::iter::repeat_n(u, e - a - first)).collect();
            let mut rng = rng_for(self.seed, 32, ((epoch as u64) << 32) | bi as u64);
            let h = (self.tower.encode_at(&inputs, &rows, Some(&mut rng))? + self.user_side(&row_users)?)?;
            let logits = h.matmul(&self.tower.item_table()?.t()?)?;
            epoch_loss.step(&mut self.opt, &logits, &targets)?;
        }
        Ok(epoch_loss.mean())
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        super::save_varmap(&self.params.varmap, path)
    }

    fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        super::load_varmap(&mut self.params.varmap, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::preprocess::ItemRow;

    const N: usize = 10;
    const E: usize = 6;

    fn bank(lists: Vec<Vec<(u32, u32)>>, seed: u64, users: usize) -> FeatureBank {
        let rows = lists.iter().map(Vec::len).sum::<usize>().max(N);
        let mut r = rng_for(seed, 1, 0);
        let mut v = |n: usize| (0..n).map(|_| crate::rng::standard_normal(&mut r)).collect::<Vec<f32>>();
        FeatureBank {
            dim: E,
            patterns: v(users * E),
            has_pattern: vec![true; users],
            reasons: v(rows * E),
            texts: vec![String::new(); rows],
            lists,
        }
    }

    #[test]
    fn trains_uses_its_texts_and_every_weight_learns() {
        let items = (0..N).map(|i| ItemRow { raw_id: i.to_string(), info: Default::default() }).collect();
        let mut ds = Dataset::from_interactions("toy", (0..4).map(|u| u.to_string()).collect(), items, &[]);
        for u in 0..4 {
            ds.train[u] = (0..7).map(|j| ((u * 3 + j * 2) % N) as u32).collect();
            ds.valid[u] = ((u + 1) % N) as u32;
            ds.test[u] = ((u + 2) % N) as u32;
        }
        // Items 0..5 have reasons; the rest fall back to their descriptions.
        let reasons = bank((0..N as u32).map(|i| if i < 5 { vec![(i, 0)] } else { vec![] }).collect(), 1, 4);
        let desc = bank((0..N as u32).map(|i| vec![(i, u32::MAX)]).collect(), 2, 4);
        let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, lr: 1e-2, ..Default::default() };
        let cfg = KarConfig { hidden: 8 };
        let mut m = Kar::new(&cfg, &tcfg, &reasons, &desc, 5, &Device::Cpu).unwrap();
        let before = super::super::nn::named_values(&m.params.varmap);
        let first = m.train_epoch(&ds, 0).unwrap().unwrap();
        let mut last = first;
        for e in 1..20 {
            last = m.train_epoch(&ds, e).unwrap().unwrap();
        }
        assert!(last < first, "loss {first} → {last}");
        for ((name, b), (_, a)) in before.iter().zip(super::super::nn::named_values(&m.params.varmap)) {
            if name != "pos_emb" {
                assert!(&a != b, "{name} did not change");
            }
        }
        // Another user pattern changes that user's scores and only them.
        let s1 = m.score(&ds, &[0, 1], Split::Test).unwrap();
        let mut r2 = reasons.clone();
        r2.patterns[..E].iter_mut().for_each(|x| *x += 1.0);
        let m2 = Kar::new(&cfg, &tcfg, &r2, &desc, 5, &Device::Cpu).unwrap();
        m2.params.varmap.data().lock().unwrap().iter().for_each(|(k, v)| {
            v.set(m.params.varmap.data().lock().unwrap()[k].as_tensor()).unwrap();
        });
        let s2 = m2.score(&ds, &[0, 1], Split::Test).unwrap();
        assert!(s1[..N].iter().zip(&s2[..N]).any(|(a, b)| (a - b).abs() > 1e-6));
        assert!(s1[N..].iter().zip(&s2[N..]).all(|(a, b)| (a - b).abs() < 1e-6));
    }
}
