//! Batched sampling with a KV cache. Prompts of different lengths are left-padded; every row has
//! its own positions (counted from its first real token) and a mask that hides its padding, so a
//! sequence generates the same tokens alone or in any batch. Each row draws from its own RNG,
//! seeded by (seed, row key), so results do not depend on batch composition or worker count.
//! Finished rows are dropped from the batch (and from the cache) as they stop; identical prompts
//! are prefilled once.

use anyhow::Result;
use candle_core::Tensor;
use rand_chacha::ChaCha8Rng;

use super::model::{padded_bias, CausalLm, KvCache};
use super::sampling::{sample, Finish, Generation, SamplingConfig};
use super::tokenizer::Tokenizer;
use crate::rng::rng_for;
/// Generate completions for tokenized prompts. `keys[i]` picks row i's random stream (use a
/// stable record id, e.g. the interaction index, so that batching does not change results).
pub fn generate(
    model: &CausalLm,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    keys: &[u64],
    cfg: &SamplingConfig,
    adapters: bool,
) -> Result<Vec<Generation>> {
    let n = prompts.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    assert_eq!(keys.len(), n, "one key per prompt");
    let dev = model.device();
    // Identical prompts (a GRPO group) are prefilled once and their cache rows copied.
    let mut first_of: std::collections::HashMap<&[u32], u32> = std::collections::HashMap::new();
    let mut unique: Vec<&[u32]> = Vec::new();
    let row_of: Vec<u32> = prompts
        .iter()
        .map(|p| {
            *first_of.entry(p.as_slice()).or_insert_with(|| {
                unique.push(p.as_slice());
                unique.len() as u32 - 1
            })
        })
        .collect();
    let len = unique.iter().map(|p| p.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(unique.len() * len);
    let mut pos = Vec::with_capacity(unique.len() * len);
    let mut valid_u: Vec<Vec<bool>> = Vec::with_capacity(unique.len());
    for p in &unique {
        let pad = len - p.len();
        ids.extend(std::iter::repeat_n(tok.pad_id, pad).chain(p.iter().copied()));
        pos.extend((0..len).map(|j| j.saturating_sub(pad) as u32));
        valid_u.push((0..len).map(|j| j >= pad).collect());
    }
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut rngs: Vec<ChaCha8Rng> = keys.iter().map(|&k| rng_for(cfg.seed, 0x6e6, k)).collect();
    let mut out: Vec<Option<Generation>> = vec![None; n];
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut active: Vec<usize> = (0..n).collect();
    let mut cache = KvCache::new(model.cfg.num_layers);

    let u = unique.len();
    let ids_t = Tensor::from_vec(ids, (u, len), dev)?;
    let pos_t = Tensor::from_vec(pos, (u, len), dev)?;
    let bias = padded_bias(&valid_u, len, dev)?;
    let hidden = model.forward(&ids_t, &pos_t, Some(&bias), Some(&mut cache), adapters)?;
    let mut logits = model.logits(&hidden.narrow(1, len - 1, 1)?.squeeze(1)?)?;
    let mut valid: Vec<Vec<bool>> = row_of.iter().map(|&r| valid_u[r as usize].clone()).collect();
    if u < n {
        let rows = Tensor::new(row_of.as_slice(), dev)?;
        cache.select_rows(&rows)?;
        logits = logits.index_select(&rows, 0)?;
    }

    for step in 0..cfg.max_new_tokens {
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        let mut still = Vec::with_capacity(active.len());
        let mut keep_rows = Vec::with_capacity(active.len());
        let mut next_ids = Vec::with_capacity(active.len());
        for (r, &i) in active.iter().enumerate() {
            let t = sample(&rows[r], cfg.temperature, cfg.top_p, &mut rngs[i]);
            let mut finished = None;
            let mut decoded = None;
            let mut eos = None;
            if tok.stop_ids.contains(&t) {
                finished = Some(Finish::Stop);
                eos = Some(t);
            } else {
                tokens[i].push(t);
                if !cfg.stop.is_empty() {
                    let text = tok.decode(&tokens[i], true)?;
                    if cfg.stop.iter().any(|s| text.contains(s.as_str())) {
                        finished = Some(Finish::Stop);
                    }
                    decoded = Some(text);
                }
                if finished.is_none() && step + 1 == cfg.max_new_tokens {
                    finished = Some(Finish::Length);
                }
            }
            match finished {
                Some(f) => {
                    let mut text = match decoded {
                        Some(text) => text,
                        None => tok.decode(&tokens[i], true)?,
                    };
                    if let Some(cut) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                        text.truncate(cut);
                    }
                    out[i] = Some(Generation { tokens: std::mem::take(&mut tokens[i]), text, finish: f, eos });
                }
                None => {
                    still.push(i);
                    keep_rows.push(r as u32);
                    next_ids.push(t);
                }
            }
        }
        if still.is_empty() {
            break;
        }
        if still.len() != active.len() {
            let keep = Tensor::new(keep_rows.as_slice(), dev)?;
            cache.select_rows(&keep)?;
            valid = keep_rows.iter().map(|&r| valid[r as usize].clone()).collect();
        }
        active = still;
        for v in valid.iter_mut() {
            v.push(true);
        }
        let b = active.len();
        let pos: Vec<u32> = active.iter().map(|&i| next_pos[i]).collect();
        for &i in &active {
            next_pos[i] += 1;
        }
        let ids_t = Tensor::from_vec(next_ids, (b, 1), dev)?;
        let pos_t = Tensor::from_vec(pos, (b, 1), dev)?;
        let bias = padded_bias(&valid, 1, dev)?;
        let hidden = model.forward(&ids_t, &pos_t, Some(&bias), Some(&mut cache), adapters)?;
        logits = model.logits(&hidden.squeeze(1)?)?;
    }
    Ok(out
        .into_iter()
        .map(|g| g.unwrap_or(Generation { tokens: Vec::new(), text: String::new(), finish: Finish::Length, eos: None }))
        .collect())
}

/// Whether generation for a model on `device` runs on the quantized engine: on the CPU, unless
/// `CUREC_ENGINE=candle` asks for the f32 reference path.
pub fn engine_enabled(device: &candle_core::Device) -> bool {
    device.is_cpu() && std::env::var("CUREC_ENGINE").map_or(true, |v| v != "candle")
}

/// A model ready to generate from: the engine's quantized copy, or candle's f32 model, either with
/// the LoRA adapters folded in (sampling then runs at the base model's speed).
pub enum Generator {
    Engine(Box<super::engine::QModel>),
    Candle(Box<CausalLm>),
}

impl Generator {
    /// The generator for `model` (with its LoRA adapters when `adapters`), see [`engine_enabled`].
    pub fn for_model(model: &CausalLm, adapters: bool) -> Result<Self> {
        if engine_enabled(model.device()) {
            Ok(Generator::Engine(Box::new(super::engine::quantize_model(model, adapters)?)))
        } else if adapters {
            Ok(Generator::Candle(Box::new(model.merged()?)))
        } else {
            Ok(Generator::Candle(Box::new(model.clone())))
        }
    }

    pub fn generate(
        &self,
        tok: &Tokenizer,
        prompts: &[Vec<u32>],
        keys: &[u64],
        cfg: &SamplingConfig,
    ) -> Result<Vec<Generation>> {
        match self {
            Generator::Engine(q) => super::engine::generate_quantized(q, tok, prompts, keys, cfg),
            Generator::Candle(model) => generate(model, tok, prompts, keys, cfg, false),
        }
    }
}
