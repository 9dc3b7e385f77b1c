//! Per-token log-probabilities of completions under the model: for GRPO's ratio (differentiable,
//! with adapters on), the old policy (the same, detached) and the reference policy (adapters off).
//! Sequences are right-padded; the head is applied only at positions that predict a completion
//! token, so memory scales with completion tokens × vocabulary, not the whole batch.

use anyhow::Result;
use candle_core::Tensor;

use super::model::{padded_bias, CausalLm, Checkpoints};

/// How much of the autograd graph a log-prob pass keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grad {
    /// No gradient (old / reference policy): layers run detached, memory stays at one layer's.
    None,
    /// The whole graph, for `loss.backward()`.
    Full,
    /// Activation checkpointing: call [`CausalLm::backward_checkpointed`] with the returned
    /// checkpoints (training on CPU within a small memory budget).
    Checkpointed,
}

/// Log-probs [batch, max completion length] and the mask of real tokens (1.0 / 0.0), same shape.
pub struct CompletionLogProbs {
    pub log_probs: Tensor,
    pub mask: Tensor,
}

/// `pairs[i] = (prompt ids, completion ids)`; every prompt must be non-empty. Differentiable
/// (the whole graph is kept).
pub fn completion_log_probs(
    model: &CausalLm,
    pairs: &[(Vec<u32>, Vec<u32>)],
    adapters: bool,
) -> Result<CompletionLogProbs> {
    Ok(log_probs_with(model, pairs, adapters, Grad::Full)?.0)
}

/// [`completion_log_probs`] choosing what to keep for the backward pass.
pub fn log_probs_with(
    model: &CausalLm,
    pairs: &[(Vec<u32>, Vec<u32>)],
    adapters: bool,
    grad: Grad,
) -> Result<(CompletionLogProbs, Option<Checkpoints>)> {
    let dev = model.device();
    let b = pairs.len();
    let t = pairs.iter().map(|(p, c)| p.len() + c.len()).max().unwrap_or(1);
    let cmax = pairs.iter().map(|(_, c)| c.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(b * t);
    let mut valid = Vec::with_capacity(b);
    let mut gather = Vec::with_capacity(b * cmax);
    let mut targets = Vec::with_capacity(b * cmax);
    let mut mask = Vec::with_capacity(b * cmax);
    for (r, (p, c)) in pairs.iter().enumerate() {
        anyhow::ensure!(!p.is_empty(), "log-probs: prompt {r} is empty");
        let n = p.len() + c.len();
        ids.extend(p.iter().chain(c).copied().chain(std::iter::repeat_n(0, t - n)));
        valid.push((0..t).map(|j| j < n).collect::<Vec<bool>>());
        for k in 0..cmax {
            let real = k < c.len();
            gather.push((r * t + if real { p.len() + k - 1 } else { 0 }) as u32);
            targets.push(if real { c[k] } else { 0 });
            mask.push(if real { 1f32 } else { 0.0 });
        }
    }
    let ids = Tensor::from_vec(ids, (b, t), dev)?;
    let pos = Tensor::from_vec((0..b).flat_map(|_| 0..t as u32).collect::<Vec<u32>>(), (b, t), dev)?;
    let bias = padded_bias(&valid, t, dev)?;
    let (hidden, ck) = match grad {
        Grad::Full => (model.forward(&ids, &pos, Some(&bias), None, adapters)?, None),
        Grad::None => (model.forward_no_grad(&ids, &pos, Some(&bias), adapters)?, None),
        Grad::Checkpointed => {
            let (h, ck) = model.forward_checkpointed(&ids, &pos, Some(&bias), adapters)?;
            (h, Some(ck))
        }
    };
    let h = hidden.reshape((b * t, model.cfg.hidden_size))?.index_select(&Tensor::new(gather.as_slice(), dev)?, 0)?;
    let logits = model.logits(&h)?;
    let lp = crate::ops::token_log_probs(&logits, &Tensor::new(targets.as_slice(), dev)?)?;
    let mask = Tensor::from_vec(mask, (b, cmax), dev)?;
    let mut log_probs = (lp.reshape((b, cmax))? * &mask)?;
    if grad == Grad::None {
        log_probs = log_probs.detach();
    }
    Ok((CompletionLogProbs { log_probs, mask }, ck))
}

impl CompletionLogProbs {
    /// Detached copy (old / reference policy).
    pub fn detach(&self) -> Self {
        Self { log_probs: self.log_probs.detach(), mask: self.mask.clone() }
    }
}
