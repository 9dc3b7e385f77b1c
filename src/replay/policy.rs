//! The policy operator: holds an epoch's annotated records until its input frontier has passed
//! the epoch (every epoch the source's [`Tick`]s announce, in order), then hands them (sorted by key) to the [`Corrector`] in one batch, emits the state
//! rewrites into the feedback loop, reports the epoch's metrics through the dataflow, and at
//! snapshot epochs saves the policy. With one policy (the LLM being trained) every record goes to worker 0 and the GRPO
//! steps apply in epoch order; a stateless corrector (the stand-in) runs keyed by user.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::Result;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

use super::board::{part_report, Board, Report};
use super::snapshot::Part;
use super::EpochMetrics;
use super::{Annotated, Tick, Update};
pub struct EpochOutput {
    pub updates: Vec<Update>,
    pub metrics: EpochMetrics,
}

/// What runs on an epoch's records: the LLM correction or the bench's stand-in.
pub trait Corrector {
    /// One epoch's records, sorted by key.
    fn epoch(&mut self, epoch: u64, records: Vec<Annotated>) -> Result<EpochOutput>;
    /// Save the policy's state (weights, optimizer) into a snapshot directory.
    fn save(&mut self, dir: &Path) -> Result<()>;
}

/// Wire the policy operator. `single`: all records go to worker 0 (one policy). Outputs: the
/// rewrites (into the feedback loop), and the epoch's metrics and snapshot part as [`Report`]s.
#[allow(clippy::type_complexity)]
pub fn policy_operator<'s>(
    records: Stream<'s, u64, Vec<Annotated>>,
    ticks: Stream<'s, u64, Vec<Tick>>,
    mut corrector: Option<Box<dyn Corrector>>,
    single: bool,
    board: Arc<Board>,
    failure: Rc<RefCell<Option<String>>>,
) -> (Stream<'s, u64, Vec<Update>>, Stream<'s, u64, Vec<Report>>) {
    let pact = Exchange::new(move |a: &Annotated| if single { 0 } else { a.event.user as u64 });
    let mut builder = OperatorBuilder::new("Policy".to_owned(), records.scope());
    let mut input = builder.new_input(records, pact);
    let mut ticks = builder.new_input(ticks, Pipeline);
    let (out_updates, updates_stream) = builder.new_output::<Vec<Update>>();
    let (out_reports, reports_stream) = builder.new_output::<Vec<Report>>();
    let mut out_updates = OutputBuilder::from(out_updates);
    let mut out_reports = OutputBuilder::from(out_reports);
    builder.build(move |mut caps| {
        // Capabilities only for stashed records (see the state operators) and, on the reports
        // output, for the epochs the ticks announced and not yet finished.
        caps.clear();
        let mut stash: BTreeMap<u64, (Capability<u64>, Vec<Annotated>)> = BTreeMap::new();
        let mut epochs: BTreeMap<u64, (Capability<u64>, bool)> = BTreeMap::new();
        move |frontiers| {
            let mut output = out_updates.activate();
            let mut reports = out_reports.activate();
            input.for_each_stamp(|c, data| {
                if let Some(cap) = c.retain_least(0) {
                    let slot = stash.entry(*cap.time()).or_insert_with(|| (cap, Vec::new()));
                    slot.1.extend(data.flat_map(|d| d.drain(..)));
                }
            });
            ticks.for_each_stamp(|c, data| {
                for tick in data.flat_map(|d| d.drain(..)) {
                    let e = epochs.entry(tick.epoch).or_insert_with(|| (c.delayed(&tick.epoch, 1), false));
                    e.1 |= tick.snapshot;
                }
            });
            let limit = [&frontiers[0], &frontiers[1]].iter().filter_map(|f| f.frontier().iter().min().copied()).min();
            while let Some(t) = epochs.keys().next().copied().filter(|&t| limit.is_none_or(|b| t < b)) {
                let (report_cap, snapshot) = epochs.remove(&t).expect("the first epoch");
                let (cap, mut recs) = match stash.remove(&t) {
                    Some((c, r)) => (Some(c), r),
                    None => (None, Vec::new()),
                };
                recs.sort_by_key(|a| a.event.key);
                // Retractions changed the state on their way here; there is nothing to write.
                recs.retain(|a| !a.event.retract);
                let mut out = vec![];
                let mut metrics = EpochMetrics { epoch: t, ..Default::default() };
                let started = std::time::Instant::now();
                if let Some(c) = corrector.as_mut().filter(|_| failure.borrow().is_none() && !recs.is_empty()) {
                    match c.epoch(t, recs) {
                        Ok(o) => {
                            metrics = o.metrics;
                            metrics.epoch = t;
                            if let Some(at) = &cap {
                                let mut updates = o.updates;
                                output.session(at).give_container(&mut updates);
                            }
                        }
                        Err(e) => {
                            let error = format!("epoch {t}: {e:#}");
                            *failure.borrow_mut() = Some(error.clone());
                            out.push(Report::Failed { epoch: t, error });
                        }
                    }
                }
                out.push(Report::Metrics { metrics, seconds: started.elapsed().as_secs_f64() });
                if snapshot {
                    out.push(part_report(t, &failure, "saving the policy", || {
                        if let Some(c) = corrector.as_mut() {
                            c.save(&board.shard_dir(t)?)?;
                        }
                        Ok(Part::default())
                    }));
                }
                reports.session(&report_cap).give_iterator(out.into_iter());
            }
        }
    });
    (updates_stream, reports_stream)
}
