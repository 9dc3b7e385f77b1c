//! Per-token log-probabilities of completions under the model: for GRPO's ratio (differentiable,
//! with adapters on), the old policy (the same, detached) and the reference policy (adapters off).
//! The head is applied only at positions that predict a completion token, so memory scales with
//! completion tokens × vocabulary, not the whole batch.
//!
//! Completions that share a prompt (a GRPO group) are packed into one row: the prompt once, then
//! each completion, every completion attending to the prompt and to its own earlier tokens only,
//! with positions continuing from the prompt's end. That is the same computation as one row per
//! completion (same positions, same visible keys; masked keys add exactly zero), but the prompt's
//! tokens go through the model once per group instead of once per completion: with prompts of
//! ~450 tokens and completions of ~30, a group of 4 costs ~570 token-passes instead of ~1,900.
//! The prompt's share of the gradient is summed over the group's completions by the same graph.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::model::{CausalLm, Checkpoints, MASKED};

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

/// Model inputs for `pairs` packed by shared prompt (see the module docs).
struct Packed {
    /// [rows, t] token ids, positions, and the additive mask [rows, 1, t, t].
    ids: Tensor,
    pos: Tensor,
    bias: Tensor,
    rows: usize,
    t: usize,
    /// For pair i and completion token k: the flat slot (row · t + slot) whose output predicts it.
    gather: Vec<Vec<u32>>,
}

/// Segment of a padding slot (sees the prompt only; its outputs are never read).
const PAD: u32 = u32::MAX;

fn pack(pairs: &[(Vec<u32>, Vec<u32>)], dev: &Device) -> Result<Packed> {
    // Rows in order of first appearance of each prompt; members in pair order.
    let mut row_of: HashMap<&[u32], usize> = HashMap::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (i, (p, _)) in pairs.iter().enumerate() {
        anyhow::ensure!(!p.is_empty(), "log-probs: prompt {i} is empty");
        let r = *row_of.entry(p.as_slice()).or_insert_with(|| {
            members.push(Vec::new());
            members.len() - 1
        });
        members[r].push(i);
    }
    let lens: Vec<usize> =
        members.iter().map(|m| pairs[m[0]].0.len() + m.iter().map(|&i| pairs[i].1.len()).sum::<usize>()).collect();
    let t = lens.iter().copied().max().unwrap_or(1).max(1);
    let rows = members.len();
    let (mut ids, mut pos, mut seg) = (Vec::with_capacity(rows * t), Vec::with_capacity(rows * t), Vec::new());
    let mut gather = vec![Vec::new(); pairs.len()];
    for (r, m) in members.iter().enumerate() {
        let prompt = &pairs[m[0]].0;
        let p = prompt.len();
        let mut row_seg = vec![0u32; p];
        ids.extend_from_slice(prompt);
        pos.extend(0..p as u32);
        for (j, &i) in m.iter().enumerate() {
            let c = &pairs[i].1;
            let start = row_seg.len();
            gather[i] = (0..c.len()).map(|k| (r * t + if k == 0 { p - 1 } else { start + k - 1 }) as u32).collect();
            ids.extend_from_slice(c);
            pos.extend((p..p + c.len()).map(|x| x as u32));
            row_seg.extend(std::iter::repeat_n(j as u32 + 1, c.len()));
        }
        let pad = t - row_seg.len();
        ids.extend(std::iter::repeat_n(0, pad));
        pos.extend(std::iter::repeat_n(0, pad));
        row_seg.extend(std::iter::repeat_n(PAD, pad));
        seg.push(row_seg);
    }
    let mut bias = Vec::with_capacity(rows * t * t);
    for s in &seg {
        for (i, &si) in s.iter().enumerate() {
            bias.extend(s.iter().enumerate().map(|(k, &sk)| {
                if k <= i && sk != PAD && (sk == 0 || sk == si) {
                    0.0f32
                } else {
                    MASKED
                }
            }));
        }
    }
    Ok(Packed {
        ids: Tensor::from_vec(ids, (rows, t), dev)?,
        pos: Tensor::from_vec(pos, (rows, t), dev)?,
        bias: Tensor::from_vec(bias, (rows, 1, t, t), dev)?,
        rows,
        t,
        gather,
    })
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
    let cmax = pairs.iter().map(|(_, c)| c.len()).max().unwrap_or(0).max(1);
    let pk = pack(pairs, dev)?;
    let mut gather = Vec::with_capacity(b * cmax);
    let mut targets = Vec::with_capacity(b * cmax);
    let mut mask = Vec::with_capacity(b * cmax);
    for (i, (_, c)) in pairs.iter().enumerate() {
        for k in 0..cmax {
            let real = k < c.len();
            gather.push(if real { pk.gather[i][k] } else { 0 });
            targets.push(if real { c[k] } else { 0 });
            mask.push(if real { 1f32 } else { 0.0 });
        }
    }
    let (hidden, ck) = match grad {
        Grad::Full => (model.forward(&pk.ids, &pk.pos, Some(&pk.bias), None, adapters)?, None),
        Grad::None => (model.forward_no_grad(&pk.ids, &pk.pos, Some(&pk.bias), adapters)?, None),
        Grad::Checkpointed => {
            let (h, ck) = model.forward_checkpointed(&pk.ids, &pk.pos, Some(&pk.bias), adapters)?;
            (h, Some(ck))
        }
    };
    let h = hidden
        .reshape((pk.rows * pk.t, model.cfg.hidden_size))?
        .index_select(&Tensor::new(gather.as_slice(), dev)?, 0)?;
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
