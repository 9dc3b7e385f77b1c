//! The LLM's linear projection `x · wᵀ`: a skinny kernel for decoding's few rows, gemm above, and a
//! backward that computes no gradient for frozen weights.

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;

/// `x · wᵀ` with `w` [n, k] row-major (the Hugging Face layout of a projection).
///
/// For few rows of `x` (LLM decoding: one row per sequence) a skinny kernel: with 8 rows, gemm
/// splits them into register tiles of 6 and 2 and streams the (transposed) weight through memory
/// once per tile; this reads every weight row once, contiguously, and dots it with all rows of
/// `x`, which stay in L1. For more rows, gemm. Its backward skips inputs that need no gradient.
struct LinearOp;

/// Rows up to which [`linear_rows`] uses the skinny kernel.
pub const SKINNY_MAX_ROWS: usize = 16;

/// One dot product with 64 independent lanes of accumulation (FMA latency hides behind them).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 64];
    let (ca, cb) = (a.chunks_exact(64), b.chunks_exact(64));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..64 {
            acc[i] = x[i].mul_add(y[i], acc[i]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Four dot products against one weight row: the weight chunk is loaded once for four rows and
/// the four accumulators form independent FMA chains.
#[inline]
fn dot4(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    let (mut a0, mut a1, mut a2, mut a3) = ([0f32; 16], [0f32; 16], [0f32; 16], [0f32; 16]);
    let chunks = w
        .chunks_exact(16)
        .zip(x[0].chunks_exact(16))
        .zip(x[1].chunks_exact(16))
        .zip(x[2].chunks_exact(16).zip(x[3].chunks_exact(16)));
    for (((wc, x0), x1), (x2, x3)) in chunks {
        for i in 0..16 {
            a0[i] = x0[i].mul_add(wc[i], a0[i]);
            a1[i] = x1[i].mul_add(wc[i], a1[i]);
            a2[i] = x2[i].mul_add(wc[i], a2[i]);
            a3[i] = x3[i].mul_add(wc[i], a3[i]);
        }
    }
    let k = w.len() / 16 * 16;
    let tail = |r: usize| (k..w.len()).map(|j| x[r][j] * w[j]).sum::<f32>();
    [
        a0.iter().sum::<f32>() + tail(0),
        a1.iter().sum::<f32>() + tail(1),
        a2.iter().sum::<f32>() + tail(2),
        a3.iter().sum::<f32>() + tail(3),
    ]
}

impl candle_core::CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "curec-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "linear input")?;
        let w = contiguous_f32(s2, l2, "linear weight")?;
        let (m, k) = (l1.dims()[0], l1.dims()[1]);
        let n = l2.dims()[0];
        if m > SKINNY_MAX_ROWS {
            let mut out = vec![0f32; m * n];
            let threads = rayon::current_num_threads();
            let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
            // SAFETY: the slices hold m·k, n·k and m·n elements laid out as the strides say.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    0f32,
                    1f32,
                    false,
                    false,
                    false,
                    par,
                );
            }
            return Ok((CpuStorage::F32(out), Shape::from((m, n))));
        }
        // Output column-major by chunks of weight rows, transposed at the end.
        const CHUNK: usize = 64;
        let mut t = vec![0f32; n * m];
        t.par_chunks_mut(CHUNK * m).enumerate().for_each(|(c, out)| {
            let o0 = c * CHUNK;
            let row = |r: usize| &x[r * k..(r + 1) * k];
            for (j, o) in out.chunks_mut(m).enumerate() {
                let wrow = &w[(o0 + j) * k..(o0 + j + 1) * k];
                let mut r = 0;
                while r + 4 <= m {
                    o[r..r + 4].copy_from_slice(&dot4(wrow, [row(r), row(r + 1), row(r + 2), row(r + 3)]));
                    r += 4;
                }
                for (rr, v) in o.iter_mut().enumerate().skip(r) {
                    *v = dot(row(rr), wrow);
                }
            }
        });
        let mut out = vec![0f32; m * n];
        for o in 0..n {
            for r in 0..m {
                out[r * n + o] = t[o * m + r];
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Frozen (LoRA) base weights get no gradient: it would cost a full-size matmul.
        let dx = if x.track_op() { Some(grad.matmul(w)?) } else { None };
        let dw = if w.track_op() { Some(grad.t()?.matmul(x)?) } else { None };
        Ok((dx, dw))
    }
}

/// `x · wᵀ` for 2-D `x` [m, k] and `w` [n, k]: on the CPU in f32 the skinny kernel for few rows,
/// gemm for more; candle's matmul elsewhere. Differentiable, and unlike candle's matmul the
/// backward pass computes no gradient for a weight that does not need one (a frozen LoRA base):
/// that gradient costs a full-size matmul and a full-size buffer per projection.
pub fn linear_rows(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && w.is_contiguous() {
        x.contiguous()?.apply_op2(w, LinearOp)
    } else {
        x.matmul(&w.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::*;

    #[test]
    fn skinny_matmul_matches_gemm_with_gradients() {
        // k = 83 exercises the non-multiple-of-16 tails; m up to 16 the skinny kernel, 40 gemm.
        for m in [1usize, 3, 4, 7, 16, 40] {
            let x = var((m, 83), |i| ((i * 13 % 17) as f32 - 8.0) * 0.1);
            let w = var((130, 83), |i| ((i * 7 % 19) as f32 - 9.0) * 0.05);
            let fast = linear_rows(x.as_tensor(), w.as_tensor()).unwrap();
            let slow = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
            close_rel(&fast, &slow);
            let g1 = fast.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = slow.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            close_rel(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
            close_rel(g1.get(w.as_tensor()).unwrap(), g2.get(w.as_tensor()).unwrap());
        }
    }
}
