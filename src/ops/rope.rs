//! Rotate-half rotary position embedding with a one-pass backward.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::contiguous_f32;

/// Rotate-half RoPE, `x · cos + rotate_half(x) · sin` with `rotate_half([x₁, x₂]) = [−x₂, x₁]`,
/// for x [b, h, t, d] and the tables [b, 1, t, d]: one pass each way instead of the composite's
/// six (two halves, a negation, a concatenation, two products and a sum). With `inverse`, the
/// transpose of that rotation: the backward pass, `g · cos + [g₂ · sin₂, −g₁ · sin₁]`.
struct Rope {
    inverse: bool,
}

/// Row `x` (d values) rotated by one position's `cos`/`sin` rows into `out` (see [`Rope`]).
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

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.inverse {
            "curec-rope-grad"
        } else {
            "curec-rope"
        }
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
            rope_row(x, &cos[p..p + d], &sin[p..p + d], o, self.inverse);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let transposed = Rope { inverse: !self.inverse };
        Ok((Some(grad.contiguous()?.apply_op3_no_bwd(cos, sin, &transposed)?), None, None))
    }
}

/// Rotate-half RoPE of `x` [b, h, t, d] with tables `cos`, `sin` [b, 1, t, d] (constants: no
/// gradient), differentiable in `x`. In f32 on the CPU one fused op; elsewhere the composite.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        return x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { inverse: false });
    }
    let half = x.dim(D::Minus1)? / 2;
    let rotated = Tensor::cat(&[&x.narrow(D::Minus1, half, half)?.neg()?, &x.narrow(D::Minus1, 0, half)?], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::*;

    #[test]
    fn fused_rope_equals_the_composite_ops_with_gradients() {
        let (b, h, t, d) = (2, 3, 5, 8);
        let x = var((b, h, t, d), |i| ((i * 11 % 31) as f32 - 15.0) * 0.13);
        let ang = |i: usize| (i % 17) as f32 * 0.37;
        let cos = filled((b, 1, t, d), |i| ang(i).cos());
        let sin = filled((b, 1, t, d), |i| ang(i).sin());
        let m = filled((b, h, t, d), |i| (i % 7) as f32 - 3.0);
        let fused = rope(x.as_tensor(), &cos, &sin).unwrap();
        let xt = x.as_tensor();
        let rotated =
            Tensor::cat(&[&xt.narrow(3, d / 2, d / 2).unwrap().neg().unwrap(), &xt.narrow(3, 0, d / 2).unwrap()], 3)
                .unwrap();
        let composite = (xt.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap();
        // The same products and sums in the same order: equal to the bit.
        assert_eq!(bits(&fused), bits(&composite));
        let g1 = (fused * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (composite * &m).unwrap().sum_all().unwrap().backward().unwrap();
        grads_close(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        assert!(g1.get(x.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 1.0);
    }
}
