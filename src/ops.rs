//! Fused CPU kernels with backward passes: the attention softmax and the softmax cross-entropy
//! over all items (candle's fused `softmax_last_dim` has no backward and its composite `softmax`
//! makes five passes and allocations over B·H·T² elements; these make one), per-token
//! log-probs, and the linear projection of the LLM (`linear_rows`). All fall back to candle's
//! ops off the CPU.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{what}: expected f32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

fn softmax_row(x: &[f32], out: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - m).exp();
        sum += *o;
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "curec-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "softmax")?;
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, r)| softmax_row(r, o));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // d softmax: y ⊙ (g − Σ g ⊙ y)
        let s = (grad * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some((res * grad.broadcast_sub(&s)?)?))
    }
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

/// Per-row cross-entropy −log softmax(logits)[target]; the gradient is (softmax − one-hot) · g.
struct CrossEntropyRows;

impl candle_core::CustomOp2 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "curec-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "cross-entropy logits")?;
        let CpuStorage::U32(t) = s2 else { candle_core::bail!("cross-entropy: targets must be u32") };
        let (a, b) = l2.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("targets not contiguous".into()))?;
        let t = &t[a..b];
        let n = l1.dims()[1];
        let out: Vec<f32> = x
            .par_chunks(n)
            .zip(t.par_iter())
            .map(|(r, &ti)| {
                let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let lse = m + r.iter().map(|&v| (v - m).exp()).sum::<f32>().ln();
                lse - r[ti as usize]
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(t.len())))
    }

    fn bwd(&self, x: &Tensor, t: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(x.apply_op3_no_bwd(t, &grad.contiguous()?, &CrossEntropyGrad)?), None))
    }
}

struct CrossEntropyGrad;

impl CustomOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "curec-cross-entropy-grad"
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
        let x = contiguous_f32(s1, l1, "cross-entropy logits")?;
        let CpuStorage::U32(t) = s2 else { candle_core::bail!("cross-entropy: targets must be u32") };
        let (a, b) = l2.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("targets not contiguous".into()))?;
        let t = &t[a..b];
        let g = contiguous_f32(s3, l3, "cross-entropy grad")?;
        let n = l1.dims()[1];
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n).zip(x.par_chunks(n)).zip(t.par_iter().zip(g.par_iter())).for_each(
            |((o, r), (&ti, &gi))| {
                softmax_row(r, o);
                o[ti as usize] -= 1.0;
                o.iter_mut().for_each(|v| *v *= gi);
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Mean softmax cross-entropy of `logits` (rows × classes) against u32 `targets`, differentiable.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() {
        logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropyRows)?.mean_all()
    } else {
        candle_nn::loss::cross_entropy(logits, targets)
    }
}

/// Per-row log-probability of `targets` under softmax(`logits`) (rows × classes), differentiable.
pub fn token_log_probs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() && logits.dtype() == candle_core::DType::F32 {
        logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropyRows)?.neg()
    } else {
        let lsm = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        lsm.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)
    }
}

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
fn dot(a: &[f32], b: &[f32]) -> f32 {
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
    use candle_core::{Device, Var};

    fn grads_close(a: &Tensor, b: &Tensor) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn fused_softmax_and_cross_entropy_match_composite_ops_with_gradients() {
        let dev = Device::Cpu;
        let x =
            Var::from_vec((0..24).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect::<Vec<f32>>(), (2, 3, 4), &dev)
                .unwrap();
        let w = Tensor::from_vec((0..24).map(|i| (i % 5) as f32).collect::<Vec<f32>>(), (2, 3, 4), &dev).unwrap();
        let fused = softmax_last_dim(x.as_tensor()).unwrap();
        let reference = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        grads_close(&fused, &reference);
        let g1 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (reference * &w).unwrap().sum_all().unwrap().backward().unwrap();
        grads_close(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());

        let logits =
            Var::from_vec((0..15).map(|i| ((i * 5 % 7) as f32) * 0.4).collect::<Vec<f32>>(), (3, 5), &dev).unwrap();
        let t = Tensor::new(&[4u32, 0, 2], &dev).unwrap();
        let a = cross_entropy(logits.as_tensor(), &t).unwrap();
        let b = candle_nn::loss::cross_entropy(logits.as_tensor(), &t).unwrap();
        assert!((a.to_scalar::<f32>().unwrap() - b.to_scalar::<f32>().unwrap()).abs() < 1e-6);
        let ga = (a * 3.0).unwrap().backward().unwrap();
        let gb = (b * 3.0).unwrap().backward().unwrap();
        grads_close(ga.get(logits.as_tensor()).unwrap(), gb.get(logits.as_tensor()).unwrap());
    }

    fn close_rel(a: &Tensor, b: &Tensor) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs().max(y.abs())), "{x} vs {y}");
        }
    }

    #[test]
    fn skinny_matmul_matches_gemm_with_gradients() {
        let dev = Device::Cpu;
        // k = 83 exercises the non-multiple-of-16 tails; m up to 16 the skinny kernel, 40 gemm.
        for m in [1usize, 3, 4, 7, 16, 40] {
            let x = Var::from_vec(
                (0..m * 83).map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.1).collect::<Vec<f32>>(),
                (m, 83),
                &dev,
            )
            .unwrap();
            let w = Var::from_vec(
                (0..130 * 83).map(|i| ((i * 7 % 19) as f32 - 9.0) * 0.05).collect::<Vec<f32>>(),
                (130, 83),
                &dev,
            )
            .unwrap();
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
