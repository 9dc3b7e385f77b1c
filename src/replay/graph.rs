//! The correction dataflow: source → user state → item state → policy, with the policy's
//! rewrites fed back (one epoch later) into both states; run on `workers` timely threads.

use std::sync::Arc;

use anyhow::{anyhow, Result};
use timely::dataflow::operators::vec::Filter;
use timely::dataflow::operators::{ConnectLoop, Feedback};
use timely::dataflow::InputHandle;

use super::item_state::ItemState;
use super::policy::{policy_operator, Corrector, EpochMetrics};
use super::snapshot::{Board, State};
use super::state_op::state_operator;
use super::user_state::UserState;
use super::{Event, Update, UpdateKind};

/// Builds worker `index`'s corrector (`None`: this worker holds no policy).
pub type CorrectorFactory = Arc<dyn Fn(usize, usize) -> Result<Option<Box<dyn Corrector>>> + Send + Sync>;

/// The state the dataflow starts from and how the operators treat it.
pub struct Initial {
    pub state: State,
    pub history_kept: usize,
    pub reasons_kept: usize,
    /// "w/o Update": records meet the initial state; rewrites fold into the state but are not read.
    pub freeze: bool,
    /// Records carry the item's reason list and the user's history (the LLM corrector needs them).
    pub attach_reasons: bool,
    /// One policy on worker 0 (else the corrector runs keyed by user on every worker).
    pub single_policy: bool,
}

pub struct DataflowOutcome {
    pub metrics: Vec<EpochMetrics>,
    /// Seconds the corrector spent on each epoch of this run (model loading excluded).
    pub epoch_seconds: Vec<f64>,
    pub snapshots: Vec<u64>,
    pub seconds: f64,
}

/// Run the epochs `(epoch, events)` (in epoch order) through the dataflow on `workers` threads.
pub fn run_dataflow(
    epochs: Vec<(u64, Vec<Event>)>,
    initial: Arc<Initial>,
    factory: CorrectorFactory,
    board: Arc<Board>,
    workers: usize,
) -> Result<DataflowOutcome> {
    let t0 = std::time::Instant::now();
    let order: Arc<Vec<u64>> = Arc::new(epochs.iter().map(|(t, _)| *t).collect());
    let epochs = Arc::new(epochs);
    let b = board.clone();
    let guards = timely::execute(timely::Config::process(workers.max(1)), move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let mut input = InputHandle::new();
        let corrector = match factory(index, peers) {
            Ok(c) => c,
            Err(e) => {
                b.fail(format!("{e:#}"));
                None
            }
        };
        let users = UserState::new(
            &initial.state.users,
            index,
            peers,
            initial.history_kept,
            initial.freeze,
            initial.attach_reasons,
        );
        let items = ItemState::new(
            &initial.state.items,
            index,
            peers,
            initial.reasons_kept,
            initial.freeze,
            initial.attach_reasons,
        );
        let (order, board, single) = (order.clone(), b.clone(), initial.single_policy);
        worker.dataflow::<u64, _, _>(|scope| {
            let (handle, cycle) = scope.feedback::<Vec<Update>>(1);
            let patterns = cycle.clone().filter(|u: &Update| u.kind == UpdateKind::Pattern);
            let reasons = cycle.filter(|u: &Update| u.kind == UpdateKind::Reason);
            let events = input.to_stream(scope);
            let annotated = state_operator(events, patterns, users, board.clone(), index, "UserState");
            let annotated = state_operator(annotated, reasons, items, board.clone(), index, "ItemState");
            policy_operator(annotated, corrector, single, order, board).connect_loop(handle);
        });
        for (t, evs) in epochs.iter() {
            input.advance_to(*t);
            for (i, e) in evs.iter().enumerate() {
                if i % peers == index {
                    input.send::<Event>(e.clone());
                }
            }
        }
        input.close();
        while worker.step() {}
    })
    .map_err(|e| anyhow!("starting {workers} timely workers: {e}"))?;
    for r in guards.join() {
        r.map_err(|e| anyhow!("a timely worker failed: {e}"))?;
    }
    if let Some(e) = board.error() {
        return Err(anyhow!(e));
    }
    Ok(DataflowOutcome {
        epoch_seconds: board.epoch_seconds().into_values().collect(),
        metrics: board.metrics(),
        snapshots: board.written(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}
