//! GGUF tensors → [`QMatrix`] row by row, without dequantizing whole tensors: Q4_0, Q4_1 and
//! Q4_K blocks become [`Format::Q4`] blocks exactly; Q5_0 and Q5_1 become [`Format::Q5`]
//! exactly; Q8_0 becomes [`Format::Q8`] exactly; F32, F16, BF16 and Q6_K rows are decoded to f32
//! and requantized to Q8 (or the format asked for); any other type is dequantized by candle
//! first. Decoders are checked against candle's
//! `dequantize` on the pinned files (tests/llm_engine.rs).

use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use half::{bf16, f16};

use super::{expand_blocks, quantize_block, Format, QMatrix, RowBlock, BLOCK};

/// What `--quantize` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Quantize {
    /// 4- and 5-bit GGUF blocks stay as they are; everything else becomes Q8.
    #[default]
    Auto,
    Q8,
    Q5,
    Q4,
}

impl Quantize {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Quantize::Auto,
            "q8" | "q8_0" => Quantize::Q8,
            "q5" | "q5_0" | "q5_1" => Quantize::Q5,
            "q4" | "q4_k" | "q4_1" => Quantize::Q4,
            other => bail!("--quantize '{other}': expected auto, q8_0, q5_1 or q4_k"),
        })
    }
}

fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// A row's decoded content: exact 4-, 5- or 8-bit blocks, or f32 values.
enum Row {
    Blocks(Format, Vec<RowBlock>),
    F32(Vec<f32>),
}

fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn decode_row(dtype: GgmlDType, bytes: &[u8], k: usize) -> Result<Row> {
    Ok(match dtype {
        GgmlDType::F32 => {
            Row::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
        GgmlDType::F16 => Row::F32(bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()),
        GgmlDType::BF16 => {
            Row::F32(bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
        }
        GgmlDType::Q8_0 => Row::Blocks(
            Format::Q8,
            bytes
                .chunks_exact(34)
                .map(|b| {
                    let mut q = [0i8; BLOCK];
                    q.iter_mut().zip(&b[2..]).for_each(|(o, &v)| *o = v as i8);
                    // GGUF Q8_0 may hold -128; keep the symmetric range the kernels assume.
                    q.iter_mut().for_each(|v| *v = (*v).max(-127));
                    RowBlock::Q8 { d: h(b, 0), q }
                })
                .collect(),
        ),
        GgmlDType::Q4_0 | GgmlDType::Q4_1 => {
            let size = if dtype == GgmlDType::Q4_0 { 18 } else { 20 };
            Row::Blocks(
                Format::Q4,
                bytes
                    .chunks_exact(size)
                    .map(|b| {
                        let d = h(b, 0);
                        let (m, qs) = if size == 18 { (-8.0 * d, &b[2..18]) } else { (h(b, 2), &b[4..20]) };
                        let mut q = [0u8; BLOCK];
                        for j in 0..16 {
                            q[j] = qs[j] & 0x0f;
                            q[j + 16] = qs[j] >> 4;
                        }
                        RowBlock::Q4 { d, m, q }
                    })
                    .collect(),
            )
        }
        // d·(q − 16) = d·q + (−16·d), exactly: both products are a small integer times an f16.
        GgmlDType::Q5_0 | GgmlDType::Q5_1 => {
            let size = if dtype == GgmlDType::Q5_0 { 22 } else { 24 };
            Row::Blocks(
                Format::Q5,
                bytes
                    .chunks_exact(size)
                    .map(|b| {
                        let d = h(b, 0);
                        let (m, at) = if size == 22 { (-16.0 * d, 2) } else { (h(b, 2), 4) };
                        let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                        let qs = &b[at + 4..at + 20];
                        let mut q = [0u8; BLOCK];
                        for j in 0..16 {
                            let h0 = (((qh >> j) << 4) & 0x10) as u8;
                            let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                            q[j] = (qs[j] & 0x0f) | h0;
                            q[j + 16] = (qs[j] >> 4) | h1;
                        }
                        RowBlock::Q5 { d, m, q }
                    })
                    .collect(),
            )
        }
        GgmlDType::Q4K => {
            let mut out = Vec::with_capacity(k / BLOCK);
            for b in bytes.chunks_exact(144) {
                let (d, dmin) = (h(b, 0), h(b, 2));
                let (scales, qs) = (&b[4..16], &b[16..144]);
                for (c, chunk) in qs.chunks_exact(32).enumerate() {
                    for half in 0..2 {
                        let (sc, m) = scale_min_k4(2 * c + half, scales);
                        let mut q = [0u8; BLOCK];
                        for (o, &v) in q.iter_mut().zip(chunk) {
                            *o = if half == 0 { v & 0x0f } else { v >> 4 };
                        }
                        out.push(RowBlock::Q4 { d: d * sc as f32, m: -(dmin * m as f32), q });
                    }
                }
            }
            Row::Blocks(Format::Q4, out)
        }
        GgmlDType::Q6K => {
            let mut y = Vec::with_capacity(k);
            for b in bytes.chunks_exact(210) {
                let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], h(b, 208));
                for n in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                    let mut part = [0f32; 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xf) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        part[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        part[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        part[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        part[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                    y.extend_from_slice(&part);
                }
            }
            Row::F32(y)
        }
        other => bail!("GGUF type {other:?} has no row decoder"),
    })
}

fn bytes_per_row(dtype: GgmlDType, k: usize) -> Option<usize> {
    Some(match dtype {
        GgmlDType::F32 => 4 * k,
        GgmlDType::F16 | GgmlDType::BF16 => 2 * k,
        GgmlDType::Q8_0 => k / 32 * 34,
        GgmlDType::Q4_0 => k / 32 * 18,
        GgmlDType::Q4_1 => k / 32 * 20,
        GgmlDType::Q5_0 => k / 32 * 22,
        GgmlDType::Q5_1 => k / 32 * 24,
        GgmlDType::Q4K => k / 256 * 144,
        GgmlDType::Q6K => k / 256 * 210,
        _ => return None,
    })
}

/// Row r of a 2-D GGUF tensor, dequantized (for tests against candle, and embeddings).
pub fn dequantize_row(t: &QTensor, r: usize) -> Result<Vec<f32>> {
    let (_, k) = t.shape().dims2()?;
    let Some(rb) = bytes_per_row(t.dtype(), k) else { bail!("GGUF type {:?} has no row decoder", t.dtype()) };
    let data = t.data()?;
    Ok(match decode_row(t.dtype(), &data[r * rb..(r + 1) * rb], k)? {
        Row::F32(v) => v,
        Row::Blocks(_, blocks) => {
            let mut out = vec![0f32; k];
            expand_blocks(&blocks, &mut out);
            out
        }
    })
}

/// A 2-D GGUF tensor as a [`QMatrix`]; output row r is read from the tensor's row `source(r)`
/// (llama.cpp's permuted q/k rows are put back in Hugging Face order this way).
pub fn to_qmatrix(t: &QTensor, want: Quantize, source: impl Fn(usize) -> usize) -> Result<QMatrix> {
    let (n, k) = t.shape().dims2()?;
    let native4 = matches!(t.dtype(), GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K);
    let native5 = matches!(t.dtype(), GgmlDType::Q5_0 | GgmlDType::Q5_1);
    let format = match want {
        Quantize::Auto if native4 => Format::Q4,
        Quantize::Auto if native5 => Format::Q5,
        Quantize::Auto | Quantize::Q8 => Format::Q8,
        Quantize::Q5 => Format::Q5,
        Quantize::Q4 => Format::Q4,
    };
    let from_f32 = |v: &[f32]| -> Vec<RowBlock> { v.chunks(BLOCK).map(|c| quantize_block(c, format)).collect() };
    let blocks_of = |row: Row| -> Vec<RowBlock> {
        match row {
            Row::Blocks(f, b) if f == format => b,
            Row::F32(v) => from_f32(&v),
            Row::Blocks(_, b) => {
                let mut v = vec![0f32; k];
                expand_blocks(&b, &mut v);
                from_f32(&v)
            }
        }
    };
    match bytes_per_row(t.dtype(), k) {
        Some(rb) => {
            let data = t.data()?;
            let mut err = None;
            let m = QMatrix::from_row_blocks(n, k, format, |r| {
                let s = source(r);
                match decode_row(t.dtype(), &data[s * rb..(s + 1) * rb], k) {
                    Ok(row) => blocks_of(row),
                    Err(e) => {
                        err.get_or_insert(e);
                        vec![RowBlock::Q8 { d: 0.0, q: [0; BLOCK] }; 0]
                    }
                }
            });
            if let Some(e) = err {
                return Err(e);
            }
            m
        }
        None => {
            let all = t.dequantize(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            QMatrix::from_row_blocks(n, k, format, |r| from_f32(&all[source(r) * k..(source(r) + 1) * k]))
        }
    }
}

/// A 2-D GGUF tensor kept as stored, rows decoded on demand (embedding lookups).
pub struct RawRows {
    dtype: GgmlDType,
    k: usize,
    row_bytes: usize,
    data: Vec<u8>,
}

impl RawRows {
    /// `None` when the type has no row decoder.
    pub fn new(t: QTensor) -> Result<Option<Self>> {
        let (_, k) = t.shape().dims2()?;
        let Some(row_bytes) = bytes_per_row(t.dtype(), k) else { return Ok(None) };
        Ok(Some(Self { dtype: t.dtype(), k, row_bytes, data: t.data()?.into_owned() }))
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Row r into `out` (k values).
    pub fn row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        let bytes = self.data.get(r * self.row_bytes..(r + 1) * self.row_bytes);
        let bytes = bytes.ok_or_else(|| anyhow::anyhow!("row {r} is outside the table"))?;
        match decode_row(self.dtype, bytes, self.k)? {
            Row::F32(v) => out.copy_from_slice(&v),
            Row::Blocks(_, blocks) => expand_blocks(&blocks, out),
        }
        Ok(())
    }
}
