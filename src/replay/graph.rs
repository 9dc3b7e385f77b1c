//! The correction dataflow: source → user state → item state → policy, with the policy's
//! rewrites fed back (one epoch later) into both states, and every operator's reports (snapshot
//! parts, metrics) flowing to the snapshot operator on worker 0; run on timely threads, in one
//! process or several ([`Topology`]).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::vec::Filter;
use timely::dataflow::operators::{Concat, ConnectLoop, Feedback, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};

use super::board::Board;
use super::item_state::ItemState;
use super::policy::{policy_operator, Corrector};
use super::snapshot::State;
use super::snapshot_op::{snapshot_operator, Collected};
use super::state_op::state_operator;
use super::user_state::UserState;
use super::EpochMetrics;
use super::{Event, Tick, Update, UpdateKind};

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

/// Where the timely workers run: `threads` per process, `processes` processes (this one is
/// `process`), connected at `hosts` (one `host:port` per process; empty: `localhost:2101 + i`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub threads: usize,
    pub processes: usize,
    pub process: usize,
    pub hosts: Vec<String>,
}

impl Topology {
    /// One process with `threads` workers.
    pub fn threads(threads: usize) -> Self {
        Self { threads: threads.max(1), processes: 1, process: 0, hosts: Vec::new() }
    }

    /// Workers over all processes.
    pub fn peers(&self) -> usize {
        self.threads * self.processes
    }

    /// Whether this process holds worker 0, which completes snapshots and collects the metrics.
    pub fn is_first(&self) -> bool {
        self.process == 0
    }

    /// Read a timely host file: one `host:port` per line (blank lines and `#` comments skipped),
    /// at least `processes` of them (the first `processes` are used).
    pub fn read_hostfile(path: &std::path::Path, processes: usize) -> Result<Vec<String>> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let mut hosts = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            if l.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
                return Err(anyhow!("{}:{}: expected host:port, found '{l}'", path.display(), n + 1));
            }
            hosts.push(l.to_string());
        }
        if hosts.len() < processes {
            return Err(anyhow!("{}: {} hosts for {processes} processes", path.display(), hosts.len()));
        }
        hosts.truncate(processes);
        Ok(hosts)
    }

    /// This process's index is one of the processes'.
    pub fn validate(&self) -> Result<()> {
        if self.process >= self.processes.max(1) {
            return Err(anyhow!("--process: expected 0..={}, found {}", self.processes.max(1) - 1, self.process));
        }
        Ok(())
    }

    pub(crate) fn config(&self) -> Result<timely::Config> {
        self.validate()?;
        if self.processes <= 1 {
            return Ok(timely::Config::process(self.threads));
        }
        let addresses = if self.hosts.is_empty() {
            (0..self.processes).map(|i| format!("localhost:{}", 2101 + i)).collect()
        } else {
            self.hosts.clone()
        };
        Ok(timely::Config {
            communication: timely::CommunicationConfig::Cluster {
                threads: self.threads,
                process: self.process,
                addresses,
                report: false,
                zerocopy: false,
            },
            worker: timely::WorkerConfig::default(),
        })
    }
}

/// One worker's dataflow, built by [`build_worker`]: its inputs (events, and the ticks that
/// announce each epoch to this worker's operators), what its snapshot operator collects (worker
/// 0's is the run's), its first failure, and a probe on the operators' reports.
pub(crate) struct WorkerDataflow {
    pub events: InputHandle<u64, CapacityContainerBuilder<Vec<Event>>>,
    pub ticks: InputHandle<u64, CapacityContainerBuilder<Vec<Tick>>>,
    pub collected: Rc<RefCell<Collected>>,
    pub failure: Rc<RefCell<Option<String>>>,
    pub probe: ProbeHandle<u64>,
}

impl WorkerDataflow {
    /// Feed epoch `t`: its tick (a snapshot after it or not) and this worker's share of `events`
    /// (every `peers`-th from `index`).
    pub fn feed(&mut self, t: u64, events: &[Event], snapshot: bool, index: usize, peers: usize) {
        self.events.advance_to(t);
        self.ticks.advance_to(t);
        self.ticks.send(Tick { epoch: t, snapshot });
        for (i, e) in events.iter().enumerate() {
            if i % peers == index {
                self.events.send(e.clone());
            }
        }
    }

    /// The first failure, this worker's or one the snapshot operator collected.
    pub fn error(&self) -> Option<String> {
        self.failure.borrow().clone().or_else(|| self.collected.borrow().error.clone())
    }
}

/// Build the correction dataflow on `worker`.
pub(crate) fn build_worker(
    worker: &mut timely::worker::Worker,
    initial: &Initial,
    factory: &CorrectorFactory,
    board: &Arc<Board>,
) -> WorkerDataflow {
    let (index, peers) = (worker.index(), worker.peers());
    let mut input = InputHandle::new();
    let mut tick_input = InputHandle::new();
    let collected = Rc::new(RefCell::new(Collected::default()));
    // This worker's first failure: its operators stop working and report it instead of
    // their snapshot parts, so that no snapshot is completed without them.
    let (corrector, failure) = match factory(index, peers) {
        Ok(c) => (c, None),
        Err(e) => (None, Some(format!("loading the corrector on worker {index}: {e:#}"))),
    };
    let failure = Rc::new(RefCell::new(failure));
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
    let single = initial.single_policy;
    let out = collected.clone();
    let probe = worker.dataflow::<u64, _, _>(|scope| {
        let (handle, cycle) = scope.feedback::<Vec<Update>>(1);
        let patterns = cycle.clone().filter(|u: &Update| u.kind == UpdateKind::Pattern);
        let reasons = cycle.filter(|u: &Update| u.kind == UpdateKind::Reason);
        let events = input.to_stream(scope);
        let ticks = tick_input.to_stream(scope);
        let (annotated, r_users) =
            state_operator(events, patterns, ticks.clone(), users, board.clone(), index, failure.clone(), "UserState");
        let (annotated, r_items) = state_operator(
            annotated,
            reasons,
            ticks.clone(),
            items,
            board.clone(),
            index,
            failure.clone(),
            "ItemState",
        );
        let (updates, r_policy) = policy_operator(annotated, ticks, corrector, single, board.clone(), failure.clone());
        updates.connect_loop(handle);
        let (probe, reports) = r_users.concat(r_items).concat(r_policy).probe();
        snapshot_operator(reports, board.clone(), out);
        probe
    });
    WorkerDataflow { events: input, ticks: tick_input, collected, failure, probe }
}

/// Run the epochs `(epoch, events)` (in epoch order) through the dataflow on the workers of
/// `topology`. Every process passes the same epochs; each worker feeds its share. The outcome's
/// metrics and snapshots are worker 0's (empty in the other processes).
pub fn run_dataflow(
    epochs: Vec<(u64, Vec<Event>)>,
    initial: Arc<Initial>,
    factory: CorrectorFactory,
    board: Arc<Board>,
    topology: &Topology,
) -> Result<DataflowOutcome> {
    let t0 = std::time::Instant::now();
    if board.peers() != topology.peers() {
        return Err(anyhow!("snapshot board for {} workers, topology of {}", board.peers(), topology.peers()));
    }
    let epochs = Arc::new(epochs);
    let config = topology.config()?;
    let quiet = (topology.processes > 1).then(StdoutToStderr::new);
    let guards = timely::execute(config, move |worker| -> std::result::Result<Option<Collected>, String> {
        let (index, peers) = (worker.index(), worker.peers());
        let mut df = build_worker(worker, &initial, &factory, &board);
        for (t, evs) in epochs.iter() {
            df.feed(*t, evs, board.is_snapshot(*t), index, peers);
        }
        df.events.close();
        df.ticks.close();
        while worker.step() {}
        if let Some(e) = df.failure.take() {
            return Err(e);
        }
        let c = df.collected.take();
        if let Some(e) = c.error {
            return Err(e);
        }
        Ok((index == 0).then_some(c))
    })
    .map_err(|e| anyhow!("starting the timely workers ({topology:?}): {e}"));
    drop(quiet);
    let guards = guards?;
    let mut first = None;
    for r in guards.join() {
        match r {
            Ok(Ok(Some(c))) => first = Some(c),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => return Err(anyhow!(e)),
            Err(e) => return Err(anyhow!("a timely worker failed: {e}")),
        }
    }
    let c = first.unwrap_or_default();
    Ok(DataflowOutcome {
        epoch_seconds: c.seconds.into_values().collect(),
        metrics: c.metrics,
        snapshots: c.written,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// While a cluster connects, timely prints "awaiting connections" on stdout, where `curec`'s
/// commands print their JSON line; for that time stdout goes to stderr (restored on drop).
struct StdoutToStderr(Option<i32>);

#[cfg(not(unix))]
impl StdoutToStderr {
    fn new() -> Self {
        Self(None)
    }
}

#[cfg(unix)]
impl StdoutToStderr {
    fn new() -> Self {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // SAFETY: plain descriptor calls on the process's own stdout/stderr; the saved copy is
        // restored and closed exactly once, in `drop`.
        let saved = unsafe { libc::dup(1) };
        if saved < 0 || unsafe { libc::dup2(2, 1) } < 0 {
            return Self(None);
        }
        Self(Some(saved))
    }
}

#[cfg(unix)]
impl Drop for StdoutToStderr {
    fn drop(&mut self) {
        if let Some(saved) = self.0.take() {
            // SAFETY: `saved` is the descriptor `new` duplicated and nothing else closed it.
            unsafe {
                libc::dup2(saved, 1);
                libc::close(saved);
            }
        }
    }
}
