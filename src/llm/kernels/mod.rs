//! Quantized CPU kernels for inference: weights kept as 4- or 8-bit blocks of 32 along the input
//! dimension, activations quantized per block of 32 to int8, and fused dequantize-and-dot matrix
//! products that read every weight byte once per call whatever the number of rows.
//!
//! Layout. A [`QMatrix`] of n output rows × k inputs is stored in groups of [`LANES`] = 8 output
//! rows; within a group, block after block of 32 inputs, each block holding the 8 rows' quants
//! interleaved so that one 256-bit load gives every row of the group 4 (Q8) or 8 (Q4) inputs.
//! The integer dot of a block lands in one 32-bit lane per output row, so a row's result never
//! needs a horizontal reduction, and its value does not depend on how many rows of activations
//! are multiplied at once, nor on how the groups are split over threads: a sequence gets the
//! same logits alone or in any batch.
//!
//! Formats:
//! - [`Format::Q8`]: symmetric int8 in [-127, 127] with one f32 scale per block (GGUF Q8_0 kept
//!   as is; f32/f16/bf16, Q6_K and Q5_x requantized, which is near-lossless).
//! - [`Format::Q4`]: 4-bit codes 0..15 with an f32 scale and an f32 offset per block
//!   (value = d·q + m). GGUF Q4_0, Q4_1 and Q4_K (a sub-block of 32 with scale d·sc and offset
//!   −dmin·m) convert to it exactly.
//! - [`Format::Q5`]: 5-bit codes 0..31, scale and offset as Q4: the Q4 nibbles plus a plane of
//!   high bits. GGUF Q5_0 (d·(q − 16)) and Q5_1 convert to it exactly; 7 bits a weight with the
//!   f32 scale and offset, against Q8's 9, which is what a memory-bound decoding step reads.
//!
//! Every path computes each output as Σ_blocks (i32 dot) × (d_w·d_x) [+ m_w·(d_x·Σx)] with the
//! integer dot exact and the float operations in the same order, so the AVX2 and the portable
//! kernels give bit-identical results (tested). The kernel is chosen at run time
//! (`is_x86_feature_detected!`); `CUREC_KERNEL=portable` forces the portable one.
//!
//! On CPUs with AVX-512 VNNI the [`avx512`] kernel accumulates the byte products into 32-bit lanes
//! with one `vpdpbusd` each; it reads the same packed matrices as the AVX2 and portable kernels and
//! gives the same bits. Run-time choice, fastest first: `avx512vnni`, `avx2`, `portable`.

mod avx2;
mod avx512;
pub mod gguf;
mod portable;

use std::sync::OnceLock;

use rayon::prelude::*;

/// Inputs per quantization block.
pub const BLOCK: usize = 32;
/// Output rows per interleaved group (one 256-bit register of i32 lanes).
pub const LANES: usize = 8;

/// Weight storage format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Q8,
    Q4,
    Q5,
}

impl Format {
    /// Bytes of quants per group-block.
    fn quant_bytes(self) -> usize {
        match self {
            Format::Q8 => LANES * BLOCK,
            Format::Q4 => LANES * BLOCK / 2,
            // The Q4 nibbles, then 8 words of high bits (see `from_row_blocks`).
            Format::Q5 => LANES * BLOCK / 2 + LANES * BLOCK / 8,
        }
    }
}

/// One block of 32 weights of one row, before packing.
#[derive(Debug, Clone, Copy)]
pub enum RowBlock {
    /// d · q, q in [-127, 127].
    Q8 { d: f32, q: [i8; BLOCK] },
    /// d · q + m, q in 0..=15.
    Q4 { d: f32, m: f32, q: [u8; BLOCK] },
    /// d · q + m, q in 0..=31.
    Q5 { d: f32, m: f32, q: [u8; BLOCK] },
}

/// A quantized n × k weight matrix (a projection's `[out, in]`).
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub n: usize,
    /// Inputs; stored padded with zeros to a multiple of [`BLOCK`].
    pub k: usize,
    pub format: Format,
    /// Per group, per block: the interleaved quants ([`Format::quant_bytes`]).
    quants: Vec<u8>,
    /// Per group, per block: LANES scales.
    scales: Vec<f32>,
    /// Q4 and Q5: per group, per block: LANES offsets.
    mins: Vec<f32>,
}

/// Symmetric int8 quantization of one block: scale amax/127, round half away from zero.
pub fn quantize_block_q8(x: &[f32]) -> (f32, [i8; BLOCK]) {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    (d, q)
}

impl QMatrix {
    /// Pack rows given block by block: `row(r)` returns row r's ⌈k/32⌉ blocks, all of `format`
    /// (a partial last block padded with zeros).
    pub fn from_row_blocks(
        n: usize,
        k: usize,
        format: Format,
        mut row: impl FnMut(usize) -> Vec<RowBlock>,
    ) -> anyhow::Result<Self> {
        let nb = k.div_ceil(BLOCK);
        let groups = n.div_ceil(LANES);
        let qb = format.quant_bytes();
        let mut quants = vec![0u8; groups * nb * qb];
        let mut scales = vec![0f32; groups * nb * LANES];
        let mut mins = if format == Format::Q8 { Vec::new() } else { vec![0f32; groups * nb * LANES] };
        for r in 0..n {
            let blocks = row(r);
            anyhow::ensure!(blocks.len() == nb, "row {r}: {} blocks, expected {nb}", blocks.len());
            let (g, lane) = (r / LANES, r % LANES);
            for (b, blk) in blocks.iter().enumerate() {
                let gb = g * nb + b;
                let qs = &mut quants[gb * qb..(gb + 1) * qb];
                match (*blk, format) {
                    (RowBlock::Q8 { d, q }, Format::Q8) => {
                        scales[gb * LANES + lane] = d;
                        // quad j of the block: bytes [j*32 + lane*4 .. +4] = inputs 4j..4j+4
                        for j in 0..BLOCK / 4 {
                            for t in 0..4 {
                                qs[j * 32 + lane * 4 + t] = q[4 * j + t] as u8;
                            }
                        }
                    }
                    (RowBlock::Q4 { d, m, q }, Format::Q4) => {
                        scales[gb * LANES + lane] = d;
                        mins[gb * LANES + lane] = m;
                        // register p (0..4) of the block: byte [p*32 + lane*4 + t] holds input
                        // 8p+t in its low nibble and input 8p+4+t in its high nibble
                        for p in 0..4 {
                            for t in 0..4 {
                                let lo = q[8 * p + t] & 0x0f;
                                let hi = q[8 * p + 4 + t] & 0x0f;
                                qs[p * 32 + lane * 4 + t] = lo | (hi << 4);
                            }
                        }
                    }
                    (RowBlock::Q5 { d, m, q }, Format::Q5) => {
                        scales[gb * LANES + lane] = d;
                        mins[gb * LANES + lane] = m;
                        // The low nibbles as Q4; then, for register p and half s (0: the low
                        // nibbles, 1: the high ones), a word whose bit lane*4 + t is bit 4 of
                        // input 8p + 4s + t: the kernels spread it to one byte per bit.
                        let (nib, hb) = qs.split_at_mut(LANES * BLOCK / 2);
                        for p in 0..4 {
                            for t in 0..4 {
                                let lo = q[8 * p + t] & 0x0f;
                                let hi = q[8 * p + 4 + t] & 0x0f;
                                nib[p * 32 + lane * 4 + t] = lo | (hi << 4);
                                for s in 0..2 {
                                    let bit = (q[8 * p + 4 * s + t] >> 4) & 1;
                                    let at = lane * 4 + t;
                                    hb[(2 * p + s) * 4 + at / 8] |= bit << (at % 8);
                                }
                            }
                        }
                    }
                    _ => anyhow::bail!("row {r}, block {b}: block format does not match the matrix format {format:?}"),
                }
            }
        }
        Ok(Self { n, k, format, quants, scales, mins })
    }

    /// Quantize a row-major f32 matrix (n × k) to `format`.
    pub fn quantize(data: &[f32], n: usize, k: usize, format: Format) -> anyhow::Result<Self> {
        anyhow::ensure!(data.len() == n * k, "quantize: {} values for a {n} × {k} matrix", data.len());
        Self::from_row_blocks(n, k, format, |r| {
            data[r * k..(r + 1) * k]
                .chunks(BLOCK)
                .map(|x| {
                    let mut padded = [0f32; BLOCK];
                    padded[..x.len()].copy_from_slice(x);
                    quantize_block(&padded, format)
                })
                .collect()
        })
    }

    /// Concatenate matrices with the same k and format along the output rows (fused q/k/v or
    /// gate/up projections: one pass over the activations instead of several).
    pub fn concat(parts: &[&QMatrix]) -> anyhow::Result<Self> {
        let first = parts.first().ok_or_else(|| anyhow::anyhow!("concat of no matrices"))?;
        let n: usize = parts.iter().map(|p| p.n).sum();
        let mut owner = Vec::with_capacity(n);
        for (pi, p) in parts.iter().enumerate() {
            anyhow::ensure!(p.k == first.k && p.format == first.format, "concat: mismatched matrices");
            owner.extend((0..p.n).map(|r| (pi, r)));
        }
        Self::from_row_blocks(n, first.k, first.format, |r| {
            let (pi, rr) = owner[r];
            parts[pi].row_blocks(rr)
        })
    }

    /// Row r's blocks, unpacked.
    pub fn row_blocks(&self, r: usize) -> Vec<RowBlock> {
        let nb = self.k.div_ceil(BLOCK);
        let qb = self.format.quant_bytes();
        let (g, lane) = (r / LANES, r % LANES);
        (0..nb)
            .map(|b| {
                let gb = g * nb + b;
                let qs = &self.quants[gb * qb..(gb + 1) * qb];
                let d = self.scales[gb * LANES + lane];
                match self.format {
                    Format::Q8 => {
                        let mut q = [0i8; BLOCK];
                        for (i, v) in q.iter_mut().enumerate() {
                            *v = qs[(i / 4) * 32 + lane * 4 + i % 4] as i8;
                        }
                        RowBlock::Q8 { d, q }
                    }
                    Format::Q4 | Format::Q5 => {
                        let mut q = [0u8; BLOCK];
                        for (i, v) in q.iter_mut().enumerate() {
                            let (p, w) = (i / 8, i % 8);
                            let byte = qs[p * 32 + lane * 4 + w % 4];
                            *v = if w < 4 { byte & 0x0f } else { byte >> 4 };
                            if self.format == Format::Q5 {
                                let at = lane * 4 + w % 4;
                                let word = &qs[LANES * BLOCK / 2 + (2 * p + w / 4) * 4..];
                                *v |= ((word[at / 8] >> (at % 8)) & 1) << 4;
                            }
                        }
                        let m = self.mins[gb * LANES + lane];
                        if self.format == Format::Q5 {
                            RowBlock::Q5 { d, m, q }
                        } else {
                            RowBlock::Q4 { d, m, q }
                        }
                    }
                }
            })
            .collect()
    }

    /// Row r dequantized (embedding lookups from a tied head).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        expand_blocks(&self.row_blocks(r), &mut out[..self.k]);
    }

    /// The whole matrix dequantized, row-major (tests and reference paths).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n * self.k];
        for r in 0..self.n {
            self.row(r, &mut out[r * self.k..(r + 1) * self.k]);
        }
        out
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.quants.len() + 4 * (self.scales.len() + self.mins.len())
    }

    fn groups(&self) -> usize {
        self.n.div_ceil(LANES)
    }

    /// `out[m][n] = Σ_k x[m][k] · w[n][k]` for the quantized activations `x` (m rows), written
    /// into `out` (m × n, row-major).
    pub fn matmul(&self, x: &QActs, out: &mut [f32]) {
        self.matmul_with(kernel(), x, out)
    }

    /// [`Self::matmul`] with a chosen kernel (tests compare them).
    pub fn matmul_with(&self, kern: Kernel, x: &QActs, out: &mut [f32]) {
        assert_eq!(x.k, self.k, "matmul: activations have {} inputs, the matrix {}", x.k, self.k);
        assert_eq!(out.len(), x.m * self.n, "matmul: output buffer size");
        let groups = self.groups();
        // Threads split the output groups; each task computes a group into a small scratch
        // (`m × LANES`, group-major) and copies its lanes into the rows of `out` itself.
        let chunk = groups.div_ceil(rayon::current_num_threads().max(1) * 2).max(1);
        let (n, m) = (self.n, x.m);
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..groups.div_ceil(chunk)).into_par_iter().for_each(|ci| {
            let out_ptr = &out_ptr;
            let mut dst = vec![0f32; LANES * m];
            for g in ci * chunk..((ci + 1) * chunk).min(groups) {
                self.group(kern, g, x, &mut dst);
                let lanes = LANES.min(n - g * LANES);
                for r in 0..m {
                    // SAFETY: tasks own disjoint groups, i.e. disjoint column ranges
                    // [g·LANES, g·LANES + lanes) of every row of `out` (m × n, checked above).
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            dst.as_ptr().add(r * LANES),
                            out_ptr.0.add(r * n + g * LANES),
                            lanes,
                        );
                    }
                }
            }
        });
    }

    /// One group of LANES output rows for all activation rows: `dst[m * LANES + lane]`.
    fn group(&self, kern: Kernel, g: usize, x: &QActs, dst: &mut [f32]) {
        let nb = self.k.div_ceil(BLOCK);
        let qb = self.format.quant_bytes();
        let w = GroupRef {
            quants: &self.quants[g * nb * qb..(g + 1) * nb * qb],
            scales: &self.scales[g * nb * LANES..(g + 1) * nb * LANES],
            mins: if self.format == Format::Q8 { &[] } else { &self.mins[g * nb * LANES..(g + 1) * nb * LANES] },
            blocks: nb,
        };
        match (kern, self.format) {
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, Format::Q8) => unsafe { avx2::group_q8(&w, x, dst) },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, Format::Q4) => unsafe { avx2::group_q4(&w, x, dst) },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx2, Format::Q5) => unsafe { avx2::group_q5(&w, x, dst) },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512Vnni, Format::Q8) => unsafe { avx512::group_q8(&w, x, dst) },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512Vnni, Format::Q4) => unsafe { avx512::group_q4(&w, x, dst) },
            #[cfg(target_arch = "x86_64")]
            (Kernel::Avx512Vnni, Format::Q5) => unsafe { avx512::group_q5(&w, x, dst) },
            (_, Format::Q8) => portable::group_q8(&w, x, dst),
            (_, Format::Q4) => portable::group_q4(&w, x, dst),
            (_, Format::Q5) => portable::group_q5(&w, x, dst),
        }
    }
}

/// Blocks back to f32 values; `out` may be shorter than the blocks (a padded last block).
pub fn expand_blocks(blocks: &[RowBlock], out: &mut [f32]) {
    for (o, blk) in out.chunks_mut(BLOCK).zip(blocks) {
        match *blk {
            RowBlock::Q8 { d, q } => o.iter_mut().zip(q).for_each(|(o, q)| *o = d * q as f32),
            RowBlock::Q4 { d, m, q } | RowBlock::Q5 { d, m, q } => {
                o.iter_mut().zip(q).for_each(|(o, q)| *o = d * q as f32 + m)
            }
        }
    }
}

/// Quantize one block of f32 values.
pub fn quantize_block(x: &[f32], format: Format) -> RowBlock {
    match format {
        Format::Q8 => {
            let (d, q) = quantize_block_q8(x);
            RowBlock::Q8 { d, q }
        }
        Format::Q4 | Format::Q5 => {
            let top = if format == Format::Q4 { 15.0 } else { 31.0 };
            let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (hi - lo) / top;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut q = [0u8; BLOCK];
            for (o, &v) in q.iter_mut().zip(x) {
                *o = ((v - lo) * inv).round().clamp(0.0, top) as u8;
            }
            if format == Format::Q4 {
                RowBlock::Q4 { d, m: lo, q }
            } else {
                RowBlock::Q5 { d, m: lo, q }
            }
        }
    }
}

/// A pointer handed to parallel tasks that write disjoint parts of one buffer.
struct SendPtr(*mut f32);
// SAFETY: only used by `QMatrix::matmul_with`, whose tasks write disjoint ranges.
unsafe impl Sync for SendPtr {}

/// One group's weights, borrowed.
pub(crate) struct GroupRef<'a> {
    pub quants: &'a [u8],
    pub scales: &'a [f32],
    pub mins: &'a [f32],
    pub blocks: usize,
}

/// Activations quantized per block of 32: m rows × k (each row stored padded with zeros to
/// `kp`, a multiple of 32, so that padded weight blocks contribute nothing).
#[derive(Debug, Clone, Default)]
pub struct QActs {
    pub m: usize,
    pub k: usize,
    pub kp: usize,
    /// m × kp int8 values.
    pub q: Vec<i8>,
    /// m × k/32 scales.
    pub d: Vec<f32>,
    /// m × k/32: d × Σ q over the block (the offset term of Q4 weights).
    pub ds: Vec<f32>,
}

impl QActs {
    /// Quantize m rows of k values (row-major).
    pub fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        let mut a = Self::default();
        a.requantize(x, m, k);
        a
    }

    /// [`Self::quantize`] reusing this buffer's allocations.
    pub fn requantize(&mut self, x: &[f32], m: usize, k: usize) {
        assert_eq!(x.len(), m * k, "QActs: {} values for {m} × {k}", x.len());
        let nb = k.div_ceil(BLOCK);
        self.m = m;
        self.k = k;
        self.kp = nb * BLOCK;
        self.q.resize(m * self.kp, 0);
        self.d.resize(m * nb, 0.0);
        self.ds.resize(m * nb, 0.0);
        let kp = self.kp;
        let rows = self.q.par_chunks_mut(kp).zip(self.d.par_chunks_mut(nb)).zip(self.ds.par_chunks_mut(nb));
        rows.enumerate().with_min_len(8).for_each(|(r, ((q_row, d_row), ds_row))| {
            for b in 0..nb {
                let xb = &x[r * k + b * BLOCK..(r * k + (b + 1) * BLOCK).min((r + 1) * k)];
                let mut padded = [0f32; BLOCK];
                padded[..xb.len()].copy_from_slice(xb);
                let (d, q) = quantize_block_q8(&padded);
                q_row[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&q);
                d_row[b] = d;
                ds_row[b] = d * q.iter().map(|&v| v as i32).sum::<i32>() as f32;
            }
        });
    }
}

/// Which matmul implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    Avx2,
    Avx512Vnni,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Vnni => "avx512vnni",
        }
    }

    /// Whether this CPU can run it.
    pub fn available(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => {
                Kernel::Avx2.available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 | Kernel::Avx512Vnni => false,
        }
    }
}

/// Every kernel, fastest first.
pub const KERNELS: [Kernel; 3] = [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::Portable];

/// The kernel chosen for this process: the fastest available, or
/// `CUREC_KERNEL=portable|avx2|avx512vnni` (a kernel this CPU lacks falls back to the fastest it has).
pub fn kernel() -> Kernel {
    static K: OnceLock<Kernel> = OnceLock::new();
    *K.get_or_init(|| {
        let forced = std::env::var("CUREC_KERNEL").ok();
        let fastest = KERNELS.into_iter().find(|k| k.available()).unwrap_or(Kernel::Portable);
        match KERNELS.into_iter().find(|k| Some(k.name()) == forced.as_deref()) {
            Some(k) if k.available() => k,
            Some(k) => {
                tracing::warn!("CUREC_KERNEL={}: this CPU cannot run it; using {}", k.name(), fastest.name());
                fastest
            }
            None => fastest,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{rng_for, standard_normal};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rng_for(seed, 1, 2);
        (0..n).map(|_| standard_normal(&mut rng)).collect()
    }

    fn reference(w: &[f32], x: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
            }
        }
        out
    }

    fn dequantize_acts(a: &QActs) -> Vec<f32> {
        let nb = a.kp / BLOCK;
        let mut out = Vec::with_capacity(a.m * a.k);
        for r in 0..a.m {
            out.extend((0..a.k).map(|i| a.q[r * a.kp + i] as f32 * a.d[r * nb + i / BLOCK]));
        }
        out
    }

    #[test]
    fn kernels_agree_bitwise_and_match_the_dequantized_product() {
        let (n, k) = (37, 96); // a partial last group
        let w = random(n * k, 1);
        for format in [Format::Q8, Format::Q4, Format::Q5] {
            let qm = QMatrix::quantize(&w, n, k, format).unwrap();
            let deq = qm.dequantize();
            for m in [1, 3, 4, 9, 8, 13, 19] {
                let x = random(m * k, 2 + m as u64);
                let qa = QActs::quantize(&x, m, k);
                let mut a = vec![0f32; m * n];
                qm.matmul_with(Kernel::Portable, &qa, &mut a);
                for kern in [Kernel::Avx2, Kernel::Avx512Vnni] {
                    if kern.available() {
                        let mut b = vec![0f32; m * n];
                        qm.matmul_with(kern, &qa, &mut b);
                        assert_eq!(a, b, "{format:?}, m = {m}: {} and portable differ", kern.name());
                    } else {
                        eprintln!("SKIPPED: this CPU cannot run the {} kernel; it was not checked", kern.name());
                    }
                }
                // against the f32 product of the dequantized weights and activations: the integer
                // arithmetic is exact, so only float rounding separates them
                let exact = reference(&deq, &dequantize_acts(&qa), n, k, m);
                for (u, v) in a.iter().zip(&exact) {
                    assert!((u - v).abs() < 1e-4 * (1.0 + v.abs()), "{format:?}: {u} vs {v}");
                }
                // and the quantization error against the original activations stays small
                let orig = reference(&deq, &x, n, k, m);
                let err = a.iter().zip(&orig).map(|(u, v)| (u - v).abs()).sum::<f32>() / a.len() as f32;
                let scale = orig.iter().map(|v| v.abs()).sum::<f32>() / orig.len() as f32;
                assert!(
                    err < 0.02 * scale,
                    "{format:?}: mean error {err} (outputs ~{scale}) from quantizing the activations"
                );
            }
        }
    }

    #[test]
    fn a_row_gives_the_same_result_alone_or_among_others() {
        let (n, k) = (24, 64);
        let w = QMatrix::quantize(&random(n * k, 3), n, k, Format::Q8).unwrap();
        let x = random(5 * k, 4);
        let all = QActs::quantize(&x, 5, k);
        let mut out = vec![0f32; 5 * n];
        w.matmul(&all, &mut out);
        let one = QActs::quantize(&x[2 * k..3 * k], 1, k);
        let mut single = vec![0f32; n];
        w.matmul(&one, &mut single);
        assert_eq!(&out[2 * n..3 * n], single.as_slice());
    }

    #[test]
    fn q5_codes_round_trip_through_the_packed_layout() {
        let (n, k) = (13, 64);
        let rows: Vec<Vec<RowBlock>> = (0..n)
            .map(|r| {
                (0..k / BLOCK)
                    .map(|b| {
                        let mut q = [0u8; BLOCK];
                        q.iter_mut().enumerate().for_each(|(i, v)| *v = ((i * 7 + r * 3 + b * 11) % 32) as u8);
                        RowBlock::Q5 { d: 0.5 + r as f32, m: -(b as f32), q }
                    })
                    .collect()
            })
            .collect();
        let qm = QMatrix::from_row_blocks(n, k, Format::Q5, |r| rows[r].clone()).unwrap();
        for (r, row) in rows.iter().enumerate() {
            for (a, b) in qm.row_blocks(r).iter().zip(row) {
                match (a, b) {
                    (RowBlock::Q5 { d, m, q }, RowBlock::Q5 { d: d2, m: m2, q: q2 }) => {
                        assert_eq!((d, m, q), (d2, m2, q2), "row {r}");
                    }
                    _ => panic!("row {r}: not Q5 blocks"),
                }
            }
        }
    }

    #[test]
    fn packing_round_trips_and_concat_stacks_rows() {
        let (n, k) = (11, 64);
        let a = QMatrix::quantize(&random(n * k, 5), n, k, Format::Q4).unwrap();
        let b = QMatrix::quantize(&random(3 * k, 6), 3, k, Format::Q4).unwrap();
        let c = QMatrix::concat(&[&a, &b]).unwrap();
        assert_eq!(c.n, 14);
        let (da, db, dc) = (a.dequantize(), b.dequantize(), c.dequantize());
        assert_eq!(&dc[..n * k], da.as_slice());
        assert_eq!(&dc[n * k..], db.as_slice());
        // k not a multiple of 32: padded, and the product is still right
        let (n, k) = (5, 40);
        let w = random(n * k, 7);
        let x = random(2 * k, 8);
        let qm = QMatrix::quantize(&w, n, k, Format::Q8).unwrap();
        let mut out = vec![0f32; 2 * n];
        qm.matmul(&QActs::quantize(&x, 2, k), &mut out);
        let acts = QActs::quantize(&x, 2, k);
        for (u, v) in out.iter().zip(reference(&qm.dequantize(), &dequantize_acts(&acts), n, k, 2)) {
            assert!((u - v).abs() < 1e-4 * (1.0 + v.abs()), "{u} vs {v}");
        }
    }
}
