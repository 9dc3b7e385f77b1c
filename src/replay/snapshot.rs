//! Snapshots: `snapshots/epoch-<e>/` holds the state after epoch e: `patterns-p<k>.parquet`,
//! `reasons-p<k>.parquet` (the `curec features` schema, so the reward model reads a snapshot as
//! it reads a features directory), `history-p<k>.parquet` in [`PARTITIONS`] partitions by key,
//! `metrics.parquet`, the policy's weights, and `manifest.json`. Each state operator writes its
//! own partitions (or, with a worker count that does not divide the partition count, sends its
//! rows to worker 0 to merge) and reports its part through the dataflow; the snapshot operator
//! ([`super::snapshot_op`]) completes a snapshot once its input frontier has passed the epoch,
//! i.e. once every worker's part is in. The manifest is written last and atomically: a snapshot
//! without one is incomplete and ignored (and removed) on resume.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, UInt32Type};
use arrow_array::{ArrayRef, Float64Array, Int64Array, UInt32Array};
use arrow_schema::DataType;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::features::store::{kind_files, part_path, PARTITIONS};

use super::{EpochMetrics, IdMap, Reason, ReasonList, Shared, UserEntry};
use crate::data::prepared::{batch, column, read_parquet, write_parquet};
use crate::features::store;
use sha2::{Digest, Sha256};
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
pub fn to_prune(all: &[(u64, PathBuf)], keep: usize) -> Vec<PathBuf> {
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
    pub fn absorb(&mut self, o: Shard) {
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
pub fn part_of(key: u32) -> usize {
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
pub fn partition_ranges<T>(rows: &[T], key: impl Fn(&T) -> u32) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::with_capacity(PARTITIONS);
    let mut start = 0;
    for k in 0..PARTITIONS {
        let end = start + rows[start..].partition_point(|r| part_of(key(r)) == k);
        out.push(start..end);
        start = end;
    }
    out
}

pub fn write_history(path: &Path, rows: &[(u32, u32, u32, i64)]) -> Result<()> {
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

pub fn write_metrics(path: &Path, ms: &[EpochMetrics]) -> Result<()> {
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
            super::fold_reason(
                l,
                Reason { user: r.user, timestamp: r.timestamp, text: Shared::from(r.text.as_str()) },
                reasons_kept,
            );
        }
        s.items = lists.into_iter().map(|(i, l)| (i, Arc::new(l))).collect();
        Ok(s)
    }
}

/// The manifest of a complete snapshot.
pub fn manifest(dir: &Path) -> Result<Value> {
    crate::io::read_json(&dir.join(MANIFEST))
}

/// The short hash that names a run's identity in its manifests.
pub fn identity_hash(v: &Value) -> String {
    Sha256::digest(v.to_string().as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect()
}
