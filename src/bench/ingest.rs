//! `curec bench ingest`: what ingesting a few interactions into the state of a large replay
//! costs, against replaying it. The synthetic log of `curec bench replay` is replayed into a
//! temporary run (timed inside the dataflow, as there), then batches of new interactions (known
//! users and items, later times, seeded) go in two ways:
//!
//! - **one-shot** (`curec ingest`'s path, in process): open the run's newest snapshot (the log's
//!   dedup keys of the batch's users, the whole state), run the batch, write a snapshot, stop;
//! - **resident** (`curec serve`'s path): a session opened once (every user's dedup keys, the
//!   state, the workers), then each batch is admitted, recorded and run through the operators
//!   that stay up; a checkpoint (snapshot) at the end, timed on its own.
//!
//! The JSON line has every timing and the ratios `replay / batch` (the target is ≥ 100).

use std::path::Path;

use anyhow::Result;
use rand::Rng;
use serde_json::{json, Value};

use crate::bench::replay::{run_once, synthetic, tempfile_dir, BenchSpec};
use crate::pipeline::session::{Rows, Session};
use crate::replay::graph::Topology;
use crate::replay::ingest_log::NewRow;
use crate::rng::rng_for;

/// Batch `b` of `n` new interactions: seeded known users and items, times after the log's.
pub fn new_rows(spec: &BenchSpec, b: usize, n: usize) -> Vec<NewRow> {
    let mut rng = rng_for(spec.seed, 0x1a9e57, b as u64);
    (0..n)
        .map(|k| NewRow {
            user: rng.random_range(0..spec.users).to_string(),
            item: rng.random_range(0..spec.items).to_string(),
            timestamp: (spec.interactions + b * n + k) as i64,
            rating: 5.0,
            retract: false,
        })
        .collect()
}

fn write_csv(path: &Path, rows: &[NewRow]) -> Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(["user", "item", "timestamp", "rating"])?;
    for r in rows {
        w.write_record([r.user.as_str(), r.item.as_str(), &r.timestamp.to_string(), &r.rating.to_string()])?;
    }
    w.flush()?;
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

/// Replay the synthetic log into a temporary directory (removed afterwards), then time `batches`
/// batches of `new` interactions one-shot and resident, on `workers` threads.
pub fn ingest_cost(spec: &BenchSpec, new: usize, batches: usize, workers: usize) -> Result<Value> {
    let dir = tempfile_dir("ingest")?;
    let v = ingest_cost_in(spec, new, batches, workers, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    v
}

fn ingest_cost_in(spec: &BenchSpec, new: usize, batches: usize, workers: usize, dir: &Path) -> Result<Value> {
    let epochs = synthetic(spec);
    let topology = Topology::threads(workers);
    // Warm-up (allocator, page faults) outside the timing, as `curec bench replay` does.
    let small = BenchSpec { interactions: spec.interactions.min(20_000), ..*spec };
    run_once(&small, &synthetic(&small), &topology, None)?;
    let run = dir.join("run");
    let replay = run_once(spec, &epochs, &topology, Some(&run))?;
    let replay_s = replay["seconds"].as_f64().unwrap_or(0.0);
    drop(epochs);

    // One-shot: each batch into its own copy of the run, as `curec ingest --from <copy>`.
    let mut one_shot = Vec::new();
    for b in 0..batches {
        let copy = dir.join(format!("one-shot-{b}"));
        crate::io::copy_dir(&run, &copy)?;
        let file = dir.join(format!("batch-{b}.csv"));
        write_csv(&file, &new_rows(spec, b, new))?;
        let t0 = std::time::Instant::now();
        let v = crate::pipeline::session::ingest(&copy, &file, Some(workers), false)?;
        one_shot.push(t0.elapsed().as_secs_f64());
        anyhow::ensure!(v["interactions"].as_u64() == Some(new as u64), "one-shot batch {b}: {v}");
        std::fs::remove_dir_all(&copy)?;
    }

    // Resident: one session, the batches one after the other, then a checkpoint.
    let t0 = std::time::Instant::now();
    let mut session = Session::open_resident(&run, Some(workers))?;
    let open_s = t0.elapsed().as_secs_f64();
    let mut resident = Vec::new();
    let mut in_operators = Vec::new();
    for b in 0..batches {
        let rows = new_rows(spec, b, new);
        let t0 = std::time::Instant::now();
        let v = session.ingest(Rows { rows, info: Default::default() }, false)?;
        resident.push(t0.elapsed().as_secs_f64());
        in_operators.push(v["dataflow_seconds"].as_f64().unwrap_or(0.0));
        anyhow::ensure!(v["interactions"].as_u64() == Some(new as u64), "resident batch {b}: {v}");
    }
    let t0 = std::time::Instant::now();
    let snapshot = session.checkpoint()?;
    let checkpoint_s = t0.elapsed().as_secs_f64();
    session.close()?;
    let (one, res) = (median(&one_shot), median(&resident));
    Ok(json!({
        "bench": "ingest-cost",
        "interactions": spec.interactions,
        "users": spec.users,
        "items": spec.items,
        "new": new,
        "batches": batches,
        "workers": workers,
        "replay_seconds": replay_s,
        "one_shot_seconds": one_shot,
        "resident_open_seconds": open_s,
        "resident_seconds": resident,
        "resident_dataflow_seconds": in_operators,
        "checkpoint_seconds": checkpoint_s,
        "replay_over_one_shot": replay_s / one,
        "replay_over_resident": replay_s / res,
        "snapshot": snapshot.display().to_string(),
    }))
}
