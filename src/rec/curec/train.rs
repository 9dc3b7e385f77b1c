//! Training the reward model (Eq. 11): windows of each user's train sequence batched to at most
//! `positions_per_batch` targets, the softmax cross-entropy over all items (or sampled
//! negatives) at every position, one step of the shared optimiser per batch.

use std::path::Path;

use rand::seq::SliceRandom;
use rand::Rng;

use super::*;
use crate::data::Dataset;
use crate::rec::Model;
use crate::rng::rng_for;

impl Curec {
    /// Windows (user, start, end, first target position in the window).
    pub(super) fn windows(&self, ds: &Dataset) -> Vec<(u32, usize, usize, usize)> {
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
    pub(super) fn batches(&self, ds: &Dataset, epoch: usize) -> Vec<Vec<(u32, usize, usize, usize)>> {
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

impl Model for Curec {
    fn train_epoch(&mut self, ds: &Dataset, epoch: usize) -> anyhow::Result<Option<f64>> {
        let dev = self.reasons_t.device().clone();
        *self.inference.lock().expect("inference cache lock") = None;
        let full = if self.cfg.sampled_negatives == 0 { Some(self.slots(&dev, None)?) } else { None };
        let mut epoch_loss = crate::rec::EpochLoss::default();
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
        crate::rec::save_varmap(&self.params.varmap, path)
    }

    fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        *self.inference.lock().expect("inference cache lock") = None;
        crate::rec::load_varmap(&mut self.params.varmap, path)
    }
}
