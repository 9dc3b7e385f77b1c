//! How s_ui is built from the item's reasons and the user's pattern (Eq. 8, and the Table 3
//! variants): the keys and values of every reason slot, then multi-head attention from the
//! pattern (`attention`), or the reasons fused without the user (`ap`, `mlp`, `sa`, `text`)
//! concatenated with the projected pattern.

use candle_core::{Module, Tensor};

use super::*;
use crate::ops::softmax_last_dim;

impl Curec {
    /// The user-independent side of the matcher: keys `(N·L) × d` (attention only) and values
    /// `N × L × d` of every reason slot.
    pub(super) fn reason_side(&self, slots: &Slots) -> candle_core::Result<ReasonSide> {
        self.reason_side_of(&self.reasons_t, slots)
    }

    /// [`Self::reason_side`] over the reason vectors `table` (`slots.idx` indexes its rows).
    pub(super) fn reason_side_of(&self, table: &Tensor, slots: &Slots) -> candle_core::Result<ReasonSide> {
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
    pub(super) fn matching(
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
    pub(super) fn matching_for(
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
    pub(super) fn projected_values(&self, side: &ReasonSide, n: usize, l: usize) -> candle_core::Result<Vec<Tensor>> {
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
}
