//! A run's ingestion state: what `curec ingest` loads from a run's newest snapshot (the log's
//! dedup keys, the id maps grown by earlier ingests, the state, the corrector) and the dataflow
//! it feeds, kept between batches. `curec ingest` opens a session, ingests its file with a
//! snapshot after it and closes; `curec serve` and `curec bench ingest` keep one open
//! ([`crate::replay::resident`]), so that a batch costs its own epochs and a snapshot is a checkpoint
//! taken when asked for.
//!
//! Ingest records (`<run>/ingested/`) are written for every batch before it runs; a record
//! counts only once a complete snapshot covers it, so after a crash between checkpoints the
//! batches since the newest snapshot are not half-remembered (the service's write-ahead log
//! ingests them again).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::config::JobConfig;
use crate::data::preprocess::ItemRow;
use crate::data::{prepared, ItemInfo};
use crate::io::write_text;
use crate::pipeline::setup::{epoch_logger, llm_factory, seed_caches};
use crate::replay::board::Board;
use crate::replay::graph::{CorrectorFactory, Initial};
use crate::replay::ingest_log::{self, Known, NewRow};
use crate::replay::llm_corrector::LlmSetup;
use crate::replay::resident::Resident;
use crate::replay::snapshot::{self, State};
use crate::replay::source::{self, by_epoch};
use crate::replay::Event;

/// Who writes an ingest's texts: the run's LLM against its reward model, or, in a run left by
/// `curec bench replay --out`, the bench's stand-in.
#[derive(Clone)]
enum Writer {
    StandIn(CorrectorFactory),
    Llm { reward_model: PathBuf, model: String, adapter: Option<PathBuf> },
}

pub struct Session {
    run: PathBuf,
    cfg: JobConfig,
    data: PathBuf,
    /// The snapshot the session started from, and its directory.
    base: u64,
    base_dir: PathBuf,
    /// The last epoch fed (ingest records up to it are this session's).
    fed: u64,
    known: Known,
    rating_above: f32,
    users: Vec<String>,
    items: Vec<ItemRow>,
    uid: HashMap<String, u32>,
    iid: HashMap<String, u32>,
    /// Users and items of the prepared dataset: those after them in `users` and `items` were
    /// grown by ingests (the manifests' `grown` lists).
    dataset_users: usize,
    dataset_items: usize,
    /// Titles and texts of grown items that came with them, by raw id.
    grown_info: Map<String, Value>,
    /// Interactions processed up to the last batch (record keys continue from it).
    done: u64,
    identity: Value,
    workers: usize,
    grpo: bool,
    writer: Writer,
    board: Option<Arc<Board>>,
    engine: Option<Resident>,
    /// Opened for batch after batch ([`Session::open_resident`]).
    resident: bool,
}

/// Rows of one batch and the item titles and texts that came with them.
pub struct Rows {
    pub rows: Vec<NewRow>,
    pub info: HashMap<String, ItemInfo>,
}

impl Session {
    /// Open `run` at its newest complete snapshot. `only_users`: the users the batches will hold
    /// (a one-shot ingest loads the dedup keys of those only); `None`: every user (a resident
    /// session).
    pub fn open(run: &Path, workers: Option<usize>, grpo: bool, only_users: Option<&HashSet<&str>>) -> Result<Self> {
        let root = run.join("snapshots");
        let (last, dir) = snapshot::newest(&root)
            .with_context(|| format!("{}: no complete snapshot (run `curec replay` first)", run.display()))?;
        let manifest = snapshot::manifest(&dir)?;
        let identity = manifest["identity"].clone();
        let cfg: JobConfig = {
            let c = &identity["config"];
            let mut j = JobConfig {
                replay: serde_json::from_value(c["replay"].clone()).context("snapshot manifest: bad replay config")?,
                features: serde_json::from_value(c["features"].clone())
                    .context("snapshot manifest: bad features config")?,
                grpo: serde_json::from_value(c["grpo"].clone()).context("snapshot manifest: bad grpo config")?,
                lora: serde_json::from_value(c["lora"].clone()).context("snapshot manifest: bad lora config")?,
                ..Default::default()
            };
            j.train.seed = c["seed"].as_u64().unwrap_or(j.train.seed);
            // The identity leaves the worker count out (results do not depend on it).
            j.replay.workers = j.replay.workers.max(1);
            j
        };
        let data = PathBuf::from(identity["config"]["data"].as_str().context("snapshot manifest: no data path")?);
        // A `curec bench replay --out` run: the stand-in corrects, and its log is in the run.
        let (writer, data) = match crate::replay::standin::standin_factory(&identity) {
            Some(_) if grpo => {
                bail!("--grpo: {} is a `curec bench replay` run (stand-in corrector, no LLM)", run.display())
            }
            Some(f) => (Writer::StandIn(f), run.join(data)),
            None => {
                let c = &identity["config"];
                let writer = Writer::Llm {
                    reward_model: PathBuf::from(
                        c["reward_model"].as_str().context("snapshot manifest: no reward model")?,
                    ),
                    model: c["model"].as_str().context("snapshot manifest: no model")?.to_string(),
                    adapter: c["adapter"].as_str().map(PathBuf::from),
                };
                (writer, data)
            }
        };
        // One read of the prepared log: the dataset and the interactions dedup and lateness check.
        let prepared::Log { users, items, interactions: log } = prepared::read_log(&data)?;
        // The prepare step's rating filter: ratings at or below it are not positives.
        let stats: Value = crate::io::read_json(&data.join("stats.json")).unwrap_or_default();
        let rating_above = stats["config"]["rating_above"]
            .as_f64()
            .map(|r| r as f32)
            .unwrap_or(crate::data::preprocess::PrepareConfig::default().rating_above);
        let known = Known::load(&log, &users, &items, run, last, only_users)?;
        drop(log);
        // Id maps: the dataset's, then those grown by earlier ingests.
        let (mut users, mut items) = (users, items);
        let (dataset_users, dataset_items) = (users.len(), items.len());
        let grown = &manifest["grown"];
        let grown_info: Map<String, Value> = grown["info"].as_object().cloned().unwrap_or_default();
        for u in grown["users"].as_array().into_iter().flatten() {
            users.push(u.as_str().unwrap_or_default().to_string());
        }
        for i in grown["items"].as_array().into_iter().flatten() {
            let raw = i.as_str().unwrap_or_default().to_string();
            items.push(ItemRow { info: info_of(&raw, &grown_info), raw_id: raw });
        }
        let uid = users.iter().enumerate().map(|(i, u)| (u.clone(), i as u32)).collect();
        let iid = items.iter().enumerate().map(|(i, r)| (r.raw_id.clone(), i as u32)).collect();
        Ok(Self {
            run: run.to_path_buf(),
            workers: workers.unwrap_or(cfg.replay.workers),
            cfg,
            data,
            base: last,
            base_dir: dir,
            fed: last,
            known,
            rating_above,
            users,
            items,
            uid,
            iid,
            dataset_users,
            dataset_items,
            grown_info,
            done: manifest["interactions"].as_u64().unwrap_or(0),
            identity,
            grpo,
            writer,
            board: None,
            engine: None,
            resident: false,
        })
    }

    /// Open `run` for batch after batch (every user's dedup keys) and start its dataflow now, so
    /// that the first batch costs what the others do.
    pub fn open_resident(run: &Path, workers: Option<usize>) -> Result<Self> {
        let mut s = Self::open(run, workers, false, None)?;
        s.resident = true;
        s.start(1)?;
        Ok(s)
    }

    /// Ingest one batch: admit its rows (the rules of [`ingest_log`]), record them, and put them
    /// through the operators, with a snapshot after them when `snapshot`. Returns the ingest's
    /// JSON summary (`curec ingest`'s).
    pub fn ingest(&mut self, batch: Rows, snapshot: bool) -> Result<Value> {
        let t0 = Instant::now();
        let Rows { rows, info: file_info } = batch;
        let admitted = ingest_log::admit(rows, &mut self.known, self.rating_above);
        let mut v = json!({
            "duplicates": admitted.duplicates,
            "filtered": admitted.filtered,
            "late": admitted.late,
            "retracted": admitted.retracted,
            "unmatched": admitted.unmatched,
            "rerated": admitted.rerated,
        });
        if admitted.rows.is_empty() {
            // Nothing new (e.g. the same file again): no epoch, no snapshot.
            let newest = snapshot::newest(&self.run.join("snapshots")).map(|(_, d)| d).unwrap_or_default();
            extend(
                &mut v,
                json!({
                    "interactions": 0, "new_users": 0, "new_items": 0,
                    "seconds": t0.elapsed().as_secs_f64(), "slices": 0, "snapshot": newest.display().to_string(),
                }),
            );
            return Ok(v);
        }
        let (mut new_users, mut new_items) = (Vec::new(), Vec::new());
        let mut events = Vec::with_capacity(admitted.rows.len());
        for (n, NewRow { user: u, item: i, timestamp: ts, retract, .. }) in admitted.rows.iter().cloned().enumerate() {
            let user = match self.uid.get(&u) {
                Some(&x) => x,
                None => {
                    self.users.push(u.clone());
                    self.uid.insert(u.clone(), self.users.len() as u32 - 1);
                    new_users.push(u.clone());
                    self.users.len() as u32 - 1
                }
            };
            let item = match self.iid.get(&i) {
                Some(&x) => x,
                None => {
                    if let Some(info) = file_info.get(&i) {
                        self.grown_info.insert(i.clone(), json!([info.title, info.text]));
                    }
                    self.items.push(ItemRow { raw_id: i.clone(), info: info_of(&i, &self.grown_info) });
                    self.iid.insert(i.clone(), self.items.len() as u32 - 1);
                    new_items.push(i.clone());
                    self.items.len() as u32 - 1
                }
            };
            // Keys of ingested records: above every position a train sequence can have.
            let key = ((user as u64) << 32) | (0x8000_0000 | ((self.done + n as u64) & 0x7fff_ffff));
            events.push(Event { key, user, item, timestamp: ts, retract });
        }
        let n_events = events.len();
        // The LLM corrector holds the item list it started with: a batch with new items restarts
        // the dataflow from a checkpoint (the cost of a one-shot ingest, for that batch only).
        if matches!(self.writer, Writer::Llm { .. }) && self.engine.is_some() && !new_items.is_empty() {
            self.restart()?;
        }
        let first = match &self.engine {
            Some(e) => e.next_epoch(),
            None => self.base + 1,
        };
        let ep = source::epochs(&events, &self.cfg.replay, first)?;
        let grouped = by_epoch(events, &ep);
        let (first, last) = (grouped[0].0, grouped.last().expect("at least one slice").0);
        ingest_log::write_log(&self.run, self.fed, first, last, &admitted.rows)?;
        self.fed = last;
        match &self.board {
            None => self.start(grouped.len())?,
            Some(b) if !new_users.is_empty() || !new_items.is_empty() => {
                b.grow_names(&new_users, &new_items, self.grown())
            }
            Some(_) => {}
        }
        let slices = grouped.len();
        let outcome = self.engine.as_mut().expect("started").apply(grouped, snapshot)?;
        self.done += outcome.metrics.iter().map(|m| m.interactions).sum::<u64>();
        let newest = match outcome.snapshot {
            Some(e) => Some(self.after_snapshot(e)?),
            None => None,
        };
        let epoch_seconds = outcome.epoch_seconds;
        extend(
            &mut v,
            json!({
                "interactions": n_events - admitted.retracted,
                "new_users": new_users.len(),
                "new_items": new_items.len(),
                "seconds": t0.elapsed().as_secs_f64(),
                "dataflow_seconds": outcome.seconds,
                "slices": slices,
                "slice_seconds": epoch_seconds,
                "seconds_per_interaction": epoch_seconds.iter().sum::<f64>() / n_events as f64,
                "seconds_per_slice": epoch_seconds.iter().sum::<f64>() / slices.max(1) as f64,
                "snapshot": newest.map(|d| d.display().to_string()),
            }),
        );
        Ok(v)
    }

    /// A snapshot of the state as it is now (nothing to do when no batch ran since the last one).
    /// Returns its directory.
    pub fn checkpoint(&mut self) -> Result<PathBuf> {
        let Some(engine) = self.engine.as_mut() else { return Ok(self.base_dir.clone()) };
        let outcome = engine.checkpoint()?;
        let e = outcome.snapshot.context("the checkpoint wrote no snapshot")?;
        self.fed = e;
        self.after_snapshot(e)
    }

    /// The manifests' `grown` key: users and items added by ingests, and the grown items'
    /// titles and texts.
    fn grown(&self) -> Value {
        let items: Vec<&str> = self.items[self.dataset_items..].iter().map(|i| i.raw_id.as_str()).collect();
        json!({ "grown": {"users": self.users[self.dataset_users..], "items": items, "info": self.grown_info} })
    }

    /// Checkpoint, stop the dataflow, and let the next batch start it again from that snapshot.
    fn restart(&mut self) -> Result<()> {
        let dir = self.checkpoint()?;
        if let Some(e) = self.engine.take() {
            e.close()?;
        }
        self.board = None;
        self.base = self.fed;
        self.base_dir = dir;
        Ok(())
    }

    /// Stop the dataflow (no snapshot: take a [`Self::checkpoint`] first to keep the state).
    pub fn close(mut self) -> Result<()> {
        match self.engine.take() {
            Some(e) => e.close(),
            None => Ok(()),
        }
    }

    /// Start the dataflow from the snapshot the session opened (at the first batch, so that the
    /// LLM's schedule knows that batch's length).
    fn start(&mut self, slices: usize) -> Result<()> {
        let raw_items: Vec<String> = self.items.iter().map(|i| i.raw_id.clone()).collect();
        let extra = self.grown();
        let root = self.run.join("snapshots");
        let done = snapshot::read_metrics(&self.base_dir.join(snapshot::METRICS))?;
        let board = Arc::new(Board::new(
            root,
            self.workers,
            Default::default(),
            self.identity.clone(),
            self.users.clone(),
            raw_items,
            extra,
            done,
            epoch_logger(self.run.join("epochs.jsonl"), if self.resident { 0 } else { slices }, 0),
        ));
        let state = State::load(&self.base_dir, self.cfg.replay.reasons_kept)?;
        let (factory, llm_corrects) = match self.writer.clone() {
            Writer::StandIn(f) => (f, false),
            Writer::Llm { reward_model, model, adapter } => {
                let setup = LlmSetup {
                    model,
                    adapter,
                    features: self.cfg.features.clone(),
                    grpo: self.cfg.grpo.clone(),
                    lora: self.cfg.lora.clone(),
                    replay: self.cfg.replay.clone(),
                    items: self.items.clone(),
                    train: self.grpo || self.cfg.replay.grpo_on_ingest,
                    resume: Some(self.base_dir.clone()),
                    cache_dir: self.run.clone(),
                    total_steps: slices,
                    fresh_schedule: true,
                };
                (llm_factory(setup, reward_model, self.data.clone()), true)
            }
        };
        let initial = Arc::new(Initial {
            state,
            history_kept: self.cfg.replay.history_kept,
            reasons_kept: self.cfg.replay.reasons_kept,
            freeze: false,
            attach_reasons: llm_corrects,
            single_policy: llm_corrects,
        });
        self.engine = Some(Resident::start(initial, factory, board.clone(), self.workers, self.base + 1)?);
        self.board = Some(board);
        Ok(())
    }

    /// After snapshot `e` is complete: the run reads its features from it.
    fn after_snapshot(&mut self, e: u64) -> Result<PathBuf> {
        let newest = snapshot::epoch_dir(&self.run.join("snapshots"), e);
        if self.run.join("config.toml").is_file() {
            let mut run_cfg = JobConfig::load(Some(&self.run.join("config.toml")), &[])?;
            run_cfg.curec.features = Some(newest.clone());
            seed_caches(&self.run, &newest)?;
            write_text(&self.run.join("config.toml"), &run_cfg.to_toml())?;
        }
        Ok(newest)
    }
}

/// Title and text of a grown item: from the file that brought it, else the raw id.
fn info_of(raw: &str, grown_info: &Map<String, Value>) -> ItemInfo {
    match grown_info.get(raw).and_then(Value::as_array) {
        Some(v) if v.len() == 2 => {
            ItemInfo { title: v[0].as_str().unwrap_or(raw).to_string(), text: v[1].as_str().unwrap_or(raw).to_string() }
        }
        _ => ItemInfo { title: raw.to_string(), text: raw.to_string() },
    }
}

fn extend(v: &mut Value, more: Value) {
    if let (Some(m), Value::Object(x)) = (v.as_object_mut(), more) {
        m.extend(x);
    }
}

/// `curec ingest --from <run> <file>`: new interactions (new users and items included) through
/// the same operators from the run's newest snapshot, and a snapshot after them; GRPO only with
/// `replay.grpo_on_ingest`. Only the dedup keys of the file's users are loaded.
pub fn ingest(run: &Path, file: &Path, workers: Option<usize>, grpo: bool) -> Result<Value> {
    let t0 = Instant::now();
    snapshot::newest(&run.join("snapshots"))
        .with_context(|| format!("{}: no complete snapshot (run `curec replay` first)", run.display()))?;
    let (rows, info) = ingest_log::read_file(file)?;
    if rows.is_empty() {
        bail!("{}: no interactions to ingest", file.display());
    }
    let users: HashSet<String> = rows.iter().map(|r| r.user.clone()).collect();
    let only: HashSet<&str> = users.iter().map(String::as_str).collect();
    let mut session = Session::open(run, workers, grpo, Some(&only))?;
    let mut v = session.ingest(Rows { rows, info }, true)?;
    session.close()?;
    v["seconds"] = json!(t0.elapsed().as_secs_f64());
    Ok(v)
}
