//! `curec bench replay`: throughput of the correction dataflow without the LLM: a synthetic log
//! (seeded users, items and times) through the source, both state operators, the stand-in
//! corrector and snapshots, on the workers of a [`Topology`] (threads, and timely processes).
//!
//! Without `--out` (one process) the same log also runs on 1 worker first, as the baseline of the
//! speed-up. With `--out` it runs once, on the topology given, and leaves a run directory that
//! `curec ingest --from` accepts: `data/` (the synthetic log as a prepared dataset, every
//! interaction in the train split), `snapshots/` (every `snapshot_every` epochs and the last),
//! `bench.json` (this line). The manifests name the stand-in as the run's corrector, so an ingest
//! into it runs the same stand-in. Snapshot files depend on the workers over all processes only:
//! 2 processes of 1 worker and 1 process of 2 workers write the same bytes.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use rand::Rng;
use serde_json::{json, Value};

use crate::config::JobConfig;
use crate::data::dataset::Split;
use crate::data::preprocess::{Interaction, ItemRow, PrepareConfig, Prepared};
use crate::data::{prepared, ItemInfo};
use crate::replay::board::Board;
use crate::replay::graph::{run_dataflow, Initial, Topology};
use crate::replay::snapshot::State;
use crate::replay::source::key;
use crate::replay::standin::{standin_factory, HISTORY_KEPT, REASONS_KEPT, STANDIN};
use crate::replay::{Event, ReplayConfig};
use crate::rng::rng_for;
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

/// The synthetic log as a prepared dataset in `dir` (every interaction in the train split, ratings
/// of 5, items titled by their id), so that `curec ingest` can check new rows against it.
pub fn write_data(dir: &Path, spec: &BenchSpec, epochs: &[(u64, Vec<Event>)]) -> Result<()> {
    let users: Vec<String> = (0..spec.users).map(|u| u.to_string()).collect();
    let items: Vec<ItemRow> = (0..spec.items)
        .map(|i| ItemRow {
            raw_id: i.to_string(),
            info: ItemInfo { title: format!("item {i}"), text: format!("synthetic item {i}") },
        })
        .collect();
    let mut xs: Vec<Interaction> = epochs
        .iter()
        .flat_map(|(_, es)| es.iter())
        .map(|e| Interaction { user: e.user, item: e.item, timestamp: e.timestamp, rating: 5.0, split: Split::Train })
        .collect();
    // Grouped by user, each user's interactions in time order (as `curec prepare` writes them).
    xs.sort_by_key(|x| (x.user, x.timestamp));
    let n = xs.len();
    let p = Prepared { users, items, interactions: xs, counts: Default::default() };
    let stats = json!({
        "dataset": "bench-replay",
        "config": PrepareConfig::default(),
        "interactions": n,
        "bench": {"interactions": spec.interactions, "users": spec.users, "items": spec.items, "seed": spec.seed},
    });
    prepared::write_dir(dir, &p, None, &stats)?;
    Ok(())
}

/// The identity a bench run's manifests carry: what `curec ingest` needs to continue it with the
/// same stand-in. The prepared log is `data/` in the run directory (so the manifests do not
/// depend on where the run is).
pub fn identity(spec: &BenchSpec) -> Value {
    let replay = ReplayConfig {
        slice: spec.slice as u64,
        snapshot_every: spec.snapshot_every,
        history_kept: HISTORY_KEPT,
        reasons_kept: REASONS_KEPT,
        standin_cost_ns: spec.cost_ns,
        workers: 0,
        ..Default::default()
    };
    let defaults = JobConfig::default();
    let config = json!({
        "corrector": STANDIN,
        "replay": replay,
        "features": defaults.features,
        "grpo": defaults.grpo,
        "lora": defaults.lora,
        "model": STANDIN,
        "adapter": null,
        "reward_model": null,
        "data": "data",
        "seed": spec.seed,
        "bench": {"interactions": spec.interactions, "users": spec.users, "items": spec.items},
    });
    json!({"hash": crate::replay::snapshot::identity_hash(&config), "config": config})
}

/// One timed run on the workers of `topology`. Snapshots go into `out` (a run directory, see the
/// module docs) or into a temporary directory removed afterwards.
pub fn run_once(
    spec: &BenchSpec,
    epochs: &[(u64, Vec<Event>)],
    topology: &Topology,
    out: Option<&Path>,
) -> Result<Value> {
    let (root, temporary) = match out {
        Some(o) => {
            let root = o.join("snapshots");
            if std::fs::read_dir(&root).is_ok_and(|mut d| d.next().is_some()) {
                bail!("{}: already holds a bench run; use a new --out or delete it", root.display());
            }
            if topology.is_first() {
                write_data(&o.join("data"), spec, epochs)?;
            }
            (root, false)
        }
        None => (tempfile_dir("replay")?, true),
    };
    let order: Vec<u64> = epochs.iter().map(|(t, _)| *t).collect();
    let snaps: BTreeSet<u64> = order
        .iter()
        .enumerate()
        .filter(|(i, _)| (*i as u64 + 1).is_multiple_of(spec.snapshot_every) || *i + 1 == order.len())
        .map(|(_, t)| *t)
        .collect();
    let n_snaps = snaps.len();
    let identity = identity(spec);
    let factory = standin_factory(&identity).expect("a bench identity names the stand-in");
    let board = Arc::new(Board::new(
        root.clone(),
        topology.peers(),
        snaps,
        identity,
        (0..spec.users).map(|u| u.to_string()).collect(),
        (0..spec.items).map(|i| i.to_string()).collect(),
        json!({}),
        Vec::new(),
        Box::new(|_, _| {}),
    ));
    let initial = Arc::new(Initial {
        state: State::default(),
        history_kept: HISTORY_KEPT,
        reasons_kept: REASONS_KEPT,
        freeze: false,
        attach_reasons: false,
        single_policy: false,
    });
    let run = run_dataflow(epochs.to_vec(), initial, factory, board, topology);
    if temporary {
        let _ = std::fs::remove_dir_all(&root);
    }
    let run = run?;
    let per_s = spec.interactions as f64 / run.seconds;
    Ok(json!({
        "workers": topology.threads,
        "processes": topology.processes,
        "process": topology.process,
        "peers": topology.peers(),
        "seconds": run.seconds,
        "per_s": per_s,
        "per_worker_per_s": per_s / topology.peers() as f64,
        "snapshots": n_snaps,
    }))
}

/// A fresh directory under the system's temporary one, for `curec bench <what>`.
pub(super) fn tempfile_dir(what: &str) -> Result<std::path::PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let d = std::env::temp_dir().join(format!("curec-bench-{what}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// The bench's JSON line: the run on `topology` (its `per_worker_per_s` at the top level), and,
/// in one process without `out`, the same log on 1 worker first as the speed-up's baseline.
pub fn replay_throughput(spec: &BenchSpec, topology: &Topology, out: Option<&Path>) -> Result<Value> {
    let epochs = synthetic(spec);
    let baseline = out.is_none() && topology.processes == 1;
    if topology.processes == 1 {
        // Warm-up (allocator, page faults) outside the timing.
        let small = BenchSpec { interactions: spec.interactions.min(20_000), ..*spec };
        run_once(&small, &synthetic(&small), &Topology::threads(1), None)?;
    }
    let one = if baseline && topology.threads > 1 {
        Some(run_once(spec, &epochs, &Topology::threads(1), None)?)
    } else {
        None
    };
    let run = run_once(spec, &epochs, topology, out)?;
    let speedup = one.as_ref().map(|o| o["seconds"].as_f64().unwrap_or(0.0) / run["seconds"].as_f64().unwrap_or(1.0));
    let v = json!({
        "bench": "replay-dataflow",
        "interactions": spec.interactions,
        "users": spec.users,
        "items": spec.items,
        "slice": spec.slice,
        "epochs": epochs.len(),
        "snapshot_every": spec.snapshot_every,
        "standin_cost_ns": spec.cost_ns,
        "workers": topology.threads,
        "processes": topology.processes,
        "process": topology.process,
        "per_worker_per_s": run["per_worker_per_s"],
        "seconds": run["seconds"],
        "run": run,
        "one_worker": one,
        "speedup": speedup,
        "out": out.map(|o| o.display().to_string()),
    });
    if let Some(o) = out.filter(|_| topology.is_first()) {
        crate::io::write_json(&o.join("bench.json"), &v)?;
    }
    Ok(v)
}
