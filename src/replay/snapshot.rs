//! Snapshots: `snapshots/epoch-<e>/` holds the state after epoch e: `patterns-p<k>.parquet`,
//! `reasons-p<k>.parquet` (the `curec features` schema, so the reward model reads a snapshot as
//! it reads a features directory), `history-p<k>.parquet` in [`PARTITIONS`] partitions by key,
//! `metrics.parquet`, the policy's weights, and `manifest.json`. Each state operator writes its
//! own partitions (or, with a worker count that does not divide the partition count, sends its
//! rows to worker 0 to merge) and reports its part through the dataflow; the snapshot operator
//! ([`super::snapshot_op`]) completes a snapshot once its input frontier has passed the epoch,
//! i.e. once every worker's part is in. The manifest is written last and atomically: a snapshot
//! without one is incomplete and ignored (and removed) on resume.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, UInt32Type};
use arrow_array::{ArrayRef, Float64Array, Int64Array, UInt32Array};
use arrow_schema::DataType;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use crate::features::store::{kind_files, part_path, PARTITIONS};

use super::policy::EpochMetrics;
use super::user_state::UserEntry;
use super::{IdMap, Reason, ReasonList, Shared};
use crate::data::prepared::{batch, column, read_parquet, write_parquet};
use crate::features::store;

/// Called once per finished epoch with its metrics and the seconds the corrector spent on it.
pub type EpochHook = Box<dyn Fn(&EpochMetrics, f64) + Send + Sync>;

pub const MANIFEST: &str = "manifest.json";
pub const HISTORY: &str = "history.parquet";
pub const METRICS: &str = "metrics.parquet";
pub const POLICY: &str = "policy";

pub fn epoch_dir(root: &Path, e: u64) -> PathBuf {
    root.join(format!("epoch-{e:08}"))
}

/// Whether `dir` holds a readable manifest (written last, so the snapshot is whole).
fn is_complete(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file() && manifest(dir).is_ok_and(|m| m.is_object())
}

/// Complete snapshots under `root` (those with a readable manifest), oldest first.
pub fn complete(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let epoch = name.strip_prefix("epoch-")?.parse::<u64>().ok()?;
            is_complete(&e.path()).then(|| (epoch, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest complete snapshot; incomplete ones (a killed run's, or one whose manifest is
/// torn) are removed, the torn ones with a warning naming the snapshot fallen back to.
pub fn newest(root: &Path) -> Option<(u64, PathBuf)> {
    let mut torn = Vec::new();
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("epoch-") && !is_complete(&e.path()) {
            if e.path().join(MANIFEST).is_file() {
                torn.push(e.path());
            }
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let found = complete(root).pop();
    for t in torn {
        tracing::warn!(
            "{}: unreadable manifest, snapshot removed; falling back to {}",
            t.display(),
            found.as_ref().map_or("none".to_string(), |(_, d)| d.display().to_string())
        );
    }
    found
}

/// Snapshots to delete after a new one: all but the newest `keep` and the replay's own final
/// snapshot (the newest one not written by an ingest, which records `grown` in its manifest).
fn to_prune(all: &[(u64, PathBuf)], keep: usize) -> Vec<PathBuf> {
    let pinned = all.iter().rev().find(|(_, d)| manifest(d).is_ok_and(|m| m.get("grown").is_none())).map(|(e, _)| *e);
    let old = all.len().saturating_sub(keep);
    all[..old].iter().filter(|(e, _)| Some(*e) != pinned).map(|(_, d)| d.clone()).collect()
}

/// One worker's part of the state (texts shared, not copied, within a process).
#[derive(Default, Clone, Serialize, Deserialize)]
pub struct Shard {
    /// (user, timestamp, text)
    pub patterns: Vec<(u32, i64, Arc<str>)>,
    /// (user, position, item, timestamp)
    pub history: Vec<(u32, u32, u32, i64)>,
    /// (item, timestamp, user, text), each item's list in order.
    pub reasons: Vec<(u32, i64, u32, Arc<str>)>,
    /// Which kinds it holds: user state (patterns, history) and/or item state (reasons).
    pub users: bool,
    pub items: bool,
}

impl Shard {
    fn absorb(&mut self, o: Shard) {
        self.users |= o.users;
        self.items |= o.items;
        self.patterns.extend(o.patterns);
        self.history.extend(o.history);
        self.reasons.extend(o.reasons);
    }
}

/// A state operator's contribution to a snapshot: its rows for worker 0 to merge (when the
/// worker count does not divide [`PARTITIONS`]), or the counts of the rows it wrote itself.
#[derive(Default, Clone, Serialize, Deserialize)]
pub struct Part {
    pub shard: Option<Shard>,
    pub patterns: usize,
    pub reasons: usize,
}

/// The partition of a user's or an item's rows.
fn part_of(key: u32) -> usize {
    key as usize % PARTITIONS
}

/// The keys of `map` in the order the snapshot writes them: by partition, then by key.
fn write_order<V>(map: &IdMap<V>, keep: &dyn Fn(u32) -> bool) -> Vec<u32> {
    let mut keys: Vec<u32> = map.keys().copied().filter(|&k| keep(k)).collect();
    keys.sort_unstable_by_key(|&k| (part_of(k), k));
    keys
}

/// The user state's rows (of the users `keep` accepts), in write order (so that sorting them
/// again costs one pass).
pub fn pattern_shard(users: &IdMap<UserEntry>, keep: &dyn Fn(u32) -> bool) -> Shard {
    let mut sh = Shard { users: true, ..Default::default() };
    for u in write_order(users, keep) {
        let e = &users[&u];
        if let Some((ts, t)) = &e.pattern {
            sh.patterns.push((u, *ts, t.clone()));
        }
        sh.history.extend(e.history.iter().zip(&e.times).enumerate().map(|(p, (&i, &t))| (u, p as u32, i, t)));
    }
    sh
}

/// The item state's rows (of the items `keep` accepts), in write order: each item's list by
/// (timestamp, user), ties in list order.
pub fn reason_shard(items: &IdMap<Arc<ReasonList>>, keep: &dyn Fn(u32) -> bool) -> Shard {
    let mut sh = Shard { items: true, ..Default::default() };
    for i in write_order(items, keep) {
        let at = sh.reasons.len();
        sh.reasons.extend(items[&i].iter().map(|r| (i, r.timestamp, r.user, r.text.0.clone())));
        sh.reasons[at..].sort_by_key(|r| (r.1, r.2));
    }
    sh
}

/// Where each partition's rows are in `rows` (sorted by partition): [`PARTITIONS`] ranges.
fn partition_ranges<T>(rows: &[T], key: impl Fn(&T) -> u32) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::with_capacity(PARTITIONS);
    let mut start = 0;
    for k in 0..PARTITIONS {
        let end = start + rows[start..].partition_point(|r| part_of(key(r)) == k);
        out.push(start..end);
        start = end;
    }
    out
}

fn write_history(path: &Path, rows: &[(u32, u32, u32, i64)]) -> Result<()> {
    let col = |f: fn(&(u32, u32, u32, i64)) -> u32| -> ArrayRef {
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(f)))
    };
    Ok(write_parquet(
        path,
        &batch(
            vec![
                ("user", DataType::UInt32),
                ("position", DataType::UInt32),
                ("item", DataType::UInt32),
                ("timestamp", DataType::Int64),
            ],
            vec![
                col(|r| r.0),
                col(|r| r.1),
                col(|r| r.2),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.3))),
            ],
        ),
    )?)
}

/// History rows; snapshots written before event-time histories have no timestamp column, and
/// their items count as older than anything that arrives later (i64::MIN).
fn read_history(path: &Path) -> Result<Vec<(u32, u32, u32, i64)>> {
    let b = read_parquet(path)?;
    let u = column(path, &b, "user", DataType::UInt32)?.as_primitive::<UInt32Type>();
    let p = column(path, &b, "position", DataType::UInt32)?.as_primitive::<UInt32Type>();
    let i = column(path, &b, "item", DataType::UInt32)?.as_primitive::<UInt32Type>();
    let t = match b.column_by_name("timestamp") {
        Some(_) => Some(column(path, &b, "timestamp", DataType::Int64)?.as_primitive::<Int64Type>()),
        None => None,
    };
    Ok((0..b.num_rows()).map(|r| (u.value(r), p.value(r), i.value(r), t.map_or(i64::MIN, |t| t.value(r)))).collect())
}

fn write_metrics(path: &Path, ms: &[EpochMetrics]) -> Result<()> {
    let i = |f: fn(&EpochMetrics) -> u64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(ms.iter().map(|m| f(m) as i64)))
    };
    let f = |f: fn(&EpochMetrics) -> f64| -> ArrayRef { Arc::new(Float64Array::from_iter_values(ms.iter().map(f))) };
    let names = [
        "epoch",
        "interactions",
        "patterns_written",
        "reasons_written",
        "unparsed",
        "groups",
        "zero_variance_groups",
        "reward_count",
        "kl_count",
        "generated_tokens",
    ];
    let mut fields: Vec<(&str, DataType)> = names.iter().map(|n| (*n, DataType::Int64)).collect();
    let mut cols = vec![
        i(|m| m.epoch),
        i(|m| m.interactions),
        i(|m| m.patterns_written),
        i(|m| m.reasons_written),
        i(|m| m.unparsed),
        i(|m| m.groups),
        i(|m| m.zero_variance_groups),
        i(|m| m.reward_count),
        i(|m| m.kl_count),
        i(|m| m.generated_tokens),
    ];
    for (n, c) in [("reward_sum", f(|m| m.reward_sum)), ("kl_sum", f(|m| m.kl_sum)), ("loss", f(|m| m.loss))] {
        fields.push((n, DataType::Float64));
        cols.push(c);
    }
    Ok(write_parquet(path, &batch(fields, cols))?)
}

pub fn read_metrics(path: &Path) -> Result<Vec<EpochMetrics>> {
    let b = read_parquet(path)?;
    let i = |n: &str| -> Result<Vec<u64>> {
        let c = column(path, &b, n, DataType::Int64)?.as_primitive::<Int64Type>();
        Ok((0..b.num_rows()).map(|r| c.value(r) as u64).collect())
    };
    let f = |n: &str| -> Result<Vec<f64>> {
        let c = column(path, &b, n, DataType::Float64)?.as_primitive::<Float64Type>();
        Ok((0..b.num_rows()).map(|r| c.value(r)).collect())
    };
    let (ep, it, pw, rw, un, gr, zv, rc, kc, gt) = (
        i("epoch")?,
        i("interactions")?,
        i("patterns_written")?,
        i("reasons_written")?,
        i("unparsed")?,
        i("groups")?,
        i("zero_variance_groups")?,
        i("reward_count")?,
        i("kl_count")?,
        i("generated_tokens")?,
    );
    let (rs, ks, lo) = (f("reward_sum")?, f("kl_sum")?, f("loss")?);
    Ok((0..b.num_rows())
        .map(|r| EpochMetrics {
            epoch: ep[r],
            interactions: it[r],
            patterns_written: pw[r],
            reasons_written: rw[r],
            unparsed: un[r],
            groups: gr[r],
            zero_variance_groups: zv[r],
            reward_sum: rs[r],
            reward_count: rc[r],
            kl_sum: ks[r],
            kl_count: kc[r],
            loss: lo[r],
            generated_tokens: gt[r],
        })
        .collect())
}

/// The state held in a snapshot (or built from features for a first run).
#[derive(Debug, Clone, Default)]
pub struct State {
    pub users: IdMap<UserEntry>,
    pub items: IdMap<Arc<ReasonList>>,
}

impl State {
    /// Read `patterns.parquet`, `reasons.parquet` and (if present) `history.parquet` from `dir`.
    pub fn load(dir: &Path, reasons_kept: usize) -> Result<State> {
        let mut s = State::default();
        for p in store::read_patterns_in(dir)? {
            let e = s.users.entry(p.user).or_default();
            if e.pattern.as_ref().is_none_or(|(ts, _)| *ts <= p.timestamp) {
                e.pattern = Some((p.timestamp, Arc::from(p.text.as_str())));
            }
        }
        let mut hist = Vec::new();
        for h in kind_files(dir, "history") {
            hist.extend(read_history(&h)?);
        }
        hist.sort_unstable();
        for (u, _, i, t) in hist {
            let e = s.users.entry(u).or_default();
            e.history.push(i);
            e.times.push(t);
        }
        let mut lists: IdMap<ReasonList> = IdMap::default();
        for r in store::read_reasons_in(dir)? {
            let l = lists.entry(r.item).or_default();
            super::item_state::fold_reason(
                l,
                Reason { user: r.user, timestamp: r.timestamp, text: Shared::from(r.text.as_str()) },
                reasons_kept,
            );
        }
        s.items = lists.into_iter().map(|(i, l)| (i, Arc::new(l))).collect();
        Ok(s)
    }
}

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
        crate::jobs::write_json(&dir.join(MANIFEST), &manifest)?;
        for d in to_prune(&complete(&self.root), self.keep) {
            let _ = std::fs::remove_dir_all(d);
        }
        Ok(())
    }
}

/// The manifest of a complete snapshot.
pub fn manifest(dir: &Path) -> Result<Value> {
    crate::jobs::read_json(&dir.join(MANIFEST))
}
