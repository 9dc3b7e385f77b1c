//! AVX-512 VNNI kernels (x86-64 with AVX512F/BW/VL and AVX512_VNNI, chosen at run time). The
//! layout and the register tiles are the AVX2 kernel's ([`super::avx2`]: one 256-bit register holds
//! a group's 8 output rows × 4 inputs), but each product of unsigned by signed bytes accumulates
//! straight into 32-bit lanes with one `vpdpbusd` where AVX2 needs `vpmaddubsw`, `vpmaddwd` and an
//! add; Q5's fifth bits go from their word to the bytes with one masked add (the word *is* the
//! byte mask), and the 32 vector registers let eight activation rows share each weight load.
//! Integer sums are exact on every path and the float operations are the same in the same order,
//! so results equal [`super::portable`] bit for bit (tested).
#![cfg(target_arch = "x86_64")]
// Rows index several register arrays at once; an index loop reads clearer than zips here.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use super::avx2::bcast_quad;
use super::{GroupRef, QActs, BLOCK, LANES};

/// Activation rows that share one pass over a group's weights.
const TILE: usize = 8;

/// Rows `m0..m0 + R` of a Q8 group.
#[inline(always)]
unsafe fn tile_q8<const R: usize>(w: &GroupRef, x: &QActs, m0: usize, dst: *mut f32) {
    let k = x.kp;
    let xq = x.q.as_ptr();
    let xd = x.d.as_ptr();
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..w.blocks {
        let qs = w.quants.as_ptr().add(b * LANES * BLOCK);
        let mut isum = [_mm256_setzero_si256(); R];
        for j in 0..BLOCK / 4 {
            let wv = _mm256_loadu_si256(qs.add(j * 32) as *const __m256i);
            // vpdpbusd multiplies unsigned by signed bytes: |w| times x with w's sign.
            let wabs = _mm256_abs_epi8(wv);
            for r in 0..R {
                let xv = bcast_quad(xq, (m0 + r) * k + b * BLOCK + 4 * j);
                isum[r] = _mm256_dpbusd_epi32(isum[r], wabs, _mm256_sign_epi8(xv, wv));
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

/// Rows `m0..m0 + R` of a Q4 group (`HIGH`: Q5, whose fifth bits follow the nibbles).
#[inline(always)]
unsafe fn tile_q4<const R: usize, const HIGH: bool>(w: &GroupRef, x: &QActs, m0: usize, dst: *mut f32) {
    let k = x.kp;
    let low = _mm256_set1_epi8(0x0f);
    let sixteen = _mm256_set1_epi8(0x10);
    let xq = x.q.as_ptr();
    let (xd, xds) = (x.d.as_ptr(), x.ds.as_ptr());
    let qb = if HIGH { LANES * BLOCK / 2 + LANES * BLOCK / 8 } else { LANES * BLOCK / 2 };
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..w.blocks {
        let qs = w.quants.as_ptr().add(b * qb);
        let hb = qs.add(LANES * BLOCK / 2) as *const u32;
        let mut isum = [_mm256_setzero_si256(); R];
        for p in 0..4 {
            let v = _mm256_loadu_si256(qs.add(p * 32) as *const __m256i);
            let mut lo = _mm256_and_si256(v, low);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            if HIGH {
                // Bit j of the word is bit 4 of byte j's code.
                lo = _mm256_mask_add_epi8(lo, hb.add(2 * p).read_unaligned(), lo, sixteen);
                hi = _mm256_mask_add_epi8(hi, hb.add(2 * p + 1).read_unaligned(), hi, sixteen);
            }
            for r in 0..R {
                let base = (m0 + r) * k + b * BLOCK + 8 * p;
                isum[r] = _mm256_dpbusd_epi32(isum[r], lo, bcast_quad(xq, base));
                isum[r] = _mm256_dpbusd_epi32(isum[r], hi, bcast_quad(xq, base + 4));
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

/// Calls `$tile::<R>(m0)` over the rows in tiles of [`TILE`], then once for the remainder.
macro_rules! tiles {
    ($m:expr, |$m0:ident| $tile:ident::<R $(, $post:tt)?>($($arg:expr),*)) => {{
        let mut $m0 = 0;
        while $m0 + TILE <= $m {
            $tile::<TILE $(, $post)?>($($arg),*);
            $m0 += TILE;
        }
        match $m - $m0 {
            1 => $tile::<1 $(, $post)?>($($arg),*),
            2 => $tile::<2 $(, $post)?>($($arg),*),
            3 => $tile::<3 $(, $post)?>($($arg),*),
            4 => $tile::<4 $(, $post)?>($($arg),*),
            5 => $tile::<5 $(, $post)?>($($arg),*),
            6 => $tile::<6 $(, $post)?>($($arg),*),
            7 => $tile::<7 $(, $post)?>($($arg),*),
            _ => {}
        }
    }};
}

/// See [`super::portable::group_q8`].
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn group_q8(w: &GroupRef, x: &QActs, dst: &mut [f32]) {
    assert!(dst.len() >= x.m * LANES && x.q.len() >= x.m * x.kp && x.d.len() >= x.m * w.blocks);
    let out = dst.as_mut_ptr();
    tiles!(x.m, |m0| tile_q8::<R>(w, x, m0, out));
}

/// See [`super::portable::group_q4`].
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn group_q4(w: &GroupRef, x: &QActs, dst: &mut [f32]) {
    assert!(dst.len() >= x.m * LANES && x.q.len() >= x.m * x.kp && x.ds.len() >= x.m * w.blocks);
    let out = dst.as_mut_ptr();
    tiles!(x.m, |m0| tile_q4::<R, false>(w, x, m0, out));
}

/// See [`super::portable::group_q5`].
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn group_q5(w: &GroupRef, x: &QActs, dst: &mut [f32]) {
    assert!(dst.len() >= x.m * LANES && x.q.len() >= x.m * x.kp && x.ds.len() >= x.m * w.blocks);
    let out = dst.as_mut_ptr();
    tiles!(x.m, |m0| tile_q4::<R, true>(w, x, m0, out));
}
