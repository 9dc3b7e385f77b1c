//! The CUREC reward model (paper §4.3.2, Eq. 7–11): a SASRec user tower over item IDs, a matcher
//! between the user's pattern embedding and the item's reason embeddings, and a DIN head.
//!
//! For user u (at a position of the sequence) and item i:
//! - e_u: SASRec hidden state; e_i: item ID embedding (shared with the tower).
//! - s_ui (Eq. 8), by variant:
//!   - `attention`: multi-head attention, query W_q e_{p_u}, keys/values W_k E_{Q_i}, W_v E_{Q_i},
//!     output W_o; padding reasons are masked, so a list of one reason gets weight 1 and the
//!     result does not depend on the order of the list;
//!   - `ap` / `mlp` / `sa`: the reasons fused without looking at the user (mean of W_v E_{Q_i}; mean
//!     of a per-reason MLP; mean of one self-attention layer over the list), plus the projected
//!     pattern (the concatenation [fused reasons; pattern] followed by a linear layer);
//!   - `text`: like `ap` with the item's own description as its only "reason".
//!
//!   An item without reasons gets a learned vector s_∅. Reasons written for u itself are masked
//!   when scoring for u (its training interactions' reasons would otherwise leak the label:
//!   at test time the target's list never holds a reason of the user).
//! - DIN (Eq. 10): attention pooling of the last `din_history` history item embeddings w.r.t.
//!   the target, v_ui = Σ_j softmax_j(⟨W_a h_j, e_i⟩/√d) h_j, then
//!   ŷ_ui = ⟨e_u, e_i⟩ + w₂ᵀ ReLU(A e_u + B e_i + C s_ui + D v_ui + b₁) + b₂.
//!   (The first layer is applied term by term, so scoring every item costs O(N·(L + H)·d) per
//!   user instead of an MLP over N concatenations.)
//! - With `bilinear` (an extension, off by default): ŷ_ui also gets ⟨G e_u + R e_{p_u}, s_ui⟩, so
//!   the user's state and pattern meet the item's matched text directly in the score instead of
//!   only through DIN's ReLU layer (s_ui is then built per user, `U × N × d`).
//! - Loss (Eq. 11): softmax cross-entropy over all items, at every position of the train sequence.

use std::path::Path;

use candle_core::{Device, Module, Tensor};
use candle_nn::{AdamW, Linear, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::nn::{rng_for, Params};
use super::sasrec::{SasRecConfig, SasRecTower};
use super::Model;
use crate::data::{Dataset, Split};
use crate::eval::Scorer;
use crate::ops::softmax_last_dim;

const INIT_STD: f32 = 0.02;
const NEG: f32 = -1e9;

/// How s_ui is built (paper Table 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Multi-head attention from the pattern over the reasons (CUREC).
    Attention,
    /// Raw item descriptions instead of reasons, fused with the pattern.
    Text,
    /// Average pooling of the reasons, concatenated with the pattern.
    Ap,
    /// Per-reason MLP, then average pooling, concatenated with the pattern.
    Mlp,
    /// Self-attention over the reasons, then average pooling, concatenated with the pattern.
    Sa,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Attention => "attention",
            Variant::Text => "text",
            Variant::Ap => "ap",
            Variant::Mlp => "mlp",
            Variant::Sa => "sa",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CurecConfig {
    pub variant: Variant,
    /// `minilm`, a BERT directory, or `llm:<model>`.
    pub encoder: String,
    /// Most recent reasons kept per item (L).
    pub reasons_per_item: usize,
    /// Heads of the pattern→reason attention.
    pub heads: usize,
    /// History items pooled by DIN's target attention.
    pub din_history: usize,
    /// Hidden width of the DIN head.
    pub hidden: usize,
    /// Target positions per optimisation step (bounds memory: positions × items × hidden floats).
    pub positions_per_batch: usize,
    /// Mask the user's own reasons when scoring for that user.
    pub mask_own_reasons: bool,
    /// Sampled softmax for large catalogues: the batch's targets plus this many uniformly drawn
    /// items per batch (0 = softmax over all items, the paper's Eq. 11).
    pub sampled_negatives: usize,
    /// Features directory from `curec features` (the CLI's `--features` sets it).
    pub features: Option<std::path::PathBuf>,
    /// Train on each user's most recent N targets per epoch (the input still shows up to
    /// `sasrec.max_len` items before each); 0 = every target of the train sequence.
    pub positions_per_user: usize,
    /// Start the user tower and item embeddings from a trained SASRec checkpoint
    /// (`<sasrec run>/model.safetensors`); the other weights start fresh. With `--seeds`, a
    /// `{seed}` in the path becomes each run's seed (`<sasrec>/seed-{seed}/model.safetensors`).
    pub init_tower: Option<std::path::PathBuf>,
    /// With `init_tower`: keep the tower and item embeddings fixed and train the matcher and the
    /// DIN head only.
    pub freeze_tower: bool,
    /// Trainable item-ID embeddings (the CUREC model). `false` is the text-only setting of the
    /// controls: every item enters the user tower, DIN and the output layer as a projection of a
    /// fixed text vector, the mean of its bank list (its description for `text`, its pooled
    /// reasons otherwise; zero without any), so the text channel alone must tell items apart.
    pub ids: bool,
    /// Add the bilinear term ⟨G e_u + R e_{p_u}, s_ui⟩ to the score (not in the paper: a fusion in
    /// which the text meets the user's state and pattern directly, for the with-IDs controls).
    pub bilinear: bool,
    /// Variants `curec run` trains, each into `<train.out>/curec-<variant>`.
    pub variants: Vec<Variant>,
    pub max_epochs: usize,
    /// Stop after this many epochs without a better validation NDCG@10.
    pub patience: usize,
}

impl Default for CurecConfig {
    fn default() -> Self {
        Self {
            variant: Variant::Attention,
            encoder: "minilm".into(),
            reasons_per_item: 20,
            heads: 2,
            din_history: 10,
            hidden: 32,
            positions_per_batch: 1024,
            mask_own_reasons: true,
            sampled_negatives: 0,
            features: None,
            positions_per_user: 0,
            init_tower: None,
            freeze_tower: true,
            ids: true,
            bilinear: false,
            variants: vec![Variant::Attention],
            max_epochs: 100,
            patience: 5,
        }
    }
}

/// Text features in embedding form: one pattern vector per user, a reason list per item.
#[derive(Debug, Clone)]
pub struct FeatureBank {
    /// Encoder dimension.
    pub dim: usize,
    /// `n_users × dim`; zero for users without a pattern.
    pub patterns: Vec<f32>,
    pub has_pattern: Vec<bool>,
    /// Reason vectors, `n_reasons × dim`.
    pub reasons: Vec<f32>,
    /// Reason texts (the explanation), one per reason row.
    pub texts: Vec<String>,
    /// Per item: (reason row, author user) oldest first; at most L.
    pub lists: Vec<Vec<(u32, u32)>>,
}

impl FeatureBank {
    pub fn n_reasons(&self) -> usize {
        self.reasons.len() / self.dim.max(1)
    }
    pub fn max_list(&self) -> usize {
        self.lists.iter().map(Vec::len).max().unwrap_or(0).max(1)
    }

    /// Per item, the mean of its list's vectors (zero for an empty list): `n_items × dim`.
    pub fn pooled(&self) -> Vec<f32> {
        let d = self.dim;
        let mut out = vec![0f32; self.lists.len() * d];
        for (i, list) in self.lists.iter().enumerate() {
            let row = &mut out[i * d..(i + 1) * d];
            for &(r, _) in list {
                for (o, v) in row.iter_mut().zip(&self.reasons[r as usize * d..(r as usize + 1) * d]) {
                    *o += v;
                }
            }
            let n = list.len().max(1) as f32;
            row.iter_mut().for_each(|o| *o /= n);
        }
        out
    }
}

struct Matcher {
    q: Linear,
    /// Keys: the attention matcher only.
    k: Option<Linear>,
    v: Linear,
    /// Output projection: the attention matcher only.
    o: Option<Linear>,
    /// Fusion variants: per-reason MLP (`mlp`) or self-attention (`sa`) layers.
    mlp: Option<(Linear, Linear)>,
    sa: Option<(Linear, Linear, Linear)>,
    empty: Tensor,
}

pub struct Curec {
    cfg: CurecConfig,
    tower: SasRecTower,
    seed: u64,
    params: Params,
    matcher: Matcher,
    w_att: Linear,
    a: Linear,
    b: Linear,
    c: Linear,
    dd: Linear,
    w2: Linear,
    /// `bilinear`: G (`d × d`, applied to e_u) and R (`e × d`, applied to the pattern vector).
    bil: Option<(Tensor, Tensor)>,
    bank: FeatureBank,
    /// `(n_reasons + 1) × enc_dim`, last row zero (padding).
    reasons_t: Tensor,
    patterns_t: Tensor,
    opt: AdamW,
    /// Reason keys/values for scoring, cleared whenever the weights or the bank change.
    inference: std::sync::Mutex<Option<std::sync::Arc<(Slots, ReasonSide, Tensor)>>>,
}

/// Set every variable of `varmap` that `path` holds under the same name and shape; at least the
/// item embeddings must be there.
fn load_matching(varmap: &candle_nn::VarMap, path: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("curec.init_tower {}: cannot load", path.display()))?;
    anyhow::ensure!(
        tensors.contains_key("item_emb"),
        "curec.init_tower {}: not a SASRec checkpoint (no item_emb)",
        path.display()
    );
    let data = varmap.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        if let Some(t) = tensors.get(name) {
            anyhow::ensure!(
                t.dims() == var.dims(),
                "curec.init_tower {}: {name} has shape {:?}, the model needs {:?} (same dataset and sasrec config?)",
                path.display(),
                t.dims(),
                var.dims()
            );
            var.set(&t.to_device(var.device())?)?;
        }
    }
    Ok(())
}

/// Keys and values of every reason slot (see [`Curec::reason_side`]).
struct ReasonSide {
    k: Option<Tensor>,
    v: Tensor,
    /// The values through `W_o` (per head) and `C`: `N × L × hidden` per head (attention) or
    /// one (pooling). User-independent, so scoring computes them once per set of weights;
    /// training leaves them `None` and [`Curec::matching_for`] projects per batch.
    z: Option<Vec<Tensor>>,
}

/// What [`Curec::matching`] gives the head.
struct Matched {
    /// C·s_ui + b_c, `U × N × hidden`.
    c: Tensor,
    /// Matching weights `U × N × L` (asked for only).
    weights: Option<Tensor>,
    /// `bilinear`: s_ui (`U × N × d`) and R e_{p_u} (`U × d`).
    bilinear: Option<(Tensor, Tensor)>,
}

/// Per-batch reason slots: which reason row fills slot l of item n, and who wrote it.
struct Slots {
    idx: Tensor,
    /// `N × L`: 1 for a real reason, 0 for padding.
    base: Vec<f32>,
    /// Slots written by each user.
    by_author: std::collections::HashMap<u32, Vec<usize>>,
    l: usize,
    /// Items covered, in slot order (`None`: all items in id order).
    items: Option<Vec<u32>>,
    n: usize,
}

impl Curec {
    pub fn new(
        cfg: &CurecConfig,
        tower_cfg: &SasRecConfig,
        n_items: usize,
        bank: FeatureBank,
        seed: u64,
        device: &Device,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(bank.lists.len() == n_items, "feature bank has {} items, dataset {n_items}", bank.lists.len());
        anyhow::ensure!(
            tower_cfg.dim.is_multiple_of(cfg.heads),
            "curec.heads = {} must divide sasrec.dim = {}",
            cfg.heads,
            tower_cfg.dim
        );
        anyhow::ensure!(
            cfg.positions_per_batch > 0 && cfg.din_history > 0,
            "curec.positions_per_batch and curec.din_history must be positive"
        );
        anyhow::ensure!(
            cfg.ids || cfg.init_tower.is_none(),
            "curec.init_tower: a SASRec checkpoint holds item-ID embeddings, which curec.ids = false has none of; unset one of them"
        );
        let mut p = Params::new(seed, device);
        let tower = if cfg.ids {
            SasRecTower::new(tower_cfg, n_items, &mut p)?
        } else {
            SasRecTower::new_text(tower_cfg, &Tensor::from_vec(bank.pooled(), (n_items, bank.dim), device)?, &mut p)?
        };
        let (d, e, h) = (tower_cfg.dim, bank.dim, cfg.hidden);
        let matcher = Matcher {
            q: p.linear("match.q", e, d)?,
            k: if cfg.variant == Variant::Attention { Some(p.linear("match.k", e, d)?) } else { None },
            v: p.linear("match.v", e, d)?,
            o: if cfg.variant == Variant::Attention { Some(p.linear("match.o", d, d)?) } else { None },
            mlp: if cfg.variant == Variant::Mlp {
                Some((p.linear("match.mlp1", d, d)?, p.linear("match.mlp2", d, d)?))
            } else {
                None
            },
            sa: if cfg.variant == Variant::Sa {
                Some((p.linear("match.sa_q", d, d)?, p.linear("match.sa_k", d, d)?, p.linear("match.sa_v", d, d)?))
            } else {
                None
            },
            empty: p.normal("match.empty", &[d], INIT_STD)?,
        };
        let w_att = p.linear_normal("din.att", d, d, INIT_STD)?;
        let a = p.linear("din.a", d, h)?;
        let b = p.linear("din.b", d, h)?;
        let c = p.linear("din.c", d, h)?;
        let dd = p.linear("din.d", d, h)?;
        let w2 = p.linear("din.out", h, 1)?;
        // Created last so that every other weight starts as without it.
        let bil = if cfg.bilinear {
            Some((p.normal("din.bil_u", &[d, d], INIT_STD)?, p.normal("din.bil_p", &[e, d], INIT_STD)?))
        } else {
            None
        };
        let mut rt = bank.reasons.clone();
        rt.extend(std::iter::repeat_n(0f32, e));
        let reasons_t = Tensor::from_vec(rt, (bank.n_reasons() + 1, e), device)?;
        let patterns_t = Tensor::from_vec(bank.patterns.clone(), (bank.patterns.len() / e.max(1), e), device)?;
        let mut trainable = p.varmap.all_vars();
        if let Some(path) = &cfg.init_tower {
            load_matching(&p.varmap, path)?;
            if cfg.freeze_tower {
                let data = p.varmap.data().lock().expect("varmap lock");
                trainable = data
                    .iter()
                    .filter(|(name, _)| name.starts_with("match.") || name.starts_with("din."))
                    .map(|(_, v)| v.clone())
                    .collect();
            }
        }
        let opt = AdamW::new(trainable, ParamsAdamW { lr: tower_cfg.lr, weight_decay: 0.0, ..Default::default() })?;
        Ok(Self {
            cfg: cfg.clone(),
            tower,
            seed,
            params: p,
            matcher,
            w_att,
            a,
            b,
            c,
            dd,
            w2,
            bil,
            bank,
            reasons_t,
            patterns_t,
            opt,
            inference: std::sync::Mutex::new(None),
        })
    }

    /// Items the tower has embeddings for.
    pub fn n_items(&self) -> usize {
        self.tower.n_items
    }

    pub fn bank(&self) -> &FeatureBank {
        &self.bank
    }

    /// Reason slots of all items, or of `items` only (sampled softmax).
    fn slots(&self, dev: &Device, items: Option<Vec<u32>>) -> candle_core::Result<Slots> {
        let n = items.as_ref().map_or(self.tower.n_items, Vec::len);
        let l = self.bank.max_list();
        let pad = self.bank.n_reasons() as u32;
        let mut idx = vec![pad; n * l];
        let mut base = vec![0f32; n * l];
        let mut by_author: std::collections::HashMap<u32, Vec<usize>> = std::collections::HashMap::new();
        for i in 0..n {
            let item = items.as_ref().map_or(i, |v| v[i] as usize);
            for (j, &(r, u)) in self.bank.lists[item].iter().enumerate() {
                idx[i * l + j] = r;
                base[i * l + j] = 1.0;
                by_author.entry(u).or_default().push(i * l + j);
            }
        }
        Ok(Slots { idx: Tensor::from_vec(idx, n * l, dev)?, base, by_author, l, items, n })
    }

    /// The user-independent side of the matcher: keys `(N·L) × d` (attention only) and values
    /// `N × L × d` of every reason slot.
    fn reason_side(&self, slots: &Slots) -> candle_core::Result<ReasonSide> {
        self.reason_side_of(&self.reasons_t, slots)
    }

    /// [`Self::reason_side`] over the reason vectors `table` (`slots.idx` indexes its rows).
    fn reason_side_of(&self, table: &Tensor, slots: &Slots) -> candle_core::Result<ReasonSide> {
        let dev = self.reasons_t.device();
        let (n, l, d) = (slots.n, slots.l, self.tower.cfg.dim);
        let m = &self.matcher;
        let reasons = table.index_select(&slots.idx, 0)?; // (N·L) × e
        let base = m.v.forward(&reasons)?; // (N·L) × d
        let (k, x) = match (&m.k, &m.mlp, &m.sa) {
            (Some(k), _, _) => (Some(k.forward(&reasons)?), base),
            (_, Some((l1, l2)), _) => (None, (l2.forward(&l1.forward(&base)?.relu()?)? + &base)?),
            (_, _, Some((sq, sk, sv))) => {
                let x = base.reshape((n, l, d))?;
                let (qs, ks, vs) = (sq.forward(&x)?, sk.forward(&x)?, sv.forward(&x)?);
                let mask: Vec<f32> = slots.base.iter().map(|&v| if v > 0.0 { 0.0 } else { NEG }).collect();
                let mask = Tensor::from_vec(mask, (n, 1, l), dev)?;
                let att = (qs.matmul(&ks.transpose(1, 2)?.contiguous()?)? / (d as f64).sqrt())?;
                let att = softmax_last_dim(&att.broadcast_add(&mask)?)?;
                (None, (att.matmul(&vs)? + x)?.reshape((n * l, d))?)
            }
            _ => (None, base),
        };
        Ok(ReasonSide { k, v: x.reshape((n, l, d))?.contiguous()?, z: None })
    }

    /// C·s_ui + b_c for `users` × all items (`U × N × hidden`: the DIN head's first layer applied
    /// to the matching representation, folded into the reason values so that s_ui itself is never
    /// built unless `bilinear` needs it), and, when `want_weights`, the attention (or pooling)
    /// weights `U × N × L` averaged over heads (the explanation; training and plain scoring skip
    /// them).
    fn matching(
        &self,
        users: &[u32],
        slots: &Slots,
        side: &ReasonSide,
        want_weights: bool,
    ) -> candle_core::Result<Matched> {
        let uid = Tensor::new(users, self.reasons_t.device())?;
        let pat = self.patterns_t.index_select(&uid, 0)?; // U × e
        self.matching_for(&pat, users, slots, side, want_weights)
    }

    /// [`Self::matching`] for pattern vectors `pat` (`U × e`); `users` name their authors for
    /// masking own reasons.
    fn matching_for(
        &self,
        pat: &Tensor,
        users: &[u32],
        slots: &Slots,
        side: &ReasonSide,
        want_weights: bool,
    ) -> candle_core::Result<Matched> {
        let dev = self.reasons_t.device();
        let (n, l, d) = (slots.n, slots.l, self.tower.cfg.dim);
        let hid = self.cfg.hidden;
        let u = users.len();
        let m = &self.matcher;
        let q = m.q.forward(pat)?; // U × d
                                   // Allowed slots per (user, item): real and, if configured, not written by the user.
        let mut allowed = Vec::with_capacity(u * n * l);
        for &user in users {
            let start = allowed.len();
            allowed.extend_from_slice(&slots.base);
            if self.cfg.mask_own_reasons {
                for &sl in slots.by_author.get(&user).map_or(&[][..], Vec::as_slice) {
                    allowed[start + sl] = 0.0;
                }
            }
        }
        let any: Vec<f32> = allowed.chunks(l).map(|c| if c.iter().any(|&a| a > 0.0) { 1.0 } else { 0.0 }).collect();
        let allowed = Tensor::from_vec(allowed, (u, n, l), dev)?;
        let any = Tensor::from_vec(any, (u, n, 1), dev)?;
        let cw = self.c.weight(); // hid × d
                                  // The values through W_o and C: kept with the inference side, else projected here.
        let computed;
        let zs: &[Tensor] = match &side.z {
            Some(z) => z,
            None => {
                computed = self.projected_values(side, n, l)?;
                &computed
            }
        };
        let (weights, values, full) = match &side.k {
            Some(k) => {
                let h = self.cfg.heads;
                let dh = d / h;
                let o = m.o.as_ref().expect("attention has an output projection");
                let bias = ((&allowed - 1.0)? * (-NEG as f64))?; // 0 allowed, −1e9 not
                let mut ws = Vec::with_capacity(if want_weights { h } else { 0 });
                let mut heads_out = Vec::with_capacity(if self.bil.is_some() { h } else { 0 });
                let mut total: Option<Tensor> = None;
                for (head, zh) in zs.iter().enumerate() {
                    let qh = q.narrow(1, head * dh, dh)?.contiguous()?; // U × dh
                    let kh = k.narrow(1, head * dh, dh)?.contiguous()?; // (N·L) × dh
                    let logits = (qh.matmul(&kh.t()?)? / (dh as f64).sqrt())?.reshape((u, n, l))?;
                    let w = softmax_last_dim(&logits.broadcast_add(&bias)?)?; // U × N × L
                    let wt = w.transpose(0, 1)?.contiguous()?; // N × U × L
                    if self.bil.is_some() {
                        // N × U × dh
                        heads_out.push(wt.matmul(&side.v.narrow(2, head * dh, dh)?.contiguous()?)?);
                    }
                    let out = wt.matmul(zh)?; // N × U × hid
                    total = Some(match total {
                        Some(t) => (t + out)?,
                        None => out,
                    });
                    if want_weights {
                        ws.push(w);
                    }
                }
                let ob = o.bias().expect("linear with bias").unsqueeze(0)?.matmul(&cw.t()?)?; // 1 × hid
                let vals = total.expect("at least one head").transpose(0, 1)?.broadcast_add(&ob.unsqueeze(0)?)?;
                let w = if want_weights { Some((Tensor::stack(&ws, 0)?.sum(0)? / h as f64)?) } else { None };
                // s_ui itself (`U × N × d`) for the bilinear term: the heads through W_o.
                let full = if self.bil.is_some() {
                    let x = Tensor::cat(&heads_out, 2)?.reshape((n * u, d))?;
                    Some(o.forward(&x)?.reshape((n, u, d))?.transpose(0, 1)?.contiguous()?)
                } else {
                    None
                };
                (w, vals, full)
            }
            None => {
                // Uniform weights over the allowed reasons.
                let count = allowed.sum_keepdim(2)?.clamp(1.0, f64::MAX)?;
                let w = allowed.broadcast_div(&count)?;
                let wt = w.transpose(0, 1)?.contiguous()?; // N × U × L
                let pooled = wt.matmul(&zs[0])?.transpose(0, 1)?; // U × N × hid
                                                                  // The pooled values themselves (`U × N × d`) for the bilinear term.
                let full = match self.bil {
                    Some(_) => Some(wt.matmul(&side.v)?.transpose(0, 1)?.contiguous()?),
                    None => None,
                };
                (want_weights.then_some(w), pooled, full)
            }
        };
        // Items with no allowed reason: s_∅ (through C here, as is for the bilinear term).
        let none = (1.0 - &any)?;
        let or_empty = |x: &Tensor, empty: &Tensor| x.broadcast_mul(&any)? + none.broadcast_mul(empty)?;
        let c = or_empty(&values, &m.empty.unsqueeze(0)?.matmul(&cw.t()?)?.reshape((1, 1, hid))?)?;
        // Fusion variants: [fused reasons; pattern] → linear = fused part + projected pattern.
        let c = if self.cfg.variant == Variant::Attention {
            c
        } else {
            c.broadcast_add(&q.matmul(&cw.t()?)?.unsqueeze(1)?)?
        };
        let c = c.broadcast_add(&self.c.bias().expect("linear with bias").reshape((1, 1, hid))?)?;
        let bilinear = match (full, &self.bil) {
            (Some(full), Some((_, r))) => {
                let s = or_empty(&full, &m.empty.reshape((1, 1, d))?)?;
                // The fusion variants' s_ui: [fused reasons; pattern] through a linear layer.
                let s = if self.cfg.variant == Variant::Attention { s } else { s.broadcast_add(&q.unsqueeze(1)?)? };
                Some((s, pat.matmul(r)?))
            }
            _ => None,
        };
        Ok(Matched { c, weights, bilinear })
    }

    /// The reason values through the output projection and the DIN head's matching weights
    /// `C`: per head `N × L × hidden` (`W_o`'s slice of the head, then `C`) with attention,
    /// one `N × L × hidden` (`C` alone) with pooling.
    fn projected_values(&self, side: &ReasonSide, n: usize, l: usize) -> candle_core::Result<Vec<Tensor>> {
        let d = self.tower.cfg.dim;
        let hid = self.cfg.hidden;
        let cw = self.c.weight(); // hid × d
        match &side.k {
            Some(_) => {
                let h = self.cfg.heads;
                let dh = d / h;
                let o = self.matcher.o.as_ref().expect("attention has an output projection");
                (0..h)
                    .map(|head| {
                        let mh = o.weight().narrow(1, head * dh, dh)?.t()?.matmul(&cw.t()?)?; // dh × hid
                        side.v.narrow(2, head * dh, dh)?.reshape((n * l, dh))?.matmul(&mh)?.reshape((n, l, hid))
                    })
                    .collect()
            }
            None => Ok(vec![side.v.reshape((n * l, d))?.matmul(&cw.t()?)?.reshape((n, l, hid))?]),
        }
    }

    /// Slots, reason side and the DIN head's item part (`1 × N × hidden`) for scoring, computed once
    /// per set of weights and bank.
    fn inference_side(&self) -> candle_core::Result<std::sync::Arc<(Slots, ReasonSide, Tensor)>> {
        let mut cache = self.inference.lock().expect("inference cache lock");
        if let Some(c) = cache.as_ref() {
            return Ok(c.clone());
        }
        let slots = self.slots(self.reasons_t.device(), None)?;
        let side = self.reason_side(&slots)?;
        let v = side.v.detach();
        let mut side = ReasonSide { k: side.k.map(|k| k.detach()), v, z: None };
        side.z = Some(self.projected_values(&side, slots.n, slots.l)?.iter().map(Tensor::detach).collect());
        let b_items = self.b.forward(&self.tower.item_table()?)?.unsqueeze(0)?.detach(); // 1 × N × hid
        let c = std::sync::Arc::new((slots, side, b_items));
        *cache = Some(c.clone());
        Ok(c)
    }

    /// Scores `P × N` for positions with hidden states `eu` (`P × d`), DIN histories `hist`
    /// (item ids, oldest first, non-empty), `slot[p]` = the row of the position's user in the
    /// matching `m` from [`Self::matching`].
    fn head(
        &self,
        eu: &Tensor,
        hist: &[Vec<u32>],
        slot: &[u32],
        m: &Matched,
        subset: Option<&[u32]>,
        fixed_items: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let s = &m.c;
        let dev = eu.device();
        let (p, d) = eu.dims2()?;
        let table = self.tower.item_table()?;
        let items = match subset {
            Some(ids) => table.index_select(&Tensor::new(ids, dev)?, 0)?,
            None => table.clone(),
        }; // N × d (N = the subset's size)
           // The item side's part of the DIN head (user-independent): kept with the inference side.
        let b_part = match (subset, fixed_items) {
            (None, Some(b)) => b.clone(),
            _ => self.b.forward(&items)?.unsqueeze(0)?, // 1 × N × hid
        };
        let n = items.dim(0)?;
        let hh = hist.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let mut ids = vec![0u32; p * hh];
        let mut bias = vec![NEG; p * hh];
        for (r, h) in hist.iter().enumerate() {
            for (j, &it) in h.iter().enumerate() {
                ids[r * hh + j] = it;
                bias[r * hh + j] = 0.0;
            }
        }
        let hv = table.index_select(&Tensor::from_vec(ids, p * hh, dev)?, 0)?; // (P·H) × d
        let logits = (self.w_att.forward(&hv)?.matmul(&items.t()?)? / (d as f64).sqrt())?.reshape((p, hh, n))?;
        let logits = logits.broadcast_add(&Tensor::from_vec(bias, (p, hh, 1), dev)?)?;
        let att = softmax_last_dim(&logits.transpose(1, 2)?.contiguous()?)?; // P × N × H
        let g = self.dd.forward(&hv)?.reshape((p, hh, self.cfg.hidden))?; // P × H × hid
        let v_part = att.matmul(&g)?; // P × N × hid
        let c_part = s.contiguous()?.index_select(&Tensor::new(slot, dev)?, 0)?; // P × N × hid
        let a_part = self.a.forward(eu)?.unsqueeze(1)?; // P × 1 × hid
        let pre = (v_part + c_part)?.broadcast_add(&a_part)?.broadcast_add(&b_part)?.relu()?;
        let mlp = self.w2.forward(&pre)?.squeeze(2)?; // P × N
        let scores = (mlp + eu.matmul(&items.t()?)?)?;
        match (&m.bilinear, &self.bil) {
            (Some((full, rp)), Some((g, _))) => {
                // ⟨G e_u + R e_{p_u}, s_ui⟩ per position.
                let gu = (eu.matmul(g)? + rp.index_select(&Tensor::new(slot, dev)?, 0)?)?; // P × d
                scores + per_user_dot(full, &gu, slot)?
            }
            _ => Ok(scores),
        }
    }

    fn din_history(&self, seq: &[u32]) -> Vec<u32> {
        seq[seq.len().saturating_sub(self.cfg.din_history)..].to_vec()
    }

    /// Scores of all items for `users` after `histories`, with the per-item reason weights.
    pub fn score_with_weights(&self, users: &[u32], histories: &[Vec<u32>]) -> anyhow::Result<(Tensor, Tensor)> {
        let (scores, w) = self.score_all(users, histories, true)?;
        Ok((scores, w.expect("weights were asked for")))
    }

    fn score_all(
        &self,
        users: &[u32],
        histories: &[Vec<u32>],
        want_weights: bool,
    ) -> anyhow::Result<(Tensor, Option<Tensor>)> {
        let eu = self.user_states(histories)?;
        self.score_states(users, &eu, histories, want_weights)
    }

    /// The user tower's state after each history (`B × d`, its last `max_len` items): the part
    /// of scoring that depends on the history alone, so a service can keep it per user.
    pub fn user_states(&self, histories: &[Vec<u32>]) -> anyhow::Result<Tensor> {
        let max_len = self.tower.cfg.max_len;
        let refs: Vec<&[u32]> = histories.iter().map(|h| &h[h.len().saturating_sub(max_len)..]).collect();
        Ok(self.tower.last_hidden(&refs)?)
    }

    /// Scores of all items (`U × N`) for `users` whose tower states are `eu` (from
    /// [`Self::user_states`] of the same `histories`), with the per-item reason weights
    /// (`U × N × L`) when `want_weights`.
    pub fn score_states(
        &self,
        users: &[u32],
        eu: &Tensor,
        histories: &[Vec<u32>],
        want_weights: bool,
    ) -> anyhow::Result<(Tensor, Option<Tensor>)> {
        let side = self.inference_side()?;
        let m = self.matching(users, &side.0, &side.1, want_weights)?;
        let hist: Vec<Vec<u32>> = histories.iter().map(|h| self.din_history(h)).collect();
        let slot: Vec<u32> = (0..users.len() as u32).collect();
        Ok((self.head(eu, &hist, &slot, &m, None, Some(&side.2))?, m.weights))
    }

    /// Scores ŷ_ui of one (user, item) under each of several candidate reason lists (paper Eq.
    /// 12: the reward of a generated reason is the score with it appended to Q_i). `pattern` is
    /// the user's encoded pattern (zeros for none), `history` the items before the interaction,
    /// each list holds encoded reasons (any length; an empty list scores with s_∅). Nothing is
    /// masked: the candidate is the user's own reason on purpose.
    pub fn score_lists(
        &self,
        history: &[u32],
        pattern: &[f32],
        item: u32,
        lists: &[Vec<Vec<f32>>],
    ) -> anyhow::Result<Vec<f32>> {
        let dev = self.reasons_t.device().clone();
        let e = self.bank.dim;
        anyhow::ensure!(pattern.len() == e, "pattern vector has {} dims, the encoder {e}", pattern.len());
        anyhow::ensure!(!history.is_empty(), "scoring needs at least one history item");
        let n = lists.len();
        let l = lists.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut rows: Vec<f32> = Vec::with_capacity((n * l + 1) * e);
        let pad = (n * l) as u32;
        let mut idx = vec![pad; n * l];
        let mut base = vec![0f32; n * l];
        for (i, list) in lists.iter().enumerate() {
            for (j, v) in list.iter().enumerate() {
                anyhow::ensure!(v.len() == e, "reason vector has {} dims, the encoder {e}", v.len());
                idx[i * l + j] = (rows.len() / e) as u32;
                base[i * l + j] = 1.0;
                rows.extend_from_slice(v);
            }
        }
        let used = rows.len() / e;
        rows.resize((used + 1) * e, 0.0);
        for x in idx.iter_mut().filter(|x| **x == pad) {
            *x = used as u32;
        }
        let table = Tensor::from_vec(rows, (used + 1, e), &dev)?;
        let slots = Slots {
            idx: Tensor::from_vec(idx, n * l, &dev)?,
            base,
            by_author: Default::default(),
            l,
            items: Some(vec![item; n]),
            n,
        };
        let side = self.reason_side_of(&table, &slots)?;
        let pat = Tensor::from_vec(pattern.to_vec(), (1, e), &dev)?;
        let m = self.matching_for(&pat, &[u32::MAX], &slots, &side, false)?;
        let max_len = self.tower.cfg.max_len;
        let window = &history[history.len().saturating_sub(max_len)..];
        let eu = self.tower.last_hidden(&[window])?;
        let hist = vec![self.din_history(history)];
        let scores = self.head(&eu, &hist, &[0], &m, Some(&vec![item; n]), None)?;
        Ok(scores.flatten_all()?.to_vec1()?)
    }

    /// Windows (user, start, end, first target position in the window).
    fn windows(&self, ds: &Dataset) -> Vec<(u32, usize, usize, usize)> {
        let k = self.cfg.positions_per_user;
        if k == 0 {
            return self.tower.windows(ds);
        }
        let l = self.tower.cfg.max_len;
        ds.train
            .iter()
            .enumerate()
            .filter(|(_, s)| s.len() >= 2)
            .map(|(u, s)| {
                let e = s.len() - 1;
                let a = e.saturating_sub(l);
                (u as u32, a, e, (e - a).saturating_sub(k))
            })
            .collect()
    }

    /// Batches of windows with at most `positions_per_batch` targets each.
    fn batches(&self, ds: &Dataset, epoch: usize) -> Vec<Vec<(u32, usize, usize, usize)>> {
        let mut windows = self.windows(ds);
        let mut rng = rng_for(self.seed, 12, epoch as u64);
        windows.shuffle(&mut rng);
        let mut out: Vec<Vec<(u32, usize, usize, usize)>> = Vec::new();
        let mut cur = Vec::new();
        let mut count = 0;
        for w in windows {
            let n = w.2 - w.1 - w.3;
            if count + n > self.cfg.positions_per_batch && !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
                count = 0;
            }
            cur.push(w);
            count += n;
        }
        if !cur.is_empty() {
            out.push(cur);
        }
        out
    }
}

/// `out[p, n] = ⟨s[slot[p], n, :], g[p, :]⟩` for `s`: `U × N × d`, `g`: `P × d`: the positions
/// are gathered into one `d × m` matrix per user (m = that user's most positions), one batched
/// matmul, then scattered back, so `s` is never repeated per position.
fn per_user_dot(s: &Tensor, g: &Tensor, slot: &[u32]) -> candle_core::Result<Tensor> {
    let dev = g.device();
    let (u, n, d) = s.dims3()?;
    let p = g.dim(0)?;
    let mut count = vec![0usize; u];
    let cols: Vec<usize> = slot
        .iter()
        .map(|&sl| {
            count[sl as usize] += 1;
            count[sl as usize] - 1
        })
        .collect();
    let m = count.iter().copied().max().unwrap_or(1).max(1);
    let mut gather = vec![p as u32; u * m]; // row p: zeros
    let mut back = Vec::with_capacity(p);
    for (pi, (&sl, &c)) in slot.iter().zip(&cols).enumerate() {
        gather[sl as usize * m + c] = pi as u32;
        back.push((sl as usize * m + c) as u32);
    }
    let gpad = Tensor::cat(&[g, &Tensor::zeros((1, d), g.dtype(), dev)?], 0)?;
    let gm = gpad.index_select(&Tensor::from_vec(gather, u * m, dev)?, 0)?.reshape((u, m, d))?;
    let out = s.matmul(&gm.transpose(1, 2)?.contiguous()?)?; // U × N × m
    out.transpose(1, 2)?.contiguous()?.reshape((u * m, n))?.index_select(&Tensor::from_vec(back, p, dev)?, 0)
}

impl Scorer for Curec {
    fn score(&self, ds: &Dataset, users: &[u32], split: Split) -> anyhow::Result<Vec<f32>> {
        let hist: Vec<Vec<u32>> = users.iter().map(|&u| ds.history(u, split)).collect();
        let (scores, _) = self.score_all(users, &hist, false)?;
        Ok(scores.flatten_all()?.to_vec1()?)
    }
}

impl Model for Curec {
    fn train_epoch(&mut self, ds: &Dataset, epoch: usize) -> anyhow::Result<Option<f64>> {
        let dev = self.reasons_t.device().clone();
        *self.inference.lock().expect("inference cache lock") = None;
        let full = if self.cfg.sampled_negatives == 0 { Some(self.slots(&dev, None)?) } else { None };
        let mut epoch_loss = super::EpochLoss::default();
        for (bi, batch) in self.batches(ds, epoch).into_iter().enumerate() {
            let inputs: Vec<&[u32]> = batch.iter().map(|&(u, a, e, _)| &ds.train[u as usize][a..e]).collect();
            let t = inputs.iter().map(|s| s.len()).max().unwrap_or(1);
            let mut users: Vec<u32> = batch.iter().map(|w| w.0).collect();
            users.sort_unstable();
            users.dedup();
            let (mut rows, mut targets, mut hist, mut slot) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (r, &(u, a, e, from)) in batch.iter().enumerate() {
                let seq = &ds.train[u as usize];
                let us = users.binary_search(&u).expect("user in batch") as u32;
                for j in from..e - a {
                    rows.push((r * t + j) as u32);
                    targets.push(seq[a + 1 + j]);
                    hist.push(self.din_history(&seq[..a + j + 1]));
                    slot.push(us);
                }
            }
            let mut rng = rng_for(self.seed, 13, ((epoch as u64) << 32) | bi as u64);
            let eu = self.tower.encode_at(&inputs, &rows, Some(&mut rng))?;
            // Full softmax over all items, or over the batch's targets plus sampled negatives
            // (uniform, so no log-Q correction is needed).
            let sampled;
            let (slots, targets) = match &full {
                Some(f) => (f, targets),
                None => {
                    let mut r = rng_for(self.seed, 14, ((epoch as u64) << 32) | bi as u64);
                    let mut ids: Vec<u32> = targets.clone();
                    ids.extend((0..self.cfg.sampled_negatives).map(|_| r.random_range(0..self.tower.n_items as u32)));
                    ids.sort_unstable();
                    ids.dedup();
                    let t = targets.iter().map(|x| ids.binary_search(x).expect("target in set") as u32).collect();
                    sampled = self.slots(&dev, Some(ids))?;
                    (&sampled, t)
                }
            };
            let side = self.reason_side(slots)?;
            let m = self.matching(&users, slots, &side, false)?;
            let logits = self.head(&eu, &hist, &slot, &m, slots.items.as_deref(), None)?;
            epoch_loss.step(&mut self.opt, &logits, &targets)?;
        }
        Ok(epoch_loss.mean())
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        super::save_varmap(&self.params.varmap, path)
    }

    fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        *self.inference.lock().expect("inference cache lock") = None;
        super::load_varmap(&mut self.params.varmap, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::preprocess::ItemRow;

    const N: usize = 12;
    const E: usize = 8;

    fn toy() -> Dataset {
        let items = (0..N).map(|i| ItemRow { raw_id: i.to_string(), info: Default::default() }).collect();
        let lens = [6usize, 9, 4, 7];
        let mut ds = Dataset::from_interactions("toy", lens.iter().map(|l| l.to_string()).collect(), items, &[]);
        for (u, &l) in lens.iter().enumerate() {
            ds.train[u] = (0..l).map(|j| ((u * 5 + j * 3) % N) as u32).collect();
            ds.valid[u] = ((u + 1) % N) as u32;
            ds.test[u] = ((u + 2) % N) as u32;
        }
        ds
    }

    fn vec_for(seed: u64, n: usize) -> Vec<f32> {
        let mut r = rng_for(seed, 99, 0);
        (0..n).map(|_| super::super::nn::standard_normal(&mut r)).collect()
    }

    /// Item i has `counts[i]` reasons; reason j of item i is written by user (i + j) % 4.
    fn bank(counts: &[usize]) -> FeatureBank {
        let mut reasons = Vec::new();
        let mut lists = Vec::new();
        let mut texts = Vec::new();
        for (i, &c) in counts.iter().enumerate() {
            let mut l = Vec::new();
            for j in 0..c {
                l.push(((reasons.len() / E) as u32, ((i + j) % 4) as u32));
                reasons.extend(vec_for((i * 100 + j) as u64, E));
                texts.push(format!("reason {j} of item {i}"));
            }
            lists.push(l);
        }
        FeatureBank { dim: E, patterns: vec_for(7, 4 * E), has_pattern: vec![true; 4], reasons, texts, lists }
    }

    fn model(b: FeatureBank, variant: Variant) -> Curec {
        let cfg = CurecConfig { variant, hidden: 8, din_history: 3, ..Default::default() };
        let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, ..Default::default() };
        Curec::new(&cfg, &tcfg, N, b, 5, &Device::Cpu).unwrap()
    }

    fn scores(m: &Curec, ds: &Dataset, users: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let hist: Vec<Vec<u32>> = users.iter().map(|&u| ds.history(u, Split::Test)).collect();
        let (s, w) = m.score_with_weights(users, &hist).unwrap();
        (s.flatten_all().unwrap().to_vec1().unwrap(), w.flatten_all().unwrap().to_vec1().unwrap())
    }

    fn close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() < 1e-5, "entry {i}: {x} vs {y}");
        }
    }

    #[test]
    fn one_reason_gets_weight_one_and_padding_changes_nothing() {
        let ds = toy();
        let mut counts = vec![1usize; N];
        counts[3] = 0;
        let m1 = model(bank(&counts), Variant::Attention);
        // User 2 wrote no reason of item 1 (authors of item 1's only reason: user 1).
        let (s1, w1) = scores(&m1, &ds, &[2]);
        assert!((w1[1] - 1.0).abs() < 1e-6, "weight of a lone reason: {}", w1[1]);
        // Item 5 gains reasons: the list length (padding of every other item) grows to 4.
        counts[5] = 4;
        let m2 = model(bank(&counts), Variant::Attention);
        let (s2, _) = scores(&m2, &ds, &[2]);
        for i in (0..N).filter(|&i| i != 5) {
            assert!((s1[i] - s2[i]).abs() < 1e-5, "item {i}: {} vs {}", s1[i], s2[i]);
        }
    }

    #[test]
    fn scores_do_not_depend_on_reason_order() {
        let ds = toy();
        let counts = vec![3usize; N];
        for variant in [Variant::Attention, Variant::Ap, Variant::Mlp, Variant::Sa] {
            let b = bank(&counts);
            let mut r = b.clone();
            for l in &mut r.lists {
                l.reverse();
            }
            let (a, _) = scores(&model(b, variant), &ds, &[0, 1, 2, 3]);
            let (c, _) = scores(&model(r, variant), &ds, &[0, 1, 2, 3]);
            close(&a, &c);
        }
    }

    #[test]
    fn scoring_explicit_lists_equals_full_ranking() {
        // The correction's reward (Eq. 12) scores an item under candidate lists; with the bank's
        // own lists (and no own-reason masking) it must agree with the full ranking.
        let ds = toy();
        let counts = [2usize, 0, 3, 1, 4, 2, 0, 1, 1, 2, 3, 1];
        let cases = [Variant::Attention, Variant::Ap, Variant::Mlp, Variant::Sa].map(|v| (v, false));
        for (variant, bilinear) in cases.into_iter().chain([(Variant::Attention, true), (Variant::Ap, true)]) {
            let b = bank(&counts);
            let cfg = CurecConfig {
                variant,
                hidden: 8,
                din_history: 3,
                mask_own_reasons: false,
                bilinear,
                ..Default::default()
            };
            let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, ..Default::default() };
            let m = Curec::new(&cfg, &tcfg, N, b.clone(), 5, &Device::Cpu).unwrap();
            for u in 0..4u32 {
                let hist = ds.history(u, Split::Test);
                let (all, _) = m.score_all(&[u], std::slice::from_ref(&hist), false).unwrap();
                let all: Vec<f32> = all.flatten_all().unwrap().to_vec1().unwrap();
                let pattern = &b.patterns[u as usize * E..(u as usize + 1) * E];
                for i in 0..N as u32 {
                    let list: Vec<Vec<f32>> = b.lists[i as usize]
                        .iter()
                        .map(|&(r, _)| b.reasons[r as usize * E..(r as usize + 1) * E].to_vec())
                        .collect();
                    // Twice, to check that candidates in one call do not interact.
                    let got = m.score_lists(&hist, pattern, i, &[list.clone(), list]).unwrap();
                    for g in got {
                        assert!(
                            (g - all[i as usize]).abs() < 1e-4,
                            "{variant:?} (bilinear {bilinear}) user {u} item {i}: {g} vs {}",
                            all[i as usize]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn batched_full_ranking_equals_one_user_at_a_time() {
        let ds = toy();
        for bilinear in [false, true] {
            let b = bank(&[2, 0, 3, 1, 4, 2, 0, 1, 1, 2, 3, 1]);
            let cfg = CurecConfig { hidden: 8, din_history: 3, bilinear, ..Default::default() };
            let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, ..Default::default() };
            let m = Curec::new(&cfg, &tcfg, N, b, 5, &Device::Cpu).unwrap();
            let (all, wall) = scores(&m, &ds, &[0, 1, 2, 3]);
            let per = N * m.bank().max_list();
            for u in 0..4u32 {
                let (one, w) = scores(&m, &ds, &[u]);
                close(&one, &all[u as usize * N..(u as usize + 1) * N]);
                close(&w, &wall[u as usize * per..(u as usize + 1) * per]);
            }
        }
    }

    #[test]
    fn per_user_dot_is_the_plain_dot_per_position() {
        let (u, n, d) = (3usize, 5usize, 4usize);
        let s = Tensor::from_vec(vec_for(1, u * n * d), (u, n, d), &Device::Cpu).unwrap();
        // Positions of users 2, 0, 2, 2 (user 1 has none), in no particular order.
        let slot = [2u32, 0, 2, 2];
        let g = Tensor::from_vec(vec_for(2, slot.len() * d), (slot.len(), d), &Device::Cpu).unwrap();
        let got: Vec<Vec<f32>> = per_user_dot(&s, &g, &slot).unwrap().to_vec2().unwrap();
        let (sv, gv): (Vec<f32>, Vec<f32>) =
            (s.flatten_all().unwrap().to_vec1().unwrap(), g.flatten_all().unwrap().to_vec1().unwrap());
        for (p, &sl) in slot.iter().enumerate() {
            for i in 0..n {
                let want: f32 = (0..d).map(|k| sv[(sl as usize * n + i) * d + k] * gv[p * d + k]).sum();
                assert!((got[p][i] - want).abs() < 1e-5, "position {p} item {i}: {} vs {want}", got[p][i]);
            }
        }
    }

    #[test]
    fn the_bilinear_term_leaves_the_other_weights_as_they_were() {
        // Its weights are created last: the rest of the model starts exactly as without it.
        let b = bank(&[2, 0, 3, 1, 4, 2, 0, 1, 1, 2, 3, 1]);
        let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, ..Default::default() };
        let plain =
            Curec::new(&CurecConfig { hidden: 8, ..Default::default() }, &tcfg, N, b.clone(), 5, &Device::Cpu).unwrap();
        let cfg = CurecConfig { hidden: 8, bilinear: true, ..Default::default() };
        let bil = Curec::new(&cfg, &tcfg, N, b, 5, &Device::Cpu).unwrap();
        let a = super::super::nn::named_values(&plain.params.varmap);
        let c = super::super::nn::named_values(&bil.params.varmap);
        assert_eq!(c.len(), a.len() + 2);
        for (name, v) in &a {
            assert_eq!(Some(v), c.iter().find(|(n, _)| n == name).map(|(_, v)| v), "{name}");
        }
    }

    #[test]
    fn own_reasons_are_masked_for_their_author_only() {
        let ds = toy();
        // Item 4's two reasons are written by users 0 and 1 (authors (4 + j) % 4).
        let mut counts = vec![1usize; N];
        counts[4] = 2;
        let m = model(bank(&counts), Variant::Attention);
        let (_, w0) = scores(&m, &ds, &[0]);
        let l = m.bank().max_list();
        assert_eq!(w0[4 * l], 0.0, "user 0 must not see its own reason");
        assert!((w0[4 * l + 1] - 1.0).abs() < 1e-6);
        let (_, w2) = scores(&m, &ds, &[2]);
        assert!(w2[4 * l] > 0.0 && w2[4 * l + 1] > 0.0);
    }

    #[test]
    fn sampled_softmax_covering_every_item_is_the_full_softmax() {
        let ds = toy();
        let b = bank(&[2, 0, 2, 1, 0, 3, 2, 2, 1, 0, 2, 2]);
        let mut full = model(b.clone(), Variant::Attention);
        let cfg = CurecConfig { hidden: 8, din_history: 3, sampled_negatives: 5000, ..Default::default() };
        let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, ..Default::default() };
        let mut sampled = Curec::new(&cfg, &tcfg, N, b.clone(), 5, &Device::Cpu).unwrap();
        let a = full.train_epoch(&ds, 0).unwrap().unwrap();
        let c = sampled.train_epoch(&ds, 0).unwrap().unwrap();
        assert!((a - c).abs() < 1e-5, "{a} vs {c}");
        // With few negatives it still learns.
        let cfg = CurecConfig { sampled_negatives: 3, ..cfg };
        let mut few = Curec::new(&cfg, &tcfg, N, b, 5, &Device::Cpu).unwrap();
        let before = scores(&few, &ds, &[0, 1, 2, 3]).0;
        let first = few.train_epoch(&ds, 0).unwrap().unwrap();
        let mut last = first;
        for e in 1..15 {
            last = few.train_epoch(&ds, e).unwrap().unwrap();
        }
        assert!(last < first, "sampled loss {first} → {last}");
        assert_ne!(before, scores(&few, &ds, &[0, 1, 2, 3]).0);
    }

    #[test]
    fn text_only_items_are_their_text_and_nothing_else() {
        let ds = toy();
        let mut b = bank(&[2, 0, 3, 1, 4, 2, 0, 1, 1, 2, 3, 1]);
        // Item 7 gets item 2's reasons (the same rows, the same authors): the same text.
        b.lists[7] = b.lists[2].clone();
        let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, ..Default::default() };
        for (ids, equal) in [(false, true), (true, false)] {
            let cfg = CurecConfig { hidden: 8, din_history: 3, ids, ..Default::default() };
            let m = Curec::new(&cfg, &tcfg, N, b.clone(), 5, &Device::Cpu).unwrap();
            let names = super::super::nn::named_values(&m.params.varmap);
            assert_eq!(names.iter().any(|(n, _)| n == "item_emb"), ids, "ids = {ids}");
            let (s, _) = scores(&m, &ds, &[0, 1, 2, 3]);
            for u in 0..4 {
                let (a, c) = (s[u * N + 2], s[u * N + 7]);
                assert_eq!((a - c).abs() < 1e-6, equal, "ids = {ids}, user {u}: {a} vs {c}");
            }
        }
        let cfg = CurecConfig { ids: false, init_tower: Some("x.safetensors".into()), ..Default::default() };
        let err = Curec::new(&cfg, &tcfg, N, b, 5, &Device::Cpu).err().expect("text-only with a SASRec tower");
        assert!(err.to_string().contains("curec.init_tower"), "{err}");
    }

    #[test]
    fn training_lowers_the_loss_and_every_weight_learns() {
        let ds = toy();
        for (variant, ids, bilinear) in [
            (Variant::Attention, true, false),
            (Variant::Text, true, false),
            (Variant::Sa, true, false),
            (Variant::Attention, false, false),
            (Variant::Attention, true, true),
            (Variant::Mlp, true, true),
        ] {
            let cfg = CurecConfig { variant, hidden: 8, din_history: 3, ids, bilinear, ..Default::default() };
            let tcfg = SasRecConfig { max_len: 8, dim: 8, heads: 2, inner: 16, ..Default::default() };
            let mut m =
                Curec::new(&cfg, &tcfg, N, bank(&[2, 0, 2, 1, 0, 3, 2, 2, 1, 0, 2, 2]), 5, &Device::Cpu).unwrap();
            let before = super::super::nn::named_values(&m.params.varmap);
            let first = m.train_epoch(&ds, 0).unwrap().unwrap();
            let mut last = first;
            for e in 1..15 {
                last = m.train_epoch(&ds, e).unwrap().unwrap();
            }
            assert!(last < first, "{variant:?}: loss {first} → {last}");
            for ((name, b), (_, a)) in before.iter().zip(super::super::nn::named_values(&m.params.varmap)) {
                // The positional rows past the longest toy sequence never receive a gradient.
                if name == "pos_emb" {
                    continue;
                }
                assert!(&a != b, "{variant:?}: {name} did not change");
            }
        }
    }
}
