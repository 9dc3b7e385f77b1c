//! The inference model: the same decoder as [`crate::llm::model::CausalLm`] (RMSNorm,
//! rotate-half RoPE, grouped-query attention, SwiGLU, tied or separate head) on quantized weights
//! ([`QMatrix`]), in plain Rust buffers without autograd. One forward call takes any mix of
//! sequences, each with any number of new tokens (a prompt chunk, or one decoding step) and its
//! own KV cache; every row's computation depends only on its own sequence, so results do not
//! depend on what else is in the batch.
//!
//! q/k/v are one fused matrix and gate/up another, so each layer makes four passes over its
//! weights whatever the number of rows.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};
use rayon::prelude::*;

use super::attention::{attend, HeadTask};
use super::kv::{LayerView, SeqCache};
use crate::llm::config::{Family, LlmConfig};
use crate::llm::kernels::gguf::{to_qmatrix, Quantize};
use crate::llm::kernels::{Format, QActs, QMatrix};
use crate::llm::model::CausalLm;

struct QLayer {
    attn_norm: Vec<f32>,
    mlp_norm: Vec<f32>,
    qkv: QMatrix,
    qkv_bias: Option<Vec<f32>>,
    o: QMatrix,
    gate_up: QMatrix,
    down: QMatrix,
    /// LoRA updates kept beside the quantized weights, in `ALL_TARGETS` order (q k v o gate up
    /// down); see [`QModel::set_adapters`].
    lora: [Option<LowRank>; 7],
}

/// A LoRA update beside a quantized weight, `y += scale · B (A x)` in f32: the adapters of a
/// policy under training change at every step while its base weights do not, so the base is
/// quantized once and only these (a few MB) are copied per step.
#[derive(Debug, Clone)]
struct LowRank {
    /// A [rank, in] and `scale · Bᵀ` [rank, out], row-major: both products then run along
    /// contiguous rows (a dot product per rank, then one scaled row added per rank).
    a: Vec<f32>,
    bt: Vec<f32>,
    rank: usize,
}

impl LowRank {
    /// Adds the update of every row of `x` (rows of `k` values) to columns `col..col + out` of
    /// `y` (rows of `stride` values).
    fn add_to(&self, x: &[f32], k: usize, y: &mut [f32], stride: usize, col: usize) {
        let out = self.bt.len() / self.rank;
        x.par_chunks(k).zip(y.par_chunks_mut(stride)).with_min_len(ROWS_PER_TASK).for_each(|(x, y)| {
            let y = &mut y[col..col + out];
            for (a, bt) in self.a.chunks_exact(k).zip(self.bt.chunks_exact(out)) {
                let t = crate::ops::dot(a, x);
                y.iter_mut().zip(bt).for_each(|(y, b)| *y = t.mul_add(*b, *y));
            }
        });
    }
}

/// A quantized Qwen2/Llama-family decoder for generation and scoring without gradients.
pub struct QModel {
    pub cfg: LlmConfig,
    /// Token embeddings (also the output head when tied).
    embed: QMatrix,
    /// With a separate head, the GGUF embedding rows as stored (decoded per token): the table
    /// is only looked up, so it need not be repacked (Qwen2.5-0.5B: 93 MB of Q5_0, not 153 of Q8).
    embed_rows: Option<crate::llm::kernels::gguf::RawRows>,
    head: Option<QMatrix>,
    norm: Vec<f32>,
    layers: Vec<QLayer>,
    inv_freq: Vec<f32>,
}

/// One sequence's share of a forward call.
pub struct SeqStep<'a> {
    /// New tokens, at positions `cache.len()..`.
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
    /// Which logits to return.
    pub logits: Logits,
}

/// Logits a sequence wants from a forward call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    /// After its last new token (generation).
    Last,
    /// After every new token (scoring a completion).
    All,
}

/// The attention output, written by parallel tasks into disjoint ranges.
struct AttnOut(*mut f32);
// SAFETY: see its one use in `forward_in_pool`.
unsafe impl Sync for AttnOut {}

/// Rows per parallel task of the row-wise element operations (norms, RoPE, SwiGLU, residuals).
const ROWS_PER_TASK: usize = 8;

/// RMSNorm of every row of `x` (rows of `w.len()` values) into `out`.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f64, out: &mut [f32]) {
    x.par_chunks(w.len()).zip(out.par_chunks_mut(w.len())).with_min_len(ROWS_PER_TASK).for_each(|(x, out)| {
        let inv = crate::ops::rms_inv(x, eps as f32);
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
            *o = v * inv * g;
        }
    });
}

/// `x += y`, row-parallel (`h` values a row).
fn add_rows(x: &mut [f32], y: &[f32], h: usize) {
    x.par_chunks_mut(h).zip(y.par_chunks(h)).with_min_len(ROWS_PER_TASK).for_each(|(x, y)| {
        x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
    });
}

/// Unquantized small tensors (norms, biases) as f32 vectors.
fn vec_f32(t: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
}

impl QModel {
    /// Load a GGUF file tensor by tensor (never the whole model in f32).
    pub fn load_gguf(path: &Path, quantize: Quantize) -> Result<(Self, gguf_file::Content)> {
        let shown = path.display();
        let mut r =
            std::io::BufReader::new(std::fs::File::open(path).with_context(|| format!("{shown}: cannot open"))?);
        let content = gguf_file::Content::read(&mut r).with_context(|| format!("{shown}: not a GGUF file"))?;
        let cfg = LlmConfig::from_gguf(&content).with_context(|| format!("{shown}"))?;
        let mut tensor =
            |name: &str| content.tensor(&mut r, name, &Device::Cpu).with_context(|| format!("{shown}: tensor {name}"));
        let hd = cfg.head_dim;
        // llama.cpp stores Llama q/k rows as [head, hd/2, 2]; Hugging Face order is [head, 2, hd/2].
        let unpermute = |r: usize| (r / hd) * hd + (r % hd % (hd / 2)) * 2 + (r % hd) / (hd / 2);
        let llama = cfg.family == Family::Llama;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("blk.{l}");
            let mat = |t: candle_core::quantized::QTensor, perm: bool| -> Result<QMatrix> {
                if perm {
                    to_qmatrix(&t, quantize, unpermute)
                } else {
                    to_qmatrix(&t, quantize, |r| r)
                }
            };
            let q = mat(tensor(&format!("{p}.attn_q.weight"))?, llama)?;
            let k = mat(tensor(&format!("{p}.attn_k.weight"))?, llama)?;
            let v = mat(tensor(&format!("{p}.attn_v.weight"))?, false)?;
            let qkv_bias = if cfg.attention_bias {
                let mut b = Vec::new();
                for n in ["attn_q", "attn_k", "attn_v"] {
                    b.extend(vec_f32(&tensor(&format!("{p}.{n}.bias"))?.dequantize(&Device::Cpu)?)?);
                }
                Some(b)
            } else {
                None
            };
            let gate = mat(tensor(&format!("{p}.ffn_gate.weight"))?, false)?;
            let up = mat(tensor(&format!("{p}.ffn_up.weight"))?, false)?;
            layers.push(QLayer {
                attn_norm: vec_f32(&tensor(&format!("{p}.attn_norm.weight"))?.dequantize(&Device::Cpu)?)?,
                mlp_norm: vec_f32(&tensor(&format!("{p}.ffn_norm.weight"))?.dequantize(&Device::Cpu)?)?,
                qkv: fuse(&[&q, &k, &v])?,
                qkv_bias,
                o: mat(tensor(&format!("{p}.attn_output.weight"))?, false)?,
                gate_up: fuse(&[&gate, &up])?,
                down: mat(tensor(&format!("{p}.ffn_down.weight"))?, false)?,
                lora: Default::default(),
            });
        }
        let norm = vec_f32(&tensor("output_norm.weight")?.dequantize(&Device::Cpu)?)?;
        if cfg.tie_embeddings {
            let embed = to_qmatrix(&tensor("token_embd.weight")?, quantize, |r| r)?;
            return Ok((Self::assemble(cfg, embed, None, norm, layers)?, content));
        }
        let head = to_qmatrix(&tensor("output.weight")?, quantize, |r| r)?;
        let model = match crate::llm::kernels::gguf::RawRows::new(tensor("token_embd.weight")?)? {
            Some(raw) => {
                // `assemble` checks the head's shape, which is the table's; the table stays raw.
                let mut m = Self::assemble(cfg, head, None, norm, layers)?;
                let empty = QMatrix::from_row_blocks(0, 0, Format::Q8, |_| Vec::new())?;
                m.head = Some(std::mem::replace(&mut m.embed, empty));
                m.embed_rows = Some(raw);
                m
            }
            None => {
                let embed = to_qmatrix(&tensor("token_embd.weight")?, quantize, |r| r)?;
                Self::assemble(cfg, embed, Some(head), norm, layers)?
            }
        };
        Ok((model, content))
    }

    /// Quantize a candle model's weights (LoRA adapters folded in first: pass `model.merged()`
    /// for a model under training). `Quantize::Auto` means Q8 here.
    pub fn from_causal(model: &CausalLm, quantize: Quantize) -> Result<Self> {
        let format = match quantize {
            Quantize::Q4 => Format::Q4,
            Quantize::Q5 => Format::Q5,
            Quantize::Auto | Quantize::Q8 => Format::Q8,
        };
        let cfg = model.cfg.clone();
        let mut w: std::collections::HashMap<String, candle_core::Tensor> = model.named_weights().into_iter().collect();
        let mut take = |name: &str| -> Result<candle_core::Tensor> {
            w.remove(name).with_context(|| format!("model lacks weight {name}"))
        };
        let mat = |t: candle_core::Tensor| -> Result<QMatrix> {
            let (n, k) = t.dims2()?;
            QMatrix::quantize(&vec_f32(&t)?, n, k, format)
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let q = mat(take(&format!("{p}.self_attn.q_proj.weight"))?)?;
            let k = mat(take(&format!("{p}.self_attn.k_proj.weight"))?)?;
            let v = mat(take(&format!("{p}.self_attn.v_proj.weight"))?)?;
            let qkv_bias = if cfg.attention_bias {
                let mut b = Vec::new();
                for n in ["q_proj", "k_proj", "v_proj"] {
                    b.extend(vec_f32(&take(&format!("{p}.self_attn.{n}.bias"))?)?);
                }
                Some(b)
            } else {
                None
            };
            let gate = mat(take(&format!("{p}.mlp.gate_proj.weight"))?)?;
            let up = mat(take(&format!("{p}.mlp.up_proj.weight"))?)?;
            layers.push(QLayer {
                attn_norm: vec_f32(&take(&format!("{p}.input_layernorm.weight"))?)?,
                mlp_norm: vec_f32(&take(&format!("{p}.post_attention_layernorm.weight"))?)?,
                qkv: fuse(&[&q, &k, &v])?,
                qkv_bias,
                o: mat(take(&format!("{p}.self_attn.o_proj.weight"))?)?,
                gate_up: fuse(&[&gate, &up])?,
                down: mat(take(&format!("{p}.mlp.down_proj.weight"))?)?,
                lora: Default::default(),
            });
        }
        let embed = mat(take("model.embed_tokens.weight")?)?;
        let head = if cfg.tie_embeddings { None } else { Some(mat(take("lm_head.weight")?)?) };
        let norm = vec_f32(&take("model.norm.weight")?)?;
        Self::assemble(cfg, embed, head, norm, layers)
    }

    /// Apply `model`'s LoRA adapters (as they are now) beside this model's quantized weights,
    /// replacing any set before; a projection without an adapter gets none. This model must be
    /// `model`'s base, quantized (`QModel::from_causal(model, …)` leaves adapters out): the
    /// cheap way to generate with a policy whose adapters change at every step.
    pub fn set_adapters(&mut self, model: &CausalLm) -> Result<()> {
        let cfg = &self.cfg;
        let (h, qd, kvd, inter) =
            (cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size);
        // (in, out) of q k v o gate up down.
        let shapes = [(h, qd), (h, kvd), (h, kvd), (qd, h), (h, inter), (h, inter), (inter, h)];
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (p, &(d_in, d_out)) in shapes.iter().enumerate() {
                layer.lora[p] = match model.adapter(l, p) {
                    None => None,
                    Some(ad) => {
                        let (rank, a_in) = ad.a.as_tensor().dims2()?;
                        let (b_out, b_rank) = ad.b.as_tensor().dims2()?;
                        if rank == 0 || (a_in, b_out, b_rank) != (d_in, d_out, rank) {
                            bail!("layer {l} projection {p}: adapter A {rank}×{a_in}, B {b_out}×{b_rank} do not fit {d_out}×{d_in}");
                        }
                        let bt = (ad.b.as_tensor().t()? * ad.scale)?.contiguous()?;
                        Some(LowRank { a: vec_f32(ad.a.as_tensor())?, bt: vec_f32(&bt)?, rank })
                    }
                };
            }
        }
        Ok(())
    }

    /// Take every adapter set by [`Self::set_adapters`] off: the base model again.
    pub fn clear_adapters(&mut self) {
        for layer in &mut self.layers {
            layer.lora = Default::default();
        }
    }

    fn assemble(
        cfg: LlmConfig,
        embed: QMatrix,
        head: Option<QMatrix>,
        norm: Vec<f32>,
        layers: Vec<QLayer>,
    ) -> Result<Self> {
        if embed.n != cfg.vocab_size || embed.k != cfg.hidden_size {
            bail!("token embeddings are {} × {}, expected {} × {}", embed.n, embed.k, cfg.vocab_size, cfg.hidden_size);
        }
        let hd = cfg.head_dim;
        // The same f32 arithmetic as CausalLm's RoPE tables.
        let inv_freq = (0..hd / 2).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / hd as f32)).collect();
        Ok(Self { cfg, embed, embed_rows: None, head, norm, layers, inv_freq })
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let mut b = self.embed.bytes() + self.head.as_ref().map_or(0, |h| h.bytes()) + 4 * self.norm.len();
        b += self.embed_rows.as_ref().map_or(0, |e| e.bytes());
        for l in &self.layers {
            b += l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes();
            b += 4 * (l.attn_norm.len() + l.mlp_norm.len() + l.qkv_bias.as_ref().map_or(0, |v| v.len()));
        }
        b
    }

    /// An empty cache for one sequence, with room for `capacity` positions reserved.
    pub fn new_cache(&self, capacity: usize) -> SeqCache {
        SeqCache::new(self.cfg.num_layers, self.cfg.num_kv_heads * self.cfg.head_dim, capacity)
    }

    /// Run new tokens of several sequences through the model, appending to their caches.
    /// Returns, per sequence, the logits it asked for (rows × vocab, row-major).
    pub fn forward(&self, seqs: &mut [SeqStep]) -> Result<Vec<Option<Vec<f32>>>> {
        // Run on a pool thread: the many small parallel regions of a decoding step then cost a
        // work-stealing join each instead of putting the calling thread to sleep and waking it.
        rayon::scope(|_| self.forward_in_pool(seqs))
    }

    fn forward_in_pool(&self, seqs: &mut [SeqStep]) -> Result<Vec<Option<Vec<f32>>>> {
        let cfg = &self.cfg;
        let (h, hd, nh, nkv) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let (qd, kvd, inter) = (nh * hd, nkv * hd, cfg.intermediate_size);
        let rows: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        if rows == 0 {
            return Ok(seqs.iter().map(|_| None).collect());
        }
        // Row r belongs to sequence owner[r] at absolute position pos[r].
        let mut owner = Vec::with_capacity(rows);
        let mut pos = Vec::with_capacity(rows);
        let mut x = vec![0f32; rows * h];
        for (si, s) in seqs.iter().enumerate() {
            let past = s.cache.len();
            for (i, &t) in s.tokens.iter().enumerate() {
                if t as usize >= cfg.vocab_size {
                    bail!("token id {t} is outside the vocabulary ({} tokens)", cfg.vocab_size);
                }
                let dst = &mut x[owner.len() * h..(owner.len() + 1) * h];
                match &self.embed_rows {
                    Some(raw) => raw.row(t as usize, dst)?,
                    None => self.embed.row(t as usize, dst),
                }
                owner.push(si);
                pos.push(past + i);
            }
        }
        if let Some(&p) = pos.iter().max() {
            if p >= cfg.max_position {
                bail!("position {p} is past the model's context of {} tokens", cfg.max_position);
            }
        }
        // RoPE angles per row (shared by every layer).
        let half = hd / 2;
        let mut cos = vec![0f32; rows * half];
        let mut sin = vec![0f32; rows * half];
        for r in 0..rows {
            for (i, f) in self.inv_freq.iter().enumerate() {
                let a = pos[r] as f32 * f;
                cos[r * half + i] = a.cos();
                sin[r * half + i] = a.sin();
            }
        }
        let starts: Vec<usize> = {
            let mut s = Vec::with_capacity(seqs.len());
            let mut acc = 0;
            for q in seqs.iter() {
                s.push(acc);
                acc += q.tokens.len();
            }
            s
        };
        let mut normed = vec![0f32; rows * h];
        let mut acts = QActs::default();
        let mut qkv = vec![0f32; rows * (qd + 2 * kvd)];
        let mut attn = vec![0f32; rows * qd];
        let mut proj = vec![0f32; rows * h];
        let mut gu = vec![0f32; rows * 2 * inter];
        let mut hidden = vec![0f32; rows * inter];
        let scale = 1.0 / (hd as f32).sqrt();
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm_rows(&x, &layer.attn_norm, cfg.rms_norm_eps, &mut normed);
            acts.requantize(&normed, rows, h);
            layer.qkv.matmul(&acts, &mut qkv);
            let w = qd + 2 * kvd;
            for (p, col) in [(0, 0), (1, qd), (2, qd + kvd)] {
                if let Some(lr) = &layer.lora[p] {
                    lr.add_to(&normed, h, &mut qkv, w, col);
                }
            }
            qkv.par_chunks_mut(w).enumerate().with_min_len(ROWS_PER_TASK).for_each(|(r, row)| {
                if let Some(b) = &layer.qkv_bias {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
                let (c, s) = (&cos[r * half..(r + 1) * half], &sin[r * half..(r + 1) * half]);
                for head in row[..qd + kvd].chunks_exact_mut(hd) {
                    for i in 0..half {
                        let (a, b) = (head[i], head[i + half]);
                        head[i] = a * c[i] + -b * s[i];
                        head[i + half] = b * c[i] + a * s[i];
                    }
                }
            });
            seqs.par_iter_mut().enumerate().for_each(|(si, s)| {
                for i in 0..s.tokens.len() {
                    let row = &qkv[(starts[si] + i) * w..(starts[si] + i + 1) * w];
                    s.cache.push(li, &row[qd..qd + kvd], &row[qd + kvd..]);
                }
            });
            // Attention, one task per (sequence, KV head, chunk of up to 32 query rows): the
            // `rep` query heads that share a KV head read its keys and values once.
            let rep = nh / nkv;
            let lens: Vec<usize> = seqs.iter().map(|s| s.tokens.len()).collect();
            let tasks: Vec<(usize, usize, usize, usize)> = (0..seqs.len())
                .flat_map(|si| {
                    let n = lens[si];
                    (0..nkv).flat_map(move |kh| (0..n).step_by(32).map(move |i0| (si, kh, i0, (i0 + 32).min(n))))
                })
                .collect();
            // Each sequence's key blocks and value rows, wherever they live (shared prefix
            // segments or its own positions).
            let views: Vec<LayerView> = seqs.iter().map(|s| s.cache.layer(li)).collect();
            let attn_out = AttnOut(attn.as_mut_ptr());
            tasks.par_iter().for_each(|&(si, kh, i0, i1)| {
                let attn_out = &attn_out;
                let (keys, vals) = (&views[si].0, &views[si].1);
                let mut out = vec![0f32; (i1 - i0) * rep * hd];
                let task = HeadTask { keys, vals, kh, hd, rep, n: lens[si], i0, i1, scale };
                attend(
                    &task,
                    |i, h| {
                        let r = starts[si] + i;
                        &qkv[r * w + (kh * rep + h) * hd..r * w + (kh * rep + h + 1) * hd]
                    },
                    &mut out,
                );
                for i in i0..i1 {
                    let r = starts[si] + i;
                    // SAFETY: each task owns rows i0..i1 of its sequence and the columns of
                    // its KV head's query heads: disjoint ranges of `attn` (rows × qd).
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            out.as_ptr().add((i - i0) * rep * hd),
                            attn_out.0.add(r * qd + kh * rep * hd),
                            rep * hd,
                        );
                    }
                }
            });
            acts.requantize(&attn, rows, qd);
            layer.o.matmul(&acts, &mut proj);
            if let Some(lr) = &layer.lora[3] {
                lr.add_to(&attn, qd, &mut proj, h, 0);
            }
            add_rows(&mut x, &proj, h);
            rms_norm_rows(&x, &layer.mlp_norm, cfg.rms_norm_eps, &mut normed);
            acts.requantize(&normed, rows, h);
            layer.gate_up.matmul(&acts, &mut gu);
            for (p, col) in [(4, 0), (5, inter)] {
                if let Some(lr) = &layer.lora[p] {
                    lr.add_to(&normed, h, &mut gu, 2 * inter, col);
                }
            }
            hidden.par_chunks_mut(inter).zip(gu.par_chunks(2 * inter)).with_min_len(ROWS_PER_TASK).for_each(
                |(hidden, gu)| {
                    let (g, u) = gu.split_at(inter);
                    for ((o, &g), &u) in hidden.iter_mut().zip(g).zip(u) {
                        *o = g / (1.0 + (-g).exp()) * u;
                    }
                },
            );
            acts.requantize(&hidden, rows, inter);
            layer.down.matmul(&acts, &mut proj);
            if let Some(lr) = &layer.lora[6] {
                lr.add_to(&hidden, inter, &mut proj, h, 0);
            }
            add_rows(&mut x, &proj, h);
        }
        for s in seqs.iter_mut() {
            s.cache.commit(s.tokens.len());
        }
        // Logits at the rows the sequences want.
        let mut want: Vec<(usize, usize)> = Vec::new(); // (sequence, row)
        for (si, s) in seqs.iter().enumerate() {
            let n = s.tokens.len();
            match s.logits {
                Logits::None => {}
                Logits::Last if n > 0 => want.push((si, starts[si] + n - 1)),
                Logits::Last => {}
                Logits::All => want.extend((0..n).map(|i| (si, starts[si] + i))),
            }
        }
        let mut out: Vec<Option<Vec<f32>>> = seqs.iter().map(|_| None).collect();
        if !want.is_empty() {
            let mut last = vec![0f32; want.len() * h];
            for (j, &(_, r)) in want.iter().enumerate() {
                rms_norm_rows(&x[r * h..(r + 1) * h], &self.norm, cfg.rms_norm_eps, &mut last[j * h..(j + 1) * h]);
            }
            acts.requantize(&last, want.len(), h);
            let head = self.head.as_ref().unwrap_or(&self.embed);
            let v = cfg.vocab_size;
            let mut logits = vec![0f32; want.len() * v];
            head.matmul(&acts, &mut logits);
            for (j, &(si, _)) in want.iter().enumerate() {
                out[si].get_or_insert_with(Vec::new).extend_from_slice(&logits[j * v..(j + 1) * v]);
            }
        }
        Ok(out)
    }
}

/// One matrix from several with the same input (q/k/v, gate/up); when their formats differ
/// (a Q4_K q beside a Q6_K v), all become Q8.
fn fuse(parts: &[&QMatrix]) -> Result<QMatrix> {
    if parts.iter().all(|p| p.format == parts[0].format) {
        return QMatrix::concat(parts);
    }
    let q8: Vec<QMatrix> = parts
        .iter()
        .map(|p| {
            if p.format == Format::Q8 {
                Ok((*p).clone())
            } else {
                QMatrix::quantize(&p.dequantize(), p.n, p.k, Format::Q8)
            }
        })
        .collect::<Result<_>>()?;
    QMatrix::concat(&q8.iter().collect::<Vec<_>>())
}
