//! A BERT sentence encoder (all-MiniLM-L6-v2 and any `BertModel` directory with `config.json`,
//! `model.safetensors`, `tokenizer.json`): post-LN transformer with erf-GELU, attention-masked
//! mean pooling over the last hidden state, L2-normalised, as sentence-transformers does. Inputs
//! longer than `max_len` tokens (256, the model card's limit) are cut, keeping [CLS] … [SEP].

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::Linear;
use serde::Deserialize;

use super::Encoder;
use crate::ops::softmax_last_dim;

#[derive(Debug, Clone, Deserialize)]
struct BertConfig {
    hidden_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    hidden_act: Option<String>,
}

fn default_eps() -> f64 {
    1e-12
}

struct Norm {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        Ok(xc.broadcast_div(&(var + self.eps)?.sqrt()?)?.broadcast_mul(&self.w)?.broadcast_add(&self.b)?)
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln1: Norm,
    up: Linear,
    down: Linear,
    ln2: Norm,
}

/// all-MiniLM-L6-v2 (or another BERT) as a sentence encoder.
pub struct MiniLm {
    cfg: BertConfig,
    tokenizer: tokenizers::Tokenizer,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    ln: Norm,
    layers: Vec<Layer>,
    pub max_len: usize,
    name: String,
}

impl MiniLm {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&cfg_path).with_context(|| format!("{}: cannot read", cfg_path.display()))?;
        let cfg: BertConfig =
            serde_json::from_str(&text).with_context(|| format!("{}: not a BERT config", cfg_path.display()))?;
        if let Some(act) = &cfg.hidden_act {
            if act != "gelu" {
                bail!("{}: hidden_act '{act}' is not supported (expected gelu)", cfg_path.display());
            }
        }
        let st = dir.join("model.safetensors");
        let mut w = candle_core::safetensors::load(&st, device).with_context(|| format!("{}", st.display()))?;
        let mut take = |name: &str| -> Result<Tensor> {
            let t = w.remove(name).ok_or_else(|| anyhow!("{}: no tensor '{name}'", st.display()))?;
            Ok(t.to_dtype(DType::F32)?)
        };
        fn lin(take: &mut impl FnMut(&str) -> Result<Tensor>, p: &str) -> Result<Linear> {
            Ok(Linear::new(take(&format!("{p}.weight"))?, Some(take(&format!("{p}.bias"))?)))
        }
        let eps = cfg.layer_norm_eps;
        let mut layers = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            layers.push(Layer {
                q: lin(&mut take, &format!("{p}.attention.self.query"))?,
                k: lin(&mut take, &format!("{p}.attention.self.key"))?,
                v: lin(&mut take, &format!("{p}.attention.self.value"))?,
                o: lin(&mut take, &format!("{p}.attention.output.dense"))?,
                ln1: Norm {
                    w: take(&format!("{p}.attention.output.LayerNorm.weight"))?,
                    b: take(&format!("{p}.attention.output.LayerNorm.bias"))?,
                    eps,
                },
                up: lin(&mut take, &format!("{p}.intermediate.dense"))?,
                down: lin(&mut take, &format!("{p}.output.dense"))?,
                ln2: Norm {
                    w: take(&format!("{p}.output.LayerNorm.weight"))?,
                    b: take(&format!("{p}.output.LayerNorm.bias"))?,
                    eps,
                },
            });
        }
        let word = take("embeddings.word_embeddings.weight")?;
        let position = take("embeddings.position_embeddings.weight")?;
        let token_type = take("embeddings.token_type_embeddings.weight")?.narrow(0, 0, 1)?;
        let ln = Norm { w: take("embeddings.LayerNorm.weight")?, b: take("embeddings.LayerNorm.bias")?, eps };
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| anyhow!("{}: {e}", tok_path.display()))?;
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| anyhow!("{e}"))?;
        let max_len = 256.min(position.dim(0)?);
        let name = format!("bert:{}", dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default());
        Ok(Self { cfg, tokenizer, word, position, token_type, ln, layers, max_len, name })
    }

    /// Token ids with [CLS]/[SEP], cut to `max_len`.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode_fast(text, true).map_err(|e| anyhow!("tokenizing: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > self.max_len {
            let last = *ids.last().expect("non-empty");
            ids.truncate(self.max_len - 1);
            ids.push(last);
        }
        Ok(ids)
    }

    fn forward(&self, batch: &[Vec<u32>]) -> Result<Tensor> {
        let dev = self.word.device();
        let (b, h) = (batch.len(), self.cfg.hidden_size);
        let t = batch.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        for (r, s) in batch.iter().enumerate() {
            ids[r * t..r * t + s.len()].copy_from_slice(s);
            mask[r * t..r * t + s.len()].iter_mut().for_each(|m| *m = 1.0);
        }
        let ids = Tensor::from_vec(ids, b * t, dev)?;
        let mask = Tensor::from_vec(mask, (b, t), dev)?;
        let x = self.word.index_select(&ids, 0)?.reshape((b, t, h))?;
        let x = x.broadcast_add(&self.position.narrow(0, 0, t)?)?.broadcast_add(&self.token_type)?;
        let mut x = self.ln.forward(&x)?;
        let heads = self.cfg.num_attention_heads;
        let dh = h / heads;
        // Padding keys get a large negative bias.
        let bias = ((mask.clone() - 1.0)? * 1e9)?.reshape((b, 1, 1, t))?;
        for l in &self.layers {
            let split = |lin: &Linear| -> Result<Tensor> {
                Ok(lin.forward(&x)?.reshape((b, t, heads, dh))?.transpose(1, 2)?.contiguous()?)
            };
            let (q, k, v) = (split(&l.q)?, split(&l.k)?, split(&l.v)?);
            let att = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (dh as f64).sqrt())?.broadcast_add(&bias)?;
            let ctx = softmax_last_dim(&att)?.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
            let x1 = l.ln1.forward(&(l.o.forward(&ctx)? + &x)?)?;
            let f = l.down.forward(&l.up.forward(&x1)?.gelu_erf()?)?;
            x = l.ln2.forward(&(f + x1)?)?;
        }
        // Masked mean pooling, then L2 normalisation.
        let m = mask.unsqueeze(2)?;
        let sum = x.broadcast_mul(&m)?.sum(1)?;
        let n = m.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = sum.broadcast_div(&n)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        Ok(mean.broadcast_div(&norm)?)
    }
}

impl Encoder for MiniLm {
    fn name(&self) -> &str {
        &self.name
    }

    fn dim(&self) -> usize {
        self.cfg.hidden_size
    }

    fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| self.tokenize(t)).collect::<Result<_>>()?;
        // Sort by length so that batches pad little; results go back in input order.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(32) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            let e = self.forward(&batch)?.to_vec2::<f32>()?;
            for (&i, row) in chunk.iter().zip(e) {
                out[i] = row;
            }
        }
        Ok(out)
    }
}
