//! `curec replay`: the stages around the correction dataflow.
//!
//! A replay run directory holds `snapshots/` (the state after each N epochs), `epochs.jsonl`
//! (the live per-epoch log, with timings), `metrics.json` (the reward model evaluated with the
//! corrected features, no retraining), `config.toml` (the reward model's config pointing at the
//! newest snapshot, so `curec eval --run` and `curec recommend --model-dir` work on it) and
//! `model.safetensors` (the reward model's weights, copied).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde_json::{json, Map, Value};

use crate::config::JobConfig;
use crate::data::{prepared, Dataset, Split};
use crate::eval;
use crate::io::{write_json, write_text};
use crate::pipeline::models::build_curec;
use crate::pipeline::setup::{epoch_logger, llm_factory, seed_caches};
use crate::rec::Model;
use crate::replay::board::Board;
use crate::replay::graph::{run_dataflow, Initial, Topology};
use crate::replay::llm_corrector::LlmSetup;
use crate::replay::snapshot::identity_hash;
use crate::replay::snapshot::{self, State};
use crate::replay::source::{self, by_epoch};
use crate::replay::{EpochMetrics, Event};
use crate::run_dir::{metrics_json, TrainedRun};
/// Where a job's stages live.
struct Stages {
    data: PathBuf,
    reward_model: PathBuf,
    model: String,
    adapter: Option<PathBuf>,
}

fn stages(cfg: &JobConfig) -> Result<Stages> {
    let out = cfg.train.out.clone().context("the job needs train.out (or pass --out)")?;
    let data = cfg.prepare.out.clone().unwrap_or_else(|| out.join("data"));
    let reward_model = cfg.replay.reward_model.clone().unwrap_or_else(|| out.join("curec-attention"));
    let model = cfg.features.model.clone().context(
        "replay: features.model names the LLM to correct (the one that wrote the features); set it in the job file",
    )?;
    let pretrained = out.join("pretrain").join("adapter.safetensors");
    let adapter =
        cfg.features.adapter.clone().or_else(|| (cfg.features.aligned && pretrained.is_file()).then_some(pretrained));
    Ok(Stages { data, reward_model, model, adapter })
}

/// The reward model of `run` evaluated with the features in `features` (test and valid splits).
/// Test metrics, valid metrics and the config used, then both evaluations (for `ranks.json`, so
/// `curec compare` pairs replay runs with trained ones).
type Evaluated = (Map<String, Value>, Map<String, Value>, Value, (eval::Evaluation, eval::Evaluation));

fn evaluate_with(run: &Path, data: &Path, features: &Path) -> Result<Evaluated> {
    let TrainedRun { ds, mut cfg, .. } = TrainedRun::open(run, Some(data))?;
    cfg.curec.features = Some(features.to_path_buf());
    let mut m = build_curec(&ds, &cfg, &Device::Cpu)?;
    m.load(&run.join("model.safetensors"))?;
    let test = eval::evaluate(&m, &ds, Split::Test, cfg.train.eval_batch)?;
    let valid = eval::evaluate(&m, &ds, Split::Valid, cfg.train.eval_batch)?;
    let (n, seed) = (cfg.train.bootstrap, cfg.train.seed);
    Ok((metrics_json(&test, n, seed), metrics_json(&valid, n, seed), serde_json::to_value(&cfg)?, (test, valid)))
}

/// Write `metrics.json`, `config.toml` and `model.safetensors` so the run reads as a trained run
/// whose features are `features`.
#[allow(clippy::too_many_arguments)]
fn write_run(
    out: &Path,
    rm: &Path,
    data: &Path,
    features: &Path,
    variant: &str,
    ds: &Dataset,
    seconds: f64,
    extra: Value,
) -> Result<Value> {
    seed_caches(out, features)?;
    let (test, valid, cfg, evaluations) = evaluate_with(rm, data, features)?;
    let mut m = Map::new();
    m.insert("model".into(), json!("curec"));
    m.insert("variant".into(), json!(variant));
    m.insert("dataset".into(), json!(ds.name));
    m.insert("data".into(), json!(data.display().to_string()));
    m.insert("split".into(), json!("test"));
    m.insert("users".into(), json!(ds.n_users));
    m.insert("items".into(), json!(ds.n_items));
    m.extend(test);
    m.insert("valid".into(), Value::Object(valid));
    m.insert("train_seconds".into(), json!(seconds));
    m.insert("features".into(), json!(features.display().to_string()));
    m.insert("reward_model".into(), json!(rm.display().to_string()));
    m.insert("replay".into(), extra);
    m.insert("config".into(), cfg);
    let m = Value::Object(m);
    let mut run_cfg = JobConfig::load(Some(&rm.join("config.toml")), &[])?;
    run_cfg.curec.features = Some(features.to_path_buf());
    run_cfg.curec.init_tower = None;
    write_text(&out.join("config.toml"), &run_cfg.to_toml())?;
    let weights = out.join("model.safetensors");
    let tmp = crate::io::tmp_path(&weights);
    std::fs::copy(rm.join("model.safetensors"), &tmp)
        .with_context(|| format!("{}: cannot copy the reward model", rm.display()))?;
    std::fs::rename(&tmp, &weights)?;
    crate::run_dir::write_ranks(out, &evaluations.0, &evaluations.1)?;
    write_json(&out.join("metrics.json"), &m)?;
    Ok(m)
}

/// Initial state for a first replay: the features' patterns and reason lists, and each user's
/// train items before their first replayed interaction.
fn initial_state(
    ds: &Dataset,
    times: &[Vec<i64>],
    features: &Path,
    events: &[Event],
    keep: usize,
    history_kept: usize,
) -> Result<State> {
    let mut state = State::load(features, keep)?;
    let mut first: HashMap<u32, usize> = HashMap::new();
    for e in events {
        let pos = (e.key & 0xffff_ffff) as usize;
        first.entry(e.user).and_modify(|p| *p = (*p).min(pos)).or_insert(pos);
    }
    for (u, seq) in ds.train.iter().enumerate() {
        let end = first.get(&(u as u32)).copied().unwrap_or(seq.len());
        if end > 0 {
            let from = end.saturating_sub(history_kept);
            let e = state.users.entry(u as u32).or_default();
            e.history = seq[from..end].to_vec();
            e.times = times[u][from..end].to_vec();
        }
    }
    Ok(state)
}

/// Snapshot epochs: every `every`-th epoch of `order` and the last one.
fn snapshot_epochs(order: &[u64], every: u64) -> BTreeSet<u64> {
    let mut s: BTreeSet<u64> =
        order.iter().enumerate().filter(|(i, _)| (*i as u64 + 1).is_multiple_of(every)).map(|(_, e)| *e).collect();
    if let Some(l) = order.last() {
        s.insert(*l);
    }
    s
}

/// `curec replay <job.toml> --out <run>`: every stage before the correction (reused when its
/// output exists), the correction dataflow (resumed from the newest complete snapshot), and the
/// reward model evaluated with the corrected features; `replay.workers` threads in one process.
pub fn replay(job: &JobConfig, out: &Path) -> Result<Value> {
    let topology = Topology::threads(job.replay.workers);
    Ok(replay_on(job, out, &topology)?.expect("one process holds worker 0"))
}

/// [`replay`] as one process of `topology`: every process runs the same command with its own
/// `process`; the stages before the correction must be complete when there are several (they
/// are not run by a cluster). The first process writes the manifests, the run's metrics and its
/// log, and returns the run's metrics; the others return `None` once the dataflow is done.
pub fn replay_on(job: &JobConfig, out: &Path, topology: &Topology) -> Result<Option<Value>> {
    let mut cfg = job.clone();
    cfg.replay.validate()?;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    if cfg.train.out.is_none() {
        cfg.train.out = Some(out.to_path_buf());
    }
    let mut st = stages(&cfg)?;
    if !st.reward_model.join("metrics.json").is_file() || !st.data.join(prepared::STATS).is_file() {
        if topology.processes > 1 {
            bail!(
                "{}: the stages before the correction are not complete; run them in one process first \
                 (`curec replay` without --processes, or `curec run` on the job)",
                st.reward_model.display()
            );
        }
        crate::pipeline::stages::run_job(&cfg, false)?;
        // The stages just run may have written the aligned adapter, which the correction starts
        // from (as the features did): resolve the stages again.
        st = stages(&cfg)?;
    }
    if !st.reward_model.join("model.safetensors").is_file() {
        bail!(
            "{}: no trained reward model (run `curec train curec`, or set replay.reward_model)",
            st.reward_model.display()
        );
    }
    let rm = TrainedRun::open(&st.reward_model, Some(&st.data))?;
    let features = rm.cfg.curec.features.clone().context("the reward model run names no features directory")?;
    let ds = rm.ds;
    if !cfg.replay.correct {
        let extra = json!({"correct": false});
        if !topology.is_first() {
            return Ok(None);
        }
        return write_run(out, &st.reward_model, &st.data, &features, "no-correction", &ds, 0.0, extra).map(Some);
    }
    let xs = prepared::read_interactions(&st.data.join(prepared::INTERACTIONS))?;
    let seed = cfg.train.seed;
    let events = source::replay_events(&ds, &xs, &cfg.replay, seed);
    if events.is_empty() {
        bail!("{}: no train interaction to replay with replay.users/per_user/last_seconds as set", st.data.display());
    }
    let ep = source::epochs(&events, &cfg.replay, 0)?;
    let all_events = events.clone();
    let grouped = by_epoch(events, &ep);
    let order: Vec<u64> = grouped.iter().map(|(t, _)| *t).collect();
    let mut rc = cfg.replay.clone();
    rc.workers = 0;
    let identity = json!({
        "replay": rc,
        "features": cfg.features,
        "grpo": cfg.grpo,
        "lora": cfg.lora,
        "model": st.model,
        "adapter": st.adapter,
        "reward_model": st.reward_model,
        "data": st.data,
        "seed": seed,
    });
    let identity = json!({"hash": identity_hash(&identity), "config": identity});
    let root = out.join("snapshots");
    let (state, watermark, done) = match snapshot::newest(&root) {
        Some((e, dir)) => {
            let m = snapshot::manifest(&dir)?;
            if m["identity"]["hash"] != identity["hash"] {
                bail!(
                    "{}: written by another config (hash {}); use a new --out or delete it",
                    dir.display(),
                    m["identity"]["hash"]
                );
            }
            tracing::info!("resuming from {} (after epoch {e})", dir.display());
            (
                State::load(&dir, cfg.replay.reasons_kept)?,
                Some((e, dir.clone())),
                snapshot::read_metrics(&dir.join(snapshot::METRICS))?,
            )
        }
        None => {
            if topology.is_first() {
                seed_caches(&features, out)?;
            }
            let times = crate::features::plan::train_timestamps(&ds, &xs);
            let s =
                initial_state(&ds, &times, &features, &all_events, cfg.replay.reasons_kept, cfg.replay.history_kept)?;
            (s, None, Vec::new())
        }
    };
    let wm = watermark.as_ref().map(|(e, _)| *e);
    let todo: Vec<(u64, Vec<Event>)> = grouped.into_iter().filter(|(t, _)| wm.is_none_or(|w| *t > w)).collect();
    let log = out.join("epochs.jsonl");
    match wm {
        _ if !topology.is_first() => {}
        None => write_text(&log, "")?,
        // Lines a killed run wrote after its last snapshot are written again as the epochs rerun.
        Some(w) => {
            let kept: Vec<Value> = crate::features::store::read_log::<Value>(&log)?
                .into_iter()
                .filter(|l| l["epoch"].as_u64().is_some_and(|e| e <= w))
                .collect();
            write_text(&log, "")?;
            crate::features::store::append_log(&log, &kept)?;
        }
    }
    let board = Arc::new(Board::new(
        root.clone(),
        topology.peers(),
        snapshot_epochs(&order, cfg.replay.snapshot_every).into_iter().filter(|e| wm.is_none_or(|w| *e > w)).collect(),
        identity.clone(),
        ds.users.clone(),
        ds.items.iter().map(|i| i.raw_id.clone()).collect(),
        json!({}),
        done,
        epoch_logger(log, order.len(), order.len() - todo.len()),
    ));
    let setup = LlmSetup {
        model: st.model.clone(),
        adapter: st.adapter.clone(),
        features: cfg.features.clone(),
        grpo: cfg.grpo.clone(),
        lora: cfg.lora.clone(),
        replay: cfg.replay.clone(),
        items: ds.items.clone(),
        train: true,
        resume: watermark.as_ref().map(|(_, d)| d.clone()),
        cache_dir: out.to_path_buf(),
        total_steps: order.len(),
        fresh_schedule: false,
    };
    let initial = Arc::new(Initial {
        state,
        history_kept: cfg.replay.history_kept,
        reasons_kept: cfg.replay.reasons_kept,
        freeze: !cfg.replay.update,
        attach_reasons: true,
        single_policy: true,
    });
    let t_correction = Instant::now();
    let outcome =
        run_dataflow(todo, initial, llm_factory(setup, st.reward_model.clone(), st.data.clone()), board, topology)?;
    if !topology.is_first() {
        return Ok(None);
    }
    let (last, dir) = snapshot::newest(&root).context("the replay wrote no snapshot")?;
    let ms = snapshot::read_metrics(&dir.join(snapshot::METRICS))?;
    let rewards: Vec<Option<f64>> = ms.iter().map(EpochMetrics::mean_reward).collect();
    let extra = json!({
        "epochs": ms.len(),
        "last_epoch": last,
        "interactions": ms.iter().map(|m| m.interactions).sum::<u64>(),
        "reasons_written": ms.iter().map(|m| m.reasons_written).sum::<u64>(),
        "patterns_written": ms.iter().map(|m| m.patterns_written).sum::<u64>(),
        "unparsed": ms.iter().map(|m| m.unparsed).sum::<u64>(),
        "mean_reward_per_epoch": rewards,
        "seconds_this_run": outcome.seconds,
        "epoch_seconds_this_run": outcome.epoch_seconds,
        "snapshot": dir.display().to_string(),
        "update": cfg.replay.update,
        "slice": format!("{} {}", cfg.replay.slice, cfg.replay.slice_by),
        "users": cfg.replay.users,
        "per_user": cfg.replay.per_user,
        "last_seconds": cfg.replay.last_seconds,
    });
    let variant = if cfg.replay.update { "correction" } else { "no-update" };
    crate::run_dir::record_stage(out, "correction", t_correction)?;
    write_run(out, &st.reward_model, &st.data, &dir, variant, &ds, outcome.seconds, extra).map(Some)
}
