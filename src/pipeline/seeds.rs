//! `curec train --seeds a,b,c`: the same model trained once per seed, and the spread over seeds.
//!
//! A few hundred test users make one run's number noisy, and so does the seed: on ml-latest-small,
//! SASRec's test NDCG@10 moves by about ±0.005 from seed to seed. A table that stands next to a
//! paper's should give the mean over seeds and how far the seeds spread. Each seed is an ordinary
//! run in `<out>/seed-<s>/`; a finished one trained with the same config is reused, so a killed
//! sweep resumes where it stopped and more seeds can be added later.

use std::path::Path;

use anyhow::Context;
use serde_json::{json, Map, Value};

use crate::config::{same_config, JobConfig};
use crate::io::{read_json, write_json};
use crate::rec::ModelKind;

/// The test metrics summarised over seeds.
pub const METRICS: [&str; 8] =
    ["recall@1", "recall@5", "recall@10", "recall@20", "ndcg@1", "ndcg@5", "ndcg@10", "ndcg@20"];

/// Parse `--seeds 2024,1,2`: distinct unsigned integers, at least one.
pub fn parse_seeds(s: &str) -> anyhow::Result<Vec<u64>> {
    let mut seeds = Vec::new();
    for part in s.split(',').map(str::trim) {
        let seed: u64 = part
            .parse()
            .with_context(|| format!("--seeds: '{part}' is not a seed (expected comma-separated integers)"))?;
        anyhow::ensure!(!seeds.contains(&seed), "--seeds: seed {seed} is listed twice");
        seeds.push(seed);
    }
    Ok(seeds)
}

/// Train `kind` once per seed into `out/seed-<s>/` (reusing finished runs with the same config)
/// and write `out/metrics.json`: each test metric's mean over seeds under its usual key, with
/// `<metric>_sd` (sample standard deviation), `<metric>_min`, `<metric>_max`, and `per_seed` (one
/// row per seed: seed, the test metrics, best epoch, epochs, train seconds). Returns it.
pub fn train_seeds(
    kind: ModelKind,
    data_dir: &Path,
    out: &Path,
    cfg: &JobConfig,
    seeds: &[u64],
) -> anyhow::Result<Value> {
    anyhow::ensure!(!seeds.is_empty(), "--seeds: no seeds given");
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create run directory", out.display()))?;
    let mut runs = Vec::with_capacity(seeds.len());
    for &seed in seeds {
        let mut cfg = cfg.clone();
        cfg.train.seed = seed;
        // `curec.init_tower = ".../seed-{seed}/model.safetensors"`: each seed warm-starts from
        // the SASRec run of the same seed.
        if let Some(p) = &cfg.curec.init_tower {
            cfg.curec.init_tower = Some(p.to_string_lossy().replace("{seed}", &seed.to_string()).into());
        }
        let dir = out.join(format!("seed-{seed}"));
        let m = match finished(&dir, &cfg)? {
            Some(m) => {
                tracing::info!("{}: already trained with this config (delete it to redo)", dir.display());
                m
            }
            None => crate::pipeline::stages::train(kind, data_dir, &dir, &cfg)?,
        };
        println!("{}", crate::tables::table_row(&m));
        runs.push((seed, m));
    }
    let summary = summarize(&runs)?;
    write_json(&out.join("metrics.json"), &summary)?;
    Ok(summary)
}

/// A finished run in `dir` trained with exactly `cfg`, if there is one. A run with another config
/// is an error rather than silently mixed into the summary.
fn finished(dir: &Path, cfg: &JobConfig) -> anyhow::Result<Option<Value>> {
    let metrics = dir.join("metrics.json");
    if !metrics.exists() {
        return Ok(None);
    }
    let config = dir.join("config.toml");
    let saved = std::fs::read_to_string(&config).with_context(|| format!("{}: cannot read", config.display()))?;
    anyhow::ensure!(
        same_config(&saved, cfg),
        "{}: a run with another config is already there; delete it or choose another --out",
        dir.display()
    );
    read_json(&metrics).map(Some)
}

/// The summary written to `metrics.json` from one `(seed, metrics.json)` per run.
pub fn summarize(runs: &[(u64, Value)]) -> anyhow::Result<Value> {
    let (_, first) = runs.first().context("no runs to summarise")?;
    let mut m = Map::new();
    for key in ["model", "variant", "dataset", "data", "split", "users", "items", "config"] {
        if let Some(v) = first.get(key) {
            m.insert(key.into(), v.clone());
        }
    }
    // The seed lives in each run (`per_seed`); the shared config would name only the first.
    if let Some(config) = m.get_mut("config").and_then(Value::as_object_mut) {
        config.remove("seed");
    }
    m.insert("seeds".into(), json!(runs.iter().map(|(s, _)| *s).collect::<Vec<_>>()));
    let number = |seed: u64, run: &Value, key: &str| -> anyhow::Result<f64> {
        run[key].as_f64().with_context(|| format!("seed {seed}: metrics.json has no number '{key}'"))
    };
    for key in METRICS {
        let xs = runs.iter().map(|(s, r)| number(*s, r, key)).collect::<anyhow::Result<Vec<_>>>()?;
        let (mean, sd) = mean_sd(&xs);
        m.insert(key.into(), json!(mean));
        m.insert(format!("{key}_sd"), json!(sd));
        m.insert(format!("{key}_min"), json!(xs.iter().copied().fold(f64::INFINITY, f64::min)));
        m.insert(format!("{key}_max"), json!(xs.iter().copied().fold(f64::NEG_INFINITY, f64::max)));
    }
    let seconds = runs.iter().map(|(s, r)| number(*s, r, "train_seconds")).collect::<anyhow::Result<Vec<_>>>()?;
    m.insert("train_seconds".into(), json!(mean_sd(&seconds).0));
    let per_seed: Vec<Value> = runs
        .iter()
        .map(|(seed, r)| {
            let mut row = Map::new();
            row.insert("seed".into(), json!(seed));
            for key in METRICS.iter().copied().chain(["ndcg@10_ci95", "best_epoch", "epochs", "train_seconds"]) {
                if let Some(v) = r.get(key) {
                    row.insert(key.into(), v.clone());
                }
            }
            Value::Object(row)
        })
        .collect();
    m.insert("per_seed".into(), Value::Array(per_seed));
    Ok(Value::Object(m))
}

/// Mean and sample standard deviation (0 for a single value).
pub fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let sd = if xs.len() > 1 { (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (mean, sd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_added_later_at_their_defaults_keep_old_runs_reusable() {
        let cfg = JobConfig::default();
        let full = cfg.to_toml();
        assert!(same_config(&full, &cfg));
        // A run saved before `curec.ids` and the `[ncf]` section existed.
        let mut old: toml::Table = full.parse().unwrap();
        old.get_mut("curec").and_then(toml::Value::as_table_mut).unwrap().remove("ids");
        old.remove("ncf");
        let old = toml::to_string_pretty(&old).unwrap();
        assert!(same_config(&old, &cfg));
        // ... but not once the new setting leaves its default, nor when a saved value differs.
        let mut text_only = cfg.clone();
        text_only.curec.ids = false;
        assert!(!same_config(&old, &text_only));
        let mut other = cfg.clone();
        other.train.seed += 1;
        assert!(!same_config(&full, &other) && !same_config(&old, &other));
        assert!(!same_config("not toml [", &cfg));
    }

    fn run(ndcg10: f64) -> Value {
        let mut m = Map::new();
        m.insert("model".into(), json!("sasrec"));
        m.insert("dataset".into(), json!("toy"));
        m.insert("config".into(), json!({"seed": 1, "max_len": 50}));
        for key in METRICS {
            m.insert(key.into(), json!(if key == "ndcg@10" { ndcg10 } else { 0.5 }));
        }
        m.insert("train_seconds".into(), json!(10.0));
        m.insert("best_epoch".into(), json!(3));
        Value::Object(m)
    }

    #[test]
    fn summary_has_mean_sd_min_max_and_every_seed() {
        let s = summarize(&[(1, run(0.04)), (2, run(0.05)), (3, run(0.06))]).unwrap();
        assert!((s["ndcg@10"].as_f64().unwrap() - 0.05).abs() < 1e-12);
        assert!((s["ndcg@10_sd"].as_f64().unwrap() - 0.01).abs() < 1e-12);
        assert_eq!(s["ndcg@10_min"], json!(0.04));
        assert_eq!(s["ndcg@10_max"], json!(0.06));
        assert_eq!(s["recall@20"], json!(0.5));
        assert_eq!(s["recall@20_sd"], json!(0.0));
        assert_eq!(s["seeds"], json!([1, 2, 3]));
        assert_eq!(s["per_seed"][1]["seed"], json!(2));
        assert_eq!(s["per_seed"][1]["ndcg@10"], json!(0.05));
        assert_eq!(s["per_seed"][2]["best_epoch"], json!(3));
        assert!(s["config"].get("seed").is_none(), "the shared config must not name one seed");
        assert_eq!(s["config"]["max_len"], json!(50));
    }

    #[test]
    fn a_run_without_a_metric_is_named() {
        let mut bad = run(0.05);
        bad.as_object_mut().unwrap().remove("ndcg@5");
        let err = summarize(&[(1, run(0.04)), (7, bad)]).unwrap_err().to_string();
        assert!(err.contains("seed 7") && err.contains("ndcg@5"), "{err}");
    }

    #[test]
    fn seeds_parse_and_bad_lists_are_refused() {
        assert_eq!(parse_seeds("2024, 1,2").unwrap(), vec![2024, 1, 2]);
        assert!(parse_seeds("1,x").unwrap_err().to_string().contains("'x'"));
        assert!(parse_seeds("1,1").unwrap_err().to_string().contains("twice"));
        assert!(parse_seeds("").is_err());
    }
}
