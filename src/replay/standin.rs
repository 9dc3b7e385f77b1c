//! The stand-in corrector: the dataflow without the LLM. For every record it spends a fixed
//! amount of busy time and writes a pattern and a reason. It runs keyed by user on every worker.
//!
//! Two modes:
//! - [`StandIn::new`] (the bench): texts picked from a fixed pool by a hash of the record key, so
//!   writing one costs a pointer copy and the state does not matter;
//! - [`StandIn::reading_state`] (the tests): texts that carry a digest of everything the record
//!   met — the user's pattern, its history and the item's reason list — chained through the
//!   feedback loop: a rewrite read one epoch early or late, a history out of order or a reason
//!   missing changes that text and every text written after it, so byte comparisons of the state
//!   see the feedback's timing.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::policy::{Corrector, EpochOutput};
use super::EpochMetrics;
use super::{Annotated, Update};
use crate::replay::graph::CorrectorFactory;
use serde_json::Value;

pub struct StandIn {
    pub cost: Duration,
    pub seed: u64,
    /// Texts to pick from (by a hash of seed and record): writing one costs a pointer copy.
    texts: Vec<(Arc<str>, Arc<str>)>,
    /// Write texts derived from the state the record met instead of picking from `texts`.
    reads_state: bool,
}

/// FNV-1a over bytes, folded into `h` (stable across runs, processes and platforms).
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A digest of the record and of the state it met.
pub fn state_digest(seed: u64, a: &Annotated) -> u64 {
    let e = &a.event;
    let mut h = fnv(0xcbf2_9ce4_8422_2325, &seed.to_le_bytes());
    h = fnv(h, &e.key.to_le_bytes());
    h = fnv(h, &e.item.to_le_bytes());
    h = fnv(h, &e.timestamp.to_le_bytes());
    h = fnv(h, a.pattern.as_deref().unwrap_or("<none>").as_bytes());
    for i in &a.history {
        h = fnv(h, &i.to_le_bytes());
    }
    h = fnv(h, b"|");
    for r in a.reasons.iter().flat_map(|l| l.iter()) {
        h = fnv(h, &r.user.to_le_bytes());
        h = fnv(h, &r.timestamp.to_le_bytes());
        h = fnv(h, r.text.as_bytes());
    }
    h
}

impl StandIn {
    pub fn new(cost: Duration, seed: u64) -> Self {
        // Many texts, so that workers rarely touch the same reference counts.
        let texts = (0..4096)
            .map(|k| (format!("stand-in interest pattern #{k}").into(), format!("stand-in reason #{k}").into()))
            .collect();
        Self { cost, seed, texts, reads_state: false }
    }

    /// The state-sensitive stand-in (needs records with their reason lists attached).
    pub fn reading_state(seed: u64) -> Self {
        Self { cost: Duration::ZERO, seed, texts: Vec::new(), reads_state: true }
    }
}

impl Corrector for StandIn {
    fn epoch(&mut self, epoch: u64, records: Vec<Annotated>) -> Result<EpochOutput> {
        let mut updates = Vec::with_capacity(2 * records.len());
        for a in &records {
            if !self.cost.is_zero() {
                let t = Instant::now();
                while t.elapsed() < self.cost {
                    std::hint::spin_loop();
                }
            }
            let e = &a.event;
            let (pattern, reason) = if self.reads_state {
                let d = state_digest(self.seed, a);
                (Arc::from(format!("pattern {d:016x}")), Arc::from(format!("reason {d:016x} for item {}", e.item)))
            } else {
                let k = ((e.key ^ self.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize;
                self.texts[k % self.texts.len()].clone()
            };
            updates.push(Update::pattern(e, pattern));
            updates.push(Update::reason(e, reason));
        }
        let n = records.len() as u64;
        let metrics =
            EpochMetrics { epoch, interactions: n, patterns_written: n, reasons_written: n, ..Default::default() };
        Ok(EpochOutput { updates, metrics })
    }

    fn save(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

/// The `corrector` a bench run's identity names.
pub const STANDIN: &str = "stand-in";

pub const HISTORY_KEPT: usize = 10;

pub const REASONS_KEPT: usize = 20;

/// The stand-in of a run whose identity names it (`None`: the run corrects with the LLM).
pub fn standin_factory(identity: &Value) -> Option<CorrectorFactory> {
    let c = &identity["config"];
    if c["corrector"].as_str() != Some(STANDIN) {
        return None;
    }
    let cost = Duration::from_nanos(c["replay"]["standin_cost_ns"].as_u64().unwrap_or(0));
    let seed = c["seed"].as_u64().unwrap_or(0);
    Some(Arc::new(move |_, _| -> Result<Option<Box<dyn Corrector>>> { Ok(Some(Box::new(StandIn::new(cost, seed)))) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::{Event, Reason, ReasonList, Shared};

    fn record(pattern: Option<&str>, history: Vec<u32>, reasons: &[&str]) -> Annotated {
        let list: ReasonList =
            reasons.iter().map(|t| Reason { user: 1, timestamp: 5, text: Shared::from(*t) }).collect();
        Annotated {
            event: Event { key: 42, user: 0, item: 3, timestamp: 9, retract: false },
            pattern: pattern.map(Shared::from),
            history,
            reasons: Some(Shared(Arc::new(list))),
        }
    }

    /// Every part of the state a record meets changes what the state-sensitive stand-in writes.
    #[test]
    fn texts_depend_on_the_state_met() {
        let base = record(Some("likes dramas"), vec![1, 2], &["a", "b"]);
        let d = state_digest(7, &base);
        assert_eq!(d, state_digest(7, &record(Some("likes dramas"), vec![1, 2], &["a", "b"])));
        for other in [
            record(Some("likes comedies"), vec![1, 2], &["a", "b"]),
            record(None, vec![1, 2], &["a", "b"]),
            record(Some("likes dramas"), vec![2, 1], &["a", "b"]),
            record(Some("likes dramas"), vec![1, 2], &["a"]),
            record(Some("likes dramas"), vec![1, 2], &["b", "a"]),
        ] {
            assert_ne!(d, state_digest(7, &other));
        }
        assert_ne!(d, state_digest(8, &base));
        let out = StandIn::reading_state(7).epoch(0, vec![base]).unwrap();
        assert_eq!(&*out.updates[0].text, format!("pattern {d:016x}"));
    }
}
