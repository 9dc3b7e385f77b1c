//! Fused CPU kernels with backward passes for the training paths: softmax (plain, masked for
//! attention) and the softmax cross-entropy, RMSNorm, RoPE, and the LLM's linear projection. Each
//! makes one parallel pass where candle's composite ops make several, and falls back to those ops
//! off the CPU or outside f32.

use candle_core::{CpuStorage, Layout, Result};

mod linear;
mod norm;
mod rope;
mod softmax;

pub(crate) use linear::dot;
pub use linear::{linear_rows, SKINNY_MAX_ROWS};
pub(crate) use norm::rms_inv;
pub use norm::rms_norm;
pub use rope::rope;
pub use softmax::{cross_entropy, masked_softmax, softmax_last_dim, token_log_probs};

/// Additive mask value for a key a query must not see (finite so fully masked rows stay finite).
pub const MASKED: f32 = -1e9;

pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{what}: expected f32") };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{Device, Shape, Tensor, Var};

    /// A CPU tensor of `shape` whose element i (row-major) is `f(i)`.
    pub fn filled(shape: impl Into<Shape>, f: impl Fn(usize) -> f32) -> Tensor {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count()).map(f).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// [`filled`] as a variable (its gradient is computed).
    pub fn var(shape: impl Into<Shape>, f: impl Fn(usize) -> f32) -> Var {
        Var::from_tensor(&filled(shape, f)).unwrap()
    }

    /// The f32 bit patterns of every element, for exact comparisons.
    pub fn bits(a: &Tensor) -> Vec<u32> {
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    }

    /// Equal within 1e-5 absolute, element by element.
    pub fn grads_close(a: &Tensor, b: &Tensor) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    /// Equal within 1e-5 relative, element by element.
    pub fn close_rel(a: &Tensor, b: &Tensor) {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs().max(y.abs())), "{x} vs {y}");
        }
    }
}
