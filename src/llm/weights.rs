//! Reading LLM weights into a name → tensor map with Hugging Face names
//! (`model.layers.3.self_attn.q_proj.weight`, …), from a GGUF file (every tensor dequantized
//! to f32, then cast to the run's dtype) or from a Hugging Face directory (`*.safetensors`, with or
//! without `model.safetensors.index.json`).
//!
//! llama.cpp stores the q/k projections of Llama-architecture models permuted for its interleaved
//! RoPE; they are permuted back here, so one rotate-half RoPE serves both families and the weights
//! equal the Hugging Face ones.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use super::config::{Family, LlmConfig};

pub type Weights = HashMap<String, Tensor>;

fn hf_name(gguf: &str) -> Option<String> {
    let map = |s: &str| -> Option<&'static str> {
        Some(match s {
            "attn_norm.weight" => "input_layernorm.weight",
            "ffn_norm.weight" => "post_attention_layernorm.weight",
            "attn_q.weight" => "self_attn.q_proj.weight",
            "attn_q.bias" => "self_attn.q_proj.bias",
            "attn_k.weight" => "self_attn.k_proj.weight",
            "attn_k.bias" => "self_attn.k_proj.bias",
            "attn_v.weight" => "self_attn.v_proj.weight",
            "attn_v.bias" => "self_attn.v_proj.bias",
            "attn_output.weight" => "self_attn.o_proj.weight",
            "ffn_gate.weight" => "mlp.gate_proj.weight",
            "ffn_up.weight" => "mlp.up_proj.weight",
            "ffn_down.weight" => "mlp.down_proj.weight",
            _ => return None,
        })
    };
    match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => Some("model.norm.weight".into()),
        "output.weight" => Some("lm_head.weight".into()),
        _ => {
            let rest = gguf.strip_prefix("blk.")?;
            let (layer, tail) = rest.split_once('.')?;
            Some(format!("model.layers.{layer}.{}", map(tail)?))
        }
    }
}

/// Undo llama.cpp's q/k permutation: rows grouped [head, 2, hd/2] in HF order were stored as
/// [head, hd/2, 2].
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / heads;
    Ok(w.reshape((heads, hd / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// Read a GGUF file: its header (for the config and the tokenizer) and every tensor, dequantized.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<(gguf_file::Content, LlmConfig, Weights)> {
    let shown = path.display();
    let mut r = BufReader::new(File::open(path).with_context(|| format!("{shown}: cannot open"))?);
    let content = gguf_file::Content::read(&mut r).with_context(|| format!("{shown}: not a GGUF file"))?;
    let cfg = LlmConfig::from_gguf(&content).with_context(|| format!("{shown}"))?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut w = Weights::new();
    for name in names {
        let Some(hf) = hf_name(name) else { continue };
        let q = content.tensor(&mut r, name, &Device::Cpu).with_context(|| format!("{shown}: tensor {name}"))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        if cfg.family == Family::Llama && t.rank() == 2 {
            if name.ends_with("attn_q.weight") {
                t = unpermute(&t, cfg.num_heads)?;
            } else if name.ends_with("attn_k.weight") {
                t = unpermute(&t, cfg.num_kv_heads)?;
            }
        }
        w.insert(hf, t.to_dtype(dtype)?.to_device(device)?);
    }
    Ok((content, cfg, w))
}

/// Read a Hugging Face model directory: `config.json` and its safetensors shards.
pub fn load_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<(LlmConfig, Weights)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("{}: cannot read", cfg_path.display()))?;
    let cfg = LlmConfig::from_hf_json(&text, &cfg_path.display().to_string())?;
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if index.exists() {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
            .with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map =
            v["weight_map"].as_object().with_context(|| format!("{}: expected a 'weight_map'", index.display()))?;
        let mut f: Vec<String> = map.values().filter_map(|s| s.as_str().map(String::from)).collect();
        f.sort();
        f.dedup();
        f.into_iter().map(|s| dir.join(s)).collect()
    } else {
        let mut f: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        f.sort();
        f
    };
    if files.is_empty() {
        bail!("{}: no *.safetensors files", dir.display());
    }
    let mut w = Weights::new();
    for f in files {
        let shard = candle_core::safetensors::load(&f, &Device::Cpu).with_context(|| format!("{}", f.display()))?;
        for (k, t) in shard {
            w.insert(k, t.to_dtype(dtype)?.to_device(device)?);
        }
    }
    Ok((cfg, w))
}
