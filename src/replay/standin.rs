//! The stand-in corrector, used only to measure the dataflow without the LLM: for every record it
//! spends a fixed amount of busy time and writes a pattern and a reason that depend on the record
//! alone (so it runs keyed by user on every worker, and the state is the same for any worker count).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::policy::{Corrector, EpochMetrics, EpochOutput};
use super::{Annotated, Update};

pub struct StandIn {
    pub cost: Duration,
    pub seed: u64,
    /// Texts to pick from (by a hash of seed and record): writing one costs a pointer copy.
    texts: Vec<(Arc<str>, Arc<str>)>,
}

impl StandIn {
    pub fn new(cost: Duration, seed: u64) -> Self {
        // Many texts, so that workers rarely touch the same reference counts.
        let texts = (0..4096)
            .map(|k| (format!("stand-in interest pattern #{k}").into(), format!("stand-in reason #{k}").into()))
            .collect();
        Self { cost, seed, texts }
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
            let k = ((e.key ^ self.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as usize;
            let (pattern, reason) = &self.texts[k % self.texts.len()];
            updates.push(Update::pattern(e, pattern.clone()));
            updates.push(Update::reason(e, reason.clone()));
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
