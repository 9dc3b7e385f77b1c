//! `curec bench replay`: throughput of the correction dataflow without the LLM: a synthetic log
//! (seeded users, items and times) through the source, both state operators, the stand-in
//! corrector and snapshots, on 1 and N workers in the same process.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use rand::Rng;
use serde_json::{json, Value};

use super::graph::{run_dataflow, CorrectorFactory, Initial, Topology};
use super::policy::Corrector;
use super::snapshot::{Board, State};
use super::source::key;
use super::standin::StandIn;
use super::Event;
use crate::rec::nn::rng_for;

pub struct BenchSpec {
    pub interactions: usize,
    pub users: usize,
    pub items: usize,
    pub slice: usize,
    pub snapshot_every: u64,
    pub cost_ns: u64,
    pub seed: u64,
}

/// The synthetic log, grouped into epochs of `slice` interactions.
pub fn synthetic(spec: &BenchSpec) -> Vec<(u64, Vec<Event>)> {
    let mut rng = rng_for(spec.seed, 0xbe7c, 0);
    let mut pos = vec![0usize; spec.users];
    let mut out: Vec<(u64, Vec<Event>)> = Vec::new();
    for n in 0..spec.interactions {
        let user = rng.random_range(0..spec.users as u32);
        let item = rng.random_range(0..spec.items as u32);
        let p = &mut pos[user as usize];
        *p += 1;
        let e = Event { key: key(user, *p), user, item, timestamp: n as i64, retract: false };
        let epoch = (n / spec.slice) as u64;
        match out.last_mut() {
            Some((t, v)) if *t == epoch => v.push(e),
            _ => out.push((epoch, vec![e])),
        }
    }
    out
}

/// One timed run on `workers` threads; snapshots go to a temporary directory.
pub fn run_once(spec: &BenchSpec, epochs: &[(u64, Vec<Event>)], workers: usize) -> Result<Value> {
    let dir = tempfile_dir()?;
    let order: Vec<u64> = epochs.iter().map(|(t, _)| *t).collect();
    let snaps: BTreeSet<u64> = order
        .iter()
        .enumerate()
        .filter(|(i, _)| (*i as u64 + 1).is_multiple_of(spec.snapshot_every) || *i + 1 == order.len())
        .map(|(_, t)| *t)
        .collect();
    let n_snaps = snaps.len();
    let board = Arc::new(Board::new(
        dir.clone(),
        workers,
        snaps,
        json!({"bench": true}),
        (0..spec.users).map(|u| u.to_string()).collect(),
        (0..spec.items).map(|i| i.to_string()).collect(),
        json!({}),
        Vec::new(),
        Box::new(|_, _| {}),
    ));
    let initial = Arc::new(Initial {
        state: State::default(),
        history_kept: 10,
        reasons_kept: 20,
        freeze: false,
        attach_reasons: false,
        single_policy: false,
    });
    let (cost, seed) = (Duration::from_nanos(spec.cost_ns), spec.seed);
    let factory: CorrectorFactory =
        Arc::new(move |_, _| -> Result<Option<Box<dyn Corrector>>> { Ok(Some(Box::new(StandIn::new(cost, seed)))) });
    let out = run_dataflow(epochs.to_vec(), initial, factory, board, &Topology::threads(workers))?;
    let _ = std::fs::remove_dir_all(&dir);
    let per_s = spec.interactions as f64 / out.seconds;
    Ok(json!({
        "workers": workers,
        "seconds": out.seconds,
        "interactions_per_s": per_s,
        "interactions_per_s_per_worker": per_s / workers as f64,
        "snapshots": n_snaps,
    }))
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let d = std::env::temp_dir().join(format!("curec-bench-replay-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// 1 worker, then `workers`, on the same log; the JSON line carries both and their ratio.
pub fn replay_throughput(spec: &BenchSpec, workers: usize) -> Result<Value> {
    let epochs = synthetic(spec);
    // Warm-up (allocator, page faults) outside the timing.
    let small = BenchSpec { interactions: spec.interactions.min(20_000), ..*spec };
    run_once(&small, &synthetic(&small), 1)?;
    let one = run_once(spec, &epochs, 1)?;
    let many = if workers > 1 { Some(run_once(spec, &epochs, workers)?) } else { None };
    let speedup = many.as_ref().map(|m| one["seconds"].as_f64().unwrap_or(0.0) / m["seconds"].as_f64().unwrap_or(1.0));
    Ok(json!({
        "bench": "replay-dataflow",
        "interactions": spec.interactions,
        "users": spec.users,
        "items": spec.items,
        "slice": spec.slice,
        "epochs": epochs.len(),
        "snapshot_every": spec.snapshot_every,
        "standin_cost_ns": spec.cost_ns,
        "one_worker": one,
        "n_workers": many,
        "speedup": speedup,
    }))
}
