//! The portable kernels: plain Rust, any CPU. They define the results: the SIMD kernels compute
//! the same integer dots and the same float operations in the same order, bit for bit.

use super::{GroupRef, QActs, BLOCK, LANES};

/// Q8 weights: `dst[m * LANES + lane] = Σ_b (Σ_t w·x) × (d_w·d_x)`.
pub(crate) fn group_q8(w: &GroupRef, x: &QActs, dst: &mut [f32]) {
    let k = x.kp;
    for m in 0..x.m {
        let mut acc = [0f32; LANES];
        for b in 0..w.blocks {
            let qs = &w.quants[b * LANES * BLOCK..(b + 1) * LANES * BLOCK];
            let xq = &x.q[m * k + b * BLOCK..m * k + (b + 1) * BLOCK];
            let dx = x.d[m * w.blocks + b];
            for (lane, a) in acc.iter_mut().enumerate() {
                let mut isum = 0i32;
                for j in 0..BLOCK / 4 {
                    for t in 0..4 {
                        isum += (qs[j * 32 + lane * 4 + t] as i8 as i32) * (xq[4 * j + t] as i32);
                    }
                }
                *a = (isum as f32).mul_add(w.scales[b * LANES + lane] * dx, *a);
            }
        }
        dst[m * LANES..(m + 1) * LANES].copy_from_slice(&acc);
    }
}

/// Q4 weights: `dst[m * LANES + lane] = Σ_b (Σ_t q·x) × (d_w·d_x) + m_w × (d_x·Σx)`.
pub(crate) fn group_q4(w: &GroupRef, x: &QActs, dst: &mut [f32]) {
    let k = x.kp;
    for m in 0..x.m {
        let mut acc = [0f32; LANES];
        for b in 0..w.blocks {
            let qs = &w.quants[b * LANES * BLOCK / 2..(b + 1) * LANES * BLOCK / 2];
            let xq = &x.q[m * k + b * BLOCK..m * k + (b + 1) * BLOCK];
            let (dx, ds) = (x.d[m * w.blocks + b], x.ds[m * w.blocks + b]);
            for (lane, a) in acc.iter_mut().enumerate() {
                let mut isum = 0i32;
                for p in 0..4 {
                    for t in 0..4 {
                        let byte = qs[p * 32 + lane * 4 + t];
                        isum += ((byte & 0x0f) as i32) * (xq[8 * p + t] as i32);
                        isum += ((byte >> 4) as i32) * (xq[8 * p + 4 + t] as i32);
                    }
                }
                *a = (isum as f32).mul_add(w.scales[b * LANES + lane] * dx, *a);
                *a = w.mins[b * LANES + lane].mul_add(ds, *a);
            }
        }
        dst[m * LANES..(m + 1) * LANES].copy_from_slice(&acc);
    }
}

/// Q5 weights: as Q4 with the fifth bit of each code from the high-bit plane.
pub(crate) fn group_q5(w: &GroupRef, x: &QActs, dst: &mut [f32]) {
    let k = x.kp;
    let qb = LANES * BLOCK / 2 + LANES * BLOCK / 8;
    for m in 0..x.m {
        let mut acc = [0f32; LANES];
        for b in 0..w.blocks {
            let qs = &w.quants[b * qb..(b + 1) * qb];
            let (nib, hb) = qs.split_at(LANES * BLOCK / 2);
            let xq = &x.q[m * k + b * BLOCK..m * k + (b + 1) * BLOCK];
            let (dx, ds) = (x.d[m * w.blocks + b], x.ds[m * w.blocks + b]);
            for (lane, a) in acc.iter_mut().enumerate() {
                let mut isum = 0i32;
                for p in 0..4 {
                    for t in 0..4 {
                        let at = lane * 4 + t;
                        let byte = nib[p * 32 + at];
                        let h0 = (hb[(2 * p) * 4 + at / 8] >> (at % 8)) & 1;
                        let h1 = (hb[(2 * p + 1) * 4 + at / 8] >> (at % 8)) & 1;
                        isum += (((byte & 0x0f) | (h0 << 4)) as i32) * (xq[8 * p + t] as i32);
                        isum += (((byte >> 4) | (h1 << 4)) as i32) * (xq[8 * p + 4 + t] as i32);
                    }
                }
                *a = (isum as f32).mul_add(w.scales[b * LANES + lane] * dx, *a);
                *a = w.mins[b * LANES + lane].mul_add(ds, *a);
            }
        }
        dst[m * LANES..(m + 1) * LANES].copy_from_slice(&acc);
    }
}
