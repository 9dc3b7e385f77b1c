//! The reward model's construction and scoring: the tower, the matcher's and DIN's weights, a
//! warm start from a SASRec checkpoint, the per-batch reason slots and the DIN head (Eq. 10)
//! that scores every item for a batch of users.

use std::path::Path;

use candle_core::{Device, Module, Tensor};

use super::*;
use crate::data::{Dataset, Split};
use crate::eval::Scorer;
use crate::ops::softmax_last_dim;
use crate::rec::nn::Params;
use crate::rec::sasrec::{SasRecConfig, SasRecTower};

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
        let opt = crate::rec::train::adamw(trainable, tower_cfg.lr)?;
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
    pub(super) fn slots(&self, dev: &Device, items: Option<Vec<u32>>) -> candle_core::Result<Slots> {
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

    /// Slots, reason side and the DIN head's item part (`1 × N × hidden`) for scoring, computed once
    /// per set of weights and bank.
    pub(super) fn inference_side(&self) -> candle_core::Result<std::sync::Arc<(Slots, ReasonSide, Tensor)>> {
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
    pub(super) fn head(
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

    pub(super) fn din_history(&self, seq: &[u32]) -> Vec<u32> {
        seq[seq.len().saturating_sub(self.cfg.din_history)..].to_vec()
    }

    /// Scores of all items for `users` after `histories`, with the per-item reason weights.
    pub fn score_with_weights(&self, users: &[u32], histories: &[Vec<u32>]) -> anyhow::Result<(Tensor, Tensor)> {
        let (scores, w) = self.score_all(users, histories, true)?;
        Ok((scores, w.expect("weights were asked for")))
    }

    pub(super) fn score_all(
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
}

/// `out[p, n] = ⟨s[slot[p], n, :], g[p, :]⟩` for `s`: `U × N × d`, `g`: `P × d`: the positions
/// are gathered into one `d × m` matrix per user (m = that user's most positions), one batched
/// matmul, then scattered back, so `s` is never repeated per position.
pub(super) fn per_user_dot(s: &Tensor, g: &Tensor, slot: &[u32]) -> candle_core::Result<Tensor> {
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
