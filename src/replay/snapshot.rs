//! Snapshots: `snapshots/epoch-<e>/` holds the state after epoch e: `patterns-p<k>.parquet`,
//! `reasons-p<k>.parquet` (the `curec features` schema, so the reward model reads a snapshot as
//! it reads a features directory), `history-p<k>.parquet` in [`PARTITIONS`] partitions by key,
//! `metrics.parquet`, the policy's weights, and `manifest.json`. Each state operator writes its
//! own partitions (or, with a worker count that does not divide the partition count, hands its
//! rows to the [`Board`] to merge); the last part in writes the metrics and the manifest. The manifest is written last and atomically:
//! a snapshot without one is incomplete and ignored (and removed) on resume.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, UInt32Type};
use arrow_array::{ArrayRef, Float64Array, Int64Array, UInt32Array};
use arrow_schema::DataType;
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

/// One worker's part of the state, handed to the [`Board`] (texts shared, not copied).
#[derive(Default)]
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

/// A state operator's contribution to a snapshot: its rows for the board to merge (when the
/// worker count does not divide [`PARTITIONS`]), or the counts of the rows it wrote itself.
#[derive(Default)]
pub struct Part {
    pub shard: Option<Shard>,
    pub patterns: usize,
    pub reasons: usize,
}

pub fn pattern_shard(users: &IdMap<UserEntry>) -> Shard {
    let mut sh = Shard { users: true, ..Default::default() };
    for (&u, e) in users {
        if let Some((ts, t)) = &e.pattern {
            sh.patterns.push((u, *ts, t.clone()));
        }
        sh.history.extend(e.history.iter().zip(&e.times).enumerate().map(|(p, (&i, &t))| (u, p as u32, i, t)));
    }
    sh
}

pub fn reason_shard(items: &IdMap<Arc<ReasonList>>) -> Shard {
    let mut sh = Shard { items: true, ..Default::default() };
    for (&i, l) in items {
        sh.reasons.extend(l.iter().map(|r| (i, r.timestamp, r.user, r.text.0.clone())));
    }
    sh
}

/// `rows` split into [`PARTITIONS`] lists by `key % PARTITIONS`, in their order.
fn by_partition<T: Clone>(rows: &[T], key: impl Fn(&T) -> u32) -> Vec<Vec<T>> {
    let mut out = vec![Vec::new(); PARTITIONS];
    for r in rows {
        out[key(r) as usize % PARTITIONS].push(r.clone());
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

#[derive(Default)]
struct Inner {
    parts: BTreeMap<u64, usize>,
    shards: BTreeMap<u64, Shard>,
    counts: BTreeMap<u64, (usize, usize)>,
    partial: BTreeMap<u64, (usize, EpochMetrics)>,
    /// Seconds the corrector spent on each epoch (the slowest worker); not part of snapshots.
    seconds: BTreeMap<u64, f64>,
    done: Vec<EpochMetrics>,
    error: Option<String>,
    written: Vec<u64>,
}

/// Coordinates the workers' snapshot parts and collects the per-epoch metrics (in-process).
pub struct Board {
    root: PathBuf,
    peers: usize,
    snapshots: BTreeSet<u64>,
    /// Run identity for the manifests (config hash, seed, …).
    identity: Value,
    raw_users: Vec<String>,
    raw_items: Vec<String>,
    /// Keys added to every manifest (e.g. the id maps grown by ingestion).
    extra: Value,
    keep: usize,
    inner: Mutex<Inner>,
    on_epoch: EpochHook,
}

impl Board {
    /// `snapshots`: the epochs after which a snapshot is written; `done`: metrics of the epochs
    /// before (from the snapshot resumed from).
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
        let inner = Inner { done, ..Default::default() };
        Self {
            root,
            peers,
            snapshots,
            identity,
            raw_users,
            raw_items,
            extra,
            keep: 2,
            inner: Mutex::new(inner),
            on_epoch,
        }
    }

    pub fn pending_snapshots(&self) -> VecDeque<u64> {
        self.snapshots.iter().copied().collect()
    }

    pub fn is_snapshot(&self, e: u64) -> bool {
        self.snapshots.contains(&e)
    }

    pub fn shard_dir(&self, e: u64) -> Result<PathBuf> {
        let d = epoch_dir(&self.root, e);
        std::fs::create_dir_all(&d).with_context(|| format!("{}: cannot create", d.display()))?;
        Ok(d)
    }

    pub fn failed(&self) -> bool {
        self.inner.lock().expect("board lock").error.is_some()
    }

    pub fn fail(&self, e: String) {
        self.inner.lock().expect("board lock").error.get_or_insert(e);
    }

    pub fn error(&self) -> Option<String> {
        self.inner.lock().expect("board lock").error.clone()
    }

    /// All finished epochs' metrics, in epoch order.
    pub fn metrics(&self) -> Vec<EpochMetrics> {
        self.inner.lock().expect("board lock").done.clone()
    }

    /// Snapshots completed in this run.
    pub fn written(&self) -> Vec<u64> {
        self.inner.lock().expect("board lock").written.clone()
    }

    /// One policy instance's metrics for an epoch and the seconds it spent on it; the sum is
    /// final once every worker reported.
    pub fn report_metrics(&self, m: EpochMetrics, seconds: f64) {
        let finished = {
            let mut g = self.inner.lock().expect("board lock");
            let s = g.seconds.entry(m.epoch).or_default();
            *s = s.max(seconds);
            let slot =
                g.partial.entry(m.epoch).or_insert_with(|| (0, EpochMetrics { epoch: m.epoch, ..Default::default() }));
            slot.0 += 1;
            slot.1.merge(&m);
            if slot.0 == self.peers {
                let (_, total) = g.partial.remove(&m.epoch).expect("present");
                g.done.push(total.clone());
                Some((total, g.seconds[&m.epoch]))
            } else {
                None
            }
        };
        if let Some((t, secs)) = finished {
            (self.on_epoch)(&t, secs);
        }
    }

    /// Seconds spent on each epoch of this run.
    pub fn epoch_seconds(&self) -> BTreeMap<u64, f64> {
        self.inner.lock().expect("board lock").seconds.clone()
    }

    /// Whether workers write their own partitions (the worker count divides [`PARTITIONS`]).
    pub fn direct(&self) -> bool {
        PARTITIONS.is_multiple_of(self.peers)
    }

    /// A state operator's part of snapshot `e`: in direct mode it writes the partitions worker
    /// `index` owns (patterns and history, or reasons), else it hands the rows over.
    pub fn part(&self, e: u64, shard: Shard, index: usize) -> Result<Part> {
        if !self.direct() {
            return Ok(Part { shard: Some(shard), ..Default::default() });
        }
        let dir = self.shard_dir(e)?;
        let owned: Vec<usize> = (0..PARTITIONS).filter(|k| k % self.peers == index).collect();
        self.write_partitions(&dir, shard, &owned)
    }

    /// Write partitions `owned` of the kinds `shard` holds (users: patterns and history; items:
    /// reasons), sorted by key.
    fn write_partitions(&self, dir: &Path, mut sh: Shard, owned: &[usize]) -> Result<Part> {
        sh.patterns.sort_by_key(|r| r.0);
        sh.reasons.sort_by_key(|r| (r.0, r.1, r.2));
        sh.history.sort_unstable();
        // One pass per kind puts every row in its partition (rows stay sorted within each).
        let pats = by_partition(&sh.patterns, |r| r.0);
        let hist = by_partition(&sh.history, |r| r.0);
        let rs = by_partition(&sh.reasons, |r| r.0);
        for &k in owned {
            if sh.users {
                let raw = &self.raw_users;
                store::write_pattern_columns(&part_path(dir, "patterns", k), &pats[k], |r| (r.0, r.1, &*r.2), raw)?;
                write_history(&part_path(dir, "history", k), &hist[k])?;
            }
            if sh.items {
                let raw = &self.raw_items;
                store::write_reason_columns(&part_path(dir, "reasons", k), &rs[k], |r| (r.2, r.0, r.1, &*r.3), raw)?;
            }
        }
        Ok(Part { shard: None, patterns: sh.patterns.len(), reasons: sh.reasons.len() })
    }

    /// One part of snapshot `e` is written (or failed); the last part completes the snapshot.
    pub fn report_part(&self, e: u64, r: Result<Part>) {
        let part = match r {
            Ok(s) => s,
            Err(err) => {
                self.fail(format!("snapshot after epoch {e}: {err:#}"));
                return;
            }
        };
        let last = {
            let mut g = self.inner.lock().expect("board lock");
            if let Some(sh) = part.shard {
                g.shards.entry(e).or_default().absorb(sh);
            }
            let c = g.counts.entry(e).or_default();
            c.0 += part.patterns;
            c.1 += part.reasons;
            let n = g.parts.entry(e).or_default();
            *n += 1;
            *n == 3 * self.peers
        };
        if last && !self.failed() {
            if let Err(err) = self.finish(e) {
                self.fail(format!("snapshot after epoch {e}: {err:#}"));
            }
        }
    }

    fn finish(&self, e: u64) -> Result<()> {
        let dir = self.shard_dir(e)?;
        let (merged, counts) = {
            let mut g = self.inner.lock().expect("board lock");
            (g.shards.remove(&e), g.counts.remove(&e).unwrap_or_default())
        };
        let (patterns, reasons) = match merged {
            Some(mut sh) if !self.direct() => {
                let all: Vec<usize> = (0..PARTITIONS).collect();
                sh.users = true;
                sh.items = true;
                let part = self.write_partitions(&dir, sh, &all)?;
                (part.patterns, part.reasons)
            }
            _ => counts,
        };
        let (metrics, interactions) = {
            let g = self.inner.lock().expect("board lock");
            let ms: Vec<EpochMetrics> = g.done.iter().filter(|m| m.epoch <= e).cloned().collect();
            let n: u64 = ms.iter().map(|m| m.interactions).sum();
            (ms, n)
        };
        write_metrics(&dir.join(METRICS), &metrics)?;
        let mut manifest = json!({
            "epoch": e,
            "watermark": e,
            "interactions": interactions,
            "patterns": patterns,
            "reasons": reasons,
            "users": self.raw_users.len(),
            "items": self.raw_items.len(),
            "identity": self.identity,
        });
        if let (Some(m), Some(x)) = (manifest.as_object_mut(), self.extra.as_object()) {
            m.extend(x.clone());
        }
        crate::jobs::write_json(&dir.join(MANIFEST), &manifest)?;
        self.inner.lock().expect("board lock").written.push(e);
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
