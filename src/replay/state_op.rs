//! The skeleton both state operators share: records exchanged by their key, updates (from the
//! feedback loop) exchanged by the same key, and the state folded epoch by epoch once both
//! frontiers have passed it: first the updates stamped t (the rewrites of epoch t − 1, in key
//! order), then the records of t. Once the updates stamped e + 1 are in, and before the records of
//! e + 1 fold into it, the state is the state "after epoch e"; if e is a snapshot epoch the
//! operator writes its shard then and reports it, stamped e, on its second output. Which epochs
//! are snapshot epochs the source's [`Tick`]s say (a third input, worker-local), and a snapshot
//! tick's capability is what the report is sent with.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;
use timely::progress::frontier::MutableAntichain;

use super::board::{part_report, Board, Report};
use super::KeyedState;
use super::{Tick, Update};
fn bound(f: &MutableAntichain<u64>) -> Option<u64> {
    f.frontier().iter().min().copied()
}

/// Wire a keyed state operator: `records`, `updates` and this worker's `ticks` in; annotated
/// records out, and the operator's snapshot parts (or its failure) as [`Report`]s for the
/// snapshot operator.
///
/// The reports get their own output so that the capability held for a snapshot epoch (a report
/// is stamped with its epoch) never holds back the records, and so the feedback loop.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn state_operator<'s, S: KeyedState>(
    records: Stream<'s, u64, Vec<S::In>>,
    updates: Stream<'s, u64, Vec<Update>>,
    ticks: Stream<'s, u64, Vec<Tick>>,
    mut state: S,
    board: Arc<Board>,
    worker: usize,
    failure: Rc<RefCell<Option<String>>>,
    name: &str,
) -> (Stream<'s, u64, Vec<S::Out>>, Stream<'s, u64, Vec<Report>>) {
    let mut builder = OperatorBuilder::new(name.to_owned(), records.scope());
    let mut in1 = builder.new_input(records, Exchange::new(|r: &S::In| S::key(r)));
    let mut in2 =
        builder.new_input(updates, Exchange::new(|u: &Update| if u.kind == S::KIND { S::update_key(u) } else { 0 }));
    let mut in3 = builder.new_input(ticks, Pipeline);
    let (out_records, records_stream) = builder.new_output::<Vec<S::Out>>();
    let (out_reports, reports_stream) = builder.new_output::<Vec<Report>>();
    let mut out_records = OutputBuilder::from(out_records);
    let mut out_reports = OutputBuilder::from(out_reports);
    builder.build(move |mut caps| {
        // Capabilities are held only for records waiting to be annotated and for snapshot epochs
        // announced by a tick (holding one for nothing would keep the feedback loop alive forever).
        caps.clear();
        let mut recs: BTreeMap<u64, (Capability<u64>, Vec<S::In>)> = BTreeMap::new();
        let mut ups: BTreeMap<u64, Vec<Update>> = BTreeMap::new();
        // Snapshot epochs not yet written, with the capability their report goes out with.
        let mut pending: BTreeMap<u64, Capability<u64>> = BTreeMap::new();
        move |frontiers| {
            let (f1, f2, f3) = (&frontiers[0], &frontiers[1], &frontiers[2]);
            let mut output = out_records.activate();
            let mut reports = out_reports.activate();
            in1.for_each_stamp(|c, data| {
                if let Some(cap) = c.retain_least(0) {
                    let slot = recs.entry(*cap.time()).or_insert_with(|| (cap, Vec::new()));
                    slot.1.extend(data.flat_map(|d| d.drain(..)));
                }
            });
            in2.for_each_stamp(|c, data| {
                if let Some(&t) = c.least() {
                    let v = ups.entry(t).or_default();
                    v.extend(data.flat_map(|d| d.drain(..)).filter(|u| u.kind == S::KIND));
                }
            });
            in3.for_each_stamp(|c, data| {
                for tick in data.flat_map(|d| d.drain(..)) {
                    if tick.snapshot {
                        pending.entry(tick.epoch).or_insert_with(|| c.delayed(&tick.epoch, 1));
                    }
                }
            });
            // Nothing is decided at an epoch whose ticks may still come (it might be a snapshot
            // epoch).
            let limit = [bound(f1), bound(f2), bound(f3)].into_iter().flatten().min();
            let ready = |t: u64| limit.is_none_or(|b| t < b);
            // Snapshot e: this worker's part (or its failure), stamped e.
            let mut snapshot = |e: u64, state: &S, pending: &mut BTreeMap<u64, Capability<u64>>| {
                let cap = pending.remove(&e).expect("a pending snapshot");
                let report = part_report(e, &failure, "snapshot", || board.part(e, |keep| state.shard(keep), worker));
                reports.session(&cap).give(report);
            };
            let first = |p: &BTreeMap<u64, Capability<u64>>| p.keys().next().copied();
            loop {
                let next = [recs.keys().next(), ups.keys().next()].into_iter().flatten().min().copied();
                let Some(t) = next.filter(|&t| ready(t)) else { break };
                while let Some(e) = first(&pending).filter(|&e| e + 1 < t) {
                    snapshot(e, &state, &mut pending);
                }
                if let Some(mut u) = ups.remove(&t) {
                    u.sort_by_key(|u| u.key);
                    state.apply(u);
                }
                // The state after epoch t − 1: its rewrites are in, epoch t's records not yet.
                while let Some(e) = first(&pending).filter(|&e| e < t) {
                    snapshot(e, &state, &mut pending);
                }
                if let Some((c, mut r)) = recs.remove(&t) {
                    r.sort_by_key(|r| S::order(r));
                    let out = state.annotate(r);
                    let mut out = out;
                    output.session(&c).give_container(&mut out);
                }
            }
            while let Some(e) = first(&pending).filter(|&e| ready(e + 1)) {
                snapshot(e, &state, &mut pending);
            }
        }
    });
    (records_stream, reports_stream)
}
