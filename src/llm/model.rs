//! The decoder-only transformer shared by the Qwen2 and Llama families, written with
//! differentiable ops only (candle-nn's fused `softmax_last_dim`, `rms_norm` and `rope` have no
//! backward pass and would silently cut the graph; `crate::ops` has fused ones that do):
//! RMSNorm, rotate-half RoPE at per-sequence positions, grouped-query attention with an additive
//! mask, SwiGLU MLP, tied or separate head.
//!
//! `forward` returns the final hidden states at every position (GRPO scores every completion
//! token); `logits` applies the head to any subset of them. Generation owns its [`KvCache`].

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::config::LlmConfig;
use super::lora::{Adapter, LoraConfig, ALL_TARGETS};
use super::weights::Weights;
use crate::rng::{rng_for, standard_normal};

pub use crate::ops::MASKED;

/// A projection with an optional bias and an optional LoRA adapter; the weight is [out, in].
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<Adapter>,
}

impl Linear {
    /// `x` is 2-D (rows × in).
    pub fn forward(&self, x: &Tensor, adapters: bool) -> Result<Tensor> {
        let mut y = crate::ops::linear_rows(x, &self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if adapters {
            if let Some(l) = &self.lora {
                y = (y + l.delta(x)?)?;
            }
        }
        Ok(y)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    proj: [Linear; 7], // q k v o gate up down, in ALL_TARGETS order
}

/// Per-layer cached keys and values ([batch, kv_heads, past, head_dim]).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers] }
    }

    /// Cached positions (0 when empty).
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep only the given batch rows (drops finished sequences from a generation batch).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(rows, 0)?;
            *v = v.index_select(rows, 0)?;
        }
        Ok(())
    }
}

/// Per-call inputs shared by all layers.
#[derive(Debug, Clone)]
struct Step {
    b: usize,
    t: usize,
    cos: Tensor,
    sin: Tensor,
    bias: Tensor,
    /// The mask as [b, t, keys] values for the fused attention op (f32 on the CPU only).
    mask: Option<std::sync::Arc<Vec<f32>>>,
}

/// What [`CausalLm::forward_checkpointed`] keeps for the backward pass.
pub struct Checkpoints {
    inputs: Vec<Tensor>,
    ids: Tensor,
    st: Step,
    adapters: bool,
    last: Var,
}

/// A Qwen2- or Llama-family causal LM.
#[derive(Debug, Clone)]
pub struct CausalLm {
    pub cfg: LlmConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    cos: Tensor,
    sin: Tensor,
    dtype: DType,
    device: Device,
    /// The fused attention op on the CPU in f32 (`llm::attention`): less memory (no attention
    /// matrices kept), not yet faster than the composite ops, so off unless
    /// `CUREC_ATTENTION=fused` at load or [`Self::set_fused_attention`].
    fused_attention: bool,
}

fn take(w: &mut Weights, name: &str) -> Result<Tensor> {
    w.remove(name).with_context(|| format!("weights lack tensor '{name}'"))
}

impl CausalLm {
    /// Build from a Hugging Face–named weight map (see [`super::weights`]).
    pub fn from_weights(cfg: LlmConfig, mut w: Weights, dtype: DType, device: &Device) -> Result<Self> {
        let embed = take(&mut w, "model.embed_tokens.weight")?;
        if embed.dims2()? != (cfg.vocab_size, cfg.hidden_size) {
            bail!("embed_tokens has shape {:?}, expected [{}, {}]", embed.dims(), cfg.vocab_size, cfg.hidden_size);
        }
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let mut proj = Vec::with_capacity(ALL_TARGETS.len());
            for pi in 0..ALL_TARGETS.len() {
                let n = proj_name(i, pi);
                proj.push(Linear {
                    weight: take(&mut w, &format!("{n}.weight"))?,
                    bias: w.remove(&format!("{n}.bias")),
                    lora: None,
                });
            }
            let proj: [Linear; 7] = proj.try_into().expect("one Linear per target");
            layers.push(Layer {
                input_norm: take(&mut w, &format!("{p}.input_layernorm.weight"))?,
                post_norm: take(&mut w, &format!("{p}.post_attention_layernorm.weight"))?,
                proj,
            });
        }
        let norm = take(&mut w, "model.norm.weight")?;
        let lm_head = if cfg.tie_embeddings { None } else { Some(take(&mut w, "lm_head.weight")?) };
        let (cos, sin) = rope_tables(&cfg, cfg.max_position.min(32_768), device)?;
        let fused_attention = std::env::var("CUREC_ATTENTION").is_ok_and(|v| v == "fused");
        Ok(Self { cfg, embed, layers, norm, lm_head, cos, sin, dtype, device: device.clone(), fused_attention })
    }

    /// A randomly initialised model (normal(0, 0.02) matrices, unit norms), seeded; for tests.
    pub fn random(cfg: LlmConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut w = Weights::new();
        let mut idx = 0u64;
        let mut normal = |shape: &[usize]| -> Result<Tensor> {
            idx += 1;
            let mut rng = rng_for(seed, 0x11a, idx);
            let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| 0.02 * standard_normal(&mut rng)).collect();
            Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
        };
        let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (q, kv) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        w.insert("model.embed_tokens.weight".into(), normal(&[v, h])?);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            for (name, o, n) in [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q)] {
                w.insert(format!("{p}.self_attn.{name}.weight"), normal(&[o, n])?);
                if cfg.attention_bias && name != "o_proj" {
                    w.insert(format!("{p}.self_attn.{name}.bias"), normal(&[o])?);
                }
            }
            for (name, o, n) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
                w.insert(format!("{p}.mlp.{name}.weight"), normal(&[o, n])?);
            }
            w.insert(format!("{p}.input_layernorm.weight"), Tensor::ones(h, dtype, device)?);
            w.insert(format!("{p}.post_attention_layernorm.weight"), Tensor::ones(h, dtype, device)?);
        }
        w.insert("model.norm.weight".into(), Tensor::ones(h, dtype, device)?);
        if !cfg.tie_embeddings {
            w.insert("lm_head.weight".into(), normal(&[v, h])?);
        }
        Self::from_weights(cfg, w, dtype, device)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Use the fused attention op where it applies, or the composite ops (the default).
    pub fn set_fused_attention(&mut self, on: bool) {
        self.fused_attention = on;
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// RoPE tables at the given positions and the mask, in the model's dtype.
    fn prepare(&self, positions: &Tensor, bias: Option<&Tensor>, past: usize) -> Result<Step> {
        let (b, t) = positions.dims2()?;
        let hd = self.cfg.head_dim;
        let pos = positions.flatten_all()?;
        let context = self.cos.dim(0)?;
        let max = pos.max(0)?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        if max >= context {
            bail!(
                "position {max} is past the model's context of {context} tokens (shorten the prompt or --max-new-tokens)"
            );
        }
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, 1, t, hd))?.to_dtype(self.dtype)?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, 1, t, hd))?.to_dtype(self.dtype)?;
        let bias = match bias {
            Some(m) => m.to_dtype(self.dtype)?,
            None => causal_bias(b, t, past, &self.device)?.to_dtype(self.dtype)?,
        };
        let fused = self.fused_attention && self.device.is_cpu() && self.dtype == DType::F32;
        let mask = if fused { Some(std::sync::Arc::new(bias.flatten_all()?.to_vec1::<f32>()?)) } else { None };
        Ok(Step { b, t, cos, sin, bias, mask })
    }

    /// One decoder layer on the residual stream `x` ([b·t, hidden]).
    fn layer(&self, li: usize, x: &Tensor, st: &Step, cache: Option<&mut KvCache>, adapters: bool) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = (st.b, st.t);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let rep = nh / nkv;
        let layer = &self.layers[li];
        let [qp, kp, vp, op, gp, up, dp] = &layer.proj;
        let h = crate::ops::rms_norm(x, &layer.input_norm, cfg.rms_norm_eps)?;
        let q = qp.forward(&h, adapters)?.reshape((b, t, nh, hd))?.transpose(1, 2)?;
        let k = kp.forward(&h, adapters)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let v = vp.forward(&h, adapters)?.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = crate::ops::rope(&q, &st.cos, &st.sin)?;
        let k = crate::ops::rope(&k, &st.cos, &st.sin)?;
        let (k, v) = match cache {
            Some(c) => {
                let kv = match &c.layers[li] {
                    Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                    None => (k, v),
                };
                c.layers[li] = Some((kv.0.detach(), kv.1.detach()));
                kv
            }
            None => (k, v),
        };
        let total = k.dim(2)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = match &st.mask {
            // The fused op (`llm::attention`): no [b, heads, t, keys] tensors kept or written.
            Some(mask) if mask.len() == b * t * total => {
                let op = super::attention::Attention { mask: mask.clone(), scale: scale as f32 };
                q.contiguous()?.apply_op3(&k.contiguous()?, &v, op)?
            }
            _ => {
                // Grouped-query attention without repeating K/V: the `rep` query heads that
                // share a KV head are stacked along the query axis.
                let qg = (q * scale)?.contiguous()?.reshape((b, nkv, rep * t, hd))?;
                let scores = qg.matmul(&k.t()?)?.reshape((b, nh, t, total))?;
                let probs = crate::ops::masked_softmax(&scores, &st.bias)?.reshape((b, nkv, rep * t, total))?;
                probs.matmul(&v)?.reshape((b, nh, t, hd))?
            }
        };
        let att = att.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        let x = (x + op.forward(&att, adapters)?)?;
        let h = crate::ops::rms_norm(&x, &layer.post_norm, cfg.rms_norm_eps)?;
        let g = gp.forward(&h, adapters)?.silu()?;
        let u = up.forward(&h, adapters)?;
        Ok((&x + dp.forward(&(g * u)?, adapters)?)?)
    }

    /// Hidden states after the final norm, [batch, t, hidden].
    ///
    /// `ids` and `positions` are [batch, t] u32; `bias` is the additive attention mask
    /// [batch, 1, t, past + t] (None: plain causal, no padding). With a cache (inference), the new
    /// keys and values are appended to it and no autograd graph is kept, even when adapters are
    /// trainable: generation with a model under training would otherwise hold every step's graph.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        bias: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        adapters: bool,
    ) -> Result<Tensor> {
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() != self.layers.len() {
                *c = KvCache::new(self.layers.len());
            }
        }
        let past = cache.as_ref().map_or(0, |c| c.len());
        let st = self.prepare(positions, bias, past)?;
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?; // [b*t, h]
        let inference = cache.is_some();
        for li in 0..self.layers.len() {
            x = self.layer(li, &x, &st, cache.as_deref_mut(), adapters)?;
            if inference {
                x = x.detach();
            }
        }
        let x = crate::ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?;
        Ok(x.reshape((st.b, st.t, self.cfg.hidden_size))?)
    }

    /// Every layer run on a detached residual stream, so that no layer's autograd graph outlives
    /// it; returns the last layer's output and, when `keep`, each layer's input.
    fn layers_detached(&self, ids: &Tensor, st: &Step, adapters: bool, keep: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = self.embed.index_select(ids, 0)?.detach();
        let mut inputs = Vec::with_capacity(if keep { self.layers.len() } else { 0 });
        for li in 0..self.layers.len() {
            if keep {
                inputs.push(x.clone());
            }
            x = self.layer(li, &x, st, None, adapters)?.detach();
        }
        Ok((x, inputs))
    }

    /// [`Self::forward`] without any gradient (old and reference policies): memory stays at one
    /// layer's activations even when adapters are trainable variables.
    pub fn forward_no_grad(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        bias: Option<&Tensor>,
        adapters: bool,
    ) -> Result<Tensor> {
        let st = self.prepare(positions, bias, 0)?;
        let (x, _) = self.layers_detached(&ids.flatten_all()?, &st, adapters, false)?;
        let h = crate::ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?.detach();
        Ok(h.reshape((st.b, st.t, self.cfg.hidden_size))?)
    }

    /// [`Self::forward`] for training with activation checkpointing: only each layer's input is
    /// kept; [`Self::backward_checkpointed`] recomputes one layer at a time. Peak memory is the
    /// weights plus one layer's activations instead of all of them (Qwen 0.5B, 4 × 256 tokens,
    /// LoRA: see README).
    pub fn forward_checkpointed(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        bias: Option<&Tensor>,
        adapters: bool,
    ) -> Result<(Tensor, Checkpoints)> {
        let st = self.prepare(positions, bias, 0)?;
        let ids = ids.flatten_all()?;
        let (x, inputs) = self.layers_detached(&ids, &st, adapters, true)?;
        let last = Var::from_tensor(&x)?;
        let h = crate::ops::rms_norm(last.as_tensor(), &self.norm, self.cfg.rms_norm_eps)?;
        let hidden = h.reshape((st.b, st.t, self.cfg.hidden_size))?;
        Ok((hidden, Checkpoints { inputs, ids, st, adapters, last }))
    }

    /// Gradients of `loss` (built on the hidden states of [`Self::forward_checkpointed`]) for
    /// every trainable variable of the model: LoRA adapters, or all weights after
    /// [`Self::train_full`].
    pub fn backward_checkpointed(&self, loss: &Tensor, ck: Checkpoints) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let Some(mut g) = grads.remove(ck.last.as_tensor()) else { return Ok(grads) };
        let add = |grads: &mut GradStore, t: &Tensor, gr: &Tensor| -> Result<()> {
            let sum = match grads.get(t) {
                Some(prev) => (prev + gr)?,
                None => gr.clone(),
            };
            grads.insert(t, sum);
            Ok(())
        };
        for li in (0..self.layers.len()).rev() {
            let xin = Var::from_tensor(&ck.inputs[li])?;
            let out = self.layer(li, xin.as_tensor(), &ck.st, None, ck.adapters)?;
            let lg = (out * &g)?.sum_all()?.backward()?;
            for t in self.layer_tensors(li) {
                if t.is_variable() {
                    if let Some(gr) = lg.get(&t) {
                        add(&mut grads, &t, gr)?;
                    }
                }
            }
            g = match lg.get(xin.as_tensor()) {
                Some(gx) => gx.clone(),
                None => return Ok(grads),
            };
        }
        if self.embed.is_variable() {
            let lg = (self.embed.index_select(&ck.ids, 0)? * &g)?.sum_all()?.backward()?;
            if let Some(gr) = lg.get(&self.embed) {
                add(&mut grads, &self.embed, gr)?;
            }
        }
        Ok(grads)
    }

    fn layer_tensors(&self, li: usize) -> Vec<Tensor> {
        let l = &self.layers[li];
        let mut out = vec![l.input_norm.clone(), l.post_norm.clone()];
        for p in &l.proj {
            out.push(p.weight.clone());
            out.extend(p.bias.clone());
            if let Some(a) = &p.lora {
                out.push(a.a.as_tensor().clone());
                out.push(a.b.as_tensor().clone());
            }
        }
        out
    }

    /// Logits for hidden states of any leading shape, in f32.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let h = hidden.reshape(((), self.cfg.hidden_size))?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let l = crate::ops::linear_rows(&h, head)?.to_dtype(DType::F32)?;
        let mut out = dims[..dims.len() - 1].to_vec();
        out.push(self.cfg.vocab_size);
        Ok(l.reshape(out)?)
    }

    /// Attach fresh LoRA adapters to the configured projections of every layer.
    pub fn add_lora(&mut self, cfg: &LoraConfig) -> Result<()> {
        cfg.validate()?;
        for (li, layer) in self.layers.iter_mut().enumerate() {
            for (pi, name) in ALL_TARGETS.iter().enumerate() {
                if cfg.targets.iter().any(|t| t == name) {
                    let lin = &mut layer.proj[pi];
                    let (d_out, d_in) = lin.weight.dims2()?;
                    let index = (li * ALL_TARGETS.len() + pi) as u64;
                    lin.lora = Some(Adapter::new(cfg, index, d_in, d_out, self.dtype, &self.device)?);
                }
            }
        }
        Ok(())
    }

    /// Load adapters saved by [`Self::save_lora`] (attaching them first).
    pub fn load_lora(&mut self, path: &std::path::Path) -> Result<LoraConfig> {
        let (cfg, tensors) = super::lora::load(path)?;
        self.add_lora(&cfg)?;
        let mut named: HashMap<String, &mut Adapter> = HashMap::new();
        for (li, layer) in self.layers.iter_mut().enumerate() {
            for (pi, lin) in layer.proj.iter_mut().enumerate() {
                if let Some(a) = lin.lora.as_mut() {
                    named.insert(proj_name(li, pi), a);
                }
            }
        }
        for (name, a) in named.iter_mut() {
            let (ta, tb) = tensors.get(name).with_context(|| format!("{}: lacks adapter {name}", path.display()))?;
            if ta.dims() != a.a.dims() || tb.dims() != a.b.dims() {
                bail!(
                    "{}: adapter {name} has shape {:?}/{:?}, expected {:?}/{:?}",
                    path.display(),
                    ta.dims(),
                    tb.dims(),
                    a.a.dims(),
                    a.b.dims()
                );
            }
            a.a.set(&ta.to_dtype(self.dtype)?.to_device(&self.device)?)?;
            a.b.set(&tb.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        }
        Ok(cfg)
    }

    pub fn save_lora(&self, path: &std::path::Path, cfg: &LoraConfig) -> Result<()> {
        let list: Vec<(String, &Adapter)> = self.lora_adapters();
        if list.is_empty() {
            bail!("the model has no LoRA adapters to save");
        }
        super::lora::save(path, cfg, &list)
    }

    /// The LoRA adapter of projection `proj` (in `ALL_TARGETS` order) of layer `layer`, if any.
    pub fn adapter(&self, layer: usize, proj: usize) -> Option<&Adapter> {
        self.layers.get(layer)?.proj.get(proj)?.lora.as_ref()
    }

    fn lora_adapters(&self) -> Vec<(String, &Adapter)> {
        let mut out = Vec::new();
        for (li, layer) in self.layers.iter().enumerate() {
            for (pi, lin) in layer.proj.iter().enumerate() {
                if let Some(a) = &lin.lora {
                    out.push((proj_name(li, pi), a));
                }
            }
        }
        out
    }

    /// Every base weight, named as in Hugging Face checkpoints (a tied head is not listed twice).
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (li, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{li}");
            out.push((format!("{p}.input_layernorm.weight"), layer.input_norm.clone()));
            out.push((format!("{p}.post_attention_layernorm.weight"), layer.post_norm.clone()));
            for (pi, lin) in layer.proj.iter().enumerate() {
                let n = proj_name(li, pi);
                out.push((format!("{n}.weight"), lin.weight.clone()));
                if let Some(b) = &lin.bias {
                    out.push((format!("{n}.bias"), b.clone()));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h.clone()));
        }
        out
    }

    /// A copy for inference with every adapter folded into its weight (W + s·B·A) and nothing
    /// trainable: generation from a model under LoRA training runs at the base model's speed.
    /// Unfolded weights share storage with this model.
    pub fn merged(&self) -> Result<CausalLm> {
        self.map_weights(|t| Ok(t.detach()))
    }

    /// A frozen deep copy (new storage, adapters folded in): the reference policy of full
    /// fine-tuning, which later updates must not reach.
    pub fn frozen_copy(&self) -> Result<CausalLm> {
        self.map_weights(|t| Ok(t.copy()?.detach()))
    }

    fn map_weights(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<CausalLm> {
        let mut m = self.clone();
        m.embed = f(&m.embed)?;
        m.norm = f(&m.norm)?;
        m.lm_head = m.lm_head.as_ref().map(&f).transpose()?;
        for layer in m.layers.iter_mut() {
            layer.input_norm = f(&layer.input_norm)?;
            layer.post_norm = f(&layer.post_norm)?;
            for lin in layer.proj.iter_mut() {
                lin.weight = match lin.lora.take() {
                    Some(a) => {
                        let delta = (a.b.as_tensor().matmul(a.a.as_tensor())? * a.scale)?;
                        f(&(&lin.weight + delta.to_dtype(lin.weight.dtype())?)?)?
                    }
                    None => f(&lin.weight)?,
                };
                lin.bias = lin.bias.as_ref().map(&f).transpose()?;
            }
        }
        Ok(m)
    }

    /// The trainable LoRA variables, named.
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (name, a) in self.lora_adapters() {
            out.push((format!("{name}.lora_A.weight"), a.a.clone()));
            out.push((format!("{name}.lora_B.weight"), a.b.clone()));
        }
        out
    }

    /// Full fine-tuning: turn every base weight into a trainable `Var` and return them, named.
    pub fn train_full(&mut self) -> Result<Vec<(String, Var)>> {
        let mut out = Vec::new();
        let mut to_var = |name: String, t: &mut Tensor| -> Result<()> {
            let v = Var::from_tensor(t)?;
            *t = v.as_tensor().clone();
            out.push((name, v));
            Ok(())
        };
        to_var("model.embed_tokens.weight".into(), &mut self.embed)?;
        for (li, layer) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{li}");
            to_var(format!("{p}.input_layernorm.weight"), &mut layer.input_norm)?;
            to_var(format!("{p}.post_attention_layernorm.weight"), &mut layer.post_norm)?;
            for (pi, lin) in layer.proj.iter_mut().enumerate() {
                let n = proj_name(li, pi);
                to_var(format!("{n}.weight"), &mut lin.weight)?;
                if let Some(b) = lin.bias.as_mut() {
                    to_var(format!("{n}.bias"), b)?;
                }
            }
        }
        to_var("model.norm.weight".into(), &mut self.norm)?;
        if let Some(h) = self.lm_head.as_mut() {
            to_var("lm_head.weight".into(), h)?;
        }
        Ok(out)
    }
}

fn proj_name(layer: usize, proj: usize) -> String {
    let sub = if proj < 4 { "self_attn" } else { "mlp" };
    format!("model.layers.{layer}.{sub}.{}", ALL_TARGETS[proj])
}

fn rope_tables(cfg: &LlmConfig, max_pos: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim;
    let inv: Vec<f32> = (0..hd / 2).map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / hd as f32)).collect();
    let mut cos = Vec::with_capacity(max_pos * hd);
    let mut sin = Vec::with_capacity(max_pos * hd);
    for p in 0..max_pos {
        for _ in 0..2 {
            for f in &inv {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }
    Ok((Tensor::from_vec(cos, (max_pos, hd), dev)?, Tensor::from_vec(sin, (max_pos, hd), dev)?))
}

/// Plain causal mask for `t` new queries after `past` cached keys, all rows unpadded.
pub fn causal_bias(b: usize, t: usize, past: usize, dev: &Device) -> Result<Tensor> {
    let total = past + t;
    let v: Vec<f32> = (0..t).flat_map(|i| (0..total).map(move |j| if j <= past + i { 0.0 } else { MASKED })).collect();
    Ok(Tensor::from_vec(v, (1, 1, t, total), dev)?.broadcast_as((b, 1, t, total))?.contiguous()?)
}

/// Mask for `t` new queries whose absolute slot is `past + i`, where `valid[row][j]` says whether
/// key slot j holds a real token (false for padding), over `valid[row].len()` = past + t slots.
pub fn padded_bias(valid: &[Vec<bool>], t: usize, dev: &Device) -> Result<Tensor> {
    let b = valid.len();
    let total = valid.first().map_or(0, |r| r.len());
    let past = total - t;
    let mut v = Vec::with_capacity(b * t * total);
    for row in valid {
        for i in 0..t {
            v.extend((0..total).map(|j| if j <= past + i && row[j] { 0.0 } else { MASKED }));
        }
    }
    Ok(Tensor::from_vec(v, (b, 1, t, total), dev)?)
}
