//! Building blocks shared by the recommenders: seeded parameter initialisation (candle's CPU
//! RNG cannot be seeded), differentiable layer norm, seeded dropout, a stable BCE-with-logits.
//! candle-nn's fused `layer_norm`/`softmax_last_dim` have no backward pass, so we avoid them.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::VarMap;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::rng::{rng_for, standard_normal};

/// Parameters registered in a `VarMap` under checkpoint names, initialised from a seeded RNG.
pub struct Params {
    pub varmap: VarMap,
    rng: ChaCha8Rng,
    device: Device,
}

impl Params {
    pub fn new(seed: u64, device: &Device) -> Self {
        Params { varmap: VarMap::new(), rng: rng_for(seed, 1, 0), device: device.clone() }
    }

    fn register(&mut self, name: &str, data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        let var = Var::from_tensor(&Tensor::from_vec(data, shape, &self.device)?)?;
        let t = var.as_tensor().clone();
        self.varmap.data().lock().expect("varmap lock").insert(name.to_string(), var);
        Ok(t)
    }

    pub fn normal(&mut self, name: &str, shape: &[usize], std: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| std * standard_normal(&mut self.rng)).collect();
        self.register(name, data, shape)
    }

    pub fn uniform(&mut self, name: &str, shape: &[usize], bound: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| self.rng.random_range(-bound..=bound)).collect();
        self.register(name, data, shape)
    }

    pub fn constant(&mut self, name: &str, shape: &[usize], value: f32) -> Result<Tensor> {
        self.register(name, vec![value; shape.iter().product()], shape)
    }

    /// A linear layer `out × in` with PyTorch's default U(±1/√in) initialisation.
    pub fn linear(&mut self, name: &str, d_in: usize, d_out: usize) -> Result<candle_nn::Linear> {
        let b = 1.0 / (d_in as f32).sqrt();
        let w = self.uniform(&format!("{name}.weight"), &[d_out, d_in], b)?;
        let bias = self.uniform(&format!("{name}.bias"), &[d_out], b)?;
        Ok(candle_nn::Linear::new(w, Some(bias)))
    }

    /// A linear layer with N(0, std²) weights and zero bias (BERT/RecBole initialisation).
    pub fn linear_normal(&mut self, name: &str, d_in: usize, d_out: usize, std: f32) -> Result<candle_nn::Linear> {
        let w = self.normal(&format!("{name}.weight"), &[d_out, d_in], std)?;
        let bias = self.constant(&format!("{name}.bias"), &[d_out], 0.0)?;
        Ok(candle_nn::Linear::new(w, Some(bias)))
    }

    pub fn layer_norm(&mut self, name: &str, d: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.constant(&format!("{name}.weight"), &[d], 1.0)?,
            bias: self.constant(&format!("{name}.bias"), &[d], 0.0)?,
            eps: 1e-12,
        })
    }
}

/// Layer norm over the last dimension, built from differentiable primitives.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl candle_core::Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// Inverted dropout with a mask drawn from `rng`; identity when `p == 0` or not training.
pub fn dropout(x: &Tensor, p: f32, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
    let Some(rng) = rng else { return Ok(x.clone()) };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    x * Tensor::from_vec(dropout_mask(x.elem_count(), p, rng), x.shape(), x.device())?
}

/// The `n` factors of an inverted-dropout mask (0 or 1 / (1 − p)), as [`dropout`] draws them.
pub fn dropout_mask(n: usize, p: f32, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p);
    (0..n).map(|_| if rng.random::<f32>() < p { 0.0 } else { keep }).collect()
}

/// Mean binary cross-entropy with logits, stable for large |x|: max(x,0) − x·y + log(1 + e^{−|x|}).
pub fn bce_with_logits(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let relu = x.relu()?;
    let softplus = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    ((relu - (x * y)?)? + softplus)?.mean_all()
}

/// Additive attention bias `B × 1 × T × T`: 0 where query t may see key s (s ≤ t and s is not
/// padding), a large negative number elsewhere (not −∞, so rows of padding queries stay finite).
pub fn causal_padding_bias(valid: &[Vec<bool>], device: &Device) -> Result<Tensor> {
    attention_bias(valid, true, device)
}

/// [`causal_padding_bias`], or with `causal = false` the padding part only (every position
/// attends to every real position: BERT4Rec).
pub fn attention_bias(valid: &[Vec<bool>], causal: bool, device: &Device) -> Result<Tensor> {
    let b = valid.len();
    let t = valid.first().map_or(0, Vec::len);
    let mut bias = vec![0f32; b * t * t];
    for (bi, v) in valid.iter().enumerate() {
        for q in 0..t {
            for k in 0..t {
                if (causal && k > q) || !v[k] {
                    bias[(bi * t + q) * t + k] = -1e9;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, t, t), device)
}

/// 0/1 mask `B × T × 1` of valid (non-padding) positions.
pub fn position_mask(valid: &[Vec<bool>], device: &Device) -> Result<Tensor> {
    let b = valid.len();
    let t = valid.first().map_or(0, Vec::len);
    let m: Vec<f32> = valid.iter().flat_map(|v| v.iter().map(|&x| if x { 1.0 } else { 0.0 })).collect();
    Tensor::from_vec(m, (b, t, 1), device)?.to_dtype(DType::F32)
}

/// Every variable's values by name, sorted by name (tests compare before and after training).
#[cfg(test)]
pub(crate) fn named_values(varmap: &VarMap) -> Vec<(String, Vec<f32>)> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut v: Vec<_> = data
        .iter()
        .map(|(k, var)| (k.clone(), var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    #[test]
    fn layer_norm_matches_definition_and_has_gradients() {
        let dev = Device::Cpu;
        let mut p = Params::new(1, &dev);
        let ln = p.layer_norm("ln", 4).unwrap();
        let x = Var::from_vec(vec![1f32, 2., 3., 6.], (1, 4), &dev).unwrap();
        let y = ln.forward(x.as_tensor()).unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        // mean 3, var 3.5 → (x − 3)/√3.5
        let want = [-2.0 / 3.5f32.sqrt(), -1.0 / 3.5f32.sqrt(), 0.0, 3.0 / 3.5f32.sqrt()];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-5);
        }
        let g = (y.sqr().unwrap() * Tensor::new(&[[1f32, 0., 0., 2.]], &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(x.as_tensor()).is_some());
        for var in p.varmap.all_vars() {
            assert!(g.get(var.as_tensor()).is_some());
        }
    }

    #[test]
    fn bce_is_stable_and_correct() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[0f32, 100.0, -100.0], &dev).unwrap();
        let y = Tensor::new(&[1f32, 1.0, 0.0], &dev).unwrap();
        let l: f32 = bce_with_logits(&x, &y).unwrap().to_scalar().unwrap();
        assert!((l - (2f32.ln() / 3.0)).abs() < 1e-6, "{l}");
    }

    #[test]
    fn same_seed_same_parameters() {
        let a = Params::new(5, &Device::Cpu).normal("w", &[3, 3], 0.02).unwrap();
        let b = Params::new(5, &Device::Cpu).normal("w", &[3, 3], 0.02).unwrap();
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
