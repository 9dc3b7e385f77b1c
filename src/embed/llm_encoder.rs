//! The LLM as the encoder (paper Eq. 7): the final-norm hidden state averaged over the text's
//! tokens (no chat template, no generation). Right-padded batches; padding is masked in attention
//! and in the mean, so a text's vector does not depend on its batch.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::Encoder;
use crate::llm::model::padded_bias;
use crate::llm::Llm;

pub struct LlmEncoder {
    llm: Llm,
    name: String,
    /// Longest input in tokens (longer texts keep their first `max_len` tokens).
    pub max_len: usize,
}

impl LlmEncoder {
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let path = crate::llm::resolve(spec)?;
        let llm = Llm::load(&path, device, crate::llm::default_dtype(device))?;
        Ok(Self::new(llm, spec))
    }

    pub fn new(llm: Llm, spec: &str) -> Self {
        Self { llm, name: format!("llm:{spec}"), max_len: 256 }
    }

    fn forward(&self, batch: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let dev = self.llm.model.device().clone();
        let b = batch.len();
        let t = batch.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let mut ids = vec![self.llm.tokenizer.pad_id; b * t];
        let mut pos = vec![0u32; b * t];
        let mut valid = vec![vec![false; t]; b];
        for (r, s) in batch.iter().enumerate() {
            for (j, &id) in s.iter().enumerate() {
                ids[r * t + j] = id;
                pos[r * t + j] = j as u32;
                valid[r][j] = true;
            }
        }
        let ids = Tensor::from_vec(ids, (b, t), &dev)?;
        let pos = Tensor::from_vec(pos, (b, t), &dev)?;
        let bias = padded_bias(&valid, t, &dev)?.to_dtype(self.llm.model.dtype())?;
        let h = self.llm.model.forward_no_grad(&ids, &pos, Some(&bias), true)?.to_dtype(DType::F32)?;
        let mask: Vec<f32> = valid.iter().flat_map(|v| v.iter().map(|&x| f32::from(u8::from(x)))).collect();
        let mask = Tensor::from_vec(mask, (b, t, 1), &dev)?;
        let sum = h.broadcast_mul(&mask)?.sum(1)?;
        let n = mask.sum(1)?.clamp(1.0, f64::MAX)?;
        Ok(sum.broadcast_div(&n)?.to_vec2::<f32>()?)
    }
}

impl Encoder for LlmEncoder {
    fn name(&self) -> &str {
        &self.name
    }

    fn dim(&self) -> usize {
        self.llm.model.cfg.hidden_size
    }

    fn encode(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        let mut ids = Vec::with_capacity(texts.len());
        for t in texts {
            let mut v = self.llm.tokenizer.encode(t)?;
            v.truncate(self.max_len);
            if v.is_empty() {
                v.push(self.llm.tokenizer.pad_id);
            }
            ids.push(v);
        }
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(16) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
            for (&i, row) in chunk.iter().zip(self.forward(&batch)?) {
                out[i] = row;
            }
        }
        Ok(out)
    }
}
