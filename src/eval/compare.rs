//! `curec compare A B`: is run A better than run B on the same users? A paired comparison: the
//! per-user metric of A minus that of B, its mean and a 95% bootstrap interval over users. Pairing
//! removes the spread between users that both runs share, so the interval of the difference is
//! much narrower than the two runs' own intervals side by side.
//!
//! A run is a `curec train` directory (its `ranks.json`) or a `--seeds` directory (each user's
//! metric averaged over the seeds, so the seed's noise shrinks too). Users are also split into
//! three equal groups by their held-out item's train popularity (`tail`, `mid`, `head`), since
//! content features should matter most for rare items.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use super::bootstrap::mean_ci95;
use super::{ndcg_at, recall_at};
use crate::data::{prepared, Split};
use crate::eval::RANKS;
use crate::io::read_json;

/// Per-user values of `metric` (`ndcg@K` or `recall@K`) on `split` for the run at `dir`, averaged
/// over seeds for a `--seeds` directory; with the run's dataset directory.
pub fn per_user(dir: &Path, metric: &str, split: Split) -> Result<(Vec<f64>, PathBuf)> {
    let f = metric_fn(metric)?;
    let runs = run_dirs(dir)?;
    let mut sum: Vec<f64> = Vec::new();
    for r in &runs {
        let path = r.join(RANKS);
        let v = read_json(&path)?;
        let ranks = v[split.as_str()]
            .as_array()
            .with_context(|| format!("{}: no '{}' ranks", path.display(), split.as_str()))?;
        let vals: Vec<f64> = ranks
            .iter()
            .map(|x| x.as_u64().map(|r| f.0(r as usize, f.1)))
            .collect::<Option<_>>()
            .with_context(|| format!("{}: ranks must be non-negative integers", path.display()))?;
        if sum.is_empty() {
            sum = vals;
        } else {
            ensure!(sum.len() == vals.len(), "{}: {} users, the other seeds {}", path.display(), vals.len(), sum.len());
            sum.iter_mut().zip(vals).for_each(|(s, v)| *s += v);
        }
    }
    sum.iter_mut().for_each(|s| *s /= runs.len() as f64);
    let m = read_json(&runs[0].join("metrics.json"))?;
    let data =
        m["data"].as_str().map(PathBuf::from).with_context(|| format!("{}: no 'data' key", runs[0].display()))?;
    Ok((sum, data))
}

/// A per-user metric of the held-out item's rank: the function and its K.
type Metric = (fn(usize, usize) -> f64, usize);

fn metric_fn(metric: &str) -> Result<Metric> {
    let (name, k) =
        metric.split_once('@').with_context(|| format!("--metric '{metric}': expected ndcg@K or recall@K"))?;
    let k: usize = k
        .parse()
        .ok()
        .filter(|&k| k > 0)
        .with_context(|| format!("--metric '{metric}': K must be a positive integer"))?;
    match name {
        "ndcg" => Ok((ndcg_at, k)),
        "recall" => Ok((recall_at, k)),
        _ => anyhow::bail!("--metric '{metric}': expected ndcg@K or recall@K"),
    }
}

/// The run directories behind `dir`: itself, or its `seed-*` runs.
fn run_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.join(RANKS).is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let mut seeds: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read run directory", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("seed-")) && p.join(RANKS).is_file()
        })
        .collect();
    seeds.sort();
    ensure!(
        !seeds.is_empty(),
        "{}: no {RANKS} here or in seed-*/ (runs trained before per-user ranks were written must be retrained)",
        dir.display()
    );
    Ok(seeds)
}

/// Mean and 95% interval of `values`.
fn summary(values: &[f64], resamples: usize, seed: u64) -> Value {
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let (lo, hi) = mean_ci95(values, resamples, seed);
    json!({"mean": mean, "ci95": [lo, hi], "users": values.len()})
}

/// Compare runs `a` and `b` on `metric`: overall and per popularity group, each with A's and B's
/// means and intervals and the paired difference A − B with its interval.
pub fn compare(a: &Path, b: &Path, metric: &str, split: Split, resamples: usize, seed: u64) -> Result<Value> {
    let (va, data) = per_user(a, metric, split)?;
    let (vb, data_b) = per_user(b, metric, split)?;
    ensure!(
        va.len() == vb.len(),
        "{} and {}: {} and {} users; compare runs on the same prepared dataset",
        a.display(),
        b.display(),
        va.len(),
        vb.len()
    );
    if data != data_b {
        tracing::warn!(
            "{} and {} name different data directories ({} and {})",
            a.display(),
            b.display(),
            data.display(),
            data_b.display()
        );
    }
    let ds = prepared::read_dataset(&data).with_context(|| format!("{}: the runs' dataset", data.display()))?;
    ensure!(ds.n_users == va.len(), "{}: {} users, the runs {}", data.display(), ds.n_users, va.len());
    let mut pop = vec![0usize; ds.n_items];
    ds.train.iter().flatten().for_each(|&i| pop[i as usize] += 1);
    let mut users: Vec<usize> = (0..ds.n_users).collect();
    users.sort_by_key(|&u| (pop[ds.target(u as u32, split) as usize], u));
    let third = users.len().div_ceil(3);
    let mut groups = vec![("all", (0..ds.n_users).collect::<Vec<usize>>())];
    for (g, name) in ["tail", "mid", "head"].iter().enumerate() {
        let mut us: Vec<usize> = users.iter().skip(g * third).take(third).copied().collect();
        us.sort_unstable();
        groups.push((name, us));
    }
    let mut out = serde_json::Map::new();
    out.insert("a".into(), json!(a.display().to_string()));
    out.insert("b".into(), json!(b.display().to_string()));
    out.insert("metric".into(), json!(metric));
    out.insert("split".into(), json!(split.as_str()));
    for (name, us) in groups {
        let pa: Vec<f64> = us.iter().map(|&u| va[u]).collect();
        let pb: Vec<f64> = us.iter().map(|&u| vb[u]).collect();
        let d: Vec<f64> = pa.iter().zip(&pb).map(|(x, y)| x - y).collect();
        let pops: Vec<usize> = us.iter().map(|&u| pop[ds.target(u as u32, split) as usize]).collect();
        let diff = summary(&d, resamples, seed);
        let (lo, hi) = (diff["ci95"][0].as_f64().unwrap_or(f64::NAN), diff["ci95"][1].as_f64().unwrap_or(f64::NAN));
        let verdict = if lo > 0.0 {
            "A better"
        } else if hi < 0.0 {
            "B better"
        } else {
            "no difference shown"
        };
        out.insert(
            name.into(),
            json!({
                "a": summary(&pa, resamples, seed),
                "b": summary(&pb, resamples, seed),
                "diff": diff,
                "verdict": verdict,
                "target_train_count": [pops.iter().min(), pops.iter().max()],
            }),
        );
    }
    Ok(Value::Object(out))
}

/// One Markdown table row per group of a comparison.
pub fn markdown(c: &Value) -> String {
    let mut s = format!(
        "{} vs {} ({}, {})\n\n| users | target train count | A | B | A − B [95% CI] | |\n|---|---|---|---|---|---|\n",
        c["a"].as_str().unwrap_or(""),
        c["b"].as_str().unwrap_or(""),
        c["metric"].as_str().unwrap_or(""),
        c["split"].as_str().unwrap_or("")
    );
    for g in ["all", "tail", "mid", "head"] {
        let x = &c[g];
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        s.push_str(&format!(
            "| {g} ({}) | {}–{} | {:.4} | {:.4} | {:+.4} [{:+.4}, {:+.4}] | {} |\n",
            x["diff"]["users"],
            x["target_train_count"][0],
            x["target_train_count"][1],
            f(&x["a"]["mean"]),
            f(&x["b"]["mean"]),
            f(&x["diff"]["mean"]),
            f(&x["diff"]["ci95"][0]),
            f(&x["diff"]["ci95"][1]),
            x["verdict"].as_str().unwrap_or("")
        ));
    }
    s
}
