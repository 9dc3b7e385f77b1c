//! Feature generation as a timely dataflow: jobs enter on every worker, are exchanged by user (a
//! user's prompts share a prefix, which the worker's engine computes once), and each worker runs
//! its share through its own copy of the LLM in batches once its input frontier has passed the
//! jobs' time, one batch per activation, so that each batch's rows are written (and survive a
//! kill) before the next batch starts. A job's text depends on its record alone (greedy, or sampled
//! from (seed, key)), so the rows are the same with 1 or N workers; only their order differs, and
//! the caller sorts them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Result};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Inspect, Operator, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};

use super::plan::FeatureJob;
use super::writer::{run_batch, FeaturePrompts};
use super::FeaturesConfig;
use crate::data::preprocess::ItemRow;
use crate::llm::Llm;

/// A generated job: the job, its text, whether it had an answer section, completion tokens.
pub type Generated = (FeatureJob, String, bool, usize);

/// Receives each finished batch, from any worker, one at a time.
pub type Sink = Arc<Mutex<dyn FnMut(Vec<Generated>) -> Result<()> + Send>>;

/// What every worker needs, shared read-only.
pub struct WorkerContext {
    pub items: Vec<ItemRow>,
    pub prompts: FeaturePrompts,
    pub cfg: FeaturesConfig,
    /// Loads a worker's copy of the model.
    pub load: Box<dyn Fn() -> Result<Llm> + Send + Sync>,
}

/// Run `jobs` on `workers` timely worker threads; `sink` receives each finished batch (from any
/// worker, one at a time). Returns the first error any worker hit.
pub fn generate_on_workers(jobs: Vec<FeatureJob>, workers: usize, ctx: Arc<WorkerContext>, sink: Sink) -> Result<()> {
    let jobs = Arc::new(jobs);
    let error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let err = error.clone();
    let guards = timely::execute(timely::Config::process(workers.max(1)), move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let mut input = InputHandle::new();
        let probe = ProbeHandle::new();
        let (ctx, err, sink) = (ctx.clone(), err.clone(), sink.clone());
        let model = match (ctx.load)() {
            Ok(m) => Some(m),
            Err(e) => {
                err.lock().expect("error slot").get_or_insert(format!("{e:#}"));
                None
            }
        };
        worker.dataflow::<u64, _, _>(|scope| {
            let err_op = err.clone();
            let act_scope = scope;
            input
                .to_stream(scope)
                .unary_frontier(Exchange::new(|j: &FeatureJob| j.user as u64), "GenerateFeatures", move |_cap, info| {
                    let activator = act_scope.activator_for(info.address.clone());
                    let mut stash = Vec::new();
                    // Batches ready to run, in order, each with its capability: one runs per
                    // activation, so that its rows reach the sink (and the resumable log)
                    // before the next one starts.
                    let mut ready = VecDeque::new();
                    move |(input, frontier), output| {
                        input.for_each_stamp(|cap, data| {
                            if let Some(cap) = cap.retain_least(output.output_index()) {
                                stash.push((cap, data.flat_map(|d| d.drain(..)).collect::<Vec<FeatureJob>>()));
                            }
                        });
                        stash.retain_mut(|(cap, todo)| {
                            if frontier.less_equal(cap.time()) {
                                return true;
                            }
                            // Patterns first, then reasons, each in key order; a batch holds one kind.
                            todo.sort_by_key(|j| (j.item.is_some(), j.key));
                            let split = todo.partition_point(|j| j.item.is_none());
                            let (patterns, reasons) = todo.split_at(split);
                            for c in patterns.chunks(ctx.cfg.batch) {
                                ready.push_back((cap.clone(), c.to_vec(), ctx.cfg.max_new_tokens_pattern));
                            }
                            for c in reasons.chunks(ctx.cfg.batch) {
                                ready.push_back((cap.clone(), c.to_vec(), ctx.cfg.max_new_tokens_reason));
                            }
                            false
                        });
                        if let Some((cap, chunk, max_new_tokens)) = ready.pop_front() {
                            let failed = err_op.lock().expect("error slot").is_some();
                            match model.as_ref() {
                                Some(model) if !failed => {
                                    match run_batch(model, &ctx.prompts, &ctx.items, &chunk, &ctx.cfg, max_new_tokens) {
                                        Ok(outs) => output.session(&cap).give(
                                            chunk
                                                .into_iter()
                                                .zip(outs)
                                                .map(|(j, (t, p, n))| (j, t, p, n))
                                                .collect::<Vec<Generated>>(),
                                        ),
                                        Err(e) => {
                                            err_op.lock().expect("error slot").get_or_insert(format!("{e:#}"));
                                        }
                                    }
                                }
                                _ => ready.clear(),
                            }
                        }
                        if !ready.is_empty() {
                            activator.activate();
                        }
                    }
                })
                .container::<Vec<_>>()
                .inspect(move |batch: &Vec<Generated>| {
                    let mut sink = sink.lock().expect("sink lock");
                    if let Err(e) = (*sink)(batch.clone()) {
                        err.lock().expect("error slot").get_or_insert(format!("{e:#}"));
                    }
                })
                .probe_with(&probe);
        });
        for (i, job) in jobs.iter().enumerate() {
            if i % peers == index {
                input.send(job.clone());
            }
        }
        input.close();
        while worker.step() {}
    })
    .map_err(|e| anyhow!("starting {workers} timely workers: {e}"))?;
    for r in guards.join() {
        r.map_err(|e| anyhow!("a timely worker failed: {e}"))?;
    }
    let first = error.lock().expect("error slot").take();
    match first {
        Some(e) => Err(anyhow!(e)),
        None => Ok(()),
    }
}
