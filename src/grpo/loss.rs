//! The GRPO objective per token (paper Eq. 3): −min(ρA, clip(ρ, 1−ε, 1+ε)A) + β·KL, with ρ the
//! ratio of the current to the old policy and KL the k3 estimator exp(ref−logp) − (ref−logp) − 1
//! against the reference policy. Aggregation is token-level by default (the sum over completion
//! tokens divided by the number of completion tokens in the whole batch) or the mean of each
//! sequence's token mean. The divisor is passed in so that micro-batches add up to the full loss.

use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregation {
    /// Σ over all completion tokens ÷ number of completion tokens in the batch (DAPO/Dr. GRPO style).
    Token,
    /// Mean over sequences of each sequence's token mean (the original GRPO).
    Sequence,
}

/// Sums over the tokens of one (micro-)batch, for the step log.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossStats {
    pub tokens: f64,
    pub kl_sum: f64,
    /// Tokens whose clipped term was the active one (no gradient).
    pub clipped: f64,
    pub loss: f64,
}

impl LossStats {
    pub fn add(&mut self, o: &LossStats) {
        self.tokens += o.tokens;
        self.kl_sum += o.kl_sum;
        self.clipped += o.clipped;
        self.loss += o.loss;
    }
}

/// What the loss is divided by: see [`Aggregation`].
#[derive(Debug, Clone, Copy)]
pub struct LossConfig {
    pub epsilon: f32,
    pub beta: f32,
    pub aggregation: Aggregation,
}

/// The loss of rows `[B, T]`: `logp` is the current policy (carries the graph), `old` and
/// `reference` are detached, `mask` marks real completion tokens, `adv` holds one advantage per
/// row. `norm` is the whole batch's token count (token aggregation) or row count (sequence).
pub fn grpo_loss(
    logp: &Tensor,
    old: &Tensor,
    reference: Option<&Tensor>,
    mask: &Tensor,
    adv: &[f32],
    cfg: &LossConfig,
    norm: f64,
) -> Result<(Tensor, LossStats)> {
    let (b, t) = logp.dims2()?;
    anyhow::ensure!(adv.len() == b, "one advantage per row: {} rows, {} advantages", b, adv.len());
    let dev = logp.device();
    let ratio = (logp - old)?.exp()?;
    let ratio_v: Vec<Vec<f32>> = ratio.to_vec2()?;
    let mask_v: Vec<Vec<f32>> = mask.to_vec2()?;
    let (lo, hi) = (1.0 - cfg.epsilon, 1.0 + cfg.epsilon);
    let mut free = Vec::with_capacity(b * t); // 1 where the unclipped term is active
    let mut fixed = Vec::with_capacity(b * t); // the clipped term's value where it is active
    let mut weight = Vec::with_capacity(b * t);
    let mut stats = LossStats::default();
    for r in 0..b {
        let len: f32 = mask_v[r].iter().sum();
        let w = match cfg.aggregation {
            Aggregation::Token => 1.0 / norm,
            Aggregation::Sequence => 1.0 / (norm * len.max(1.0) as f64),
        };
        for k in 0..t {
            let rho = ratio_v[r][k];
            let a = adv[r];
            // min(ρA, clip(ρ)A) picks the clipped term exactly when ρ left the range on A's side.
            let clipped = mask_v[r][k] > 0.0 && ((a > 0.0 && rho > hi) || (a < 0.0 && rho < lo));
            free.push(if clipped { 0f32 } else { 1.0 });
            fixed.push(if clipped { rho.clamp(lo, hi) * a } else { 0.0 });
            weight.push(mask_v[r][k] * w as f32);
            stats.clipped += clipped as u8 as f64;
        }
        stats.tokens += len as f64;
    }
    let free = Tensor::from_vec(free, (b, t), dev)?;
    let fixed = Tensor::from_vec(fixed, (b, t), dev)?;
    let weight = Tensor::from_vec(weight, (b, t), dev)?;
    let adv_t = Tensor::from_vec(adv.to_vec(), (b, 1), dev)?;
    let objective = ((ratio.broadcast_mul(&adv_t)? * &free)? + fixed)?;
    let mut per_token = objective.neg()?;
    if let Some(reference) = reference {
        let d = (reference - logp)?;
        let kl = ((d.exp()? - &d)? - 1.0)?;
        stats.kl_sum = (&kl * mask)?.sum_all()?.to_scalar::<f32>()? as f64;
        if cfg.beta != 0.0 {
            per_token = (per_token + (kl * cfg.beta as f64)?)?;
        }
    }
    let loss = (per_token * weight)?.sum_all()?;
    stats.loss = loss.to_scalar::<f32>()? as f64;
    Ok((loss, stats))
}
