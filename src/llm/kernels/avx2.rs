//! AVX2 + FMA kernels (x86-64, chosen at run time). One 256-bit register holds a group's 8
//! output rows × 4 inputs (Q8) or × 8 inputs (Q4, two nibbles a byte); `vpmaddubsw` multiplies
//! unsigned by signed bytes, so Q8 moves the weight's sign onto the activation (`vpsignb`, as
//! llama.cpp does) and Q4's codes are unsigned already. Up to four activation rows share each
//! weight load; the tile size is a const parameter so that its accumulators live in registers
//! (a run-time row count made LLVM keep them on the stack). Results equal [`super::portable`]
//! bit for bit.
#![cfg(target_arch = "x86_64")]
// Rows index several register arrays at once; an index loop reads clearer than zips here.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::{GroupRef, QActs, BLOCK, LANES};

/// Activation rows that share one pass over a group's weights.
const TILE: usize = 4;

/// Four int8 inputs at `at`, repeated in every 32-bit lane (also the AVX-512 kernel's).
#[inline(always)]
pub(super) unsafe fn bcast_quad(x: *const i8, at: usize) -> __m256i {
    _mm256_set1_epi32((x.add(at) as *const i32).read_unaligned())
}

/// Rows `m0..m0 + R` of a Q8 group.
#[inline(always)]
unsafe fn tile_q8<const R: usize>(w: &GroupRef, x: &QActs, m0: usize, dst: *mut f32) {
    let k = x.kp;
    let ones = _mm256_set1_epi16(1);
    let xq = x.q.as_ptr();
    let xd = x.d.as_ptr();
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..w.blocks {
        let qs = w.quants.as_ptr().add(b * LANES * BLOCK);
        let mut isum = [_mm256_setzero_si256(); R];
        for j in 0..BLOCK / 4 {
            let wv = _mm256_loadu_si256(qs.add(j * 32) as *const __m256i);
            let wabs = _mm256_sign_epi8(wv, wv);
            for r in 0..R {
                let xv = bcast_quad(xq, (m0 + r) * k + b * BLOCK + 4 * j);
                let p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(xv, wv));
                isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(p, ones));
            }
        }
        let dw = _mm256_loadu_ps(w.scales.as_ptr().add(b * LANES));
        for r in 0..R {
            let dx = _mm256_set1_ps(*xd.add((m0 + r) * w.blocks + b));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_mul_ps(dw, dx), acc[r]);
        }
    }
    for r in 0..R {
        _mm256_storeu_ps(dst.add((m0 + r) * LANES), acc[r]);
    }
}

/// Rows `m0..m0 + R` of a Q4 group.
#[inline(always)]
unsafe fn tile_q4<const R: usize>(w: &GroupRef, x: &QActs, m0: usize, dst: *mut f32) {
    let k = x.kp;
    let ones = _mm256_set1_epi16(1);
    let low = _mm256_set1_epi8(0x0f);
    let xq = x.q.as_ptr();
    let (xd, xds) = (x.d.as_ptr(), x.ds.as_ptr());
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..w.blocks {
        let qs = w.quants.as_ptr().add(b * LANES * BLOCK / 2);
        // |q·x| ≤ 15·127·2 per pair: eight products sum within i16.
        let mut s16 = [_mm256_setzero_si256(); R];
        for p in 0..4 {
            let v = _mm256_loadu_si256(qs.add(p * 32) as *const __m256i);
            let lo = _mm256_and_si256(v, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            for r in 0..R {
                let base = (m0 + r) * k + b * BLOCK + 8 * p;
                let a = _mm256_maddubs_epi16(lo, bcast_quad(xq, base));
                let c = _mm256_maddubs_epi16(hi, bcast_quad(xq, base + 4));
                s16[r] = _mm256_add_epi16(s16[r], _mm256_add_epi16(a, c));
            }
        }
        let dw = _mm256_loadu_ps(w.scales.as_ptr().add(b * LANES));
        let mw = _mm256_loadu_ps(w.mins.as_ptr().add(b * LANES));
        for r in 0..R {
            let i = (m0 + r) * w.blocks + b;
            let isum = _mm256_madd_epi16(s16[r], ones);
            let dx = _mm256_set1_ps(*xd.add(i));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, dx), acc[r]);
            acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xds.add(i)), acc[r]);
        }
    }
    for r in 0..R {
        _mm256_storeu_ps(dst.add((m0 + r) * LANES), acc[r]);
    }
}

/// 32 bits → 32 bytes, byte j = 0x10 where bit j is set (llama.cpp's `bytes_from_bits_32`).
#[inline(always)]
unsafe fn high_bits(words: *const u8, at: usize) -> __m256i {
    let x = _mm256_set1_epi32((words.add(at * 4) as *const i32).read_unaligned());
    let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let bytes = _mm256_or_si256(_mm256_shuffle_epi8(x, shuf), _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_and_si256(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10))
}

/// Rows `m0..m0 + R` of a Q5 group.
#[inline(always)]
unsafe fn tile_q5<const R: usize>(w: &GroupRef, x: &QActs, m0: usize, dst: *mut f32) {
    let k = x.kp;
    let ones = _mm256_set1_epi16(1);
    let low = _mm256_set1_epi8(0x0f);
    let xq = x.q.as_ptr();
    let (xd, xds) = (x.d.as_ptr(), x.ds.as_ptr());
    let qb = LANES * BLOCK / 2 + LANES * BLOCK / 8;
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..w.blocks {
        let qs = w.quants.as_ptr().add(b * qb);
        let hb = qs.add(LANES * BLOCK / 2);
        // |q·x| ≤ 31·127·2 per pair: sixteen products (two registers) sum within i16, so the
        // 16-bit sums are widened after every second register.
        let mut isum = [_mm256_setzero_si256(); R];
        for pp in 0..2 {
            let mut s16 = [_mm256_setzero_si256(); R];
            for p in 2 * pp..2 * pp + 2 {
                let v = _mm256_loadu_si256(qs.add(p * 32) as *const __m256i);
                let lo = _mm256_or_si256(_mm256_and_si256(v, low), high_bits(hb, 2 * p));
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low), high_bits(hb, 2 * p + 1));
                for r in 0..R {
                    let base = (m0 + r) * k + b * BLOCK + 8 * p;
                    let a = _mm256_maddubs_epi16(lo, bcast_quad(xq, base));
                    let c = _mm256_maddubs_epi16(hi, bcast_quad(xq, base + 4));
                    s16[r] = _mm256_add_epi16(s16[r], _mm256_add_epi16(a, c));
                }
            }
            for r in 0..R {
                isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(s16[r], ones));
            }
        }
        let dw = _mm256_loadu_ps(w.scales.as_ptr().add(b * LANES));
        let mw = _mm256_loadu_ps(w.mins.as_ptr().add(b * LANES));
        for r in 0..R {
            let i = (m0 + r) * w.blocks + b;
            let dx = _mm256_set1_ps(*xd.add(i));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_mul_ps(dw, dx), acc[r]);
            acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xds.add(i)), acc[r]);
        }
    }
    for r in 0..R {
        _mm256_storeu_ps(dst.add((m0 + r) * LANES), acc[r]);
    }
}

/// See [`super::portable::group_q8`].
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn group_q8(w: &GroupRef, x: &QActs, dst: &mut [f32]) {
    assert!(dst.len() >= x.m * LANES && x.q.len() >= x.m * x.kp && x.d.len() >= x.m * w.blocks);
    let out = dst.as_mut_ptr();
    let mut m0 = 0;
    while m0 + TILE <= x.m {
        tile_q8::<TILE>(w, x, m0, out);
        m0 += TILE;
    }
    match x.m - m0 {
        1 => tile_q8::<1>(w, x, m0, out),
        2 => tile_q8::<2>(w, x, m0, out),
        3 => tile_q8::<3>(w, x, m0, out),
        _ => {}
    }
}

/// See [`super::portable::group_q4`].
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn group_q4(w: &GroupRef, x: &QActs, dst: &mut [f32]) {
    assert!(dst.len() >= x.m * LANES && x.q.len() >= x.m * x.kp && x.ds.len() >= x.m * w.blocks);
    let out = dst.as_mut_ptr();
    let mut m0 = 0;
    while m0 + TILE <= x.m {
        tile_q4::<TILE>(w, x, m0, out);
        m0 += TILE;
    }
    match x.m - m0 {
        1 => tile_q4::<1>(w, x, m0, out),
        2 => tile_q4::<2>(w, x, m0, out),
        3 => tile_q4::<3>(w, x, m0, out),
        _ => {}
    }
}

/// See [`super::portable::group_q5`].
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn group_q5(w: &GroupRef, x: &QActs, dst: &mut [f32]) {
    assert!(dst.len() >= x.m * LANES && x.q.len() >= x.m * x.kp && x.ds.len() >= x.m * w.blocks);
    let out = dst.as_mut_ptr();
    let mut m0 = 0;
    while m0 + TILE <= x.m {
        tile_q5::<TILE>(w, x, m0, out);
        m0 += TILE;
    }
    match x.m - m0 {
        1 => tile_q5::<1>(w, x, m0, out),
        2 => tile_q5::<2>(w, x, m0, out),
        3 => tile_q5::<3>(w, x, m0, out),
        _ => {}
    }
}
