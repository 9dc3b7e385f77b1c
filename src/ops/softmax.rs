//! Softmax over the last dimension (plain, and with an additive attention mask) and the softmax
//! cross-entropy over all classes, with one-pass backwards: candle's fused `softmax_last_dim` has
//! no backward and its composite `softmax` makes five passes and allocations over B·H·T² elements.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::contiguous_f32;

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
/// [b, h, t, k] and `bias` [b, 1, t, k] (broadcast over heads, never differentiated). In f32 on
/// the CPU one fused op; elsewhere the composite ops, the softmax in f32 whatever the dtype.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == candle_core::DType::F32 {
        return scores.contiguous()?.apply_op2(&bias.contiguous()?, MaskedSoftmax);
    }
    let summed = scores.broadcast_add(bias)?.to_dtype(candle_core::DType::F32)?;
    candle_nn::ops::softmax(&summed, D::Minus1)?.to_dtype(scores.dtype())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::*;
    use candle_core::Device;

    #[test]
    fn fused_softmax_and_cross_entropy_match_composite_ops_with_gradients() {
        let dev = Device::Cpu;
        let x = var((2, 3, 4), |i| ((i * 7 % 11) as f32 - 5.0) * 0.3);
        let w = filled((2, 3, 4), |i| (i % 5) as f32);
        let fused = softmax_last_dim(x.as_tensor()).unwrap();
        let reference = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        grads_close(&fused, &reference);
        let g1 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (reference * &w).unwrap().sum_all().unwrap().backward().unwrap();
        grads_close(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());

        let logits = var((3, 5), |i| ((i * 5 % 7) as f32) * 0.4);
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
        let (b, h, t, k) = (2, 3, 5, 7);
        let x = var((b, h, t, k), |i| ((i * 13 % 29) as f32 - 14.0) * 0.37);
        // Causal with a different key masked per row; row (1, 4) fully masked (finite, as in
        // the model's padding rows).
        let bias = filled((b, 1, t, k), |i| {
            let (bi, r, j) = (i / (t * k), i / k % t, i % k);
            if (bi == 1 && r == 4) || j > r + 2 || j == (r + bi) % k {
                crate::ops::MASKED
            } else {
                0.0
            }
        });
        let w = filled((b, h, t, k), |i| (i % 5) as f32 - 2.0);
        let fused = masked_softmax(x.as_tensor(), &bias).unwrap();
        let added = x.as_tensor().broadcast_add(&bias).unwrap();
        let one_pass = softmax_last_dim(&added).unwrap();
        let composite = candle_nn::ops::softmax(&added, D::Minus1).unwrap();
        // The same arithmetic as the separate add and softmax: equal to the bit.
        assert_eq!(bits(&fused), bits(&one_pass));
        grads_close(&fused, &composite);
        let g1 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (composite * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (g1, g2) = (g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        grads_close(g1, g2);
        assert!(g1.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 1.0, "a gradient flows");
    }
}
