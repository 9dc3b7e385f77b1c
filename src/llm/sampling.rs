//! Sampling: the settings of one generation (temperature, top-p, stop strings, seed), what a
//! finished sequence holds, and the seeded draw of the next token that both the candle path
//! (`generate`) and the quantized engine use.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass (1 keeps the whole distribution).
    pub top_p: f32,
    pub max_new_tokens: usize,
    /// Generation stops when the decoded completion contains one of these (it is cut before it).
    pub stop: Vec<String>,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.7, top_p: 0.9, max_new_tokens: 256, stop: Vec::new(), seed: 2024 }
    }
}

impl SamplingConfig {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { temperature: 0.0, top_p: 1.0, max_new_tokens, ..Self::default() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Completion token ids (without the stop token).
    pub tokens: Vec<u32>,
    /// Decoded completion, cut before any stop string.
    pub text: String,
    pub finish: Finish,
    /// The end-of-sequence token that stopped it, if one did (GRPO trains on it too).
    pub eos: Option<u32>,
}

/// Pick a token from one row of logits.
pub fn sample(logits: &[f32], temperature: f32, top_p: f32, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv_t = 1.0 / temperature;
    let mut p: Vec<(f32, u32)> = logits.iter().enumerate().map(|(i, &v)| (((v - m) * inv_t).exp(), i as u32)).collect();
    let total: f32 = p.iter().map(|x| x.0).sum();
    if top_p < 1.0 {
        // Only tokens above total·(1-top_p)/V·… can matter; a cheap prefilter keeps the sort short.
        p.retain(|x| x.0 > total * 1e-7);
        p.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut cum = 0.0;
        let mut keep = p.len();
        for (i, x) in p.iter().enumerate() {
            cum += x.0;
            if cum >= top_p * total {
                keep = i + 1;
                break;
            }
        }
        p.truncate(keep);
    }
    let mass: f32 = p.iter().map(|x| x.0).sum();
    let mut r = rng.random::<f32>() * mass;
    for x in &p {
        r -= x.0;
        if r <= 0.0 {
            return x.1;
        }
    }
    p.last().map_or_else(argmax, |x| x.1)
}
