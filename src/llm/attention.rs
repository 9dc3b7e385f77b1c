//! Fused grouped-query attention with a backward pass, for the LLM's training path on the CPU
//! (GRPO's log-probs and their gradient). The composite version (scores matmul, mask add,
//! softmax, values matmul) materializes several [batch, heads, t, keys] tensors forward and
//! more backward, and candle's backward of the mask add also reduces a gradient for the constant
//! mask; this op keeps only its output and recomputes each probability row in the backward pass
//! (as FlashAttention does), skipping masked keys. Opt-in (`CUREC_ATTENTION=fused`): it keeps
//! less memory, but its per-row loops are not yet faster than the gemm-based composite ops.
//!
//! Shapes: q [b, heads, t, d] (RoPE applied, not scaled), k and v [b, kv_heads, keys, d], the
//! additive mask [b, t, keys] (0 or [`MASKED`]); output [b, heads, t, d]. Query head h reads KV
//! head h / (heads / kv_heads). Equal to the composite ops up to float rounding (tested, values
//! and gradients).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::model::MASKED;
use crate::ops::contiguous_f32;

/// Keys whose mask is at or below this are skipped (their probability is exactly 0 either way).
const SKIP: f32 = MASKED / 2.0;

pub struct Attention {
    /// [b, t, keys], row-major.
    pub mask: Arc<Vec<f32>>,
    pub scale: f32,
}

/// Four dot products of `q` with `k[0..4]` (four independent FMA chains).
#[inline(always)]
fn dot4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0f32; 8]; 4];
    for (c, qc) in q.chunks_exact(8).enumerate() {
        for u in 0..4 {
            let kc = &k[u][c * 8..c * 8 + 8];
            for t in 0..8 {
                acc[u][t] = qc[t].mul_add(kc[t], acc[u][t]);
            }
        }
    }
    let mut out = [0f32; 4];
    for u in 0..4 {
        out[u] = acc[u].iter().sum::<f32>();
    }
    for (c, &qv) in q.iter().enumerate().skip(q.len() / 8 * 8) {
        for u in 0..4 {
            out[u] = qv.mul_add(k[u][c], out[u]);
        }
    }
    out
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot4(a, [b, b, b, b])[0]
}

/// `o += a · x`
#[inline(always)]
fn axpy(o: &mut [f32], a: f32, x: &[f32]) {
    o.iter_mut().zip(x).for_each(|(o, x)| *o = a.mul_add(*x, *o));
}

/// `o = Σ_{j ∈ vis} p[j] · v_j`, the output dims in registers when d is 64.
fn weighted_sum(o: &mut [f32], p: &[f32], vis: &[usize], v: &[f32], d: usize) {
    if d == 64 {
        let mut acc = [0f32; 64];
        for &j in vis {
            let (pj, vj) = (p[j], &v[j * 64..(j + 1) * 64]);
            for t in 0..64 {
                acc[t] = pj.mul_add(vj[t], acc[t]);
            }
        }
        o.copy_from_slice(&acc);
    } else {
        for &j in vis {
            axpy(o, p[j], &v[j * d..(j + 1) * d]);
        }
    }
}

/// One query row's probabilities over the keys (`p` has `keys` slots; masked keys get 0); the
/// visible keys' indices go to `vis`.
fn probs(q: &[f32], k: &[f32], mask: &[f32], scale: f32, d: usize, p: &mut [f32], vis: &mut Vec<usize>) {
    vis.clear();
    vis.extend(mask.iter().enumerate().filter(|(_, &m)| m > SKIP).map(|(j, _)| j));
    if vis.is_empty() {
        // A fully masked row: the composite softmax spreads it over every key; do the same.
        vis.extend(0..mask.len());
    }
    p.iter_mut().for_each(|x| *x = 0.0);
    let mut c = 0;
    while c + 4 <= vis.len() {
        let j = [vis[c], vis[c + 1], vis[c + 2], vis[c + 3]];
        let s = dot4(q, j.map(|j| &k[j * d..(j + 1) * d]));
        for u in 0..4 {
            p[j[u]] = s[u] * scale + mask[j[u]];
        }
        c += 4;
    }
    for &j in &vis[c..] {
        p[j] = dot(q, &k[j * d..(j + 1) * d]) * scale + mask[j];
    }
    let m = vis.iter().map(|&j| p[j]).fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for &j in vis.iter() {
        p[j] = (p[j] - m).exp();
        sum += p[j];
    }
    let inv = 1.0 / sum;
    for &j in vis.iter() {
        p[j] *= inv;
    }
}

struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    keys: usize,
    d: usize,
}

impl Attention {
    fn dims(&self, q: &[usize], k: &[usize]) -> Result<Dims> {
        let (&[b, nh, t, d], &[b2, nkv, keys, d2]) = (q, k) else {
            candle_core::bail!("attention: expected 4-D q and k, got {q:?} and {k:?}")
        };
        if b != b2 || d != d2 || nkv == 0 || nh % nkv != 0 || self.mask.len() != b * t * keys {
            candle_core::bail!("attention: q {q:?}, k {k:?} and a mask of {} values do not fit", self.mask.len());
        }
        Ok(Dims { b, nh, nkv, t, keys, d })
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "curec-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            contiguous_f32(s1, l1, "attention q")?,
            contiguous_f32(s2, l2, "attention k")?,
            contiguous_f32(s3, l3, "attention v")?,
        );
        let Dims { nh, nkv, t, keys, d, .. } = self.dims(l1.dims(), l2.dims())?;
        let rep = nh / nkv;
        let mut out = vec![0f32; q.len()];
        // One task per (batch row, head): every one does the same work.
        out.par_chunks_mut(t * d).enumerate().for_each(|(bh, o)| {
            let (bi, h) = (bh / nh, bh % nh);
            let kv = (bi * nkv + h / rep) * keys * d;
            let (kb, vb) = (&k[kv..kv + keys * d], &v[kv..kv + keys * d]);
            let (mut p, mut vis) = (vec![0f32; keys], Vec::with_capacity(keys));
            for (i, o) in o.chunks_mut(d).enumerate() {
                let qi = &q[(bh * t + i) * d..(bh * t + i + 1) * d];
                let mask = &self.mask[(bi * t + i) * keys..(bi * t + i + 1) * keys];
                probs(qi, kb, mask, self.scale, d, &mut p, &mut vis);
                weighted_sum(o, &p, &vis, vb, d);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Dims { b, nh, nkv, t, keys, d } = self.dims(q.dims(), k.dims())?;
        let rep = nh / nkv;
        let flat = |x: &Tensor| -> Result<Vec<f32>> { x.contiguous()?.flatten_all()?.to_vec1::<f32>() };
        let (qv, kv, vv, gv) = (flat(q)?, flat(k)?, flat(v)?, flat(grad)?);
        // Per (batch row, head): its dq, and its share of dk and dv (summed over the heads of a
        // KV head afterwards, in head order).
        let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * nh)
            .into_par_iter()
            .map(|bh| {
                let (bi, h) = (bh / nh, bh % nh);
                let kvo = (bi * nkv + h / rep) * keys * d;
                let (kb, vb) = (&kv[kvo..kvo + keys * d], &vv[kvo..kvo + keys * d]);
                let mut dq = vec![0f32; t * d];
                let (mut dk, mut dv) = (vec![0f32; keys * d], vec![0f32; keys * d]);
                let (mut p, mut vis, mut dp) = (vec![0f32; keys], Vec::with_capacity(keys), vec![0f32; keys]);
                for i in 0..t {
                    let qi = &qv[(bh * t + i) * d..(bh * t + i + 1) * d];
                    let gi = &gv[(bh * t + i) * d..(bh * t + i + 1) * d];
                    let mask = &self.mask[(bi * t + i) * keys..(bi * t + i + 1) * keys];
                    probs(qi, kb, mask, self.scale, d, &mut p, &mut vis);
                    let mut c = 0;
                    while c + 4 <= vis.len() {
                        let j = [vis[c], vis[c + 1], vis[c + 2], vis[c + 3]];
                        let x = dot4(gi, j.map(|j| &vb[j * d..(j + 1) * d]));
                        for u in 0..4 {
                            dp[j[u]] = x[u];
                        }
                        c += 4;
                    }
                    for &j in &vis[c..] {
                        dp[j] = dot(gi, &vb[j * d..(j + 1) * d]);
                    }
                    let mut total = 0f32;
                    for &j in &vis {
                        total += p[j] * dp[j];
                    }
                    let dqi = &mut dq[i * d..(i + 1) * d];
                    for &j in &vis {
                        let ds = p[j] * (dp[j] - total) * self.scale;
                        axpy(dqi, ds, &kb[j * d..(j + 1) * d]);
                        axpy(&mut dk[j * d..(j + 1) * d], ds, qi);
                        axpy(&mut dv[j * d..(j + 1) * d], p[j], gi);
                    }
                }
                (dq, dk, dv)
            })
            .collect();
        let mut dq = Vec::with_capacity(qv.len());
        let (mut dk, mut dv) = (vec![0f32; kv.len()], vec![0f32; vv.len()]);
        for (bh, (q, k, v)) in parts.into_iter().enumerate() {
            dq.extend_from_slice(&q);
            let (bi, h) = (bh / nh, bh % nh);
            let o = (bi * nkv + h / rep) * keys * d;
            dk[o..o + keys * d].iter_mut().zip(&k).for_each(|(a, x)| *a += x);
            dv[o..o + keys * d].iter_mut().zip(&v).for_each(|(a, x)| *a += x);
        }
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}
