//! The CLI's commands as library functions: prepare a dataset, train and evaluate a baseline,
//! re-evaluate a saved run, and run a whole job file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};
use serde_json::{json, Map, Value};

use crate::config::JobConfig;
use crate::data::{self, prepared, preprocess, Dataset, Format, Split};
use crate::embed::EmbeddingCache;
use crate::eval::{self, bootstrap, Evaluation};
use crate::features::bank::build_bank;
use crate::features::Features;
use crate::rec::curec::Curec;
use crate::rec::curec::Variant;
use crate::rec::kar::Kar;
use crate::rec::train::{fit, FitConfig, FitReport};
use crate::rec::{bert4rec::Bert4Rec, ncf::Ncf, pop::Pop, sasrec::SasRec, Model, ModelKind};

/// `curec prepare`: read, preprocess and write; returns the stats written to `stats.json`.
pub fn prepare(input: &Path, out: &Path, format: &str, cfg: &JobConfig) -> anyhow::Result<Value> {
    let format = if format == "auto" { Format::detect(input)? } else { Format::parse(format)? };
    let log = data::read_raw(input, format)?;
    if let Some(&(_, line)) = log.deletes.first() {
        let path = data::generic::find_file(input).unwrap_or_else(|_| input.to_path_buf());
        return Err(data::DataError::row(
            &path,
            line,
            "op 'delete' is a retraction, which `curec ingest` applies to a run; `curec prepare` reads additions only",
        )
        .into());
    }
    let p = preprocess::preprocess(&log, &cfg.preprocess)?;
    let name = cfg.prepare.dataset.clone().unwrap_or_else(|| {
        let base = if input.is_file() { input.file_stem() } else { input.file_name() };
        base.map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "dataset".into())
    });
    let count = |s: Split| p.interactions.iter().filter(|x| x.split == s).count();
    let stats = json!({
        "dataset": name,
        "format": format.name(),
        "source": input.display().to_string(),
        "users": p.users.len(),
        "items": p.items.len(),
        "interactions": p.interactions.len(),
        "train": count(Split::Train),
        "valid": count(Split::Valid),
        "test": count(Split::Test),
        "density": p.interactions.len() as f64 / (p.users.len() as f64 * p.items.len() as f64),
        "steps": p.counts,
        "config": cfg.preprocess,
    });
    prepared::write_dir(out, &p, &stats)?;
    Ok(stats)
}

/// Build an untrained model of `kind` for `ds`.
pub fn build_model(kind: ModelKind, ds: &Dataset, cfg: &JobConfig, device: &Device) -> anyhow::Result<Box<dyn Model>> {
    let seed = cfg.train.seed;
    Ok(match kind {
        ModelKind::Pop => Box::new(Pop::new(ds.n_items)),
        ModelKind::Ncf => Box::new(Ncf::new(&cfg.ncf, ds.n_users, ds.n_items, seed, device)?),
        ModelKind::Sasrec => Box::new(SasRec::new(&cfg.sasrec, ds.n_items, seed, device)?),
        ModelKind::Bert4rec => Box::new(Bert4Rec::new(&cfg.bert4rec, ds.n_items, seed, device)?),
        ModelKind::Curec => Box::new(build_curec(ds, cfg, device)?),
        ModelKind::Kar => Box::new(build_kar(ds, cfg, device)?),
    })
}

/// The reward model with its feature bank (features encoded through the cache in the features dir).
pub fn build_curec(ds: &Dataset, cfg: &JobConfig, device: &Device) -> anyhow::Result<Curec> {
    let dir = cfg
        .curec
        .features
        .as_deref()
        .context("curec: no features directory; pass --features <dir> (from `curec features`)")?;
    let feats = Features::load(dir)?;
    let encoder = crate::embed::load(&cfg.curec.encoder, device)?;
    let mut cache = EmbeddingCache::open(dir, encoder.as_ref())?;
    let bank = build_bank(ds, &feats, cfg.curec.variant, cfg.curec.reasons_per_item, encoder.as_ref(), &mut cache)?;
    Curec::new(&cfg.curec, &cfg.sasrec, ds.n_items, bank, cfg.train.seed, device)
}

/// The KAR-style baseline over the features in `curec.features` (patterns and reason lists, and
/// item descriptions for items without reasons), encoded with `curec.encoder`.
pub fn build_kar(ds: &Dataset, cfg: &JobConfig, device: &Device) -> anyhow::Result<Kar> {
    let dir = cfg
        .curec
        .features
        .as_deref()
        .context("kar: no features directory; pass --features <dir> (from `curec features`)")?;
    let feats = Features::load(dir)?;
    let encoder = crate::embed::load(&cfg.curec.encoder, device)?;
    let mut cache = EmbeddingCache::open(dir, encoder.as_ref())?;
    let n = cfg.curec.reasons_per_item;
    let reasons = build_bank(ds, &feats, Variant::Ap, n, encoder.as_ref(), &mut cache)?;
    let descriptions = build_bank(ds, &feats, Variant::Text, n, encoder.as_ref(), &mut cache)?;
    Kar::new(&cfg.kar, &cfg.sasrec, &reasons, &descriptions, cfg.train.seed, device)
}

fn model_config(kind: ModelKind, cfg: &JobConfig) -> Value {
    let mut c = match kind {
        ModelKind::Pop => json!({}),
        ModelKind::Ncf => serde_json::to_value(&cfg.ncf).unwrap_or_default(),
        ModelKind::Sasrec => serde_json::to_value(&cfg.sasrec).unwrap_or_default(),
        ModelKind::Bert4rec => serde_json::to_value(&cfg.bert4rec).unwrap_or_default(),
        ModelKind::Curec => json!({"sasrec": cfg.sasrec, "curec": cfg.curec}),
        ModelKind::Kar => json!({"sasrec": cfg.sasrec, "kar": cfg.kar, "features": cfg.curec.features,
            "encoder": cfg.curec.encoder, "reasons_per_item": cfg.curec.reasons_per_item}),
    };
    c["seed"] = json!(cfg.train.seed);
    c
}

/// Metrics of one split as a flat JSON object, with 95% bootstrap intervals for the @10 metrics.
pub fn metrics_json(ev: &Evaluation, resamples: usize, seed: u64) -> Map<String, Value> {
    let mut m = Map::new();
    for (k, v) in &ev.metrics {
        m.insert(k.clone(), json!(v));
    }
    for (key, f) in [("ndcg@10", eval::ndcg_at as fn(usize, usize) -> f64), ("recall@10", eval::recall_at)] {
        let per_user: Vec<f64> = ev.ranks.iter().map(|&r| f(r, 10)).collect();
        let (lo, hi) = bootstrap::mean_ci95(&per_user, resamples, seed);
        m.insert(format!("{key}_ci95"), json!([lo, hi]));
    }
    m
}

/// Per-user ranks of the held-out item (0 = top; users in id order) of a run, for paired
/// comparisons between runs (`curec compare`).
pub const RANKS: &str = "ranks.json";

/// Write `ranks.json` into `out`: each user's rank of the held-out item on test and valid (what
/// `curec compare` reads).
pub fn write_ranks(out: &Path, test: &Evaluation, valid: &Evaluation) -> anyhow::Result<()> {
    write_json(&out.join(RANKS), &json!({"test": test.ranks, "valid": valid.ranks}))
}

/// `curec train`: fit with early stopping, evaluate on test, write `model.safetensors`,
/// `config.toml`, `history.json`, `ranks.json` and `metrics.json` into `out`; returns the metrics.
pub fn train(kind: ModelKind, data_dir: &Path, run_dir: &Path, cfg: &JobConfig) -> anyhow::Result<Value> {
    let ds = prepared::read_dataset(data_dir)?;
    let staged = StagedRun::new(run_dir, cfg)?;
    let out = staged.tmp.as_path();
    let device = Device::Cpu;
    let mut model = build_model(kind, &ds, cfg, &device)?;
    let (max_epochs, patience) = match kind {
        ModelKind::Pop => (1, 0),
        ModelKind::Ncf => (cfg.ncf.max_epochs, cfg.ncf.patience),
        ModelKind::Sasrec => (cfg.sasrec.max_epochs, cfg.sasrec.patience),
        ModelKind::Bert4rec => (cfg.bert4rec.max_epochs, cfg.bert4rec.patience),
        ModelKind::Curec => (cfg.curec.max_epochs, cfg.curec.patience),
        ModelKind::Kar => (cfg.sasrec.max_epochs, cfg.sasrec.patience),
    };
    let fit_cfg = FitConfig {
        max_epochs,
        patience,
        eval_batch: cfg.train.eval_batch,
        label: format!("{} {}", kind.name(), ds.name),
    };
    let ckpt = out.join("model.safetensors");
    let report = fit(model.as_mut(), &ds, &fit_cfg, &ckpt)?;
    let test = eval::evaluate(model.as_ref(), &ds, Split::Test, cfg.train.eval_batch)?;
    let valid = eval::evaluate(model.as_ref(), &ds, Split::Valid, cfg.train.eval_batch)?;
    let metrics = run_metrics(kind, &ds, data_dir, &test, &valid, &report, cfg);
    write_json(&out.join("history.json"), &json!(report.history))?;
    write_ranks(out, &test, &valid)?;
    write_text(&out.join("config.toml"), &cfg.to_toml())?;
    write_json(&out.join("metrics.json"), &metrics)?;
    staged.commit()?;
    Ok(metrics)
}

/// A run written into `<out>.partial/` and renamed to `<out>/` only when complete, so a killed
/// retrain never leaves a folder whose metrics describe other weights. A folder holding a
/// finished run of another config is refused rather than overwritten.
pub struct StagedRun {
    pub tmp: std::path::PathBuf,
    out: std::path::PathBuf,
}

impl StagedRun {
    pub fn new(out: &Path, cfg: &JobConfig) -> anyhow::Result<Self> {
        let config = out.join("config.toml");
        if out.join("metrics.json").is_file() {
            if let Ok(saved) = std::fs::read_to_string(&config) {
                anyhow::ensure!(
                    crate::seeds::same_config(&saved, cfg),
                    "{}: holds a finished run of another config; choose another --out or delete it",
                    out.display()
                );
            }
        }
        // The whole folder is replaced on commit: refuse one that holds anything else.
        const RUN_FILES: [&str; 6] =
            ["model.safetensors", "history.json", RANKS, "config.toml", "metrics.json", "report.html"];
        for e in std::fs::read_dir(out).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            anyhow::ensure!(
                RUN_FILES.contains(&n.as_str()) || (n.starts_with("eval-") && n.ends_with(".json")),
                "{}: not empty and not a training run ({n}); choose another --out",
                out.display()
            );
        }
        let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "run".into());
        let tmp = out.with_file_name(format!("{name}.partial"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create run directory", tmp.display()))?;
        Ok(Self { tmp, out: out.to_path_buf() })
    }

    /// Move the finished run into place (an older run there is replaced).
    pub fn commit(self) -> anyhow::Result<()> {
        let old = self.out.with_file_name(format!(
            "{}.replaced",
            self.out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
        ));
        if self.out.exists() {
            if old.exists() {
                std::fs::remove_dir_all(&old)?;
            }
            std::fs::rename(&self.out, &old).with_context(|| format!("{}: cannot replace", self.out.display()))?;
        }
        std::fs::rename(&self.tmp, &self.out)
            .with_context(|| format!("{}: cannot move into place", self.out.display()))?;
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        Ok(())
    }
}

pub fn run_metrics(
    kind: ModelKind,
    ds: &Dataset,
    data_dir: &Path,
    test: &Evaluation,
    valid: &Evaluation,
    report: &FitReport,
    cfg: &JobConfig,
) -> Value {
    let (n, seed) = (cfg.train.bootstrap, cfg.train.seed);
    let mut m = Map::new();
    m.insert("model".into(), json!(kind.name()));
    if kind == ModelKind::Curec {
        m.insert("variant".into(), json!(cfg.curec.variant.name()));
    }
    m.insert("dataset".into(), json!(ds.name));
    m.insert("data".into(), json!(data_dir.display().to_string()));
    m.insert("split".into(), json!("test"));
    m.insert("users".into(), json!(ds.n_users));
    m.insert("items".into(), json!(ds.n_items));
    m.extend(metrics_json(test, n, seed));
    m.insert("valid".into(), Value::Object(metrics_json(valid, n, seed)));
    m.insert("epochs".into(), json!(report.epochs));
    m.insert("best_epoch".into(), json!(report.best_epoch));
    m.insert("train_seconds".into(), json!(report.train_seconds));
    m.insert("seconds_per_epoch".into(), json!(report.seconds_per_epoch));
    m.insert("config".into(), model_config(kind, cfg));
    Value::Object(m)
}

/// A run written by `curec train`: its metrics, model kind, dataset and resolved config.
pub struct TrainedRun {
    pub metrics: Value,
    pub kind: ModelKind,
    pub ds: Dataset,
    pub cfg: JobConfig,
    /// The prepared interactions `ds` was built from (timestamps included), from the same read.
    pub log: Vec<crate::data::preprocess::Interaction>,
}

impl TrainedRun {
    /// Read `run/metrics.json` and `run/config.toml` and the dataset (`data_dir`, or the one the run
    /// was trained on). The run's checkpoint holds every weight, so a warm-start source
    /// (`curec.init_tower`) is neither read again nor needed.
    pub fn open(run: &Path, data_dir: Option<&Path>) -> anyhow::Result<Self> {
        let path = run.join("metrics.json");
        let metrics: Value = read_json(&path)?;
        let kind = metrics["model"]
            .as_str()
            .and_then(ModelKind::parse)
            .with_context(|| format!("{}: no known 'model' key", path.display()))?;
        let data_dir: PathBuf = match data_dir {
            Some(d) => d.to_path_buf(),
            None => metrics["data"]
                .as_str()
                .map(PathBuf::from)
                .with_context(|| format!("{}: no 'data' key; pass --data", path.display()))?,
        };
        let mut cfg = JobConfig::load(Some(&run.join("config.toml")), &[])?;
        cfg.curec.init_tower = None;
        // Features from one of the run's own snapshots that is gone (pruned, or removed for a
        // torn manifest): the newest complete snapshot instead.
        if let Some(f) = cfg.curec.features.clone() {
            let root = run.join("snapshots");
            if f.parent() == Some(root.as_path()) && !f.join(crate::replay::snapshot::MANIFEST).is_file() {
                if let Some((_, newest)) = crate::replay::snapshot::complete(&root).pop() {
                    tracing::warn!("{}: snapshot gone, reading features from {}", f.display(), newest.display());
                    cfg.curec.features = Some(newest);
                }
            }
        }
        let (ds, log) = prepared::read_dataset_and_log(&data_dir)?;
        Ok(Self { metrics, kind, ds, cfg, log })
    }
}

/// `curec eval`: reload a run's checkpoint and evaluate it on a split; writes `eval-<split>.json`.
pub fn eval_run(run: &Path, data_dir: Option<&Path>, split: Split) -> anyhow::Result<Value> {
    let TrainedRun { metrics, kind, ds, cfg, .. } = TrainedRun::open(run, data_dir)?;
    let mut model = build_model(kind, &ds, &cfg, &Device::Cpu)?;
    model.load(&run.join("model.safetensors"))?;
    let ev = eval::evaluate(model.as_ref(), &ds, split, cfg.train.eval_batch)?;
    let mut m = Map::new();
    m.insert("model".into(), json!(kind.name()));
    if let Some(v) = metrics.get("variant") {
        m.insert("variant".into(), v.clone());
    }
    m.insert("dataset".into(), json!(ds.name));
    m.insert("split".into(), json!(split.as_str()));
    m.extend(metrics_json(&ev, cfg.train.bootstrap, cfg.train.seed));
    let m = Value::Object(m);
    write_json(&run.join(format!("eval-{}.json", split.as_str())), &m)?;
    Ok(m)
}

/// One recommended item with its explanation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recommendation {
    pub item: String,
    pub title: String,
    pub score: f32,
    /// The item's reasons that matched this user most (attention weight, averaged over heads).
    pub reasons: Vec<ReasonWeight>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReasonWeight {
    pub text: String,
    pub weight: f32,
}

/// `curec recommend`: the top `k` items for a user (raw id) after everything the user has seen
/// (train, valid and test), each with its top `n_reasons` reasons when the run is a CUREC model.
pub fn recommend(run: &Path, raw_user: &str, k: usize, n_reasons: usize) -> anyhow::Result<Vec<Recommendation>> {
    Recommender::open(run)?.recommend(raw_user, k, n_reasons)
}

enum Loaded {
    Curec(Box<Curec>),
    Other(Box<dyn Model>),
}

/// A trained run loaded once to answer many recommendation queries (`curec recommend` opens one
/// per call, `curec serve` keeps one and replaces it after each ingest).
pub struct Recommender {
    kind: ModelKind,
    ds: Dataset,
    trained_users: usize,
    /// Users with completed ingests: their whole history, ingested items in event time.
    ingested: std::collections::HashMap<u32, Vec<u32>>,
    user_index: std::collections::HashMap<String, u32>,
    model: Loaded,
    /// Tower states (`1 × d`) of the users served so far (see [`Self::user_states`]).
    states: std::sync::Mutex<std::collections::HashMap<u32, Tensor>>,
    /// SHA-256 of `model.safetensors`: states carry over to a new recommender only under the
    /// same weights.
    weights_digest: [u8; 32],
}

impl Recommender {
    /// The run's model, dataset and the interactions ingested since training (new users included).
    pub fn open(run: &Path) -> anyhow::Result<Self> {
        let TrainedRun { kind, mut ds, cfg, log, .. } = TrainedRun::open(run, None)?;
        let trained_users = ds.n_users;
        let crate::replay::ingest_log::Ingested { mut added, retracted } =
            crate::replay::ingest_log::ingested_sequences(run, &mut ds)?;
        // Users with ingests: their whole history in event time (late interactions in place,
        // retracted ones out).
        for &(u, _) in &retracted {
            added.entry(u).or_default();
        }
        let ingested = if added.keys().any(|&u| (u as usize) < trained_users) {
            let mut by_user: std::collections::HashMap<u32, [Vec<(i64, u32)>; 3]> =
                added.keys().filter(|&&u| (u as usize) < trained_users).map(|&u| (u, Default::default())).collect();
            for x in &log {
                if retracted.contains(&(x.user, x.item)) {
                    continue;
                }
                if let Some(parts) = by_user.get_mut(&x.user) {
                    let k = match x.split {
                        Split::Train => 0,
                        Split::Valid => 1,
                        Split::Test => 2,
                    };
                    parts[k].push((x.timestamp, x.item));
                }
            }
            added
                .into_iter()
                .map(|(u, late)| {
                    let prepared: Vec<(i64, u32)> = by_user.remove(&u).map(|p| p.concat()).unwrap_or_default();
                    (u, crate::replay::ingest_log::merge_event_time(&prepared, &late))
                })
                .collect()
        } else {
            added.into_iter().map(|(u, v)| (u, v.into_iter().map(|(_, i)| i).collect())).collect()
        };
        let model = if kind == ModelKind::Curec {
            let mut m = build_curec(&ds, &cfg, &Device::Cpu)?;
            m.load(&run.join("model.safetensors"))?;
            Loaded::Curec(Box::new(m))
        } else {
            let mut m = build_model(kind, &ds, &cfg, &Device::Cpu)?;
            m.load(&run.join("model.safetensors"))?;
            Loaded::Other(m)
        };
        let user_index = ds.users.iter().enumerate().map(|(i, u)| (u.clone(), i as u32)).collect();
        let weights_digest = {
            use sha2::Digest as _;
            let path = run.join("model.safetensors");
            let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
            sha2::Sha256::digest(&bytes).into()
        };
        Ok(Self { kind, ds, trained_users, ingested, user_index, model, states: Default::default(), weights_digest })
    }

    /// The user states computed so far, with what they were computed from, for
    /// [`Self::warm`] of the recommender that replaces this one.
    pub fn states(&self) -> UserStates {
        let cache = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let by_user = self
            .ds
            .users
            .iter()
            .filter_map(|raw| {
                let (u, seen) = self.seen(raw).ok()?;
                Some((raw.clone(), (seen, cache.get(&u)?.clone())))
            })
            .collect();
        UserStates { weights_digest: self.weights_digest, by_user }
    }

    /// Compute the tower state of every user now (each alone, as a request would), taking them
    /// from `previous` where the weights and the user's history are the same, so that the first
    /// request of each user costs no more than the others. Returns (computed, carried over).
    /// A no-op for models without a separate user tower.
    pub fn warm(&self, previous: Option<&UserStates>) -> anyhow::Result<(usize, usize)> {
        let Loaded::Curec(m) = &self.model else { return Ok((0, 0)) };
        let previous = previous.filter(|p| p.weights_digest == self.weights_digest);
        let (mut computed, mut carried) = (0, 0);
        for raw in &self.ds.users {
            let Ok((u, seen)) = self.seen(raw) else { continue };
            if self.states.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&u) {
                continue;
            }
            let old = previous.and_then(|p| p.by_user.get(raw)).filter(|(s, _)| *s == seen);
            let state = match old {
                Some((_, t)) => {
                    carried += 1;
                    t.clone()
                }
                None => {
                    computed += 1;
                    m.user_states(std::slice::from_ref(&seen))?
                }
            };
            self.states.lock().unwrap_or_else(|p| p.into_inner()).insert(u, state);
        }
        Ok((computed, carried))
    }

    /// Whether the raw user id is known (trained or ingested).
    pub fn knows(&self, raw_user: &str) -> bool {
        self.user_index.contains_key(raw_user)
    }

    /// Raw ids of the users (ingested ones included).
    pub fn user_ids(&self) -> Vec<String> {
        self.ds.users.clone()
    }

    /// Raw ids of the items the model scores.
    pub fn item_ids(&self) -> Vec<String> {
        self.ds.items[..self.ds.n_items].iter().map(|i| i.raw_id.clone()).collect()
    }

    /// A user's whole history as the model reads it (raw item ids, oldest first): the prepared
    /// log with the ingested interactions in event time (items new to the model left out).
    pub fn history(&self, raw_user: &str) -> anyhow::Result<Vec<String>> {
        let (_, seen) = self.seen(raw_user)?;
        Ok(seen.into_iter().map(|i| self.ds.items[i as usize].raw_id.clone()).collect())
    }

    /// Users and items the model serves (ingested ones included).
    pub fn sizes(&self) -> (usize, usize) {
        (self.ds.users.len(), self.ds.n_items)
    }

    /// Top `k` unseen items for a user, each with its top `n_reasons` matched reasons.
    pub fn recommend(&self, raw_user: &str, k: usize, n_reasons: usize) -> anyhow::Result<Vec<Recommendation>> {
        self.recommend_many(&[Query { user: raw_user.to_string(), k, n_reasons }]).pop().expect("one answer per query")
    }

    /// The items a user has seen (train, valid, test and ingested), or why the user cannot be
    /// served.
    fn seen(&self, raw_user: &str) -> anyhow::Result<(u32, Vec<u32>)> {
        let ds = &self.ds;
        let user = *self.user_index.get(raw_user).with_context(|| {
            format!(
                "--user '{raw_user}': no such user in dataset {} or its ingests (raw ids as in the input log)",
                ds.name
            )
        })?;
        let mut seen = Vec::new();
        if let Some(merged) = self.ingested.get(&user) {
            // The user's whole history with the ingests in event time (see `open`).
            seen = merged.clone();
        } else if (user as usize) < self.trained_users {
            seen = ds.history(user, Split::Test);
            seen.push(ds.test[user as usize]);
        }
        if (user as usize) >= self.trained_users {
            anyhow::ensure!(
                self.kind != ModelKind::Ncf,
                "--user '{raw_user}': added by ingestion after training, and {} learns an embedding per user; use a sequential model",
                self.kind.name()
            );
        }
        anyhow::ensure!(
            !seen.is_empty(),
            "--user '{raw_user}': no interaction with an item the model knows yet (ingested items are new to it)"
        );
        Ok((user, seen))
    }

    /// [`Self::recommend`] for several queries in one ranking pass (`curec serve` batches the
    /// requests that arrive together). Answers come in query order; a query that cannot be
    /// served (unknown user, …) gets its error without failing the others. Each answer is the
    /// one the query would get alone.
    pub fn recommend_many(&self, queries: &[Query]) -> Vec<anyhow::Result<Vec<Recommendation>>> {
        let ds = &self.ds;
        let mut out: Vec<Option<anyhow::Result<Vec<Recommendation>>>> = Vec::with_capacity(queries.len());
        let mut users = Vec::new();
        let mut seens = Vec::new();
        let mut rows = Vec::new(); // query index of each scored row
        for (q, query) in queries.iter().enumerate() {
            match self.seen(&query.user) {
                Ok((u, s)) => {
                    users.push(u);
                    seens.push(s);
                    rows.push(q);
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        if !users.is_empty() {
            let n = ds.n_items;
            let scored = (|| -> anyhow::Result<Scored> {
                Ok(match &self.model {
                    Loaded::Curec(m) => {
                        // One user at a time: a batched matmul may round differently with other
                        // rows beside it, and an answer must not depend on the traffic around it.
                        let eu = self.user_states(m, &users, &seens)?;
                        let (mut scores, mut weights) = (Vec::new(), Vec::new());
                        for (r, (&u, seen)) in users.iter().zip(&seens).enumerate() {
                            let (s, w) =
                                m.score_states(&[u], &eu.narrow(0, r, 1)?, std::slice::from_ref(seen), true)?;
                            scores.extend(s.flatten_all()?.to_vec1::<f32>()?);
                            weights.extend(w.expect("weights were asked for").flatten_all()?.to_vec1::<f32>()?);
                        }
                        (scores, Some((m.as_ref(), weights)))
                    }
                    Loaded::Other(m) => {
                        let mut tmp = ds.clone();
                        for (&u, s) in users.iter().zip(&seens) {
                            tmp.train[u as usize] = s.clone();
                        }
                        (m.score(&tmp, &users, Split::Valid)?, None)
                    }
                })
            })();
            match scored {
                Err(e) => {
                    let msg = format!("{e:#}");
                    for &q in &rows {
                        out[q] = Some(Err(anyhow::anyhow!("{msg}")));
                    }
                }
                Ok((scores, weights)) => {
                    for (r, (&q, seen)) in rows.iter().zip(&seens).enumerate() {
                        let scores = &scores[r * n..(r + 1) * n];
                        let w = weights.as_ref().map(|(m, w)| {
                            let l = m.bank().max_list();
                            (*m, &w[r * n * l..(r + 1) * n * l])
                        });
                        out[q] = Some(Ok(self.top(scores, w, seen, queries[q].k, queries[q].n_reasons)));
                    }
                }
            }
        }
        out.into_iter().map(|a| a.expect("every query answered")).collect()
    }

    /// The tower states of `users` after `seens` (`U × d`): kept per user, since they change
    /// only when the user's history does (and a history changes only by an ingest, which opens
    /// a new recommender). A state is always computed for its user alone, so an answer does
    /// not depend on which requests shared its ranking pass or came before it.
    fn user_states(&self, m: &Curec, users: &[u32], seens: &[Vec<u32>]) -> anyhow::Result<Tensor> {
        let mut cache = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows = Vec::with_capacity(users.len());
        for (&u, seen) in users.iter().zip(seens) {
            let row = match cache.get(&u) {
                Some(r) => r.clone(),
                None => {
                    let r = m.user_states(std::slice::from_ref(seen))?;
                    cache.insert(u, r.clone());
                    r
                }
            };
            rows.push(row);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// The top `k` unseen items of one user's `scores`, each with its `n_reasons` heaviest
    /// reasons under `weights` (`N × L`).
    fn top(
        &self,
        scores: &[f32],
        weights: Option<(&Curec, &[f32])>,
        seen: &[u32],
        k: usize,
        n_reasons: usize,
    ) -> Vec<Recommendation> {
        let ds = &self.ds;
        let seen: std::collections::HashSet<u32> = seen.iter().copied().collect();
        let mut order: Vec<u32> = (0..ds.n_items as u32).filter(|i| !seen.contains(i)).collect();
        let cmp = |a: &u32, b: &u32| scores[*b as usize].total_cmp(&scores[*a as usize]).then(a.cmp(b));
        if k < order.len() {
            order.select_nth_unstable_by(k, cmp);
            order.truncate(k);
        }
        order.sort_by(cmp);
        order
            .into_iter()
            .map(|i| {
                let reasons = match weights {
                    Some((m, w)) => {
                        let bank = m.bank();
                        let l = bank.max_list();
                        let mut rs: Vec<ReasonWeight> = bank.lists[i as usize]
                            .iter()
                            .enumerate()
                            .map(|(j, &(r, _))| ReasonWeight {
                                text: bank.texts[r as usize].clone(),
                                weight: w[i as usize * l + j],
                            })
                            .collect();
                        rs.sort_by(|a, b| b.weight.total_cmp(&a.weight));
                        rs.truncate(n_reasons);
                        rs
                    }
                    None => Vec::new(),
                };
                Recommendation {
                    item: ds.items[i as usize].raw_id.clone(),
                    title: ds.items[i as usize].info.title.clone(),
                    score: scores[i as usize],
                    reasons,
                }
            })
            .collect()
    }
}

/// Tower states by raw user id, with the history each was computed after, and the digest of
/// the weights that computed them (see [`Recommender::warm`]).
pub struct UserStates {
    weights_digest: [u8; 32],
    by_user: std::collections::HashMap<String, (Vec<u32>, Tensor)>,
}

/// Scores `U × N` of one ranking pass, and for a CUREC model its reason weights `U × N × L`.
type Scored<'a> = (Vec<f32>, Option<(&'a Curec, Vec<f32>)>);

/// One recommendation query: a raw user id, how many items, how many reasons per item.
#[derive(Debug, Clone)]
pub struct Query {
    pub user: String,
    pub k: usize,
    pub n_reasons: usize,
}

/// Markdown table header matching [`table_row`].
pub fn table_header() -> String {
    "| model | dataset | Recall@1 | Recall@5 | Recall@10 | Recall@20 | NDCG@1 | NDCG@5 | NDCG@10 (95% CI) | NDCG@20 | train s |\n\
     |---|---|---|---|---|---|---|---|---|---|---|"
        .to_string()
}

/// One Markdown row of a metrics object.
pub fn table_row(m: &Value) -> String {
    let f = |k: &str| m[k].as_f64().map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    // One run: the 95% bootstrap interval over users; a summary over seeds: ± the seeds' sd.
    let ci = m["ndcg@10_ci95"]
        .as_array()
        .map(|a| format!(" [{:.4}, {:.4}]", a[0].as_f64().unwrap_or(f64::NAN), a[1].as_f64().unwrap_or(f64::NAN)))
        .or_else(|| {
            let n = m["seeds"].as_array()?.len();
            Some(format!(" ± {:.4} ({n} seeds)", m["ndcg@10_sd"].as_f64()?))
        });
    let secs = m["train_seconds"].as_f64().map(|s| format!("{s:.1}")).unwrap_or_else(|| "-".into());
    let model = match m["variant"].as_str() {
        Some(v) => format!("{}-{v}", m["model"].as_str().unwrap_or("?")),
        None => m["model"].as_str().unwrap_or("?").to_string(),
    };
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {}{} | {} | {} |",
        model,
        m["dataset"].as_str().unwrap_or("?"),
        f("recall@1"),
        f("recall@5"),
        f("recall@10"),
        f("recall@20"),
        f("ndcg@1"),
        f("ndcg@5"),
        f("ndcg@10"),
        ci.unwrap_or_default(),
        f("ndcg@20"),
        secs
    )
}

/// `curec run <job.toml>`: prepare (unless already prepared) and train every listed model.
pub fn run_job(cfg: &JobConfig, force_prepare: bool) -> anyhow::Result<Vec<Value>> {
    let out = cfg.train.out.clone().context("the job file needs train.out (the run directory)")?;
    let data_dir = cfg.prepare.out.clone().unwrap_or_else(|| out.join("data"));
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create the run directory", out.display()))?;
    if force_prepare || !data_dir.join(prepared::STATS).is_file() {
        let input = cfg.prepare.input.clone().context("the job file needs prepare.input (the raw dataset)")?;
        let t0 = std::time::Instant::now();
        let stats = prepare(&input, &data_dir, &cfg.prepare.format, cfg)?;
        record_stage(&out, "prepare", t0)?;
        tracing::info!(
            "prepared {}: {} users, {} items, {} interactions",
            data_dir.display(),
            stats["users"],
            stats["items"],
            stats["interactions"]
        );
    }
    let mut rows = Vec::new();
    println!("{}", table_header());
    for name in &cfg.train.models {
        let kind = ModelKind::parse(name).with_context(|| {
            format!("train.models: unknown model '{name}', expected pop, ncf, sasrec, bert4rec, curec or kar")
        })?;
        let dir = out.join(kind.name());
        let m = match read_json(&dir.join("metrics.json")) {
            Ok(m) => {
                tracing::info!("{}: already trained (delete it to redo)", dir.display());
                m
            }
            Err(_) => {
                let t0 = std::time::Instant::now();
                let m = train(kind, &data_dir, &dir, cfg)?;
                record_stage(&out, kind.name(), t0)?;
                m
            }
        };
        println!("{}", table_row(&m));
        rows.push(m);
    }
    let write_table = |rows: &[Value]| {
        let table = std::iter::once(table_header()).chain(rows.iter().map(table_row)).collect::<Vec<_>>().join("\n");
        write_text(&out.join("table.md"), &(table + "\n"))
    };
    write_table(&rows)?;
    let mut adapter = None;
    if let Some(model) = &cfg.pretrain.model {
        let dir = out.join("pretrain");
        let eval = match read_json(&dir.join("eval.json")) {
            Ok(v) => {
                tracing::info!("{}: pretraining already done (delete it to redo)", dir.display());
                v
            }
            Err(_) => {
                let t0 = std::time::Instant::now();
                let v = crate::align::pretrain(&data_dir, model, &dir, &cfg.pretrain, &cfg.grpo, &cfg.lora)?;
                record_stage(&out, "alignment", t0)?;
                v
            }
        };
        let table = pretrain_table(model, &eval);
        println!("{table}");
        write_text(&out.join("pretrain.md"), &(table + "\n"))?;
        adapter = Some(dir.join("adapter.safetensors")).filter(|p| p.is_file());
    }
    let mut cfg = cfg.clone();
    if let Some(model) = cfg.features.model.clone() {
        let dir = out.join("features");
        if cfg.features.adapter.is_none() && cfg.features.aligned {
            cfg.features.adapter = adapter;
        }
        let t0 = std::time::Instant::now();
        let done_before = dir.join("manifest.json").is_file();
        let m = crate::features::generate_features(&data_dir, &model, &dir, &cfg.features)?;
        if !done_before {
            record_stage(&out, "features", t0)?;
        }
        tracing::info!("features: {} patterns, {} reasons in {}", m["patterns"], m["reasons"], dir.display());
        cfg.curec.features.get_or_insert(dir);
    }
    if cfg.curec.features.is_some() {
        for v in cfg.curec.variants.clone() {
            cfg.curec.variant = v;
            let dir = out.join(format!("curec-{}", v.name()));
            let m = match read_json(&dir.join("metrics.json")) {
                Ok(m) => {
                    tracing::info!("{}: already trained (delete it to redo)", dir.display());
                    m
                }
                Err(_) => {
                    let t0 = std::time::Instant::now();
                    let m = train(ModelKind::Curec, &data_dir, &dir, &cfg)?;
                    record_stage(&out, &format!("curec-{}", v.name()), t0)?;
                    m
                }
            };
            println!("{}", table_row(&m));
            rows.push(m);
            write_table(&rows)?;
        }
    }
    Ok(rows)
}

/// Stage wall times of a job: `<out>/stages.json` maps each stage run (not reused) to seconds.
pub const STAGES: &str = "stages.json";

/// Add the seconds since `t0` under `stage` to `<out>/stages.json`.
pub fn record_stage(out: &Path, stage: &str, t0: std::time::Instant) -> anyhow::Result<()> {
    let path = out.join(STAGES);
    let mut v: Value = read_json(&path).unwrap_or_else(|_| json!({}));
    if let Some(m) = v.as_object_mut() {
        m.insert(stage.to_string(), json!((t0.elapsed().as_secs_f64() * 10.0).round() / 10.0));
    }
    write_json(&path, &v)
}

/// `stages.json` as a Markdown table with the total.
pub fn stages_table(out: &Path) -> Option<String> {
    let v = read_json(&out.join(STAGES)).ok()?;
    let m = v.as_object()?;
    let total: f64 = m.values().filter_map(Value::as_f64).sum();
    let rows: Vec<String> = m.iter().map(|(k, s)| format!("| {k} | {:.1} |", s.as_f64().unwrap_or(f64::NAN))).collect();
    Some(format!("| stage | seconds |\n|---|---|\n{}\n| **total** | **{total:.1}** |", rows.join("\n")))
}

/// Aligned vs base vs random on the validation prompts, as Markdown.
pub fn pretrain_table(model: &str, eval: &Value) -> String {
    let f = |k: &str| eval[k].as_f64().unwrap_or(f64::NAN);
    let ci = |k: &str| {
        let v = &eval[k];
        format!("[{:.3}, {:.3}]", v[0].as_f64().unwrap_or(f64::NAN), v[1].as_f64().unwrap_or(f64::NAN))
    };
    format!(
        "| model | policy | format rate | legal rate | hit rate (95% CI) |\n|---|---|---|---|---|\n\
         | {model} | aligned (GRPO, {} steps) | {:.3} | {:.3} | {:.3} {} |\n\
         | {model} | base | {:.3} | {:.3} | {:.3} {} |\n\
         | — | random choice | — | 1.000 | {:.3} |",
        eval["steps"],
        f("format_rate"),
        f("legal_rate"),
        f("hit_rate"),
        ci("hit_rate_ci95"),
        f("base_format_rate"),
        f("base_legal_rate"),
        f("base_hit_rate"),
        ci("base_hit_rate_ci95"),
        f("random_hit_rate"),
    )
}

pub fn write_json(path: &Path, v: &Value) -> anyhow::Result<()> {
    write_text(path, &(serde_json::to_string_pretty(v)? + "\n"))
}

/// Copy the directory `from` into `to` (created), recursively.
pub fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("{}: cannot create", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("{}: cannot read", from.display()))? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type()?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).with_context(|| format!("{}: cannot copy", src.display()))?;
        }
    }
    Ok(())
}

pub fn write_text(path: &Path, s: &str) -> anyhow::Result<()> {
    prepared::write_atomic(path, |f| {
        use std::io::Write;
        f.write_all(s.as_bytes()).map_err(|e| data::DataError::io(path, e))
    })?;
    Ok(())
}

pub fn read_json(path: &Path) -> anyhow::Result<Value> {
    let s = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&s).with_context(|| format!("{}: not valid JSON", path.display()))
}
