//! RMSNorm with a one-pass backward (the composite ops make seven passes forward, and candle
//! reduces on one thread).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::contiguous_f32;

/// `1 / sqrt(mean(x²) + eps)` of one row (the sum of squares in order).
pub(crate) fn rms_inv(x: &[f32], eps: f32) -> f32 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::*;

    #[test]
    fn fused_rms_norm_matches_the_composite_ops_with_gradients() {
        let n = 37;
        let x = var((2, 3, n), |i| ((i * 13 % 23) as f32 - 11.0) * 0.21);
        let w = var(n, |i| 0.5 + (i % 7) as f32 * 0.2);
        let m = filled((2, 3, n), |i| (i % 5) as f32 - 2.0);
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
}
