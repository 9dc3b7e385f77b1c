//! The training-side stages as library functions: `curec prepare`, `curec train`, `curec eval`
//! and `curec run` (a whole job file); the CLI, the tests and `curec replay` call them alike.

use std::path::Path;

use anyhow::Context;
use candle_core::Device;
use serde_json::{json, Map, Value};

use crate::config::JobConfig;
use crate::data::{self, prepared, preprocess, Dataset, Format, Split};
use crate::eval::{self, Evaluation};
use crate::io::{read_json, write_json, write_text};
use crate::pipeline::models::{build_model, model_config};
use crate::rec::train::{fit, FitConfig, FitReport};
use crate::rec::ModelKind;
use crate::run_dir::{metrics_json, record_stage, write_ranks, StagedRun, TrainedRun};
use crate::tables::{pretrain_table, table_header, table_row};

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
    let (p, stream) = if cfg.preprocess.split == "time" {
        let (p, s) = data::time_split::split_time(&log, &cfg.preprocess)?;
        (p, Some(s))
    } else {
        (preprocess::preprocess(&log, &cfg.preprocess)?, None)
    };
    let name = cfg.prepare.dataset.clone().unwrap_or_else(|| {
        let base = if input.is_file() { input.file_stem() } else { input.file_name() };
        base.map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "dataset".into())
    });
    let count = |s: Split| p.interactions.iter().filter(|x| x.split == s).count();
    let mut stats = json!({
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
    if let Some(s) = &stream {
        // The head is the prepared dataset above; `items` counts the whole catalogue.
        stats["head"] = json!(p.interactions.len());
        stats["stream"] = json!(s.rows.len());
        stats["new_item_interactions"] = json!(s.new_item_interactions);
        stats["new_user_interactions"] = json!(s.new_user_interactions);
        stats["new_items"] = json!(s.new_items);
        stats["new_users"] = json!(s.new_users.len());
    }
    prepared::write_dir(out, &p, stream.as_ref(), &stats)?;
    Ok(stats)
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
        let m = crate::pipeline::features::generate_features(&data_dir, &model, &dir, &cfg.features)?;
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
