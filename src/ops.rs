//! Fused CPU kernels with backward passes for the two hottest element-wise spots of training:
//! the attention softmax and the softmax cross-entropy over all items. candle's fused
//! `softmax_last_dim` has no backward and its composite `softmax` makes five passes and
//! allocations over B·H·T² elements; these make one (and fall back to composite ops off the CPU).

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
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
}
