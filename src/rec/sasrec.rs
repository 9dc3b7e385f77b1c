//! SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018), trained with
//! softmax cross-entropy over all items at every position of the sequence (CUREC paper Eq. 11).
//!
//! Sequences are right-padded and positions count from the oldest item, so with the causal mask
//! the output at position j is exactly a prediction from the prefix of j + 1 items (as when
//! training on one prefix per sample, RecBole-style, but all prefixes in one pass). Post-LN blocks (as in RecBole) with a ReLU feed-forward (as in the
//! original; GELU's tanh cost 20% of an epoch on CPU).
//! Training covers every target of every user once per epoch: a user's train sequence is cut
//! into windows of `max_len` inputs from the end, each window predicting all of its next items.

use std::path::Path;

use candle_core::{Device, Module, Tensor};
use candle_nn::{AdamW, Linear, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::nn::{causal_padding_bias, dropout, position_mask, rng_for, LayerNorm, Params};
use super::Model;
use crate::data::{Dataset, Split};
use crate::eval::Scorer;
use crate::ops::{cross_entropy, softmax_last_dim};

/// Standard deviation of every weight at initialisation (biases start at zero), as in RecBole.
const INIT_STD: f32 = 0.02;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SasRecConfig {
    /// Longest input sequence (most recent items kept).
    pub max_len: usize,
    /// Training windows of `max_len` inputs end every `stride` targets, and each window trains
    /// only its newest `stride` targets (the oldest window all of its own), so every target is
    /// trained once per epoch with at least `max_len - stride` items before it. 0 = `max_len`
    /// (windows do not overlap: cheapest). 1 = every target with its full `max_len` context, as
    /// when training on one sliding prefix per sample (RecBole).
    pub stride: usize,
    pub dim: usize,
    pub blocks: usize,
    pub heads: usize,
    /// Hidden size of the feed-forward layer.
    pub inner: usize,
    pub dropout: f32,
    pub lr: f64,
    pub batch_size: usize,
    pub max_epochs: usize,
    /// Stop after this many epochs without a better validation NDCG@10.
    pub patience: usize,
}

impl Default for SasRecConfig {
    fn default() -> Self {
        SasRecConfig {
            max_len: 200,
            stride: 0,
            dim: 64,
            blocks: 2,
            heads: 2,
            inner: 256,
            dropout: 0.2,
            lr: 1e-3,
            batch_size: 128,
            max_epochs: 300,
            patience: 20,
        }
    }
}

struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln1: LayerNorm,
    ff1: Linear,
    ff2: Linear,
    ln2: LayerNorm,
}

/// The SASRec transformer over item-ID sequences (also the user tower of the CUREC reward model).
pub struct SasRecTower {
    pub cfg: SasRecConfig,
    pub n_items: usize,
    /// Row 0 is padding; item i is row i + 1.
    item_emb: Tensor,
    pos_emb: Tensor,
    emb_ln: LayerNorm,
    blocks: Vec<Block>,
}

pub struct SasRec {
    tower: SasRecTower,
    seed: u64,
    params: Params,
    opt: AdamW,
}

impl SasRec {
    pub fn new(cfg: &SasRecConfig, n_items: usize, seed: u64, device: &Device) -> anyhow::Result<Self> {
        let mut p = Params::new(seed, device);
        let tower = SasRecTower::new(cfg, n_items, &mut p)?;
        let opt = AdamW::new(p.varmap.all_vars(), ParamsAdamW { lr: cfg.lr, weight_decay: 0.0, ..Default::default() })?;
        Ok(SasRec { tower, seed, params: p, opt })
    }
}

impl SasRecTower {
    /// Register the tower's parameters in `p` (names as in SASRec checkpoints).
    pub fn new(cfg: &SasRecConfig, n_items: usize, p: &mut Params) -> anyhow::Result<Self> {
        anyhow::ensure!(
            cfg.dim % cfg.heads == 0,
            "sasrec.dim = {} must be divisible by sasrec.heads = {}",
            cfg.dim,
            cfg.heads
        );
        anyhow::ensure!(cfg.max_len > 0 && cfg.batch_size > 0, "sasrec.max_len and sasrec.batch_size must be positive");
        let d = cfg.dim;
        let item_emb = p.normal("item_emb", &[n_items + 1, d], INIT_STD)?;
        let pos_emb = p.normal("pos_emb", &[cfg.max_len, d], INIT_STD)?;
        let emb_ln = p.layer_norm("emb_ln", d)?;
        let mut blocks = Vec::new();
        for b in 0..cfg.blocks {
            let n = |s: &str| format!("blocks.{b}.{s}");
            blocks.push(Block {
                q: p.linear_normal(&n("q"), d, d, INIT_STD)?,
                k: p.linear_normal(&n("k"), d, d, INIT_STD)?,
                v: p.linear_normal(&n("v"), d, d, INIT_STD)?,
                o: p.linear_normal(&n("o"), d, d, INIT_STD)?,
                ln1: p.layer_norm(&n("ln1"), d)?,
                ff1: p.linear_normal(&n("ff1"), d, cfg.inner, INIT_STD)?,
                ff2: p.linear_normal(&n("ff2"), cfg.inner, d, INIT_STD)?,
                ln2: p.layer_norm(&n("ln2"), d)?,
            });
        }
        Ok(SasRecTower { cfg: cfg.clone(), n_items, item_emb, pos_emb, emb_ln, blocks })
    }

    /// Hidden states `B × T × d` for right-padded sequences (T = longest sequence in the batch).
    pub fn encode(&self, seqs: &[&[u32]], mut rng: Option<&mut ChaCha8Rng>) -> candle_core::Result<Tensor> {
        let dev = self.item_emb.device();
        let (b, d, p) = (seqs.len(), self.cfg.dim, self.cfg.dropout);
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(1).clamp(1, self.cfg.max_len);
        let mut ids = vec![0u32; b * t];
        let mut valid = vec![vec![false; t]; b];
        for (r, s) in seqs.iter().enumerate() {
            let s = &s[s.len().saturating_sub(t)..];
            for (j, &item) in s.iter().enumerate() {
                ids[r * t + j] = item + 1;
                valid[r][j] = true;
            }
        }
        let ids = Tensor::from_vec(ids, b * t, dev)?;
        let mask = position_mask(&valid, dev)?;
        let bias = causal_padding_bias(&valid, dev)?;
        let x = self.item_emb.index_select(&ids, 0)?.reshape((b, t, d))?;
        let pos = self.pos_emb.narrow(0, 0, t)?;
        let x = self.emb_ln.forward(&x.broadcast_add(&pos)?)?;
        let mut x = dropout(&x, p, rng.as_deref_mut())?.broadcast_mul(&mask)?;
        let (h, dh) = (self.cfg.heads, d / self.cfg.heads);
        for blk in &self.blocks {
            let split = |l: &Linear| -> candle_core::Result<Tensor> {
                l.forward(&x)?.reshape((b, t, h, dh))?.transpose(1, 2)?.contiguous()
            };
            let (q, k, v) = (split(&blk.q)?, split(&blk.k)?, split(&blk.v)?);
            let q = (q / (dh as f64).sqrt())?;
            let att = q.matmul(&k.transpose(2, 3)?.contiguous()?)?.broadcast_add(&bias)?;
            let att = dropout(&softmax_last_dim(&att)?, p, rng.as_deref_mut())?;
            let ctx = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
            let a = dropout(&blk.o.forward(&ctx)?, p, rng.as_deref_mut())?;
            let x1 = blk.ln1.forward(&(&x + a)?)?;
            let f = blk.ff2.forward(&blk.ff1.forward(&x1)?.relu()?)?;
            let f = dropout(&f, p, rng.as_deref_mut())?;
            x = blk.ln2.forward(&(x1 + f)?)?.broadcast_mul(&mask)?;
        }
        Ok(x)
    }

    /// Item embeddings `n_items × d` (without the padding row).
    pub fn item_table(&self) -> candle_core::Result<Tensor> {
        self.item_emb.narrow(0, 1, self.n_items)
    }

    /// The hidden state at each sequence's last position, `B × d`.
    pub fn last_hidden(&self, seqs: &[&[u32]]) -> candle_core::Result<Tensor> {
        let x = self.encode(seqs, None)?;
        let (b, t) = (x.dim(0)?, x.dim(1)?);
        let rows: Vec<u32> = seqs.iter().enumerate().map(|(r, s)| (r * t + s.len().clamp(1, t) - 1) as u32).collect();
        x.reshape((b * t, self.cfg.dim))?.index_select(&Tensor::new(rows.as_slice(), x.device())?, 0)
    }

    /// Training windows `(user, start, end, first)`: inputs `seq[start..end]` predict
    /// `seq[start + 1..end + 1]`, and the loss covers the window positions `first..end - start`.
    /// Together they cover every train target of every user exactly once (see `stride`).
    pub fn windows(&self, ds: &Dataset) -> Vec<(u32, usize, usize, usize)> {
        let l = self.cfg.max_len;
        let stride = if self.cfg.stride == 0 { l } else { self.cfg.stride.min(l) };
        let mut w = Vec::new();
        for (u, seq) in ds.train.iter().enumerate() {
            // Targets are seq[1..]; a window of inputs seq[a..e] predicts seq[a+1..e+1].
            let mut end = seq.len().saturating_sub(1);
            while end > 0 {
                let start = end.saturating_sub(l);
                let first = if start == 0 { 0 } else { end - start - stride.min(end - start) };
                w.push((u as u32, start, end, first));
                if start == 0 {
                    break;
                }
                end -= stride.min(end - start);
            }
        }
        w
    }
}

impl Scorer for SasRec {
    fn score(&self, ds: &Dataset, users: &[u32], split: Split) -> anyhow::Result<Vec<f32>> {
        let hist: Vec<Vec<u32>> = users.iter().map(|&u| ds.history(u, split)).collect();
        let max_len = self.tower.cfg.max_len;
        let refs: Vec<&[u32]> = hist.iter().map(|h| &h[h.len().saturating_sub(max_len)..]).collect();
        let last = self.tower.last_hidden(&refs)?;
        let scores = last.matmul(&self.tower.item_table()?.t()?)?;
        Ok(scores.flatten_all()?.to_vec1()?)
    }
}

impl Model for SasRec {
    fn train_epoch(&mut self, ds: &Dataset, epoch: usize) -> anyhow::Result<Option<f64>> {
        let mut windows = self.tower.windows(ds);
        let mut rng = rng_for(self.seed, 2, epoch as u64);
        windows.shuffle(&mut rng);
        // Length bucketing: batches of similar lengths pad (and attend over) less. Sort within
        // pools of 16 batches, then shuffle the order of the batches.
        let bs = self.tower.cfg.batch_size;
        for pool in windows.chunks_mut(bs * 16) {
            pool.sort_by_key(|&(_, a, e, _)| std::cmp::Reverse(e - a));
        }
        let mut batches: Vec<&[(u32, usize, usize, usize)]> = windows.chunks(bs).collect();
        batches.shuffle(&mut rng);
        let dev = self.tower.item_emb.device().clone();
        let (mut total, mut count) = (0f64, 0usize);
        for (bi, batch) in batches.into_iter().enumerate() {
            let inputs: Vec<&[u32]> = batch.iter().map(|&(u, a, e, _)| &ds.train[u as usize][a..e]).collect();
            let t = inputs.iter().map(|s| s.len()).max().unwrap_or(1);
            // Rows of the flattened B × T hidden states that have a target, and those targets.
            let (mut rows, mut targets) = (Vec::new(), Vec::new());
            for (r, &(u, a, e, first)) in batch.iter().enumerate() {
                for j in first..e - a {
                    rows.push((r * t + j) as u32);
                    targets.push(ds.train[u as usize][a + 1 + j]);
                }
            }
            let mut rng = rng_for(self.seed, 3, ((epoch as u64) << 32) | bi as u64);
            let x = self.tower.encode(&inputs, Some(&mut rng))?;
            let h = x
                .reshape((batch.len() * t, self.tower.cfg.dim))?
                .index_select(&Tensor::new(rows.as_slice(), &dev)?, 0)?;
            let logits = h.matmul(&self.tower.item_table()?.t()?)?;
            let loss = cross_entropy(&logits, &Tensor::new(targets.as_slice(), &dev)?)?;
            self.opt.backward_step(&loss)?;
            total += loss.to_scalar::<f32>()? as f64 * targets.len() as f64;
            count += targets.len();
        }
        Ok(Some(total / count.max(1) as f64))
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

    fn toy(n_items: usize, lens: &[usize]) -> Dataset {
        let items = (0..n_items).map(|i| ItemRow { raw_id: i.to_string(), info: Default::default() }).collect();
        let mut ds = Dataset::from_interactions("toy", lens.iter().map(|l| l.to_string()).collect(), items, &[]);
        for (u, &l) in lens.iter().enumerate() {
            ds.train[u] = (0..l).map(|j| ((u * 7 + j * 3) % n_items) as u32).collect();
            ds.valid[u] = ((u + 1) % n_items) as u32;
            ds.test[u] = ((u + 2) % n_items) as u32;
        }
        ds
    }

    #[test]
    fn batched_scores_equal_one_user_at_a_time() {
        // Padding and masks must make a user's scores independent of the batch it is in.
        let ds = toy(30, &[3, 12, 7, 25]);
        let cfg = SasRecConfig { max_len: 16, ..Default::default() };
        let m = SasRec::new(&cfg, 30, 3, &Device::Cpu).unwrap();
        let all = m.score(&ds, &[0, 1, 2, 3], Split::Test).unwrap();
        for u in 0..4u32 {
            let one = m.score(&ds, &[u], Split::Test).unwrap();
            for (a, b) in one.iter().zip(&all[u as usize * 30..(u as usize + 1) * 30]) {
                assert!((a - b).abs() < 1e-4, "user {u}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn strided_windows_train_every_target_once_with_long_context() {
        let ds = toy(30, &[1, 2, 9, 40, 57]);
        for (max_len, stride) in [(16, 0), (16, 1), (16, 5), (16, 16), (16, 40), (50, 7)] {
            let cfg = SasRecConfig { max_len, stride, ..Default::default() };
            let m = SasRec::new(&cfg, 30, 3, &Device::Cpu).unwrap();
            let eff = if stride == 0 { max_len } else { stride.min(max_len) };
            let mut seen: Vec<Vec<usize>> = ds.train.iter().map(|s| vec![0; s.len()]).collect();
            for (u, a, e, first) in m.tower.windows(&ds) {
                assert!(e - a <= max_len && first < e - a, "{max_len}/{stride}: window {a}..{e} from {first}");
                for j in first..e - a {
                    // Input position a + j predicts target a + j + 1 from a + j + 1 items before it.
                    seen[u as usize][a + j + 1] += 1;
                    assert!(j + 1 >= (a + j + 1).min(max_len - eff + 1), "{max_len}/{stride}: context {}", j + 1);
                }
            }
            for (u, s) in seen.iter().enumerate() {
                let want: Vec<usize> = (0..s.len()).map(|i| usize::from(i > 0)).collect();
                assert_eq!(s, &want, "{max_len}/{stride}: user {u}");
            }
        }
    }

    #[test]
    fn windows_cover_every_target_once_and_every_weight_learns() {
        let ds = toy(30, &[3, 40]);
        let cfg = SasRecConfig { max_len: 16, batch_size: 4, ..Default::default() };
        let mut m = SasRec::new(&cfg, 30, 3, &Device::Cpu).unwrap();
        let w = m.tower.windows(&ds);
        let covered: usize = w.iter().map(|&(_, a, e, f)| e - a - f).sum();
        assert_eq!(covered, 2 + 39);
        assert!(w.iter().all(|&(_, a, e, _)| e - a <= 16));
        let before = super::super::nn::named_values(&m.params.varmap);
        m.train_epoch(&ds, 0).unwrap();
        for ((name, a), (_, b)) in before.iter().zip(super::super::nn::named_values(&m.params.varmap)) {
            assert!(a != &b, "{name} did not change after a training epoch");
        }
    }
}
