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
use candle_nn::{AdamW, Linear};
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::nn::{attention_bias, dropout, dropout_mask, position_mask, LayerNorm, Params};
use super::Model;
use crate::data::{Dataset, Split};
use crate::eval::Scorer;
use crate::ops::softmax_last_dim;
use crate::rng::rng_for;

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

/// How items enter the tower (its inputs, and the item table that scores its outputs).
enum ItemSide {
    /// Trainable ID embeddings (`item_emb`, `(n_items + 1) × d`): row 0 is padding, item i is
    /// row i + 1.
    Ids(Tensor),
    /// No per-item parameters: fixed text vectors `(n_items + 1) × e` (row 0 is padding) through
    /// a trainable linear projection (`item_proj`), so the text alone must tell items apart.
    Text { table: Tensor, proj: Linear },
    /// ID embeddings plus a two-layer adaptor of fixed text vectors, `emb + W₂ ReLU(W₁ text)`
    /// (the augmented item vectors of the KAR baseline).
    Augmented { emb: Tensor, table: Tensor, l1: Linear, l2: Linear },
}

/// The SASRec transformer over item sequences (also the user tower of the CUREC reward model).
pub struct SasRecTower {
    pub cfg: SasRecConfig,
    pub n_items: usize,
    /// Each position attends to the positions before it (SASRec); `false`: to all (BERT4Rec).
    causal: bool,
    items: ItemSide,
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
        let opt = crate::rec::train::adamw(p.varmap.all_vars(), cfg.lr)?;
        Ok(SasRec { tower, seed, params: p, opt })
    }

    pub fn tower(&self) -> &SasRecTower {
        &self.tower
    }
}

impl SasRecTower {
    /// Register the tower's parameters in `p` (names as in SASRec checkpoints).
    pub fn new(cfg: &SasRecConfig, n_items: usize, p: &mut Params) -> anyhow::Result<Self> {
        let item_emb = p.normal("item_emb", &[n_items + 1, cfg.dim], INIT_STD)?;
        Self::with_items(cfg, n_items, ItemSide::Ids(item_emb), p)
    }

    /// A bidirectional tower (BERT4Rec) with one more input token, `[mask]`, whose id is
    /// `n_items` (it is not an item: [`Self::item_table`] leaves it out).
    pub fn new_masked(cfg: &SasRecConfig, n_items: usize, p: &mut Params) -> anyhow::Result<Self> {
        let item_emb = p.normal("item_emb", &[n_items + 2, cfg.dim], INIT_STD)?;
        let mut t = Self::with_items(cfg, n_items, ItemSide::Ids(item_emb), p)?;
        t.causal = false;
        Ok(t)
    }

    /// A tower without item-ID embeddings: item i enters (and is scored) as `item_proj · text[i]`,
    /// `text` being `n_items × e` fixed vectors.
    ///
    /// Each dimension of `text` is standardized over the items first (zero mean, unit variance):
    /// sentence embeddings share a large common direction (every reason of a template starts
    /// alike), and what tells items apart is small next to it.
    pub fn new_text(cfg: &SasRecConfig, text: &Tensor, p: &mut Params) -> anyhow::Result<Self> {
        let (n_items, e) = text.dims2()?;
        let mean = text.mean_keepdim(0)?;
        let centered = text.broadcast_sub(&mean)?;
        let std = (centered.sqr()?.mean_keepdim(0)? + 1e-12)?.sqrt()?;
        let text = centered.broadcast_div(&std)?;
        let table = Tensor::cat(&[&Tensor::zeros((1, e), text.dtype(), text.device())?, &text], 0)?;
        // Unit-variance inputs: N(0, 0.02²) weights give item vectors of SASRec's initial scale.
        let proj = p.linear_normal("item_proj", e, cfg.dim, INIT_STD / (e as f32).sqrt())?;
        Self::with_items(cfg, n_items, ItemSide::Text { table, proj }, p)
    }

    /// A tower whose items are ID embeddings plus an adaptor (`kar.*`, hidden width `hidden`) of
    /// the fixed text vectors `text` (`n_items × e`).
    pub fn new_augmented(cfg: &SasRecConfig, text: &Tensor, hidden: usize, p: &mut Params) -> anyhow::Result<Self> {
        let (n_items, e) = text.dims2()?;
        let emb = p.normal("item_emb", &[n_items + 1, cfg.dim], INIT_STD)?;
        let table = Tensor::cat(&[&Tensor::zeros((1, e), text.dtype(), text.device())?, text], 0)?;
        let l1 = p.linear("kar.item1", e, hidden)?;
        let l2 = p.linear_normal("kar.item2", hidden, cfg.dim, INIT_STD)?;
        Self::with_items(cfg, n_items, ItemSide::Augmented { emb, table, l1, l2 }, p)
    }

    fn with_items(cfg: &SasRecConfig, n_items: usize, items: ItemSide, p: &mut Params) -> anyhow::Result<Self> {
        anyhow::ensure!(
            cfg.dim.is_multiple_of(cfg.heads),
            "sasrec.dim = {} must be divisible by sasrec.heads = {}",
            cfg.dim,
            cfg.heads
        );
        anyhow::ensure!(cfg.max_len > 0 && cfg.batch_size > 0, "sasrec.max_len and sasrec.batch_size must be positive");
        let d = cfg.dim;
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
        Ok(SasRecTower { cfg: cfg.clone(), n_items, causal: true, items, pos_emb, emb_ln, blocks })
    }

    /// Hidden states `B × T × d` for right-padded sequences (T = longest sequence in the batch).
    pub fn encode(&self, seqs: &[&[u32]], mut rng: Option<&mut ChaCha8Rng>) -> candle_core::Result<Tensor> {
        let (mut x, _, mask, bias) = self.embed(seqs, rng.as_deref_mut())?;
        for blk in &self.blocks {
            x = self.block(blk, &x, &bias, &mask, rng.as_deref_mut())?;
        }
        Ok(x)
    }

    /// The hidden states `n × d` at `rows` of the flattened `B × T` output (row `r·T + j` is
    /// position j of sequence r), equal to [`encode`](Self::encode) followed by a row selection,
    /// dropout included. The last block computes queries, attention and feed-forward only where
    /// an output is wanted (keys and values everywhere): when training on one target per window
    /// or scoring from the last position, that is one position of T.
    pub fn encode_at(
        &self,
        seqs: &[&[u32]],
        rows: &[u32],
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        let (mut x, valid, mask, bias) = self.embed(seqs, rng.as_deref_mut())?;
        let (b, t) = (x.dim(0)?, x.dim(1)?);
        let Some((last, rest)) = self.blocks.split_last() else {
            return x.reshape((b * t, self.cfg.dim))?.index_select(&Tensor::new(rows, x.device())?, 0);
        };
        for blk in rest {
            x = self.block(blk, &x, &bias, &mask, rng.as_deref_mut())?;
        }
        self.block_at(last, &x, &valid, rows, rng)
    }

    /// Embeddings, layer norm and dropout of right-padded sequences: `B × T × d` with padding
    /// zeroed, which positions are valid, the `B × T × 1` mask of them and the attention bias.
    fn embed(
        &self,
        seqs: &[&[u32]],
        rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<(Tensor, Vec<Vec<bool>>, Tensor, Tensor)> {
        let dev = self.pos_emb.device();
        let (b, d) = (seqs.len(), self.cfg.dim);
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
        let bias = attention_bias(&valid, self.causal, dev)?;
        let x = self.item_rows()?.index_select(&ids, 0)?.reshape((b, t, d))?;
        let pos = self.pos_emb.narrow(0, 0, t)?;
        let x = self.emb_ln.forward(&x.broadcast_add(&pos)?)?;
        let x = dropout(&x, self.cfg.dropout, rng)?.broadcast_mul(&mask)?;
        Ok((x, valid, mask, bias))
    }

    /// One post-LN transformer block over every position: `B × T × d` in and out.
    fn block(
        &self,
        blk: &Block,
        x: &Tensor,
        bias: &Tensor,
        mask: &Tensor,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (h, p) = (self.cfg.heads, self.cfg.dropout);
        let dh = d / h;
        let split = |l: &Linear| -> candle_core::Result<Tensor> {
            l.forward(x)?.reshape((b, t, h, dh))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = (split(&blk.q)?, split(&blk.k)?, split(&blk.v)?);
        let q = (q / (dh as f64).sqrt())?;
        let att = q.matmul(&k.transpose(2, 3)?.contiguous()?)?.broadcast_add(bias)?;
        let att = dropout(&softmax_last_dim(&att)?, p, rng.as_deref_mut())?;
        let ctx = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        let a = dropout(&blk.o.forward(&ctx)?, p, rng.as_deref_mut())?;
        let x1 = blk.ln1.forward(&(x + a)?)?;
        let f = blk.ff2.forward(&blk.ff1.forward(&x1)?.relu()?)?;
        let f = dropout(&f, p, rng)?;
        blk.ln2.forward(&(x1 + f)?)?.broadcast_mul(mask)
    }

    /// [`block`](Self::block) evaluated only at `rows` (flattened `r·T + j`): `n × d` in the
    /// order of `rows`. Each sequence's wanted positions `lo..=hi` are covered by a run of m
    /// queries; sequences needing at most T/2 share the narrowest such m, the rest take all T.
    /// Dropout masks are drawn at full size, as `block` draws them, and the needed parts used.
    fn block_at(
        &self,
        blk: &Block,
        x: &Tensor,
        valid: &[Vec<bool>],
        rows: &[u32],
        rng: Option<&mut ChaCha8Rng>,
    ) -> candle_core::Result<Tensor> {
        let dev = x.device();
        let (b, t, d) = x.dims3()?;
        if rows.is_empty() {
            return Tensor::zeros((0, d), x.dtype(), dev);
        }
        let (h, p) = (self.cfg.heads, self.cfg.dropout);
        let dh = d / h;
        let masks = match rng {
            Some(rng) if p > 0.0 => Some([
                dropout_mask(b * h * t * t, p, rng),
                dropout_mask(b * t * d, p, rng),
                dropout_mask(b * t * d, p, rng),
            ]),
            _ => None,
        };
        // The span of wanted positions of each sequence.
        let mut span: Vec<Option<(usize, usize)>> = vec![None; b];
        for &row in rows {
            let (r, j) = (row as usize / t, row as usize % t);
            span[r] = Some(span[r].map_or((j, j), |(lo, hi)| (lo.min(j), hi.max(j))));
        }
        let width = |&(lo, hi): &(usize, usize)| hi - lo + 1;
        let narrow = span.iter().flatten().map(width).filter(|&w| 2 * w <= t).max();
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        if let Some(m) = narrow {
            groups.push((m, (0..b).filter(|&r| span[r].is_some_and(|s| 2 * width(&s) <= t)).collect()));
        }
        let wide: Vec<usize> = (0..b).filter(|&r| span[r].is_some_and(|s| 2 * width(&s) > t)).collect();
        if !wide.is_empty() {
            groups.push((t, wide));
        }
        // Where each (sequence, position) lands in the concatenated group outputs.
        let mut at = vec![u32::MAX; b * t];
        let (mut outs, mut base) = (Vec::new(), 0usize);
        for (m, members) in &groups {
            let (m, bg) = (*m, members.len());
            let offset: Vec<usize> = members.iter().map(|&r| span[r].expect("member").0.min(t - m)).collect();
            let xg = if bg == b {
                x.clone()
            } else {
                let idx: Vec<u32> = members.iter().map(|&r| r as u32).collect();
                x.index_select(&Tensor::new(idx.as_slice(), dev)?, 0)?
            };
            let split = |l: &Linear, n: usize, y: &Tensor| -> candle_core::Result<Tensor> {
                l.forward(y)?.reshape((bg, n, h, dh))?.transpose(1, 2)?.contiguous()
            };
            let (k, v) = (split(&blk.k, t, &xg)?, split(&blk.v, t, &xg)?);
            // (sequence, position) of each query, and its row in the full B × T layout.
            let mut full_rows = Vec::with_capacity(bg * m);
            let mut local_rows = Vec::with_capacity(bg * m);
            for (gi, (&r, &o)) in members.iter().zip(&offset).enumerate() {
                for j in o..o + m {
                    at[r * t + j] = (base + gi * m + j - o) as u32;
                    full_rows.push(r * t + j);
                    local_rows.push((gi * t + j) as u32);
                }
            }
            let xq = if m == t {
                xg.reshape((bg * t, d))?
            } else {
                xg.reshape((bg * t, d))?.index_select(&Tensor::new(local_rows.as_slice(), dev)?, 0)?
            };
            let q = (split(&blk.q, m, &xq.reshape((bg, m, d))?)? / (dh as f64).sqrt())?;
            let mut bias = vec![0f32; bg * m * t];
            for (gi, (&r, &o)) in members.iter().zip(&offset).enumerate() {
                for i in 0..m {
                    for key in 0..t {
                        if (self.causal && key > o + i) || !valid[r][key] {
                            bias[(gi * m + i) * t + key] = -1e9;
                        }
                    }
                }
            }
            let bias = Tensor::from_vec(bias, (bg, 1, m, t), dev)?;
            let att = q.matmul(&k.transpose(2, 3)?.contiguous()?)?.broadcast_add(&bias)?;
            let mut att = softmax_last_dim(&att)?;
            if let Some([m_att, _, _]) = &masks {
                let mut g = Vec::with_capacity(bg * h * m * t);
                for (&r, &o) in members.iter().zip(&offset) {
                    for hh in 0..h {
                        let start = ((r * h + hh) * t + o) * t;
                        g.extend_from_slice(&m_att[start..start + m * t]);
                    }
                }
                att = (att * Tensor::from_vec(g, (bg, h, m, t), dev)?)?;
            }
            let ctx = att.matmul(&v)?.transpose(1, 2)?.reshape((bg * m, d))?;
            let rows_of = |mask: &[f32]| -> candle_core::Result<Tensor> {
                let mut g = Vec::with_capacity(bg * m * d);
                for &fr in &full_rows {
                    g.extend_from_slice(&mask[fr * d..(fr + 1) * d]);
                }
                Tensor::from_vec(g, (bg * m, d), dev)
            };
            let mut a = blk.o.forward(&ctx)?;
            if let Some([_, m_o, _]) = &masks {
                a = (a * rows_of(m_o)?)?;
            }
            let x1 = blk.ln1.forward(&(xq + a)?)?;
            let mut f = blk.ff2.forward(&blk.ff1.forward(&x1)?.relu()?)?;
            if let Some([_, _, m_f]) = &masks {
                f = (f * rows_of(m_f)?)?;
            }
            let keep: Vec<f32> = full_rows.iter().map(|&fr| if valid[fr / t][fr % t] { 1.0 } else { 0.0 }).collect();
            let out = blk.ln2.forward(&(x1 + f)?)?.broadcast_mul(&Tensor::from_vec(keep, (bg * m, 1), dev)?)?;
            outs.push(out);
            base += bg * m;
        }
        let all = if outs.len() == 1 { outs.pop().expect("one group") } else { Tensor::cat(&outs, 0)? };
        let idx: Vec<u32> = rows.iter().map(|&row| at[row as usize]).collect();
        all.index_select(&Tensor::new(idx.as_slice(), dev)?, 0)
    }

    /// Every item's input vector with the padding row first: `(n_items + 1) × d`.
    fn item_rows(&self) -> candle_core::Result<Tensor> {
        match &self.items {
            ItemSide::Ids(t) => Ok(t.clone()),
            ItemSide::Text { table, proj } => proj.forward(table),
            ItemSide::Augmented { emb, table, l1, l2 } => emb + l2.forward(&l1.forward(table)?.relu()?)?,
        }
    }

    /// Item embeddings `n_items × d` (without the padding row).
    pub fn item_table(&self) -> candle_core::Result<Tensor> {
        self.item_rows()?.narrow(0, 1, self.n_items)
    }

    pub fn device(&self) -> &Device {
        self.pos_emb.device()
    }

    /// The hidden state at each sequence's last position, `B × d`.
    pub fn last_hidden(&self, seqs: &[&[u32]]) -> candle_core::Result<Tensor> {
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(1).clamp(1, self.cfg.max_len);
        let rows: Vec<u32> = seqs.iter().enumerate().map(|(r, s)| (r * t + s.len().clamp(1, t) - 1) as u32).collect();
        self.encode_at(seqs, &rows, None)
    }

    /// A batch of training windows as the tower takes it: the input sequences, the rows of the
    /// flattened `B × T` hidden states that have a target, and those targets.
    pub fn batch<'a>(ds: &'a Dataset, windows: &[(u32, usize, usize, usize)]) -> (Vec<&'a [u32]>, Vec<u32>, Vec<u32>) {
        let inputs: Vec<&[u32]> = windows.iter().map(|&(u, a, e, _)| &ds.train[u as usize][a..e]).collect();
        let t = inputs.iter().map(|s| s.len()).max().unwrap_or(1);
        let (mut rows, mut targets) = (Vec::new(), Vec::new());
        for (r, &(u, a, e, first)) in windows.iter().enumerate() {
            for j in first..e - a {
                rows.push((r * t + j) as u32);
                targets.push(ds.train[u as usize][a + 1 + j]);
            }
        }
        (inputs, rows, targets)
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
        let mut epoch_loss = super::EpochLoss::default();
        for (bi, batch) in batches.into_iter().enumerate() {
            let (inputs, rows, targets) = SasRecTower::batch(ds, batch);
            let mut rng = rng_for(self.seed, 3, ((epoch as u64) << 32) | bi as u64);
            let h = self.tower.encode_at(&inputs, &rows, Some(&mut rng))?;
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
    fn outputs_at_chosen_rows_equal_the_full_pass_with_dropout_and_gradients() {
        // encode_at must be encode followed by a row selection: same values, same dropout, same
        // gradients. Rows: a last position, a run of three, every position of one sequence (the
        // wide group), a lone early position, and a padding position (zero in the full pass).
        let ds = toy(30, &[3, 12, 7, 25, 16]);
        let cfg = SasRecConfig { max_len: 16, dropout: 0.3, ..Default::default() };
        let m = SasRec::new(&cfg, 30, 3, &Device::Cpu).unwrap();
        let seqs: Vec<&[u32]> = ds.train.iter().map(|s| &s[s.len().saturating_sub(16)..]).collect();
        let t = 16u32;
        let mut rows = vec![2, t + 9, t + 10, t + 11, 2 * t + 1, 4 * t + 15, 5];
        rows.extend(3 * t..4 * t);
        rows.push(t + 10);
        for train in [false, true] {
            let (mut r1, mut r2) = (rng_for(1, 2, 3), rng_for(1, 2, 3));
            let full = m.tower.encode(&seqs, train.then_some(&mut r1)).unwrap();
            let full = full
                .reshape((5 * 16, 64))
                .unwrap()
                .index_select(&Tensor::new(rows.as_slice(), &Device::Cpu).unwrap(), 0)
                .unwrap();
            let part = m.tower.encode_at(&seqs, &rows, train.then_some(&mut r2)).unwrap();
            let (a, b): (Vec<f32>, Vec<f32>) =
                (full.flatten_all().unwrap().to_vec1().unwrap(), part.flatten_all().unwrap().to_vec1().unwrap());
            assert_eq!(a.len(), b.len());
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!((x - y).abs() < 1e-5, "train {train}, value {i}: {x} vs {y}");
            }
            assert!(a[6 * 64..7 * 64].iter().all(|&x| x == 0.0), "padding position is zero");
            let w = Tensor::from_vec(
                (0..a.len()).map(|i| ((i * 37 % 11) as f32) - 5.0).collect::<Vec<_>>(),
                part.shape(),
                &Device::Cpu,
            )
            .unwrap();
            let g_full = (full * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g_part = (part * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for var in m.params.varmap.all_vars() {
                let (gf, gp) = (g_full.get(var.as_tensor()), g_part.get(var.as_tensor()));
                assert_eq!(gf.is_some(), gp.is_some());
                if let (Some(gf), Some(gp)) = (gf, gp) {
                    let (gf, gp): (Vec<f32>, Vec<f32>) =
                        (gf.flatten_all().unwrap().to_vec1().unwrap(), gp.flatten_all().unwrap().to_vec1().unwrap());
                    let scale = gf.iter().fold(1f32, |s, x| s.max(x.abs()));
                    for (x, y) in gf.iter().zip(&gp) {
                        assert!((x - y).abs() <= 1e-4 * scale, "train {train}: gradient {x} vs {y}");
                    }
                }
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
