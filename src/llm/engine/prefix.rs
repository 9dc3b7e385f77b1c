//! The prefix cache: KV caches of prompts already computed, keyed by their token ids. A new
//! prompt takes the longest common token prefix with any entry (a GRPO group's shared prompt, the
//! fixed instructions, a user's history across that user's reasons) and computes only the rest.
//! Entries are chains of shared KV segments ([`SeqCache::share`]): an entry that extends another
//! holds the other's segments plus the positions it added, and a hit hands out pointers, not
//! copies. Memory is counted once per segment, and entries are evicted least recently used first
//! until the segments they keep alive fit the byte budget. Lookup is a scan over the
//! entries comparing token prefixes: entries number in the hundreds under any useful budget, and
//! a scan costs microseconds against milliseconds of model time per token.

use super::kv::SeqCache;

struct Entry {
    tokens: Vec<u32>,
    cache: SeqCache,
    used: u64,
}

/// Hit and miss counts, in prompts and in tokens.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PrefixStats {
    pub lookups: u64,
    pub hits: u64,
    pub tokens_looked_up: u64,
    pub tokens_reused: u64,
    pub evictions: u64,
    pub bytes: usize,
    pub entries: usize,
}

impl PrefixStats {
    /// Share of prompt tokens served from the cache.
    pub fn token_hit_rate(&self) -> f64 {
        if self.tokens_looked_up == 0 {
            0.0
        } else {
            self.tokens_reused as f64 / self.tokens_looked_up as f64
        }
    }
}

pub struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    bytes: usize,
    clock: u64,
    stats: PrefixStats,
}

fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    /// A cache holding at most `budget` bytes of keys and values (0 disables it).
    pub fn new(budget: usize) -> Self {
        Self { entries: Vec::new(), budget, bytes: 0, clock: 0, stats: PrefixStats::default() }
    }

    /// The longest cached prefix of `prompt` that leaves at least one token to compute (the
    /// last prompt token must run to give the first logits), and its length.
    pub fn longest(&self, prompt: &[u32]) -> (usize, Option<usize>) {
        let limit = prompt.len().saturating_sub(1);
        let mut best = (0, None);
        for (i, e) in self.entries.iter().enumerate() {
            let c = common(&e.tokens, prompt).min(limit).min(e.cache.len());
            if c > best.0 {
                best = (c, Some(i));
            }
        }
        best
    }

    /// A cache for `prompt` holding its longest cached prefix (counted as a lookup).
    pub fn take(&mut self, prompt: &[u32], capacity: usize, fresh: impl FnOnce() -> SeqCache) -> SeqCache {
        self.stats.lookups += 1;
        self.stats.tokens_looked_up += prompt.len() as u64;
        let (n, at) = self.longest(prompt);
        match at {
            Some(i) if n > 0 => {
                self.clock += 1;
                self.entries[i].used = self.clock;
                self.stats.hits += 1;
                self.stats.tokens_reused += n as u64;
                self.entries[i].cache.prefix(n, capacity)
            }
            _ => fresh(),
        }
    }

    /// Keep a computed prompt (its cache truncated to the prompt). Entries it extends are
    /// dropped; nothing is stored if an entry already covers it.
    pub fn insert(&mut self, prompt: &[u32], cache: &SeqCache) {
        if self.budget == 0 || prompt.is_empty() || cache.len() < prompt.len() {
            return;
        }
        self.clock += 1;
        if let Some(e) =
            self.entries.iter_mut().find(|e| e.tokens.len() >= prompt.len() && e.tokens.starts_with(prompt))
        {
            e.used = self.clock;
            return;
        }
        // Entries the prompt extends are dropped: the new entry shares their segments.
        self.entries.retain(|e| !prompt.starts_with(&e.tokens));
        let entry = Entry { tokens: prompt.to_vec(), cache: cache.share(prompt.len()), used: self.clock };
        if entry.cache.own_bytes() + entry.cache.segments().map(|(_, b)| b).sum::<usize>() > self.budget {
            self.bytes = self.count_bytes();
            return;
        }
        self.entries.push(entry);
        self.bytes = self.count_bytes();
        while self.bytes > self.budget && !self.entries.is_empty() {
            let (victim, _) = self.entries.iter().enumerate().min_by_key(|(_, e)| e.used).expect("non-empty");
            self.entries.swap_remove(victim);
            self.stats.evictions += 1;
            self.bytes = self.count_bytes();
        }
    }

    /// Bytes of keys and values the entries keep alive, each shared segment once.
    fn count_bytes(&self) -> usize {
        let mut seen = std::collections::HashSet::new();
        let mut bytes = 0;
        for e in &self.entries {
            bytes += e.cache.own_bytes();
            for (ptr, b) in e.cache.segments() {
                if seen.insert(ptr) {
                    bytes += b;
                }
            }
        }
        bytes
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats { bytes: self.bytes, entries: self.entries.len(), ..self.stats }
    }
}
