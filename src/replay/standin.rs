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
            let tag = (e.key ^ self.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            let seen = a.history.len();
            let pattern: Arc<str> = format!("user {} after {seen} items, last {} (epoch {epoch})", e.user, e.item).into();
            let reason: Arc<str> = format!("item {} suits user {} ({tag:06x})", e.item, e.user).into();
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
