//! The generation engine: a quantized copy of the model ([`QModel`], kernels in
//! [`crate::llm::kernels`]), per-sequence KV caches ([`SeqCache`]), a prefix cache
//! ([`PrefixCache`]) and a continuous-batching scheduler ([`Engine`]). Every stage that generates
//! or scores without gradient uses it: `curec generate`, the features stage, alignment rollouts
//! and evaluation, and the correction's policy samples. Training keeps the f32 candle model
//! ([`crate::llm::CausalLm`]); a model under LoRA training is quantized from its merged weights
//! ([`QModel::from_causal`]) whenever the adapters change. The engine knows nothing of
//! recommendation.

pub mod attention;
pub mod kv;
pub mod model;
pub mod prefix;
pub mod scheduler;

use std::path::{Path, PathBuf};

use anyhow::Result;

pub use kv::SeqCache;
pub use model::{Logits, QModel, SeqStep};
pub use prefix::{PrefixCache, PrefixStats};
pub use scheduler::{Engine, EngineConfig, EngineStats, Request};

use super::kernels::gguf::Quantize;
use super::sampling::{Generation, SamplingConfig};
use super::{CausalLm, ChatTemplate, Tokenizer};

/// A quantized model with its tokenizer and chat template, loaded without the f32 model.
pub struct QLlm {
    pub model: QModel,
    pub tokenizer: Tokenizer,
    pub chat: ChatTemplate,
    pub source: PathBuf,
}

impl QLlm {
    /// Load a GGUF file (tensor by tensor) or a Hugging Face directory (through the f32 model,
    /// quantized at load: `Quantize::Auto` gives Q8 there).
    pub fn load(path: &Path, quantize: Quantize) -> Result<Self> {
        if path.is_dir() {
            let llm = super::Llm::load(path, &candle_core::Device::Cpu, candle_core::DType::F32)?;
            let model = QModel::from_causal(&llm.model, quantize)?;
            return Ok(Self { model, tokenizer: llm.tokenizer, chat: llm.chat, source: path.to_path_buf() });
        }
        let (model, content) = QModel::load_gguf(path, quantize)?;
        let (tokenizer, chat) = super::text_side(path, &content)?;
        Ok(Self { model, tokenizer, chat, source: path.to_path_buf() })
    }
}

/// Generate with the engine: one request per prompt, `keys[i]` picking row i's random stream.
pub fn generate_quantized(
    model: &QModel,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    keys: &[u64],
    sampling: &SamplingConfig,
) -> Result<Vec<Generation>> {
    Engine::new(model, tok, EngineConfig::default()).run(&requests(prompts, keys, sampling)?)
}

/// One request per prompt, `keys[i]` picking row i's random stream, all with `sampling`.
pub fn requests(prompts: &[Vec<u32>], keys: &[u64], sampling: &SamplingConfig) -> Result<Vec<Request>> {
    anyhow::ensure!(keys.len() == prompts.len(), "one key per prompt");
    Ok(prompts
        .iter()
        .zip(keys)
        .map(|(p, &key)| Request { prompt: p.clone(), key, sampling: sampling.clone() })
        .collect())
}

/// Quantize a candle model for the engine, with its LoRA adapters folded in when `adapters`.
pub fn quantize_model(model: &CausalLm, adapters: bool) -> Result<QModel> {
    // named_weights() lists base weights only, so without `adapters` they are simply left out.
    if adapters {
        QModel::from_causal(&model.merged()?, Quantize::Q8)
    } else {
        QModel::from_causal(model, Quantize::Q8)
    }
}

/// Log-probabilities of `completion` after `prompt` (natural log, one per completion token),
/// computed by the quantized model: the fast path for scoring without gradient.
pub fn completion_log_probs_quantized(model: &QModel, prompt: &[u32], completion: &[u32]) -> Result<Vec<f32>> {
    anyhow::ensure!(!prompt.is_empty(), "scoring needs a non-empty prompt");
    let mut all = prompt.to_vec();
    all.extend_from_slice(completion);
    let mut cache = model.new_cache(all.len());
    let n = all.len() - 1; // row i predicts token i+1
    let logits = model
        .forward(&mut [SeqStep { tokens: &all[..n], cache: &mut cache, logits: Logits::All }])?
        .pop()
        .flatten()
        .unwrap_or_default();
    let v = model.cfg.vocab_size;
    Ok((0..completion.len())
        .map(|j| token_log_prob(&logits[(prompt.len() - 1 + j) * v..(prompt.len() + j) * v], completion[j]))
        .collect())
}

/// log softmax(row)[tok].
fn token_log_prob(row: &[f32], tok: u32) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = m + row.iter().map(|&x| (x - m).exp()).sum::<f32>().ln();
    row[tok as usize] - lse
}

/// Log-probabilities of each pair's completion after its prompt (one per completion token), by
/// the quantized model: consecutive pairs with the same prompt (a GRPO group) compute it once and
/// share its keys and values, and all completions go through one batched forward call.
pub fn pairs_log_probs_quantized(model: &QModel, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<Vec<f32>>> {
    let mut groups: Vec<(usize, usize)> = Vec::new(); // (first pair, end)
    for (i, (p, _)) in pairs.iter().enumerate() {
        anyhow::ensure!(!p.is_empty(), "scoring needs a non-empty prompt");
        match groups.last_mut() {
            Some((start, end)) if pairs[*start].0 == *p => *end = i + 1,
            _ => groups.push((i, i + 1)),
        }
    }
    // The prompts: their caches and the logits after their last token (which predict each
    // completion's first token).
    let mut caches: Vec<SeqCache> = groups.iter().map(|&(g, _)| model.new_cache(pairs[g].0.len())).collect();
    let mut steps: Vec<SeqStep> = groups
        .iter()
        .zip(caches.iter_mut())
        .map(|(&(g, _), cache)| SeqStep { tokens: &pairs[g].0, cache, logits: Logits::Last })
        .collect();
    let last = model.forward(&mut steps)?;
    drop(steps);
    let v = model.cfg.vocab_size;
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); pairs.len()];
    let mut rest: Vec<(usize, SeqCache)> = Vec::new();
    for ((&(g, end), cache), first) in groups.iter().zip(&caches).zip(last) {
        let first = first.unwrap_or_default();
        let p = pairs[g].0.len();
        let shared = cache.share(p);
        for (i, pair) in pairs.iter().enumerate().take(end).skip(g) {
            let c = &pair.1;
            if let Some(&t0) = c.first() {
                out[i].push(token_log_prob(&first[..v], t0));
            }
            if c.len() > 1 {
                rest.push((i, shared.prefix(p, p + c.len())));
            }
        }
    }
    // Every completion but its last token, in one call: row j predicts token j + 1.
    let mut steps: Vec<SeqStep> = rest
        .iter_mut()
        .map(|(i, cache)| SeqStep { tokens: &pairs[*i].1[..pairs[*i].1.len() - 1], cache, logits: Logits::All })
        .collect();
    let logits = model.forward(&mut steps)?;
    drop(steps);
    for ((i, _), rows) in rest.iter().zip(logits) {
        let rows = rows.unwrap_or_default();
        let c = &pairs[*i].1;
        for j in 1..c.len() {
            out[*i].push(token_log_prob(&rows[(j - 1) * v..j * v], c[j]));
        }
    }
    Ok(out)
}
