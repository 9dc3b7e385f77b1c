//! Attention of one task: query rows `i0..i1` of one sequence, the `rep` query heads that share
//! KV head `kh`, against that head's cached keys and values (half precision, see
//! [`super::kv`]). Two implementations with the same arithmetic in the same order, so the same
//! bits (tested): an AVX-512 one that reads the half-precision cache directly and scores up to
//! four queries against four key blocks per pass (sixteen registers of accumulators: each key
//! and query load serves several FMAs), and a portable one that converts the head's keys and
//! values to f32 once per task. Every key's score is its dot product over the head dimension in
//! order, every output its sum over positions in order, so a row's result never depends on which
//! other rows or heads share a pass (and so not on the batch).

use half::slice::HalfFloatSliceExt;

use super::kv::{Kv, KEY_BLOCK};

/// One attention task.
pub(crate) struct HeadTask<'a> {
    /// The sequence's key blocks and value rows: every cached position of this layer, the rows
    /// of the current call included.
    pub keys: &'a [&'a [Kv]],
    pub vals: &'a [&'a [Kv]],
    /// The KV head, the head dimension and the query heads per KV head.
    pub kh: usize,
    pub hd: usize,
    pub rep: usize,
    /// New rows of the sequence in this call (the last `n` cached positions); the task covers
    /// rows `i0..i1` of them.
    pub n: usize,
    pub i0: usize,
    pub i1: usize,
    pub scale: f32,
}

/// The attention output of `t` into `out` (`(i1 − i0) × rep × hd`, zeroed): `q(i, h)` is the
/// query of new row `i`, head `h` of the group.
pub(crate) fn attend<'q>(t: &HeadTask, q: impl Fn(usize, usize) -> &'q [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if t.hd.is_multiple_of(16) && use_avx512() {
        // SAFETY: the CPU has AVX-512F (checked at run time).
        unsafe { avx512::attend(t, &q, out) };
        return;
    }
    portable(t, &q, out)
}

/// The AVX-512 path runs where the CPU has AVX-512F and the matmul kernel is not forced to a
/// narrower one (`CUREC_KERNEL=avx2|portable` turns both off, for side-by-side runs).
#[cfg(target_arch = "x86_64")]
fn use_avx512() -> bool {
    use crate::llm::kernels::{kernel, Kernel};
    kernel() == Kernel::Avx512Vnni && std::arch::is_x86_feature_detected!("avx512f")
}

/// Key blocks the portable path scores per call, for one query and for two: enough independent
/// FMA chains to cover the FMA's latency without spilling (a block is one AVX-512 register or
/// two AVX2 ones; a spilled accumulator tile ran at half speed, measured).
const SCORE_BLOCKS: usize = 4;
const SCORE_BLOCKS_X2: usize = if cfg!(target_feature = "avx512f") { 4 } else { 2 };
/// Output dims a weighted sum keeps in registers per row (two rows at a time).
const SUM_WIDTH: usize = if cfg!(target_feature = "avx512f") { 64 } else { 32 };

/// Scores of one query against N transposed key blocks ([dim][KEY_BLOCK] each): N
/// accumulators, each key's sum in dimension order (so the grouping does not change a score).
#[inline(always)]
fn scores_n<const N: usize>(q: &[f32], kb: [&[f32]; N]) -> [[f32; KEY_BLOCK]; N] {
    let mut acc = [[0f32; KEY_BLOCK]; N];
    let kb = kb.map(|k| &k[..q.len() * KEY_BLOCK]);
    for (d, &qd) in q.iter().enumerate() {
        for u in 0..N {
            // SAFETY: every block holds q.len() · KEY_BLOCK values (sliced above).
            let k = unsafe { kb[u].get_unchecked(d * KEY_BLOCK..(d + 1) * KEY_BLOCK) };
            for t in 0..KEY_BLOCK {
                acc[u][t] = qd.mul_add(k[t], acc[u][t]);
            }
        }
    }
    acc
}

/// [`scores_n`] for two queries: each key block load serves both.
#[inline(always)]
fn scores_n_x2<const N: usize>(q0: &[f32], q1: &[f32], kb: [&[f32]; N]) -> [[[f32; KEY_BLOCK]; N]; 2] {
    let mut acc = [[[0f32; KEY_BLOCK]; N]; 2];
    let kb = kb.map(|k| &k[..q0.len() * KEY_BLOCK]);
    for (d, (&x0, &x1)) in q0.iter().zip(q1).enumerate() {
        for u in 0..N {
            // SAFETY: as in `scores_n`.
            let k = unsafe { kb[u].get_unchecked(d * KEY_BLOCK..(d + 1) * KEY_BLOCK) };
            for t in 0..KEY_BLOCK {
                acc[0][u][t] = x0.mul_add(k[t], acc[0][u][t]);
                acc[1][u][t] = x1.mul_add(k[t], acc[1][u][t]);
            }
        }
    }
    acc
}

/// [`weighted_sum`] for two rows of weights over the same values (two query rows of one head,
/// or two heads of one row): each value load serves both, and each output keeps the order it
/// has alone.
#[inline(always)]
fn weighted_sum_2<'v, const W: usize>(
    o0: &mut [f32],
    o1: &mut [f32],
    p0: &[f32],
    p1: &[f32],
    v: impl Fn(usize) -> &'v [f32],
) {
    let mut a0 = [0f32; W];
    let mut a1 = [0f32; W];
    a0.copy_from_slice(&o0[..W]);
    a1.copy_from_slice(&o1[..W]);
    for (j, (&x0, &x1)) in p0.iter().zip(p1).enumerate() {
        let v = &v(j)[..W];
        for t in 0..W {
            a0[t] = x0.mul_add(v[t], a0[t]);
            a1[t] = x1.mul_add(v[t], a1[t]);
        }
    }
    o0[..W].copy_from_slice(&a0);
    o1[..W].copy_from_slice(&a1);
}

/// `o += Σ_j p[j] · v(j)` over W output dims kept in registers, j in order.
#[inline(always)]
fn weighted_sum<'v, const W: usize>(o: &mut [f32], p: &[f32], v: impl Fn(usize) -> &'v [f32]) {
    let mut acc = [0f32; W];
    acc.copy_from_slice(&o[..W]);
    for (j, &pj) in p.iter().enumerate() {
        let v = &v(j)[..W];
        for t in 0..W {
            acc[t] = pj.mul_add(v[t], acc[t]);
        }
    }
    o[..W].copy_from_slice(&acc);
}

/// e^x for x ≤ 0 (softmax after the max is subtracted): 2^(x·log2 e) split into an integer power
/// and a degree-6 polynomial of the fraction (relative error below 2e-5, far under the int8
/// activations' own), in plain arithmetic that the compiler vectorizes, unlike libm's `expf`.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    let t = (x * std::f32::consts::LOG2_E).max(-126.0);
    let n = t.floor();
    let f = t - n;
    let p = 1.0
        + f * (std::f32::consts::LN_2
            + f * (0.240_226_5 + f * (0.055_504_11 + f * (0.009_618_129 + f * (0.001_333_355 + f * 0.000_154_035_3)))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Lanes of [`softmax`]'s max and sum: independent chains the compiler keeps in vector registers
/// (one running max or sum is a serial chain of `vmaxss`/`vaddss`, as slow as the scores).
const LANES: usize = 16;

/// Softmax in place. The max and the sum run in [`LANES`] lanes, each over every LANES-th value
/// in order, then across lanes in order: a fixed order, so a row's result depends only on it.
#[inline(always)]
fn softmax(sc: &mut [f32]) {
    let mut mx = [f32::NEG_INFINITY; LANES];
    let mut chunks = sc.chunks_exact(LANES);
    for c in &mut chunks {
        for t in 0..LANES {
            mx[t] = if c[t] > mx[t] { c[t] } else { mx[t] };
        }
    }
    let m = chunks.remainder().iter().chain(&mx).copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = [0f32; LANES];
    let mut chunks = sc.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for t in 0..LANES {
            c[t] = fast_exp(c[t] - m);
            sum[t] += c[t];
        }
    }
    let mut total = 0f32;
    for s in chunks.into_remainder() {
        *s = fast_exp(*s - m);
        total += *s;
    }
    let inv = 1.0 / (total + sum.iter().sum::<f32>());
    sc.iter_mut().for_each(|s| *s *= inv);
}

/// The portable path: this KV head's keys and values converted to f32 once, then register-tiled
/// loops the compiler vectorizes.
pub(crate) fn portable<'q>(t: &HeadTask, q: &impl Fn(usize, usize) -> &'q [f32], out: &mut [f32]) {
    let &HeadTask { keys, vals, kh, hd, rep, n, i0, i1, scale } = t;
    let total = vals.len();
    let stride = total.div_ceil(KEY_BLOCK) * KEY_BLOCK;
    // This KV head's keys and values up to the last row's visible position, in f32:
    // read from the half-precision cache once per task, whatever the query rows.
    let seen = total - n + i1;
    let mut kf = vec![0f32; seen.div_ceil(KEY_BLOCK) * KEY_BLOCK * hd];
    for (b, dst) in kf.chunks_exact_mut(KEY_BLOCK * hd).enumerate() {
        keys[b][kh * hd * KEY_BLOCK..(kh + 1) * hd * KEY_BLOCK].convert_to_f32_slice(dst);
    }
    let mut vf = vec![0f32; seen * hd];
    for (j, dst) in vf.chunks_exact_mut(hd).enumerate() {
        vals[j][kh * hd..(kh + 1) * hd].convert_to_f32_slice(dst);
    }
    // Scores of up to two query rows (row k of the pair at (k·rep + h)·stride).
    let mut scores = vec![0f32; 2 * rep * stride];
    let kb = |b: usize| &kf[b * hd * KEY_BLOCK..(b + 1) * hd * KEY_BLOCK];
    let val = |j: usize, c: usize, width: usize| &vf[j * hd + c..j * hd + c + width];
    // Rows go in pairs where they can (a prompt's rows): each key and value load then
    // serves two queries. Row i of a pair sees one key fewer than row i + 1; every
    // row's sums run in the same order as alone, so the outputs are the same bit for
    // bit whatever the pairing (and so whatever the batch).
    let mut i = i0;
    while i < i1 {
        let g = if i + 1 < i1 && hd % 32 == 0 { 2 } else { 1 };
        let vis: [usize; 2] = [total - n + i + 1, total - n + i + g];
        let blocks = vis[g - 1].div_ceil(KEY_BLOCK);
        for h in 0..rep {
            let q = |k: usize| q(i + k, h);
            // Several key blocks at a time: independent FMA chains; each key's sum
            // runs over the head dimension in order either way.
            let store = |scores: &mut [f32], k: usize, b: usize, acc: &[[f32; KEY_BLOCK]]| {
                let sc = &mut scores[(k * rep + h) * stride + b * KEY_BLOCK..];
                for (u, a) in acc.iter().enumerate() {
                    for t in 0..KEY_BLOCK {
                        sc[u * KEY_BLOCK + t] = a[t] * scale;
                    }
                }
            };
            let mut b = 0;
            if g == 2 {
                while b + SCORE_BLOCKS_X2 <= blocks {
                    let acc = scores_n_x2::<SCORE_BLOCKS_X2>(q(0), q(1), std::array::from_fn(|u| kb(b + u)));
                    store(&mut scores, 0, b, &acc[0]);
                    store(&mut scores, 1, b, &acc[1]);
                    b += SCORE_BLOCKS_X2;
                }
            } else {
                while b + SCORE_BLOCKS <= blocks {
                    let acc = scores_n::<SCORE_BLOCKS>(q(0), std::array::from_fn(|u| kb(b + u)));
                    store(&mut scores, 0, b, &acc);
                    b += SCORE_BLOCKS;
                }
            }
            for k in 0..g {
                for b in b..blocks {
                    let acc = scores_n::<1>(q(k), [kb(b)]);
                    store(&mut scores, k, b, &acc);
                }
                softmax(&mut scores[(k * rep + h) * stride..][..vis[k]]);
            }
        }
        let (o0, o1) = out[(i - i0) * rep * hd..].split_at_mut(rep * hd);
        // Keys in blocks of 64 (16 KiB of values for head_dim 64 stay in L1 while
        // every head sharing them reads them); the output dims of a chunk stay in
        // registers over a block: eight independent FMA chains.
        if g == 2 {
            let common = vis[0];
            for j0 in (0..common).step_by(64) {
                let j1 = (j0 + 64).min(common);
                for h in 0..rep {
                    let p0 = &scores[h * stride + j0..h * stride + j1];
                    let p1 = &scores[(rep + h) * stride + j0..(rep + h) * stride + j1];
                    if hd % SUM_WIDTH == 0 {
                        for c in (0..hd).step_by(SUM_WIDTH) {
                            let (a, b) = (h * hd + c, h * hd + c + SUM_WIDTH);
                            weighted_sum_2::<SUM_WIDTH>(&mut o0[a..b], &mut o1[a..b], p0, p1, |j| {
                                val(j0 + j, c, SUM_WIDTH)
                            });
                        }
                    } else {
                        for c in (0..hd).step_by(32) {
                            let (a, b) = (h * hd + c, h * hd + c + 32);
                            weighted_sum_2::<32>(&mut o0[a..b], &mut o1[a..b], p0, p1, |j| val(j0 + j, c, 32));
                        }
                    }
                }
            }
            // Row i + 1's last key.
            for h in 0..rep {
                let pj = scores[(rep + h) * stride + common];
                let o = &mut o1[h * hd..(h + 1) * hd];
                o.iter_mut().zip(val(common, 0, hd)).for_each(|(o, v)| *o = pj.mul_add(*v, *o));
            }
        } else {
            let visible = vis[0];
            for j0 in (0..visible).step_by(64) {
                let j1 = (j0 + 64).min(visible);
                // Two heads at a time where they can: each value load serves both.
                let mut h = 0;
                if hd % SUM_WIDTH == 0 {
                    while h + 2 <= rep {
                        let p0 = &scores[h * stride + j0..h * stride + j1];
                        let p1 = &scores[(h + 1) * stride + j0..(h + 1) * stride + j1];
                        let (oa, ob) = o0[h * hd..(h + 2) * hd].split_at_mut(hd);
                        for c in (0..hd).step_by(SUM_WIDTH) {
                            weighted_sum_2::<SUM_WIDTH>(
                                &mut oa[c..c + SUM_WIDTH],
                                &mut ob[c..c + SUM_WIDTH],
                                p0,
                                p1,
                                |j| val(j0 + j, c, SUM_WIDTH),
                            );
                        }
                        h += 2;
                    }
                }
                for h in h..rep {
                    let p = &scores[h * stride + j0..h * stride + j1];
                    let o = &mut o0[h * hd..(h + 1) * hd];
                    if hd % 64 == 0 {
                        for c in (0..hd).step_by(64) {
                            weighted_sum::<64>(&mut o[c..c + 64], p, |j| val(j0 + j, c, 64));
                        }
                    } else if hd % 16 == 0 {
                        for c in (0..hd).step_by(16) {
                            weighted_sum::<16>(&mut o[c..c + 16], p, |j| val(j0 + j, c, 16));
                        }
                    } else {
                        for (j, &pj) in (j0..j1).zip(p) {
                            o.iter_mut().zip(val(j, 0, hd)).for_each(|(o, v)| *o = pj.mul_add(*v, *o));
                        }
                    }
                }
            }
        }
        i += g;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // register tiles: indices say which accumulator
mod avx512 {
    use std::arch::x86_64::*;

    use super::{softmax, HeadTask};
    use crate::llm::engine::kv::{Kv, KEY_BLOCK};

    /// Queries (row, head) per pass, key blocks per scoring pass, rows per group.
    const QG: usize = 4;
    const NB: usize = 4;
    const ROWS: usize = 2;

    /// `$call` with `$a` = `[$f(item); N]` for the N = 1..=4 items of `$items` (the const
    /// parameter of the kernel `$call` names is inferred from the array's length).
    macro_rules! by_len {
        ($items:expr, $f:expr, |$a:ident| $call:expr) => {
            match $items.len() {
                4 => {
                    let $a: [_; 4] = std::array::from_fn(|x| $f($items[x]));
                    $call
                }
                3 => {
                    let $a: [_; 3] = std::array::from_fn(|x| $f($items[x]));
                    $call
                }
                2 => {
                    let $a: [_; 2] = std::array::from_fn(|x| $f($items[x]));
                    $call
                }
                _ => {
                    let $a: [_; 1] = std::array::from_fn(|x| $f($items[x]));
                    $call
                }
            }
        };
    }

    /// Sixteen half-precision values at `p` as f32 (exact).
    #[inline(always)]
    unsafe fn load_h(p: *const Kv) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }

    /// Scores of Q queries against N key blocks from block `b`, times `scale`, into `outs[x]`
    /// at position `b · KEY_BLOCK`.
    #[inline(always)]
    unsafe fn block_scores<const Q: usize, const N: usize>(
        qs: &[&[f32]; Q],
        kp: &[*const Kv; N],
        hd: usize,
        scale: f32,
        outs: &[*mut f32; Q],
    ) {
        let mut acc = [[_mm512_setzero_ps(); N]; Q];
        for d in 0..hd {
            let mut kv = [_mm512_setzero_ps(); N];
            for u in 0..N {
                kv[u] = load_h(kp[u].add(d * KEY_BLOCK));
            }
            for x in 0..Q {
                let qv = _mm512_set1_ps(*qs[x].get_unchecked(d));
                for u in 0..N {
                    acc[x][u] = _mm512_fmadd_ps(qv, kv[u], acc[x][u]);
                }
            }
        }
        let sv = _mm512_set1_ps(scale);
        for x in 0..Q {
            for u in 0..N {
                _mm512_storeu_ps(outs[x].add(u * KEY_BLOCK), _mm512_mul_ps(acc[x][u], sv));
            }
        }
    }

    /// Scores of Q queries against key blocks `0..blocks` of KV head `kh`.
    #[inline(always)]
    unsafe fn score_pass<const Q: usize>(qs: [&[f32]; Q], t: &HeadTask, blocks: usize, outs: [*mut f32; Q]) {
        let off = t.kh * t.hd * KEY_BLOCK;
        let mut b = 0;
        while b + NB <= blocks {
            let kp: [*const Kv; NB] = std::array::from_fn(|u| t.keys[b + u].as_ptr().add(off));
            let o: [*mut f32; Q] = std::array::from_fn(|x| outs[x].add(b * KEY_BLOCK));
            block_scores::<Q, NB>(&qs, &kp, t.hd, t.scale, &o);
            b += NB;
        }
        while b < blocks {
            let kp = [t.keys[b].as_ptr().add(off)];
            let o: [*mut f32; Q] = std::array::from_fn(|x| outs[x].add(b * KEY_BLOCK));
            block_scores::<Q, 1>(&qs, &kp, t.hd, t.scale, &o);
            b += 1;
        }
    }

    /// `outs[x][..16·W] += Σ_j ps[x][j] · v_{j0+j}[at..at + 16·W]`, j in order.
    #[inline(always)]
    unsafe fn weighted<const Q: usize, const W: usize>(
        ps: [&[f32]; Q],
        vals: &[&[Kv]],
        j0: usize,
        at: usize,
        outs: [*mut f32; Q],
    ) {
        let mut acc = [[_mm512_setzero_ps(); W]; Q];
        for x in 0..Q {
            for w in 0..W {
                acc[x][w] = _mm512_loadu_ps(outs[x].add(16 * w));
            }
        }
        for j in 0..ps[0].len() {
            let vp = vals.get_unchecked(j0 + j).as_ptr().add(at);
            let mut vv = [_mm512_setzero_ps(); W];
            for w in 0..W {
                vv[w] = load_h(vp.add(16 * w));
            }
            for x in 0..Q {
                let pv = _mm512_set1_ps(*ps[x].get_unchecked(j));
                for w in 0..W {
                    acc[x][w] = _mm512_fmadd_ps(pv, vv[w], acc[x][w]);
                }
            }
        }
        for x in 0..Q {
            for w in 0..W {
                _mm512_storeu_ps(outs[x].add(16 * w), acc[x][w]);
            }
        }
    }

    /// [`weighted`] over the head dimension: 64 dims a pass where it divides, else 16.
    #[inline(always)]
    unsafe fn weighted_heads<const Q: usize>(
        ps: [&[f32]; Q],
        vals: &[&[Kv]],
        j0: usize,
        base: usize,
        hd: usize,
        outs: [*mut f32; Q],
    ) {
        if hd.is_multiple_of(64) {
            for c in (0..hd).step_by(64) {
                weighted::<Q, 4>(ps, vals, j0, base + c, outs.map(|o| o.add(c)));
            }
        } else {
            for c in (0..hd).step_by(16) {
                weighted::<Q, 1>(ps, vals, j0, base + c, outs.map(|o| o.add(c)));
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attend<'q>(t: &HeadTask, q: &impl Fn(usize, usize) -> &'q [f32], out: &mut [f32]) {
        let &HeadTask { vals, kh, hd, rep, n, i0, i1, .. } = t;
        let total = vals.len();
        let stride = total.div_ceil(KEY_BLOCK) * KEY_BLOCK;
        let mut scores = vec![0f32; ROWS * rep * stride];
        let sp = scores.as_mut_ptr();
        // The queries of a row group (refilled per group, allocated once) and a row's heads.
        let mut qs: Vec<(usize, usize)> = Vec::with_capacity(ROWS * rep);
        let heads: Vec<usize> = (0..rep).collect();
        let mut i = i0;
        while i < i1 {
            let g = (i1 - i).min(ROWS);
            // Query (k, h) = head h of row i + k; its scores at (k·rep + h)·stride.
            qs.clear();
            qs.extend((0..g).flat_map(|k| (0..rep).map(move |h| (k, h))));
            for chunk in qs.chunks(QG) {
                let last = chunk.iter().map(|&(k, _)| k).max().unwrap_or(0);
                let blocks = (total - n + i + last + 1).div_ceil(KEY_BLOCK);
                let qf = |(k, h): (usize, usize)| (q(i + k, h), sp.add((k * rep + h) * stride));
                by_len!(chunk, qf, |a| score_pass(a.map(|p| p.0), t, blocks, a.map(|p| p.1)));
            }
            for &(k, h) in &qs {
                softmax(&mut scores[(k * rep + h) * stride..][..total - n + i + k + 1]);
            }
            let sp = scores.as_ptr();
            // Weighted sums, keys in tiles of 64 (their values stay in L1 while every query of
            // the group reads them); a query reads only the keys it sees.
            let op = out.as_mut_ptr();
            let longest = total - n + i + g;
            for j0 in (0..longest).step_by(64) {
                for k in 0..g {
                    let visible = total - n + i + k + 1;
                    if j0 >= visible {
                        continue;
                    }
                    let j1 = (j0 + 64).min(visible);
                    for hs in heads.chunks(QG) {
                        let pf = |h: usize| {
                            let p = std::slice::from_raw_parts(sp.add((k * rep + h) * stride + j0), j1 - j0);
                            (p, op.add(((i + k - i0) * rep + h) * hd))
                        };
                        by_len!(hs, pf, |a| weighted_heads(a.map(|p| p.0), vals, j0, kh * hd, hd, a.map(|p| p.1)));
                    }
                }
            }
            i += g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::engine::kv::SeqCache;

    /// A cache of `total` random positions for `nkv` KV heads and random queries.
    fn setup(total: usize, nkv: usize, hd: usize, seed: u64) -> SeqCache {
        let mut rng = seed;
        let mut next = move || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let mut c = SeqCache::new(1, nkv * hd, total);
        for _ in 0..total {
            let k: Vec<f32> = (0..nkv * hd).map(|_| 3.0 * next()).collect();
            let v: Vec<f32> = (0..nkv * hd).map(|_| next()).collect();
            c.push(0, &k, &v);
        }
        c.commit(total);
        c
    }

    /// The same task through both paths, and both against softmax(q·k/√d)·v in f64.
    fn check(total: usize, n: usize, rep: usize, hd: usize, i0: usize, i1: usize) {
        let nkv = 2;
        let cache = setup(total, nkv, hd, (total * 31 + n * 7 + rep + hd) as u64);
        let (keys, vals) = cache.layer(0);
        let qv: Vec<f32> = (0..n * rep * hd).map(|x| ((x * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let q = |i: usize, h: usize| &qv[(i * rep + h) * hd..(i * rep + h + 1) * hd];
        let scale = 1.0 / (hd as f32).sqrt();
        for kh in 0..nkv {
            let t = HeadTask { keys: &keys, vals: &vals, kh, hd, rep, n, i0, i1, scale };
            let mut a = vec![0f32; (i1 - i0) * rep * hd];
            portable(&t, &q, &mut a);
            // The reference, from the cache's own (half-precision) values.
            let kf = |j: usize, d: usize| {
                let b = j / KEY_BLOCK;
                keys[b][(kh * hd + d) * KEY_BLOCK + j % KEY_BLOCK].to_f64()
            };
            for i in i0..i1 {
                for h in 0..rep {
                    let vis = total - n + i + 1;
                    let s: Vec<f64> = (0..vis)
                        .map(|j| (0..hd).map(|d| q(i, h)[d] as f64 * kf(j, d)).sum::<f64>() * scale as f64)
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        let want: f64 = (0..vis).map(|j| e[j] / z * vals[j][kh * hd + d].to_f64()).sum();
                        let got = a[((i - i0) * rep + h) * hd + d] as f64;
                        assert!((got - want).abs() < 1e-4, "row {i} head {h} dim {d}: {got} vs {want}");
                    }
                }
            }
            #[cfg(target_arch = "x86_64")]
            if hd.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
                let mut b = vec![0f32; a.len()];
                // SAFETY: the CPU has AVX-512F.
                unsafe { avx512::attend(&t, &q, &mut b) };
                assert!(
                    a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "AVX-512 and portable attention differ (total {total}, n {n}, rep {rep}, hd {hd}, rows {i0}..{i1})"
                );
            }
        }
    }

    #[test]
    fn both_paths_agree_bit_for_bit_and_with_the_reference() {
        #[cfg(target_arch = "x86_64")]
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("SKIPPED: the AVX-512 attention comparison (this CPU lacks AVX-512F); the portable path is still checked");
        }
        // Decoding (one row against a long context), prompt chunks with odd and even row
        // counts, contexts off and on the key-block boundary, 3 and 7 heads per KV head.
        for &(total, n, rep, hd, i0, i1) in &[
            (1, 1, 3, 64, 0, 1),
            (200, 1, 3, 64, 0, 1),
            (203, 1, 7, 64, 0, 1),
            (37, 37, 3, 64, 0, 32),
            (37, 37, 3, 64, 32, 37),
            (100, 20, 7, 64, 0, 20),
            (70, 5, 2, 32, 0, 5),
            (70, 5, 2, 48, 1, 4),
            (300, 9, 3, 128, 0, 9),
        ] {
            check(total, n, rep, hd, i0, i1);
        }
    }

    #[test]
    fn fast_exp_is_close_to_exp_on_softmax_inputs() {
        for i in 0..=20_000 {
            let x = -100.0 * i as f32 / 20_000.0;
            let (got, want) = (fast_exp(x), x.exp());
            if want > 1e-30 {
                assert!(((got - want) / want).abs() < 3e-5, "exp({x}) = {want}, got {got}");
            } else {
                assert!(got < 1e-30, "exp({x}) should be tiny, got {got}");
            }
        }
        assert_eq!(fast_exp(0.0), 1.0);
    }
}
