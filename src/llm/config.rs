//! The architecture hyper-parameters of a decoder-only LLM, read from GGUF metadata or from a
//! Hugging Face `config.json`. One config covers both families: Qwen2 (bias on q/k/v) and Llama
//! (no bias); everything else (RMSNorm, SwiGLU, rotate-half RoPE, grouped-query attention) is shared.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use serde::{Deserialize, Serialize};

/// The model family: it decides the q/k/v bias, the GGUF tensor layout and the chat template defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Qwen2,
    Llama,
}

impl Family {
    pub fn parse(arch: &str) -> Result<Self> {
        match arch {
            "qwen2" | "Qwen2ForCausalLM" => Ok(Family::Qwen2),
            "llama" | "LlamaForCausalLM" => Ok(Family::Llama),
            other => bail!("architecture '{other}' is not supported: expected qwen2 or llama"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f64,
    pub max_position: usize,
    pub tie_embeddings: bool,
    pub attention_bias: bool,
}

impl LlmConfig {
    pub fn from_gguf(c: &gguf_file::Content) -> Result<Self> {
        let arch = meta_str(c, "general.architecture")?;
        let family = Family::parse(&arch)?;
        let u = |k: &str| -> Result<usize> {
            let key = format!("{arch}.{k}");
            let v = c.metadata.get(&key).with_context(|| format!("GGUF metadata lacks '{key}'"))?;
            Ok(v.to_u64().or_else(|_| v.to_u32().map(u64::from))? as usize)
        };
        let f = |k: &str, default: f32| -> Result<f32> {
            match c.metadata.get(&format!("{arch}.{k}")) {
                Some(v) => Ok(v.to_f32()?),
                None => Ok(default),
            }
        };
        let hidden_size = u("embedding_length")?;
        let num_heads = u("attention.head_count")?;
        let num_kv_heads = u("attention.head_count_kv").unwrap_or(num_heads);
        let vocab_size = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => c.metadata.get("tokenizer.ggml.tokens").context("GGUF lacks a vocabulary")?.to_vec()?.len(),
        };
        let embd = c.tensor_infos.get("token_embd.weight").context("GGUF lacks tensor token_embd.weight")?;
        let vocab_size = vocab_size.max(embd.shape.dims()[0]);
        Ok(Self {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim: u("attention.key_length").unwrap_or(hidden_size / num_heads),
            rope_theta: f("rope.freq_base", 10_000.0)?,
            rms_norm_eps: f("attention.layer_norm_rms_epsilon", 1e-6)? as f64,
            max_position: u("context_length").unwrap_or(32_768),
            tie_embeddings: !c.tensor_infos.contains_key("output.weight"),
            attention_bias: c.tensor_infos.contains_key("blk.0.attn_q.bias"),
        })
    }

    /// From a Hugging Face `config.json` (the text of the file, and its path for errors).
    pub fn from_hf_json(text: &str, path: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text).with_context(|| format!("{path}: not valid JSON"))?;
        let arch = v["architectures"][0]
            .as_str()
            .or_else(|| v["model_type"].as_str())
            .with_context(|| format!("{path}: expected 'architectures' or 'model_type'"))?;
        let family = Family::parse(arch)?;
        let u = |k: &str| -> Result<usize> {
            v[k].as_u64().map(|x| x as usize).with_context(|| format!("{path}: expected an integer '{k}'"))
        };
        let hidden_size = u("hidden_size")?;
        let num_heads = u("num_attention_heads")?;
        Ok(Self {
            family,
            vocab_size: u("vocab_size")?,
            hidden_size,
            intermediate_size: u("intermediate_size")?,
            num_layers: u("num_hidden_layers")?,
            num_heads,
            num_kv_heads: u("num_key_value_heads").unwrap_or(num_heads),
            head_dim: u("head_dim").unwrap_or(hidden_size / num_heads),
            rope_theta: v["rope_theta"].as_f64().unwrap_or(10_000.0) as f32,
            rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            max_position: u("max_position_embeddings").unwrap_or(32_768),
            tie_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
            attention_bias: v["attention_bias"].as_bool().unwrap_or(family == Family::Qwen2),
        })
    }

    /// A tiny config for tests and examples (random weights).
    pub fn tiny(family: Family) -> Self {
        Self {
            family,
            vocab_size: 97,
            hidden_size: 32,
            intermediate_size: 48,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            max_position: 512,
            tie_embeddings: family == Family::Llama,
            attention_bias: family == Family::Qwen2,
        }
    }

    /// Parameter count (tied head counted once).
    pub fn num_params(&self) -> usize {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let q = self.num_heads * hd;
        let kv = self.num_kv_heads * hd;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let layer = h * q + 2 * h * kv + q * h + bias + 3 * h * i + 2 * h;
        let head = if self.tie_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_layers * layer + h + head
    }
}

pub(crate) fn meta_str(c: &gguf_file::Content, key: &str) -> Result<String> {
    Ok(c.metadata.get(key).with_context(|| format!("GGUF metadata lacks '{key}'"))?.to_string()?.clone())
}
