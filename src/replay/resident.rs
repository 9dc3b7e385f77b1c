//! A correction dataflow that stays up: the same operators as [`super::run_dataflow`], started
//! once from a snapshot's state and fed batch after batch, so that ingesting a few interactions
//! costs their epochs in the operators instead of reading and writing the whole state
//! (`curec serve`, and `curec bench ingest` which measures it).
//!
//! Each batch is a run of epochs: every worker feeds its share and its ticks, advances its inputs
//! past the batch and steps until the probe on the operators' reports has passed it; worker 0
//! then answers with the batch's metrics (from its snapshot operator, through the dataflow). A
//! batch may ask for a snapshot after its last epoch (a checkpoint): the inputs then advance one
//! epoch further, so that the rewrites of that epoch are folded before the state operators write
//! their parts. Closing the engine closes the inputs and joins the workers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use timely::communication::initialize::WorkerGuards;

use super::board::Board;
use super::graph::{build_worker, CorrectorFactory, Initial, Topology};
use super::EpochMetrics;
use super::Event;

/// What the workers get: the epochs in order, whether a snapshot follows the last one, and the
/// time the inputs advance to afterwards.
struct Batch {
    epochs: Vec<(u64, Vec<Event>)>,
    snapshot: bool,
    until: u64,
}

type Slot = Mutex<Option<Receiver<Arc<Batch>>>>;

/// What a batch did (worker 0's view, summed over the workers).
#[derive(Debug, Default, Clone)]
pub struct BatchOutcome {
    pub metrics: Vec<EpochMetrics>,
    /// Seconds the corrector spent on each epoch (the slowest worker).
    pub epoch_seconds: Vec<f64>,
    /// The snapshot written after the batch, if one was asked for.
    pub snapshot: Option<u64>,
    /// From feeding the first epoch to worker 0's answer.
    pub seconds: f64,
}

pub struct Resident {
    feeds: Vec<Sender<Arc<Batch>>>,
    acks: Receiver<std::result::Result<BatchOutcome, String>>,
    guards: Option<WorkerGuards<std::result::Result<(), String>>>,
    next: u64,
    /// Set by a worker that panics, so that the others and the caller stop waiting for it.
    dead: Arc<AtomicBool>,
}

/// Sets its flag when dropped by a panicking thread.
struct PanicFlag(Arc<AtomicBool>);

impl Drop for PanicFlag {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

impl Resident {
    /// Start `workers` timely threads on `initial`; the first batch's epochs start at `first` or
    /// later.
    pub fn start(
        initial: Arc<Initial>,
        factory: CorrectorFactory,
        board: Arc<Board>,
        workers: usize,
        first: u64,
    ) -> Result<Self> {
        let topology = Topology::threads(workers);
        if board.peers() != topology.peers() {
            bail!("snapshot board for {} workers, engine of {}", board.peers(), topology.peers());
        }
        let (feeds, receivers): (Vec<_>, Vec<_>) = (0..topology.peers()).map(|_| channel::<Arc<Batch>>()).unzip();
        // Each worker takes its own receiver once.
        let receivers: Arc<Vec<Slot>> = Arc::new(receivers.into_iter().map(|r| Mutex::new(Some(r))).collect());
        let (ack_tx, acks) = channel();
        let ack_tx = Mutex::new(ack_tx);
        let config = topology.config()?;
        let dead = Arc::new(AtomicBool::new(false));
        let dead_w = dead.clone();
        let guards = timely::execute(config, move |worker| -> std::result::Result<(), String> {
            let _flag = PanicFlag(dead_w.clone());
            let dead = || dead_w.load(Ordering::Relaxed);
            let (index, peers) = (worker.index(), worker.peers());
            let rx = receivers[index].lock().unwrap_or_else(|p| p.into_inner()).take().ok_or("worker started twice")?;
            let mut df = build_worker(worker, &initial, &factory, &board);
            let mut seen = df.collected.borrow().metrics.len();
            while let Ok(batch) = rx.recv() {
                let t0 = Instant::now();
                let last = batch.epochs.last().map(|(t, _)| *t);
                for (t, evs) in &batch.epochs {
                    df.feed(*t, evs, batch.snapshot && Some(*t) == last, index, peers);
                }
                df.events.advance_to(batch.until);
                df.ticks.advance_to(batch.until);
                // Worker 0 also waits for its snapshot operator to have finished the batch's
                // epochs (their metrics, and the snapshot), unless something failed.
                let finished = |df: &super::graph::WorkerDataflow| {
                    index != 0
                        || df.error().is_some()
                        || last.is_none_or(|l| df.collected.borrow().metrics.last().is_some_and(|m| m.epoch >= l))
                };
                worker.step_while(|| !dead() && (df.probe.less_than(&batch.until) || !finished(&df)));
                if dead() {
                    // Timely would step a dataflow with a dead peer forever after we return.
                    for id in worker.installed_dataflows() {
                        worker.drop_dataflow(id);
                    }
                    return Err("another timely worker panicked".into());
                }
                if index == 0 {
                    let c = df.collected.borrow();
                    let answer = match df.error() {
                        Some(e) => Err(e),
                        None => {
                            let metrics: Vec<EpochMetrics> = c.metrics[seen..].to_vec();
                            let epoch_seconds =
                                metrics.iter().map(|m| c.seconds.get(&m.epoch).copied().unwrap_or(0.0)).collect();
                            let snapshot = last.filter(|l| batch.snapshot && c.written.contains(l));
                            Ok(BatchOutcome { metrics, epoch_seconds, snapshot, seconds: t0.elapsed().as_secs_f64() })
                        }
                    };
                    seen = c.metrics.len();
                    let _ = ack_tx.lock().unwrap_or_else(|p| p.into_inner()).send(answer);
                }
            }
            let (failure, collected) = (df.failure.clone(), df.collected.clone());
            df.events.close();
            df.ticks.close();
            while !dead() && worker.step() {}
            if dead() {
                for id in worker.installed_dataflows() {
                    worker.drop_dataflow(id);
                }
            }
            let error = failure.take().or_else(|| collected.borrow().error.clone());
            error.map_or(Ok(()), Err)
        })
        .map_err(|e| anyhow!("starting the timely workers: {e}"))?;
        Ok(Self { feeds, acks, guards: Some(guards), next: first, dead })
    }

    /// The first epoch the next batch may use.
    pub fn next_epoch(&self) -> u64 {
        self.next
    }

    /// Put `epochs` (in order, from [`Self::next_epoch`] on) through the operators; with
    /// `snapshot`, a snapshot after the last one. Returns once they are processed (and the
    /// snapshot is complete).
    pub fn apply(&mut self, epochs: Vec<(u64, Vec<Event>)>, snapshot: bool) -> Result<BatchOutcome> {
        let Some(&(last, _)) = epochs.last() else { bail!("an empty batch") };
        if epochs[0].0 < self.next || epochs.windows(2).any(|w| w[0].0 >= w[1].0) {
            bail!("batch epochs must increase from {} (found {}..={last})", self.next, epochs[0].0);
        }
        let until = if snapshot { last + 2 } else { last + 1 };
        let batch = Arc::new(Batch { epochs, snapshot, until });
        for f in &self.feeds {
            f.send(batch.clone()).map_err(|_| anyhow!("the dataflow has stopped"))?;
        }
        let answer = loop {
            match self.acks.recv_timeout(std::time::Duration::from_millis(200)) {
                Ok(a) => break a,
                Err(RecvTimeoutError::Timeout) if !self.dead.load(Ordering::Relaxed) => {}
                Err(_) if self.dead.load(Ordering::Relaxed) => bail!("a timely worker panicked (logged above)"),
                Err(_) => bail!("the dataflow has stopped"),
            }
        };
        self.next = until;
        let outcome = answer.map_err(|e| anyhow!(e))?;
        if snapshot && outcome.snapshot.is_none() {
            bail!("the snapshot after epoch {last} was not written");
        }
        Ok(outcome)
    }

    /// A snapshot of the state as it is: one empty epoch, with a snapshot after it.
    pub fn checkpoint(&mut self) -> Result<BatchOutcome> {
        self.apply(vec![(self.next, Vec::new())], true)
    }

    /// Close the inputs and join the workers (their first failure, if any).
    pub fn close(mut self) -> Result<()> {
        self.feeds.clear();
        let Some(guards) = self.guards.take() else { return Ok(()) };
        for r in guards.join() {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(anyhow!(e)),
                Err(e) => return Err(anyhow!("a timely worker failed: {e}")),
            }
        }
        Ok(())
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        self.feeds.clear();
        if let Some(g) = self.guards.take() {
            drop(g.join());
        }
    }
}
