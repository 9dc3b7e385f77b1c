//! The snapshot board: what a snapshot holds and where it goes (the run's identity, the id maps,
//! the epochs to snapshot), the reports the operators send the snapshot operator through the
//! dataflow, and the completion of a snapshot once every part is in (the merge, the metrics,
//! then the manifest, last). The on-disk format itself is [`super::snapshot`].

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::snapshot::{
    complete, epoch_dir, part_of, part_path, partition_ranges, to_prune, write_history, write_metrics, Part, Shard,
    MANIFEST, METRICS, PARTITIONS,
};
use super::EpochMetrics;
use crate::features::store;

/// Called once per finished epoch with its metrics and the seconds the corrector spent on it.
pub type EpochHook = Box<dyn Fn(&EpochMetrics, f64) + Send + Sync>;

/// What the operators tell the snapshot operator ([`super::snapshot_op`]), through the dataflow.
#[derive(Clone, Serialize, Deserialize)]
pub enum Report {
    /// A state operator's or the policy's part of the snapshot after `epoch`.
    Part { epoch: u64, part: Part },
    /// One policy instance's metrics for an epoch, and the seconds it spent on it.
    Metrics { metrics: EpochMetrics, seconds: f64 },
    /// An operator failed at `epoch`: no snapshot is completed from there on.
    Failed { epoch: u64, error: String },
}

/// An operator's part of snapshot `e` as a report: the failure this worker had before, if any
/// (worker 0 must not complete the snapshot without the part), else the part `write` makes, or
/// its error (`what` names the step), which becomes this worker's failure.
pub fn part_report(
    e: u64,
    failure: &RefCell<Option<String>>,
    what: &str,
    write: impl FnOnce() -> Result<Part>,
) -> Report {
    if let Some(error) = failure.borrow().clone() {
        return Report::Failed { epoch: e, error };
    }
    match write() {
        Ok(part) => Report::Part { epoch: e, part },
        Err(err) => {
            let error = format!("{what} after epoch {e}: {err:#}");
            *failure.borrow_mut() = Some(error.clone());
            Report::Failed { epoch: e, error }
        }
    }
}

struct Names {
    raw_users: Vec<String>,
    raw_items: Vec<String>,
    extra: Value,
}

/// What a snapshot holds and where it goes: the run's identity, the id maps, the epochs to
/// snapshot and the metrics of the epochs before this run. Read-only: the workers' parts and
/// metrics reach the snapshot operator through the dataflow, not through this value.
pub struct Board {
    root: PathBuf,
    peers: usize,
    snapshots: BTreeSet<u64>,
    /// Run identity for the manifests (config hash, seed, …).
    identity: Value,
    /// The raw ids and the keys added to every manifest (e.g. the id maps grown by ingestion):
    /// they grow between the batches of a resident dataflow ([`Board::set_names`]).
    names: std::sync::RwLock<Names>,
    keep: usize,
    /// Metrics of the epochs before this run (from the snapshot resumed from).
    done: Vec<EpochMetrics>,
    on_epoch: EpochHook,
}

impl Board {
    /// `peers`: timely workers over all processes; `snapshots`: the epochs after which a
    /// snapshot is written; `done`: metrics of the epochs before (from the snapshot resumed from);
    /// `on_epoch`: called on worker 0 once per finished epoch, in epoch order.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        root: PathBuf,
        peers: usize,
        snapshots: BTreeSet<u64>,
        identity: Value,
        raw_users: Vec<String>,
        raw_items: Vec<String>,
        extra: Value,
        done: Vec<EpochMetrics>,
        on_epoch: EpochHook,
    ) -> Self {
        let names = std::sync::RwLock::new(Names { raw_users, raw_items, extra });
        Self { root, peers, snapshots, identity, names, keep: 2, done, on_epoch }
    }

    /// Raw ids added, and the new manifest keys, for the snapshots after the next batch (a
    /// resident dataflow grows them before feeding the batch that uses them).
    pub fn grow_names(&self, users: &[String], items: &[String], extra: Value) {
        let mut n = self.names.write().unwrap_or_else(|p| p.into_inner());
        n.raw_users.extend_from_slice(users);
        n.raw_items.extend_from_slice(items);
        n.extra = extra;
    }

    fn names(&self) -> std::sync::RwLockReadGuard<'_, Names> {
        self.names.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_snapshot(&self, e: u64) -> bool {
        self.snapshots.contains(&e)
    }

    pub fn peers(&self) -> usize {
        self.peers
    }

    pub fn done(&self) -> &[EpochMetrics] {
        &self.done
    }

    pub fn on_epoch(&self, m: &EpochMetrics, seconds: f64) {
        (self.on_epoch)(m, seconds)
    }

    pub fn shard_dir(&self, e: u64) -> Result<PathBuf> {
        let d = epoch_dir(&self.root, e);
        std::fs::create_dir_all(&d).with_context(|| format!("{}: cannot create", d.display()))?;
        Ok(d)
    }

    /// Whether workers write their own partitions (the worker count divides [`PARTITIONS`]).
    pub fn direct(&self) -> bool {
        PARTITIONS.is_multiple_of(self.peers)
    }

    /// A state operator's part of snapshot `e` (`shard` makes its rows of the keys a filter
    /// accepts): in direct mode it writes the partitions worker `index` owns (patterns and
    /// history, or reasons) one at a time, so that only one partition's rows are in memory at
    /// once; else it hands all its rows over.
    pub fn part(&self, e: u64, shard: impl Fn(&dyn Fn(u32) -> bool) -> Shard, index: usize) -> Result<Part> {
        if !self.direct() {
            return Ok(Part { shard: Some(shard(&|_| true)), ..Default::default() });
        }
        let dir = self.shard_dir(e)?;
        let mut total = Part::default();
        for k in (0..PARTITIONS).filter(|k| k % self.peers == index) {
            let p = self.write_partitions(&dir, shard(&|key| part_of(key) == k), &[k])?;
            total.patterns += p.patterns;
            total.reasons += p.reasons;
        }
        Ok(total)
    }

    /// Write partitions `owned` of the kinds `shard` holds (users: patterns and history; items:
    /// reasons), sorted by key.
    fn write_partitions(&self, dir: &Path, mut sh: Shard, owned: &[usize]) -> Result<Part> {
        // Sorted by partition, then by key: each partition is a run, its rows in key order (the
        // shards come in that order already, so these sorts are one pass each).
        sh.patterns.sort_by_key(|r| (part_of(r.0), r.0));
        sh.reasons.sort_by_key(|r| (part_of(r.0), r.0, r.1, r.2));
        sh.history.sort_unstable_by_key(|r| (part_of(r.0), *r));
        let pats = partition_ranges(&sh.patterns, |r| r.0);
        let hist = partition_ranges(&sh.history, |r| r.0);
        let rs = partition_ranges(&sh.reasons, |r| r.0);
        let names = self.names();
        for &k in owned {
            if sh.users {
                let raw = &names.raw_users;
                let rows = &sh.patterns[pats[k].clone()];
                store::write_pattern_columns(&part_path(dir, "patterns", k), rows, |r| (r.0, r.1, &*r.2), raw)?;
                write_history(&part_path(dir, "history", k), &sh.history[hist[k].clone()])?;
            }
            if sh.items {
                let raw = &names.raw_items;
                let rows = &sh.reasons[rs[k].clone()];
                store::write_reason_columns(&part_path(dir, "reasons", k), rows, |r| (r.2, r.0, r.1, &*r.3), raw)?;
            }
        }
        Ok(Part { shard: None, patterns: sh.patterns.len(), reasons: sh.reasons.len() })
    }

    /// Complete snapshot `e` once every part of it is in: the merged rows (when the workers did
    /// not write their own partitions) or the parts' counts, then the metrics of every epoch up
    /// to `e`, then the manifest (last, as the mark of a complete snapshot), then pruning.
    pub fn finish(&self, e: u64, parts: Vec<Part>, metrics: &[EpochMetrics]) -> Result<()> {
        let dir = self.shard_dir(e)?;
        let mut merged: Option<Shard> = None;
        let (mut patterns, mut reasons) = (0, 0);
        for p in parts {
            patterns += p.patterns;
            reasons += p.reasons;
            if let Some(sh) = p.shard {
                merged.get_or_insert_with(Shard::default).absorb(sh);
            }
        }
        if let Some(mut sh) = merged.filter(|_| !self.direct()) {
            let all: Vec<usize> = (0..PARTITIONS).collect();
            sh.users = true;
            sh.items = true;
            let part = self.write_partitions(&dir, sh, &all)?;
            (patterns, reasons) = (part.patterns, part.reasons);
        }
        let upto: Vec<EpochMetrics> = metrics.iter().filter(|m| m.epoch <= e).cloned().collect();
        let interactions: u64 = upto.iter().map(|m| m.interactions).sum();
        write_metrics(&dir.join(METRICS), &upto)?;
        let names = self.names();
        let mut manifest = json!({
            "epoch": e,
            "watermark": e,
            "interactions": interactions,
            "patterns": patterns,
            "reasons": reasons,
            "users": names.raw_users.len(),
            "items": names.raw_items.len(),
            "identity": self.identity,
        });
        if let (Some(m), Some(x)) = (manifest.as_object_mut(), names.extra.as_object()) {
            m.extend(x.clone());
        }
        crate::io::write_json(&dir.join(MANIFEST), &manifest)?;
        for d in to_prune(&complete(&self.root), self.keep) {
            let _ = std::fs::remove_dir_all(d);
        }
        Ok(())
    }
}
