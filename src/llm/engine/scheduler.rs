//! Continuous batching. Requests wait in a queue; each step admits waiting requests while the
//! batch has room, runs one forward call over every running sequence (a new sequence's prompt,
//! minus what the prefix cache already holds, and one token of every decoding sequence), samples
//! one token per sequence, and retires the sequences that finished: their place is taken at the
//! next step, not when the slowest row of a batch ends.
//!
//! A request's tokens depend only on its prompt, its sampling settings and its key: each
//! sequence has its own cache and random stream, and the model computes every row from its own
//! sequence alone, so the same request gives the same tokens alone, in any batch, with or without
//! a prefix-cache hit (tested).

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::Result;
use rand_chacha::ChaCha8Rng;

use super::kv::SeqCache;
use super::model::{Logits, QModel, SeqStep};
use super::prefix::{PrefixCache, PrefixStats};
use crate::llm::sampling::{sample, Finish, Generation, SamplingConfig};
use crate::llm::tokenizer::Tokenizer;
use crate::rng::rng_for;

/// A request waits a step for a sibling's prompt only when that saves at least this many prompt
/// tokens: a GRPO group's copies of one prompt wait, while a user's successive reason prompts
/// (each one history line longer than the last) are admitted together and fill the batch.
const DEFER_MIN_GAIN: usize = 64;

/// One generation request.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    /// Picks the random stream (a stable record id: batching must not change results).
    pub key: u64,
    pub sampling: SamplingConfig,
}

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Prefix-cache budget in MiB (0 turns it off).
    pub prefix_cache_mib: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { max_batch: 32, prefix_cache_mib: 256 }
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct EngineStats {
    pub requests: u64,
    pub steps: u64,
    /// Prompt tokens computed (cache hits excluded).
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prefix: PrefixStats,
}

impl EngineStats {
    /// Add another run's counts (the prefix-cache counts are replaced: they are the cache's own
    /// running totals).
    pub fn add(&mut self, o: &EngineStats) {
        self.requests += o.requests;
        self.steps += o.steps;
        self.prefill_tokens += o.prefill_tokens;
        self.decode_tokens += o.decode_tokens;
        self.prefill_seconds += o.prefill_seconds;
        self.decode_seconds += o.decode_seconds;
        self.prefix = o.prefix;
    }
}

struct Running {
    idx: usize,
    prompt: Vec<u32>,
    cache: SeqCache,
    /// Tokens to feed at the next step (the uncached prompt rest, then one sampled token).
    pending: Vec<u32>,
    prefilling: bool,
    tokens: Vec<u32>,
    rng: ChaCha8Rng,
}

/// The generation engine over one quantized model.
pub struct Engine<'m> {
    model: &'m QModel,
    tok: &'m Tokenizer,
    cfg: EngineConfig,
    prefix: PrefixCache,
    stats: EngineStats,
}

impl<'m> Engine<'m> {
    pub fn new(model: &'m QModel, tok: &'m Tokenizer, cfg: EngineConfig) -> Self {
        Self { model, tok, cfg, prefix: PrefixCache::new(cfg.prefix_cache_mib << 20), stats: EngineStats::default() }
    }

    /// An engine that starts from an existing prefix cache (give it back with [`Self::into_prefix`]).
    pub fn with_prefix(model: &'m QModel, tok: &'m Tokenizer, cfg: EngineConfig, prefix: PrefixCache) -> Self {
        Self { model, tok, cfg, prefix, stats: EngineStats::default() }
    }

    pub fn into_prefix(self) -> PrefixCache {
        self.prefix
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats { prefix: self.prefix.stats(), ..self.stats }
    }

    /// Generate a completion for every request; results in request order.
    pub fn run(&mut self, requests: &[Request]) -> Result<Vec<Generation>> {
        let n = requests.len();
        self.stats.requests += n as u64;
        let mut out: Vec<Option<Generation>> = vec![None; n];
        let mut waiting: VecDeque<usize> = (0..n).collect();
        let mut running: Vec<Running> = Vec::new();
        let max_batch = self.cfg.max_batch.max(1);
        while !waiting.is_empty() || !running.is_empty() {
            // Admit. A request whose prompt shares much more with a prompt being prefilled this
            // step than with anything cached waits one step and then hits the cache.
            let mut deferred = VecDeque::new();
            while running.len() < max_batch {
                let Some(i) = waiting.pop_front() else { break };
                let r = &requests[i];
                if r.prompt.is_empty() || r.sampling.max_new_tokens == 0 {
                    out[i] =
                        Some(Generation { tokens: vec![], text: String::new(), finish: Finish::Length, eos: None });
                    continue;
                }
                let (cached, _) = self.prefix.longest(&r.prompt);
                let sibling = running
                    .iter()
                    .filter(|s| s.prefilling)
                    .map(|s| s.prompt.iter().zip(&r.prompt).take_while(|(a, b)| a == b).count())
                    .max()
                    .unwrap_or(0);
                if sibling > cached + DEFER_MIN_GAIN {
                    deferred.push_back(i);
                    continue;
                }
                let capacity = r.prompt.len() + r.sampling.max_new_tokens;
                let model = self.model;
                let cache = self.prefix.take(&r.prompt, capacity, || model.new_cache(capacity));
                let pending = r.prompt[cache.len()..].to_vec();
                running.push(Running {
                    idx: i,
                    prompt: r.prompt.clone(),
                    cache,
                    pending,
                    prefilling: true,
                    tokens: Vec::new(),
                    rng: rng_for(r.sampling.seed, 0x6e6, r.key),
                });
            }
            while let Some(i) = deferred.pop_back() {
                waiting.push_front(i);
            }
            if running.is_empty() {
                continue;
            }
            let t0 = Instant::now();
            let prefill_rows: usize = running.iter().filter(|s| s.prefilling).map(|s| s.pending.len()).sum();
            let decode_rows = running.iter().filter(|s| !s.prefilling).count();
            let logits = {
                let mut steps: Vec<SeqStep> = running
                    .iter_mut()
                    .map(|s| SeqStep { tokens: &s.pending, cache: &mut s.cache, logits: Logits::Last })
                    .collect();
                self.model.forward(&mut steps)?
            };
            let secs = t0.elapsed().as_secs_f64();
            // Split the step's time between prefill and decode by rows.
            let total = (prefill_rows + decode_rows).max(1) as f64;
            self.stats.prefill_seconds += secs * prefill_rows as f64 / total;
            self.stats.decode_seconds += secs * decode_rows as f64 / total;
            self.stats.prefill_tokens += prefill_rows as u64;
            self.stats.decode_tokens += decode_rows as u64;
            self.stats.steps += 1;
            let mut still = Vec::with_capacity(running.len());
            for (mut s, logits) in running.into_iter().zip(logits) {
                if s.prefilling {
                    self.prefix.insert(&s.prompt, &s.cache);
                    s.prefilling = false;
                }
                let cfg = &requests[s.idx].sampling;
                let logits = logits.expect("every running sequence asks for logits");
                let t = sample(&logits, cfg.temperature, cfg.top_p, &mut s.rng);
                let mut finished = None;
                let mut eos = None;
                let mut decoded = None;
                if self.tok.stop_ids.contains(&t) {
                    finished = Some(Finish::Stop);
                    eos = Some(t);
                } else {
                    s.tokens.push(t);
                    if !cfg.stop.is_empty() {
                        let text = self.tok.decode(&s.tokens, true)?;
                        if cfg.stop.iter().any(|x| text.contains(x.as_str())) {
                            finished = Some(Finish::Stop);
                        }
                        decoded = Some(text);
                    }
                    if finished.is_none() && s.tokens.len() >= cfg.max_new_tokens {
                        finished = Some(Finish::Length);
                    }
                }
                match finished {
                    Some(f) => {
                        let mut text = match decoded {
                            Some(t) => t,
                            None => self.tok.decode(&s.tokens, true)?,
                        };
                        if let Some(cut) = cfg.stop.iter().filter_map(|x| text.find(x.as_str())).min() {
                            text.truncate(cut);
                        }
                        out[s.idx] = Some(Generation { tokens: s.tokens, text, finish: f, eos });
                    }
                    None => {
                        s.pending.clear();
                        s.pending.push(t);
                        still.push(s);
                    }
                }
            }
            running = still;
        }
        Ok(out.into_iter().map(|g| g.expect("every request finishes")).collect())
    }
}
