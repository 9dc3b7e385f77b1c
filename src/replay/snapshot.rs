//! Snapshots: `snapshots/epoch-<e>/` holds the state after epoch e. Each state operator writes
//! its shard there, the policy its weights; the [`Board`] counts the parts, and the last part in
//! merges the shards into `patterns.parquet`, `reasons.parquet` (a features directory, so the
//! reward model reads a snapshot as it reads `curec features` output), `history.parquet` and
//! `metrics.parquet`, then writes `manifest.json`. The manifest is written last and atomically:
//! a snapshot without one is incomplete and ignored (and removed) on resume.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, UInt32Type};
use arrow_array::{ArrayRef, Float64Array, Int64Array, UInt32Array};
use arrow_schema::DataType;
use serde_json::{json, Value};

use super::policy::EpochMetrics;
use super::user_state::UserEntry;
use super::{Reason, Shared};
use crate::data::prepared::{batch, column, read_parquet, write_parquet};
use crate::features::store::{self, PatternRow, ReasonRow};

pub const MANIFEST: &str = "manifest.json";
pub const HISTORY: &str = "history.parquet";
pub const METRICS: &str = "metrics.parquet";
pub const POLICY: &str = "policy";

pub fn epoch_dir(root: &Path, e: u64) -> PathBuf {
    root.join(format!("epoch-{e:08}"))
}

/// Complete snapshots under `root` (those with a manifest), oldest first.
pub fn complete(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let epoch = name.strip_prefix("epoch-")?.parse::<u64>().ok()?;
            e.path().join(MANIFEST).is_file().then(|| (epoch, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The newest complete snapshot; incomplete ones (a killed run's) are removed.
pub fn newest(root: &Path) -> Option<(u64, PathBuf)> {
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with("epoch-") && !e.path().join(MANIFEST).is_file() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    complete(root).pop()
}

fn shard(dir: &Path, name: &str, worker: usize) -> PathBuf {
    dir.join(format!("{name}.w{worker}.parquet"))
}

pub fn write_pattern_shard(dir: &Path, worker: usize, users: &HashMap<u32, UserEntry>) -> Result<()> {
    let mut rows: Vec<PatternRow> = users
        .iter()
        .filter_map(|(&u, e)| {
            e.pattern.as_ref().map(|(ts, t)| PatternRow {
                user: u,
                timestamp: *ts,
                text: t.to_string(),
                parsed: true,
                tokens: 0,
            })
        })
        .collect();
    rows.sort_by_key(|r| r.user);
    Ok(store::write_patterns(&shard(dir, "patterns", worker), &rows, &[])?)
}

fn write_history(path: &Path, rows: &[(u32, u32, u32)]) -> Result<()> {
    let col = |f: fn(&(u32, u32, u32)) -> u32| -> ArrayRef { Arc::new(UInt32Array::from_iter_values(rows.iter().map(f))) };
    Ok(write_parquet(
        path,
        &batch(
            vec![("user", DataType::UInt32), ("position", DataType::UInt32), ("item", DataType::UInt32)],
            vec![col(|r| r.0), col(|r| r.1), col(|r| r.2)],
        ),
    )?)
}

fn read_history(path: &Path) -> Result<Vec<(u32, u32, u32)>> {
    let b = read_parquet(path)?;
    let u = column(path, &b, "user", DataType::UInt32)?.as_primitive::<UInt32Type>();
    let p = column(path, &b, "position", DataType::UInt32)?.as_primitive::<UInt32Type>();
    let i = column(path, &b, "item", DataType::UInt32)?.as_primitive::<UInt32Type>();
    Ok((0..b.num_rows()).map(|r| (u.value(r), p.value(r), i.value(r))).collect())
}

pub fn write_history_shard(dir: &Path, worker: usize, users: &HashMap<u32, UserEntry>) -> Result<()> {
    let mut rows: Vec<(u32, u32, u32)> = users
        .iter()
        .flat_map(|(&u, e)| e.history.iter().enumerate().map(move |(p, &i)| (u, p as u32, i)))
        .collect();
    rows.sort_unstable();
    write_history(&shard(dir, "history", worker), &rows)
}

pub fn write_reason_shard(dir: &Path, worker: usize, items: &HashMap<u32, Arc<Vec<Reason>>>) -> Result<()> {
    let mut rows: Vec<ReasonRow> = items
        .iter()
        .flat_map(|(&i, l)| {
            l.iter().map(move |r| ReasonRow {
                user: r.user,
                item: i,
                timestamp: r.timestamp,
                text: r.text.to_string(),
                parsed: true,
                tokens: 0,
            })
        })
        .collect();
    rows.sort_by_key(|r| (r.item, r.timestamp, r.user));
    Ok(store::write_reasons(&shard(dir, "reasons", worker), &rows, &[])?)
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
    for (n, c) in [
        ("reward_sum", f(|m| m.reward_sum)),
        ("kl_sum", f(|m| m.kl_sum)),
        ("loss", f(|m| m.loss)),
    ] {
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
    pub users: HashMap<u32, UserEntry>,
    pub items: HashMap<u32, Arc<Vec<Reason>>>,
}

impl State {
    /// Read `patterns.parquet`, `reasons.parquet` and (if present) `history.parquet` from `dir`.
    pub fn load(dir: &Path, reasons_kept: usize) -> Result<State> {
        let mut s = State::default();
        for p in store::read_patterns(&dir.join(store::PATTERNS))? {
            let e = s.users.entry(p.user).or_default();
            if e.pattern.as_ref().is_none_or(|(ts, _)| *ts <= p.timestamp) {
                e.pattern = Some((p.timestamp, Arc::from(p.text.as_str())));
            }
        }
        let h = dir.join(HISTORY);
        if h.is_file() {
            for (u, _, i) in read_history(&h)? {
                s.users.entry(u).or_default().history.push(i);
            }
        }
        let mut lists: HashMap<u32, Vec<Reason>> = HashMap::new();
        for r in store::read_reasons(&dir.join(store::REASONS))? {
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
    partial: BTreeMap<u64, (usize, EpochMetrics)>,
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
    on_epoch: Box<dyn Fn(&EpochMetrics) + Send + Sync>,
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
        on_epoch: Box<dyn Fn(&EpochMetrics) + Send + Sync>,
    ) -> Self {
        let inner = Inner { done, ..Default::default() };
        Self { root, peers, snapshots, identity, raw_users, raw_items, extra, keep: 2, inner: Mutex::new(inner), on_epoch }
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

    /// One policy instance's metrics for an epoch; the sum is final once every worker reported.
    pub fn report_metrics(&self, m: EpochMetrics) {
        let finished = {
            let mut g = self.inner.lock().expect("board lock");
            let slot = g.partial.entry(m.epoch).or_insert_with(|| (0, EpochMetrics { epoch: m.epoch, ..Default::default() }));
            slot.0 += 1;
            slot.1.merge(&m);
            if slot.0 == self.peers {
                let (_, total) = g.partial.remove(&m.epoch).expect("present");
                g.done.push(total.clone());
                Some(total)
            } else {
                None
            }
        };
        if let Some(t) = finished {
            (self.on_epoch)(&t);
        }
    }

    /// One part of snapshot `e` is written (or failed); the last part completes the snapshot.
    pub fn report_part(&self, e: u64, r: Result<()>) {
        if let Err(err) = r {
            self.fail(format!("snapshot after epoch {e}: {err:#}"));
            return;
        }
        let last = {
            let mut g = self.inner.lock().expect("board lock");
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
        let dir = epoch_dir(&self.root, e);
        let mut patterns = Vec::new();
        let mut reasons = Vec::new();
        let mut history = Vec::new();
        for w in 0..self.peers {
            let (p, r, h) = (shard(&dir, "patterns", w), shard(&dir, "reasons", w), shard(&dir, "history", w));
            patterns.extend(store::read_patterns(&p)?);
            reasons.extend(store::read_reasons(&r)?);
            history.extend(read_history(&h)?);
            for f in [p, r, h] {
                std::fs::remove_file(&f).with_context(|| format!("{}: cannot remove", f.display()))?;
            }
        }
        patterns.sort_by_key(|r| r.user);
        reasons.sort_by_key(|r| (r.item, r.timestamp, r.user));
        history.sort_unstable();
        store::write_patterns(&dir.join(store::PATTERNS), &patterns, &self.raw_users)?;
        store::write_reasons(&dir.join(store::REASONS), &reasons, &self.raw_items)?;
        write_history(&dir.join(HISTORY), &history)?;
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
            "patterns": patterns.len(),
            "reasons": reasons.len(),
            "users": self.raw_users.len(),
            "items": self.raw_items.len(),
            "identity": self.identity,
        });
        if let (Some(m), Some(x)) = (manifest.as_object_mut(), self.extra.as_object()) {
            m.extend(x.clone());
        }
        crate::jobs::write_json(&dir.join(MANIFEST), &manifest)?;
        self.inner.lock().expect("board lock").written.push(e);
        // Keep the newest `keep` complete snapshots.
        let all = complete(&self.root);
        if all.len() > self.keep {
            for (_, d) in &all[..all.len() - self.keep] {
                let _ = std::fs::remove_dir_all(d);
            }
        }
        Ok(())
    }
}

/// The manifest of a complete snapshot.
pub fn manifest(dir: &Path) -> Result<Value> {
    crate::jobs::read_json(&dir.join(MANIFEST))
}
