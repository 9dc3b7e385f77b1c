//! The snapshot operator: every operator's reports (snapshot parts, per-epoch metrics, failures)
//! are exchanged to worker 0, which holds them by epoch. Once its input frontier has passed an
//! epoch no worker can still report on it, so the epoch is final: its metrics, summed over the
//! workers, go to the progress hook, and at a snapshot epoch the snapshot is completed (merged
//! rows, metrics, manifest). Nothing is shared between workers but the dataflow's channels; what
//! worker 0 collected is returned by its closure when the dataflow ends.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Operator;
use timely::dataflow::Stream;

use super::board::{Board, Report};
use super::snapshot::Part;
use super::EpochMetrics;

/// What worker 0 collected: every finished epoch's metrics (those of the epochs before this
/// run first), the corrector's seconds per epoch (the slowest worker), the snapshots completed,
/// and the first failure.
#[derive(Default)]
pub struct Collected {
    pub metrics: Vec<EpochMetrics>,
    pub seconds: BTreeMap<u64, f64>,
    pub written: Vec<u64>,
    pub error: Option<String>,
}

#[derive(Default)]
struct Pending {
    parts: Vec<Part>,
    metrics: Option<EpochMetrics>,
    seconds: f64,
}

/// Wire the snapshot operator over `reports`; `out` (worker-local) receives what it collects.
pub fn snapshot_operator(reports: Stream<'_, u64, Vec<Report>>, board: Arc<Board>, out: Rc<RefCell<Collected>>) {
    out.borrow_mut().metrics = board.done().to_vec();
    let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
    reports.sink(Exchange::new(|_: &Report| 0), "Snapshots", move |(input, frontier)| {
        input.for_each_stamp(|_, data| {
            for r in data.flat_map(|d| d.drain(..)) {
                match r {
                    Report::Part { epoch, part } => pending.entry(epoch).or_default().parts.push(part),
                    Report::Metrics { metrics, seconds } => {
                        let p = pending.entry(metrics.epoch).or_default();
                        p.seconds = p.seconds.max(seconds);
                        let sum = p
                            .metrics
                            .get_or_insert_with(|| EpochMetrics { epoch: metrics.epoch, ..Default::default() });
                        sum.merge(&metrics);
                    }
                    Report::Failed { error, .. } => {
                        out.borrow_mut().error.get_or_insert(error);
                    }
                }
            }
        });
        let limit = frontier.frontier().iter().min().copied();
        while pending.first_key_value().is_some_and(|(&e, _)| limit.is_none_or(|b| e < b)) {
            let (e, p) = pending.pop_first().expect("checked above");
            let mut o = out.borrow_mut();
            if let Some(m) = p.metrics {
                o.seconds.insert(e, p.seconds);
                board.on_epoch(&m, p.seconds);
                o.metrics.push(m);
            }
            // Parts come only for snapshot epochs (from every state operator and policy).
            if !p.parts.is_empty() && o.error.is_none() {
                let r = board.finish(e, p.parts, &o.metrics);
                match r {
                    Ok(()) => o.written.push(e),
                    Err(err) => o.error = Some(format!("snapshot after epoch {e}: {err:#}")),
                }
            }
        }
    });
}
