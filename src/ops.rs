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

/// Below this, `exp` of an f32 is exactly 0 (its smallest subnormal is e^-103.3), so a masked
/// key's exponential is not computed: same result, no libm call.
const EXP_ZERO_BELOW: f32 = -110.0;

/// `softmax(x + bias)` of one row into `out` (the sum `x + bias` written first, as a separate
/// add would).
fn masked_softmax_row(x: &[f32], bias: &[f32], out: &mut [f32]) {
    let mut m = f32::NEG_INFINITY;
    for ((o, &v), &b) in out.iter_mut().zip(x).zip(bias) {
        *o = v + b;
        m = m.max(*o);
    }
    let mut sum = 0f32;
    for o in out.iter_mut() {
        let d = *o - m;
        *o = if d < EXP_ZERO_BELOW { 0.0 } else { d.exp() };
        sum += *o;
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// The softmax backward of one row: `y ⊙ (g − Σ g ⊙ y)`.
fn softmax_grad_row(y: &[f32], g: &[f32], out: &mut [f32]) {
    let s: f32 = y.iter().zip(g).map(|(&a, &b)| b * a).sum();
    for ((o, &a), &b) in out.iter_mut().zip(y).zip(g) {
        *o = a * (b - s);
    }
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
        Ok(Some(softmax_grad(res, grad)?))
    }
}

/// The softmax backward in one pass over each row (the composite `(g ⊙ y).sum`, `g − s`,
/// `y ⊙ (…)` makes three passes and allocations over B·H·T² elements).
struct SoftmaxGrad;

impl candle_core::CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "curec-softmax-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = contiguous_f32(s1, l1, "softmax output")?;
        let g = contiguous_f32(s2, l2, "softmax grad")?;
        let n = l1.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(n)
            .zip(y.par_chunks(n).zip(g.par_chunks(n)))
            .for_each(|(o, (yr, gr))| softmax_grad_row(yr, gr, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

fn softmax_grad(res: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if res.device().is_cpu() && res.dtype() == candle_core::DType::F32 {
        res.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)
    } else {
        let s = (grad * res)?.sum_keepdim(D::Minus1)?;
        res * grad.broadcast_sub(&s)?
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

/// `softmax(scores + bias)` over the last dimension with `scores` [b, h, t, k] and an additive
/// mask `bias` [b, 1, t, k] shared by the heads: one pass forward, one backward (to `scores`
/// only: the mask is a constant), no [b, h, t, k] sum tensor.
struct MaskedSoftmax;

impl candle_core::CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "curec-masked-softmax"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "attention scores")?;
        let bias = contiguous_f32(s2, l2, "attention mask")?;
        let (b, h, t, k) = l1.shape().dims4()?;
        if l2.dims() != [b, 1, t, k] {
            candle_core::bail!("masked softmax: mask {:?} for scores {:?}", l2.dims(), l1.dims());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(k).zip(x.par_chunks(k)).enumerate().for_each(|(r, (o, xr))| {
            let (bi, i) = (r / (h * t), r % t);
            masked_softmax_row(xr, &bias[(bi * t + i) * k..][..k], o);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(softmax_grad(res, grad)?), None))
    }
}

/// `softmax(scores + bias)` over the last dimension, differentiable in `scores`; `scores` is
/// [b, h, t, k] and `bias` [b, 1, t, k] (broadcast over heads, never differentiated).
pub fn masked_softmax(scores: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == candle_core::DType::F32 {
        scores.contiguous()?.apply_op2(&bias.contiguous()?, MaskedSoftmax)
    } else {
        candle_nn::ops::softmax(&scores.broadcast_add(bias)?, D::Minus1)
    }
}

/// `1 / sqrt(mean(x²) + eps)` of one row (the sum of squares in order).
fn rms_inv(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// RMSNorm over the last dimension, `x · (mean(x²) + eps)^-½ · w`: one parallel pass forward
/// and one backward, where the composite ops make seven (and candle reduces on one thread).
struct RmsNorm {
    eps: f32,
}

impl candle_core::CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "curec-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "rms-norm input")?;
        let w = contiguous_f32(s2, l2, "rms-norm weight")?;
        let n = w.len();
        if l1.dims().last() != Some(&n) {
            candle_core::bail!("rms-norm: weight of {n} for input {:?}", l1.dims());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n).zip(x.par_chunks(n)).with_min_len(8).for_each(|(o, x)| {
            let inv = rms_inv(x, self.eps);
            for ((o, &v), &g) in o.iter_mut().zip(x).zip(w) {
                *o = v * inv * g;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(w, &grad, &RmsNormGrad { eps: self.eps })?;
        // The weight's gradient only when it trains (full fine-tuning), by composite ops.
        let dw = if w.track_op() {
            let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?.sqrt()?.recip()?;
            let per = (grad * x.broadcast_mul(&inv)?)?;
            let n = w.elem_count();
            Some(per.reshape(((), n))?.sum(0)?.reshape(w.shape())?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// `dx = inv · (g ⊙ w) − x · inv³ · Σ (g ⊙ w ⊙ x) / n`, one row per task.
struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "curec-rms-norm-grad"
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
        let x = contiguous_f32(s1, l1, "rms-norm input")?;
        let w = contiguous_f32(s2, l2, "rms-norm weight")?;
        let g = contiguous_f32(s3, l3, "rms-norm grad")?;
        let n = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n).zip(x.par_chunks(n).zip(g.par_chunks(n))).with_min_len(8).for_each(|(o, (x, g))| {
            let inv = rms_inv(x, self.eps);
            let dot: f32 = x.iter().zip(g).zip(w).map(|((&x, &g), &w)| g * w * x).sum();
            let c = inv * inv * inv * dot / n as f32;
            for (((o, &x), &g), &w) in o.iter_mut().zip(x).zip(g).zip(w) {
                *o = inv * (g * w) - x * c;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// RMSNorm of `x` over its last dimension with weight `w`, differentiable (in `w` too when it
/// trains). In f32 on the CPU one fused op; elsewhere the composite ops in f32.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && w.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 });
    }
    let dtype = x.dtype();
    let x = x.to_dtype(candle_core::DType::F32)?;
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.to_dtype(dtype)?.broadcast_mul(w)
}

/// Rotate-half RoPE, `x · cos + rotate_half(x) · sin` with `rotate_half([x₁, x₂]) = [−x₂, x₁]`,
/// for x [b, h, t, d] and the tables [b, 1, t, d]: one pass each way instead of the composite's
/// six (two halves, a negation, a concatenation, two products and a sum).
struct Rope;

/// Row `x` (d values) rotated by one position's `cos`/`sin` rows into `out`; with `inverse`, the
/// transpose (the backward pass): `g · cos + [g₂ · sin₂, −g₁ · sin₁]`.
fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32], inverse: bool) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        if inverse {
            out[i] = a * cos[i] + b * sin[i + half];
            out[i + half] = b * cos[i + half] + -(a * sin[i]);
        } else {
            out[i] = a * cos[i] + -b * sin[i];
            out[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

fn rope_apply(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    s3: &CpuStorage,
    l3: &Layout,
    inverse: bool,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_f32(s1, l1, "rope input")?;
    let cos = contiguous_f32(s2, l2, "rope cos")?;
    let sin = contiguous_f32(s3, l3, "rope sin")?;
    let (b, h, t, d) = l1.shape().dims4()?;
    if l2.dims() != [b, 1, t, d] || l3.dims() != [b, 1, t, d] || d % 2 != 0 {
        candle_core::bail!("rope: tables {:?} / {:?} for input {:?}", l2.dims(), l3.dims(), l1.dims());
    }
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(d).zip(x.par_chunks(d)).enumerate().with_min_len(64).for_each(|(r, (o, x))| {
        let p = (r / (h * t) * t + r % t) * d;
        rope_row(x, &cos[p..p + d], &sin[p..p + d], o, inverse);
    });
    Ok((CpuStorage::F32(out), l1.shape().clone()))
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "curec-rope"
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
        rope_apply(s1, l1, s2, l2, s3, l3, false)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.contiguous()?.apply_op3_no_bwd(cos, sin, &RopeGrad)?), None, None))
    }
}

struct RopeGrad;

impl CustomOp3 for RopeGrad {
    fn name(&self) -> &'static str {
        "curec-rope-grad"
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
        rope_apply(s1, l1, s2, l2, s3, l3, true)
    }
}

/// Rotate-half RoPE of `x` [b, h, t, d] with tables `cos`, `sin` [b, 1, t, d] (constants: no
/// gradient), differentiable in `x`. In f32 on the CPU one fused op; elsewhere the composite.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope);
    }
    let half = x.dim(D::Minus1)? / 2;
    let rotated = Tensor::cat(&[&x.narrow(D::Minus1, half, half)?.neg()?, &x.narrow(D::Minus1, 0, half)?], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
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

    #[test]
    fn masked_softmax_equals_add_then_softmax_with_gradients() {
        let dev = Device::Cpu;
        let (b, h, t, k) = (2, 3, 5, 7);
        let x = Var::from_vec(
            (0..b * h * t * k).map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.37).collect::<Vec<f32>>(),
            (b, h, t, k),
            &dev,
        )
        .unwrap();
        // Causal with a different key masked per row; row (1, 4) fully masked (finite, as in
        // the model's padding rows).
        let bias: Vec<f32> = (0..b * t * k)
            .map(|i| {
                let (bi, r, j) = (i / (t * k), i / k % t, i % k);
                if (bi == 1 && r == 4) || j > r + 2 || j == (r + bi) % k {
                    crate::llm::model::MASKED
                } else {
                    0.0
                }
            })
            .collect();
        let bias = Tensor::from_vec(bias, (b, 1, t, k), &dev).unwrap();
        let w = Tensor::from_vec(
            (0..b * h * t * k).map(|i| (i % 5) as f32 - 2.0).collect::<Vec<f32>>(),
            (b, h, t, k),
            &dev,
        )
        .unwrap();
        let fused = masked_softmax(x.as_tensor(), &bias).unwrap();
        let added = x.as_tensor().broadcast_add(&bias).unwrap();
        let one_pass = softmax_last_dim(&added).unwrap();
        let composite = candle_nn::ops::softmax(&added, D::Minus1).unwrap();
        // The same arithmetic as the separate add and softmax: equal to the bit.
        let bits = |a: &Tensor| -> Vec<u32> {
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        assert_eq!(bits(&fused), bits(&one_pass));
        grads_close(&fused, &composite);
        let g1 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (composite * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        grads_close(g1, g2);
        assert!(g1.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 1.0, "a gradient flows");
    }

    #[test]
    fn fused_rms_norm_matches_the_composite_ops_with_gradients() {
        let dev = Device::Cpu;
        let (rows, n) = (6, 37);
        let x = Var::from_vec(
            (0..rows * n).map(|i| ((i * 13 % 23) as f32 - 11.0) * 0.21).collect::<Vec<f32>>(),
            (2, 3, n),
            &dev,
        )
        .unwrap();
        let w = Var::from_vec((0..n).map(|i| 0.5 + (i % 7) as f32 * 0.2).collect::<Vec<f32>>(), n, &dev).unwrap();
        let m = Tensor::from_vec((0..rows * n).map(|i| (i % 5) as f32 - 2.0).collect::<Vec<f32>>(), (2, 3, n), &dev)
            .unwrap();
        let eps = 1e-5;
        let fused = rms_norm(x.as_tensor(), w.as_tensor(), eps).unwrap();
        let inv = (x.as_tensor().sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let composite = x.as_tensor().broadcast_mul(&inv).unwrap().broadcast_mul(w.as_tensor()).unwrap();
        grads_close(&fused, &composite);
        let g1 = (fused * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (composite * &m).unwrap().sum_all().unwrap().backward().unwrap();
        grads_close(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        grads_close(g1.get(w.as_tensor()).unwrap(), g2.get(w.as_tensor()).unwrap());
        assert!(g1.get(x.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 1.0);
        // A constant weight (LoRA training) gets no gradient.
        let wc = w.as_tensor().detach();
        let g3 = (rms_norm(x.as_tensor(), &wc, eps).unwrap() * &m).unwrap().sum_all().unwrap().backward().unwrap();
        grads_close(g3.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        assert!(g3.get(&wc).is_none());
    }

    #[test]
    fn fused_rope_equals_the_composite_ops_with_gradients() {
        let dev = Device::Cpu;
        let (b, h, t, d) = (2, 3, 5, 8);
        let x = Var::from_vec(
            (0..b * h * t * d).map(|i| ((i * 11 % 31) as f32 - 15.0) * 0.13).collect::<Vec<f32>>(),
            (b, h, t, d),
            &dev,
        )
        .unwrap();
        let ang: Vec<f32> = (0..b * t * d).map(|i| (i % 17) as f32 * 0.37).collect();
        let cos = Tensor::from_vec(ang.iter().map(|a| a.cos()).collect::<Vec<f32>>(), (b, 1, t, d), &dev).unwrap();
        let sin = Tensor::from_vec(ang.iter().map(|a| a.sin()).collect::<Vec<f32>>(), (b, 1, t, d), &dev).unwrap();
        let m = Tensor::from_vec(
            (0..b * h * t * d).map(|i| (i % 7) as f32 - 3.0).collect::<Vec<f32>>(),
            (b, h, t, d),
            &dev,
        )
        .unwrap();
        let fused = rope(x.as_tensor(), &cos, &sin).unwrap();
        let xt = x.as_tensor();
        let rotated =
            Tensor::cat(&[&xt.narrow(3, d / 2, d / 2).unwrap().neg().unwrap(), &xt.narrow(3, 0, d / 2).unwrap()], 3)
                .unwrap();
        let composite = (xt.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap();
        // The same products and sums in the same order: equal to the bit.
        let bits = |a: &Tensor| -> Vec<u32> {
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
        };
        assert_eq!(bits(&fused), bits(&composite));
        let g1 = (fused * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (composite * &m).unwrap().sum_all().unwrap().backward().unwrap();
        grads_close(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        assert!(g1.get(x.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 1.0);
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
