//! One GRPO step (paper Eq. 3–4): sample a group of completions per prompt with the current
//! policy, score them, turn rewards into group-relative advantages, and take `passes` AdamW
//! updates of the clipped, KL-regularised objective. Groups whose rewards are all equal carry no
//! signal; they are counted and, by default, left out of the log-prob and backward passes.
//!
//! Everything random is keyed: completion g of the prompt with record key k samples from the
//! stream (seed, k, g), so a step's result does not depend on batching or on the worker that
//! runs it, and a resumed run repeats the killed one exactly.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::advantage::{group_advantages, zero_variance};
use super::loss::{grpo_loss, Aggregation, LossConfig, LossStats};
use super::optim::{clip_grad_norm, cosine_lr, AdamW, AdamWConfig};
use super::reward::{Reward, Scored};
use crate::llm::engine::{generate_quantized, pairs_log_probs_quantized, quantize_model, QModel};
use crate::llm::generate::{engine_enabled, Generator};
use crate::llm::{log_probs_with, CausalLm, Grad, SamplingConfig, Tokenizer};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoConfig {
    /// Completions per prompt (G); unset: 8 on a GPU, 4 on the CPU.
    pub group_size: Option<usize>,
    /// Clip range ε of the ratio.
    pub epsilon: f32,
    /// KL coefficient β (0 skips the reference pass).
    pub beta: f32,
    /// ε added to the group std.
    pub std_eps: f32,
    pub aggregation: Aggregation,
    /// Optimisation passes per generation batch (the old-policy log-probs matter when > 1).
    pub passes: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub max_new_tokens: usize,
    /// Generation stops after any of these strings.
    pub stop: Vec<String>,
    /// Learning rate for full fine-tuning (the paper's 5e-7).
    pub lr: f64,
    /// Learning rate when training LoRA adapters.
    pub lora_lr: f64,
    /// Share of all updates spent warming up linearly before the cosine decay.
    pub warmup_ratio: f64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    pub adamw: AdamWConfig,
    /// Distinct prompts per forward/backward pass (gradients are accumulated); the completions
    /// of one prompt are packed into one row with the prompt computed once.
    pub micro_batch: usize,
    /// Activation checkpointing in the training pass (memory of one layer instead of all).
    pub checkpointing: bool,
    /// Leave zero-variance groups out of the training passes (they only add a KL term).
    pub skip_zero_variance: bool,
    /// Reference-policy log-probs (β > 0) from the quantized engine instead of the f32 model:
    /// the reference is frozen, so it is quantized once, and a group's prompt is computed once.
    /// Off by default (left out of the serialized config then, so identities do not change).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub quantized_reference: bool,
    pub seed: u64,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            group_size: None,
            epsilon: 0.2,
            beta: 0.04,
            std_eps: 1e-4,
            aggregation: Aggregation::Token,
            passes: 1,
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 96,
            stop: Vec::new(),
            lr: 5e-7,
            lora_lr: 5e-4,
            warmup_ratio: 0.1,
            grad_clip: 1.0,
            adamw: AdamWConfig::default(),
            micro_batch: 4,
            checkpointing: true,
            skip_zero_variance: true,
            quantized_reference: false,
            seed: 2024,
        }
    }
}

impl GrpoConfig {
    pub fn group(&self, dev: &candle_core::Device) -> usize {
        self.group_size.unwrap_or(if dev.is_cuda() { 8 } else { 4 })
    }

    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, what: &str| if ok { Ok(()) } else { anyhow::bail!("grpo.{what}") };
        check(self.group_size.is_none_or(|g| g >= 2), "group_size: expected at least 2 completions per prompt")?;
        check(self.epsilon > 0.0 && self.epsilon < 1.0, "epsilon: expected a value in (0, 1)")?;
        check(self.beta >= 0.0, "beta: expected a non-negative number")?;
        check(self.passes >= 1, "passes: expected at least 1")?;
        check(self.micro_batch >= 1, "micro_batch: expected at least 1")?;
        check(self.max_new_tokens >= 1, "max_new_tokens: expected at least 1")?;
        check(self.lr > 0.0 && self.lora_lr > 0.0, "lr / lora_lr: expected positive numbers")?;
        check((0.0..1.0).contains(&self.warmup_ratio), "warmup_ratio: expected a value in [0, 1)")?;
        Ok(())
    }
}

/// One group of a step: a stable record key (seeds its completions) and the prompt (token ids)
/// with the task the reward needs: one shared by all G completions, one per completion (e.g. the
/// same candidates in another order for each, so that a policy that answers by position still
/// sees its rewards vary), or m dividing G, each shared by a block of G / m completions (the
/// completions of one prompt are packed into one training row, so fewer prompts cost less).
pub struct Sample<T> {
    pub key: u64,
    pub prompts: Vec<(Vec<u32>, T)>,
}

impl<T> Sample<T> {
    /// All completions share one prompt.
    pub fn shared(key: u64, prompt: Vec<u32>, task: T) -> Self {
        Self { key, prompts: vec![(prompt, task)] }
    }

    /// The prompt of completion `j` of a group of `g`: with m prompts (m dividing g), completions
    /// come in m contiguous blocks of g / m, one block per prompt.
    fn member(&self, j: usize, g: usize) -> &(Vec<u32>, T) {
        &self.prompts[j * self.prompts.len() / g]
    }
}

/// One sampled completion.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Index of its prompt in the step's batch.
    pub prompt: usize,
    pub text: String,
    pub tokens: usize,
    pub reward: Scored,
    pub advantage: f32,
}

/// Seconds spent in each phase of a step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Timing {
    pub generate: f64,
    pub reward: f64,
    pub reference: f64,
    pub old: f64,
    /// Training passes in all; of which the policy's forward and the backward.
    pub train: f64,
    pub train_forward: f64,
    pub train_backward: f64,
}

impl Timing {
    /// All phases of the step (training passes counted once, in `train`).
    pub fn total(&self) -> f64 {
        self.generate + self.reward + self.reference + self.old + self.train
    }
}

/// What a step did (the step log's line, minus what the caller adds).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    pub reward: f64,
    pub reward_std: f64,
    pub parts: BTreeMap<String, f64>,
    pub groups: usize,
    pub zero_variance_groups: usize,
    pub rows_trained: usize,
    pub completion_tokens: f64,
    /// Mean k3 KL per completion token against the reference (null without a reference pass).
    pub kl: Option<f64>,
    pub clip_fraction: f64,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub updates: usize,
    pub seconds: Timing,
    /// Generated tokens per second of generation.
    pub gen_tokens_per_s: f64,
    /// Tokens (prompt + completion) through the training passes per second of training.
    pub train_tokens_per_s: f64,
}

pub struct StepReport {
    pub completions: Vec<Completion>,
    pub stats: StepStats,
}

/// The trainer: one policy (LoRA adapters or all weights), its optimizer and schedule.
pub struct Grpo {
    pub cfg: GrpoConfig,
    group: usize,
    opt: AdamW,
    base_lr: f64,
    total_updates: usize,
    /// Frozen initial weights (full fine-tuning); with LoRA the reference is the model with
    /// adapters off.
    reference: Option<CausalLm>,
    /// The reference quantized (with `quantized_reference` and all weights training), made at
    /// its first use; with LoRA the policy's quantized base serves.
    reference_q: Option<QModel>,
    /// Whether the trainable variables are LoRA adapters (the base weights then stay fixed).
    lora: bool,
    /// With LoRA on the CPU: the policy's base weights quantized once (at the first step) for
    /// sampling; the adapters are set beside them at every step.
    policy_q: Option<QModel>,
}

/// A stable stream index for completion `g` of record `key`.
fn completion_key(key: u64, g: usize) -> u64 {
    let mut z = key.wrapping_add((g as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Grpo {
    /// `vars` are the trainable variables (`lora_vars()` or `train_full()`); `total_steps` sizes
    /// the schedule.
    pub fn new(model: &CausalLm, vars: Vec<Var>, cfg: GrpoConfig, lora: bool, total_steps: usize) -> Result<Self> {
        cfg.validate()?;
        anyhow::ensure!(!vars.is_empty(), "GRPO: the model has no trainable variables (add LoRA or train fully)");
        let group = cfg.group(model.device());
        let base_lr = if lora { cfg.lora_lr } else { cfg.lr };
        let total_updates = total_steps.max(1) * cfg.passes;
        let opt = AdamW::new(vars, cfg.adamw.clone())?;
        let reference = if !lora && cfg.beta > 0.0 { Some(model.frozen_copy()?) } else { None };
        Ok(Self { cfg, group, opt, base_lr, total_updates, reference, reference_q: None, lora, policy_q: None })
    }

    pub fn group(&self) -> usize {
        self.group
    }

    pub fn optimizer(&mut self) -> &mut AdamW {
        &mut self.opt
    }

    fn lr_at(&self, update: usize) -> f64 {
        let warmup = (self.cfg.warmup_ratio * self.total_updates as f64).round() as usize;
        cosine_lr(self.base_lr, update, self.total_updates, warmup)
    }

    /// One step on `batch` (step index `step` sets the learning rate).
    pub fn step<T>(
        &mut self,
        model: &CausalLm,
        tok: &Tokenizer,
        batch: &[Sample<T>],
        reward: &dyn Reward<T>,
        step: usize,
    ) -> Result<StepReport> {
        let g = self.group;
        let mut timing = Timing::default();
        let mut stats = StepStats { groups: batch.len(), ..Default::default() };

        // 1. Sample G completions per prompt with the current policy.
        let t0 = Instant::now();
        for s in batch {
            anyhow::ensure!(
                !s.prompts.is_empty() && g.is_multiple_of(s.prompts.len()),
                "record {}: {} prompts, expected a divisor of the group size {g}",
                s.key,
                s.prompts.len()
            );
        }
        let prompts: Vec<Vec<u32>> = batch.iter().flat_map(|s| (0..g).map(move |j| s.member(j, g).0.clone())).collect();
        let keys: Vec<u64> =
            batch.iter().flat_map(|s| (0..g).map(move |j| completion_key(s.key, j))).collect::<Vec<_>>();
        let sampling = SamplingConfig {
            temperature: self.cfg.temperature,
            top_p: self.cfg.top_p,
            max_new_tokens: self.cfg.max_new_tokens,
            stop: self.cfg.stop.clone(),
            seed: self.cfg.seed,
        };
        let gens = if self.lora && engine_enabled(model.device()) {
            // LoRA: the base weights never change, so they are quantized once and the current
            // adapters ride beside them in f32 (no per-step merge and requantization).
            if self.policy_q.is_none() {
                self.policy_q = Some(quantize_model(model, false)?);
            }
            let q = self.policy_q.as_mut().expect("made above");
            q.set_adapters(model)?;
            generate_quantized(q, tok, &prompts, &keys, &sampling)?
        } else {
            // All weights train: the policy as it is now, quantized for the engine on the CPU.
            Generator::for_model(model, true)?.generate(tok, &prompts, &keys, &sampling)?
        };
        timing.generate = t0.elapsed().as_secs_f64();
        let generated: usize = gens.iter().map(|x| x.tokens.len() + x.eos.is_some() as usize).sum();
        stats.gen_tokens_per_s = generated as f64 / timing.generate.max(1e-9);
        stats.completion_tokens = generated as f64 / gens.len().max(1) as f64;

        // 2. Rewards and advantages.
        let t0 = Instant::now();
        let texts: Vec<String> = gens.iter().map(|x| tok.decode(&x.tokens, true)).collect::<Result<_>>()?;
        let pairs: Vec<(&T, &str)> =
            texts.iter().enumerate().map(|(i, t)| (&batch[i / g].member(i % g, g).1, t.as_str())).collect();
        let scored = reward.score(&pairs)?;
        anyhow::ensure!(
            scored.len() == texts.len(),
            "reward returned {} scores for {} completions",
            scored.len(),
            texts.len()
        );
        let rewards: Vec<f32> = scored.iter().map(|s| s.total).collect();
        let adv = group_advantages(&rewards, g, self.cfg.std_eps);
        timing.reward = t0.elapsed().as_secs_f64();
        let n = rewards.len() as f64;
        stats.reward = rewards.iter().map(|&r| r as f64).sum::<f64>() / n;
        stats.reward_std = (rewards.iter().map(|&r| (r as f64 - stats.reward).powi(2)).sum::<f64>() / n).sqrt();
        for (k, name) in reward.names().into_iter().enumerate() {
            stats.parts.insert(name, scored.iter().map(|s| s.parts[k] as f64).sum::<f64>() / n);
        }
        let mut rows = Vec::new();
        for (p, grp) in rewards.chunks(g).enumerate() {
            let zero = zero_variance(grp);
            stats.zero_variance_groups += zero as usize;
            if !(zero && self.cfg.skip_zero_variance) {
                rows.extend((p * g..(p + 1) * g).filter(|&i| !gens[i].tokens.is_empty() || gens[i].eos.is_some()));
            }
        }
        stats.rows_trained = rows.len();
        let completions: Vec<Completion> = (0..texts.len())
            .map(|i| Completion {
                prompt: i / g,
                text: texts[i].clone(),
                tokens: gens[i].tokens.len(),
                reward: scored[i].clone(),
                advantage: adv[i],
            })
            .collect();

        // 3. Training passes on the rows that carry signal.
        stats.lr = self.lr_at(step * self.cfg.passes);
        if rows.is_empty() {
            stats.seconds = timing;
            return Ok(StepReport { completions, stats });
        }
        let seqs: Vec<(Vec<u32>, Vec<u32>)> = rows
            .iter()
            .map(|&i| {
                let mut c = gens[i].tokens.clone();
                c.extend(gens[i].eos);
                (prompts[i].clone(), c)
            })
            .collect();
        let row_adv: Vec<f32> = rows.iter().map(|&i| adv[i]).collect();
        // Micro-batches of at most `micro_batch` distinct prompts: a group's completions share
        // one packed row (see `llm::logprob`), so a group is never split across two passes.
        let mut chunks: Vec<std::ops::Range<usize>> = Vec::new();
        let (mut start, mut distinct) = (0, 0);
        for i in 0..seqs.len() {
            if i == 0 || seqs[i].0 != seqs[i - 1].0 {
                if distinct == self.cfg.micro_batch {
                    chunks.push(start..i);
                    (start, distinct) = (i, 0);
                }
                distinct += 1;
            }
        }
        if start < seqs.len() {
            chunks.push(start..seqs.len());
        }
        let no_grad = |model: &CausalLm, adapters: bool, timer: &mut f64| -> Result<Vec<Tensor>> {
            let t0 = Instant::now();
            let out = chunks
                .iter()
                .map(|r| Ok(log_probs_with(model, &seqs[r.clone()], adapters, Grad::None)?.0.log_probs))
                .collect::<Result<Vec<_>>>();
            *timer += t0.elapsed().as_secs_f64();
            out
        };
        let ref_model = self.reference.as_ref().unwrap_or(model);
        let reference = if self.cfg.beta > 0.0 && self.cfg.quantized_reference && model.device().is_cpu() {
            let t0 = Instant::now();
            let q = match self.policy_q.as_mut() {
                // LoRA: the reference is the policy's base, already quantized for the rollouts;
                // its adapters come off here and go back on at the next step's rollouts.
                Some(base) if self.lora => {
                    base.clear_adapters();
                    &*base
                }
                _ => {
                    if self.reference_q.is_none() {
                        self.reference_q = Some(quantize_model(ref_model, false)?);
                    }
                    self.reference_q.as_ref().expect("made above")
                }
            };
            let dev = model.device();
            let out = chunks
                .iter()
                .map(|r| -> Result<Tensor> {
                    // The f32 path's layout: one row per pair, padded to the longest completion.
                    let lps = pairs_log_probs_quantized(q, &seqs[r.clone()])?;
                    let cmax = lps.iter().map(Vec::len).max().unwrap_or(0).max(1);
                    let mut flat = vec![0f32; lps.len() * cmax];
                    for (row, l) in flat.chunks_mut(cmax).zip(&lps) {
                        row[..l.len()].copy_from_slice(l);
                    }
                    Ok(Tensor::from_vec(flat, (lps.len(), cmax), dev)?)
                })
                .collect::<Result<Vec<_>>>()?;
            timing.reference += t0.elapsed().as_secs_f64();
            Some(out)
        } else if self.cfg.beta > 0.0 {
            Some(no_grad(ref_model, false, &mut timing.reference)?)
        } else {
            None
        };
        let old = if self.cfg.passes > 1 { Some(no_grad(model, true, &mut timing.old)?) } else { None };
        let completion_tokens: usize = seqs.iter().map(|(_, c)| c.len()).sum();
        let norm = match self.cfg.aggregation {
            Aggregation::Token => completion_tokens as f64,
            Aggregation::Sequence => seqs.len() as f64,
        };
        let loss_cfg = LossConfig { epsilon: self.cfg.epsilon, beta: self.cfg.beta, aggregation: self.cfg.aggregation };
        let t0 = Instant::now();
        let mut first = LossStats::default();
        for pass in 0..self.cfg.passes {
            let mut acc: Vec<Option<Tensor>> = vec![None; self.opt.vars().len()];
            let mut pass_stats = LossStats::default();
            for (c, r) in chunks.iter().enumerate() {
                let grad = if self.cfg.checkpointing { Grad::Checkpointed } else { Grad::Full };
                let tf = Instant::now();
                let (lp, ck) = log_probs_with(model, &seqs[r.clone()], true, grad)?;
                timing.train_forward += tf.elapsed().as_secs_f64();
                let old_c = match &old {
                    Some(o) => o[c].clone(),
                    None => lp.log_probs.detach(),
                };
                let ref_c = reference.as_ref().map(|x| &x[c]);
                let (loss, s) =
                    grpo_loss(&lp.log_probs, &old_c, ref_c, &lp.mask, &row_adv[r.clone()], &loss_cfg, norm)?;
                pass_stats.add(&s);
                let tb = Instant::now();
                let grads = match ck {
                    Some(ck) => model.backward_checkpointed(&loss, ck)?,
                    None => loss.backward()?,
                };
                timing.train_backward += tb.elapsed().as_secs_f64();
                for (k, v) in self.opt.vars().iter().enumerate() {
                    if let Some(gr) = grads.get(v.as_tensor()) {
                        let gr = gr.to_dtype(DType::F32)?;
                        acc[k] = Some(match acc[k].take() {
                            Some(prev) => (prev + gr)?,
                            None => gr,
                        });
                    }
                }
            }
            let mut grads: Vec<Tensor> = acc
                .into_iter()
                .zip(self.opt.vars())
                .map(|(g, v)| g.map_or_else(|| Tensor::zeros(v.shape(), DType::F32, v.device()), Ok))
                .collect::<candle_core::Result<_>>()?;
            let norm = clip_grad_norm(&mut grads, self.cfg.grad_clip)?;
            let lr = self.lr_at(step * self.cfg.passes + pass);
            self.opt.step(&grads, lr)?;
            stats.updates += 1;
            if pass == 0 {
                first = pass_stats;
                stats.grad_norm = norm;
            }
        }
        timing.train = t0.elapsed().as_secs_f64();
        let trained_tokens: usize = seqs.iter().map(|(p, c)| p.len() + c.len()).sum::<usize>() * self.cfg.passes;
        stats.train_tokens_per_s = trained_tokens as f64 / timing.train.max(1e-9);
        stats.loss = first.loss;
        stats.clip_fraction = first.clipped / first.tokens.max(1.0);
        stats.kl = reference.is_some().then(|| first.kl_sum / first.tokens.max(1.0));
        stats.seconds = timing;
        Ok(StepReport { completions, stats })
    }
}
