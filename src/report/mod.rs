//! `curec report <run-dir> [--out file.html]`: one self-contained HTML page (inline CSS and SVG,
//! no scripts, no network) of everything a run directory holds:
//!
//! - what the run is ([`about`]): the data, epochs against their caps, the features, alignment
//!   and replay sizes, and whether the numbers come from a sample;
//! - the results table: every trained run below the directory (`metrics.json`; a `--seeds`
//!   directory counts once, with its mean ± sd), NDCG@10 with its 95% interval, Recall@10;
//! - NDCG@10 as bars with interval whiskers, per dataset;
//! - training curves (`history.json`: loss and validation NDCG@10 per epoch);
//! - alignment (`steps.jsonl`, `eval.json`): GRPO reward, KL and format rate per step;
//! - the replay's per-slice metrics (`epochs.jsonl`);
//! - explanation cards for CUREC runs: a few users' top items with their matched reasons, the
//!   pattern→reason attention weights shaded as a heat map (the paper's Fig. 6b).
//!
//! Every number comes from the files; each results row carries its exact values as `data-*`
//! attributes, so tests (and scripts) can check the page against the metrics.

mod about;
pub mod svg;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::io::read_json;
use svg::escape;

/// Directories (depth ≤ 4) below `root` holding `metrics.json`, sorted; the `seed-*` runs of a
/// `--seeds` directory are left out (the directory's summary stands for them).
fn runs(root: &Path) -> Vec<PathBuf> {
    dirs_with(root, "metrics.json", true)
}

/// Directories (depth ≤ 4) below `root`, itself included, that hold `file`, in path order; with
/// `skip_seeds`, not the `seed-*` directories of one that holds it too.
fn dirs_with(root: &Path, file: &str, skip_seeds: bool) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, file: &str, skip_seeds: bool, out: &mut Vec<PathBuf>) {
        let has = dir.join(file).is_file();
        if has {
            out.push(dir.to_path_buf());
        }
        if depth == 0 {
            return;
        }
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        let mut subs: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
        subs.sort();
        for s in subs {
            let seed_run = s.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("seed-"));
            if !(skip_seeds && has && seed_run) {
                walk(&s, depth - 1, file, skip_seeds, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, 4, file, skip_seeds, &mut out);
    out
}

fn rel(root: &Path, p: &Path) -> String {
    let r = p.strip_prefix(root).unwrap_or(p).display().to_string();
    if r.is_empty() {
        // The root itself (e.g. the replay's own run): its folder name says more than ".".
        root.file_name().map_or(".".into(), |n| n.to_string_lossy().to_string())
    } else {
        r
    }
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn f1(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.1}"))
}

fn f4(v: Option<f64>) -> String {
    v.map_or("–".into(), |x| format!("{x:.4}"))
}

/// The model's display name: `model` plus `-variant` for CUREC.
fn name(m: &Value) -> String {
    let model = m["model"].as_str().unwrap_or("?");
    match m["variant"].as_str() {
        Some(v) => format!("{model}-{v}"),
        None => model.to_string(),
    }
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}\
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}\
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
td:first-child,th:first-child,td.l{text-align:left}.charts{display:flex;flex-wrap:wrap;gap:12px}\
.card{border:1px solid #ccc;border-radius:6px;padding:8px 12px;margin:8px 0}.muted{color:#777;font-size:12px}";

/// Write the report of `roots` (the first one names it) to `out` (default
/// `<first root>/report.html`); returns the path.
pub fn write_report(roots: &[PathBuf], out: Option<&Path>, explain_users: usize) -> Result<PathBuf> {
    let root = roots.first().context("report: no run directory")?;
    for r in roots {
        anyhow::ensure!(r.is_dir(), "{}: not a run directory", r.display());
    }
    let out = out.map_or_else(|| root.join("report.html"), Path::to_path_buf);
    let html = render_to(roots, explain_users, &out)?;
    let tmp = crate::io::tmp_path(&out);
    std::fs::write(&tmp, html).with_context(|| format!("{}: cannot write", out.display()))?;
    std::fs::rename(&tmp, &out).with_context(|| format!("{}: cannot write", out.display()))?;
    Ok(out)
}

/// The page for `roots` (each searched to depth 4); run names are relative to the root, or with
/// several roots to the root's parent.
pub fn render(roots: &[PathBuf], explain_users: usize) -> Result<String> {
    let root = roots.first().context("report: no run directory")?;
    render_to(roots, explain_users, &root.join("report.html"))
}

/// [`render`] for a page that will be written to `out` (its links are relative to it).
fn render_to(roots: &[PathBuf], explain_users: usize, out: &Path) -> Result<String> {
    let root = roots.first().context("report: no run directory")?;
    let dirs: Vec<PathBuf> = roots.iter().flat_map(|r| runs(r)).collect();
    let label = |d: &Path| -> String {
        match roots.iter().find(|r| d.starts_with(r)) {
            Some(r) if roots.len() == 1 => rel(r, d),
            Some(r) => rel(r.parent().unwrap_or(r), d),
            None => d.display().to_string(),
        }
    };
    let files = |name: &str| -> Vec<PathBuf> { roots.iter().flat_map(|r| dirs_with(r, name, false)).collect() };
    let mut h = format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>curec report: {}</title><style>{STYLE}</style></head><body>\
         <h1>curec report: {}</h1><p class=\"muted\">Test split, full ranking, seen items excluded. Intervals: 95% bootstrap over users \
         (one run) or mean ± sd over seeds.</p>",
        escape(&root.display().to_string()),
        escape(&root.display().to_string())
    );
    // Explanation cards, one block per CUREC run: the first opens the page under the results
    // (the paper's point is comprehensible recommendation), the rest close it.
    let mut explained: Vec<String> = Vec::new();
    if explain_users > 0 {
        for d in &dirs {
            let Ok(m) = read_json(&d.join("metrics.json")) else { continue };
            if m["model"] != "curec" {
                continue;
            }
            // A --seeds directory explains with its first seed's model.
            let run = if d.join("model.safetensors").is_file() {
                d.clone()
            } else {
                match first_seed(d) {
                    Some(p) => p,
                    None => continue,
                }
            };
            match explanation_cards(&run, explain_users) {
                Ok(cards) => explained.push(format!("<h2>Explanations: {}</h2>{cards}", escape(&label(d)))),
                Err(e) => tracing::warn!("{}: no explanation cards: {e:#}", d.display()),
            }
        }
    }
    h.push_str(&about::about(roots, &dirs, out));
    // Results.
    h.push_str("<h2>Results</h2><table><tr><th>run</th><th>model</th><th>dataset</th><th>NDCG@10</th><th>interval</th><th>Recall@10</th><th>epochs (best)</th><th>train s</th></tr>");
    let mut by_dataset: BTreeMap<String, Vec<svg::Bar>> = BTreeMap::new();
    for d in &dirs {
        let Ok(mut m) = read_json(&d.join("metrics.json")) else { continue };
        // A --seeds directory of one seed: that run's own interval says more than sd = 0.
        if m["per_seed"].as_array().is_some_and(|p| p.len() == 1) {
            if let Some(one) = first_seed(d).and_then(|p| read_json(&p.join("metrics.json")).ok()) {
                m = one;
            }
        }
        let Some(ndcg) = num(&m["ndcg@10"]) else { continue };
        let (interval, whisker) = match (num(&m["ndcg@10_sd"]), m["ndcg@10_ci95"].as_array()) {
            (Some(sd), _) => (
                format!("± {sd:.4} ({} seeds)", m["per_seed"].as_array().map_or(0, Vec::len)),
                Some((ndcg - sd, ndcg + sd)),
            ),
            (None, Some(ci)) if ci.len() == 2 => {
                let (lo, hi) = (ci[0].as_f64().unwrap_or(f64::NAN), ci[1].as_f64().unwrap_or(f64::NAN));
                (format!("[{lo:.4}, {hi:.4}]"), Some((lo, hi)))
            }
            _ => (String::new(), None),
        };
        let r = label(d);
        let dataset = m["dataset"].as_str().unwrap_or("?").to_string();
        h.push_str(&format!(
            "<tr data-run=\"{}\" data-ndcg10=\"{}\" data-recall10=\"{}\"><td>{}</td><td class=\"l\">{}</td><td class=\"l\">{}</td><td>{ndcg:.4}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&r),
            ndcg,
            num(&m["recall@10"]).map_or(String::new(), |v| v.to_string()),
            escape(&r),
            escape(&name(&m)),
            escape(&dataset),
            interval,
            f4(num(&m["recall@10"])),
            match (m["epochs"].as_u64(), m["best_epoch"].as_u64()) {
                (Some(e), Some(b)) => format!("{e} ({b})"),
                _ => "–".into(),
            },
            num(&m["train_seconds"]).map_or("–".into(), |s| format!("{s:.1}"))
        ));
        by_dataset.entry(dataset).or_default().push((r, ndcg, whisker));
    }
    h.push_str("</table>");
    if dirs.is_empty() {
        h.push_str("<p>No trained runs (no metrics.json) below this directory.</p>");
    }
    h.push_str("<div class=\"charts\">");
    for (ds, items) in &by_dataset {
        h.push_str(&svg::bars(&format!("NDCG@10, {ds}"), "run", items));
    }
    h.push_str("</div>");
    if let Some(first) = explained.first() {
        h.push_str(first);
    }

    // Training curves.
    let mut loss = Vec::new();
    let mut valid = Vec::new();
    for d in &dirs {
        let hist_dir = if d.join("history.json").is_file() {
            d.clone()
        } else {
            // A --seeds directory: its first seed's curve.
            match first_seed(d) {
                Some(p) => p,
                None => continue,
            }
        };
        let Ok(hist) = read_json(&hist_dir.join("history.json")) else { continue };
        let Some(rows) = hist.as_array() else { continue };
        let label = label(&hist_dir);
        let pts = |key: &str| -> Vec<(f64, f64)> {
            rows.iter().filter_map(|r| Some((r["epoch"].as_f64()?, r[key].as_f64()?))).collect()
        };
        let (l, v) = (pts("loss"), pts("valid_ndcg10"));
        if !l.is_empty() {
            loss.push((label.clone(), l));
        }
        if !v.is_empty() {
            valid.push((label, v));
        }
    }
    if !valid.is_empty() {
        h.push_str("<h2>Training</h2><div class=\"charts\">");
        h.push_str(&svg::lines("validation NDCG@10", "epoch", &valid));
        if !loss.is_empty() {
            h.push_str(&svg::lines("training loss", "epoch", &loss));
        }
        h.push_str("</div>");
    }

    // Alignment (GRPO) runs.
    for d in files("steps.jsonl") {
        let steps = jsonl(&d.join("steps.jsonl"));
        if steps.is_empty() {
            continue;
        }
        let series = |key: &str| -> (String, Vec<(f64, f64)>) {
            (key.to_string(), steps.iter().filter_map(|s| Some((s["step"].as_f64()?, s[key].as_f64()?))).collect())
        };
        h.push_str(&format!("<h2>Alignment: {}</h2><div class=\"charts\">", escape(&label(&d))));
        h.push_str(&svg::lines("GRPO reward", "step", &[series("reward")]));
        h.push_str(&svg::lines("KL to the reference", "step", &[series("kl")]));
        h.push_str(&svg::lines("format rate", "step", &[series("format_rate"), series("accuracy")]));
        h.push_str("</div>");
        if let Ok(e) = read_json(&d.join("eval.json")) {
            h.push_str("<table><tr><th>greedy eval</th><th>format</th><th>legal</th><th>hit rate</th></tr>");
            for (who, p) in [("aligned", ""), ("base", "base_")] {
                h.push_str(&format!(
                    "<tr><td>{who}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    f4(num(&e[format!("{p}format_rate")])),
                    f4(num(&e[format!("{p}legal_rate")])),
                    f4(num(&e[format!("{p}hit_rate")]))
                ));
            }
            h.push_str(&format!(
                "<tr><td>random</td><td></td><td></td><td>{}</td></tr></table>",
                f4(num(&e["random_hit_rate"]))
            ));
        }
    }

    // Replay slices.
    for d in files("epochs.jsonl") {
        let rows = jsonl(&d.join("epochs.jsonl"));
        let Some(first) = rows.first().and_then(Value::as_object) else { continue };
        let keys: Vec<&String> = first.keys().filter(|k| first[*k].is_number()).collect();
        h.push_str(&format!("<h2>Replay: {}</h2><table><tr>", escape(&label(&d))));
        for k in &keys {
            h.push_str(&format!("<th>{}</th>", escape(k)));
        }
        h.push_str("</tr>");
        for r in &rows {
            h.push_str("<tr>");
            for k in &keys {
                h.push_str(&format!(
                    "<td>{}</td>",
                    r[k.as_str()].as_f64().map_or("–".into(), |v| if v.fract() == 0.0 {
                        format!("{v:.0}")
                    } else {
                        format!("{v:.4}")
                    })
                ));
            }
            h.push_str("</tr>");
        }
        h.push_str("</table>");
    }

    // Wall time of each stage a job ran (`stages.json`, written by `curec run` and `curec replay`).
    for d in files(crate::run_dir::STAGES) {
        let Ok(v) = read_json(&d.join(crate::run_dir::STAGES)) else { continue };
        let Some(m) = v.as_object() else { continue };
        h.push_str(&format!(
            "<h2>Stage times: {}</h2><table><tr><th>stage</th><th>seconds</th></tr>",
            escape(&label(&d))
        ));
        for (k, s) in m {
            h.push_str(&format!("<tr><td>{}</td><td>{}</td></tr>", escape(k), f1(s.as_f64())));
        }
        let total: f64 = m.values().filter_map(Value::as_f64).sum();
        h.push_str(&format!("<tr><td><b>total</b></td><td><b>{total:.1}</b></td></tr></table>"));
    }

    // Explanation cards.
    // The other CUREC runs' explanations (the first one's are under the results).
    for e in explained.iter().skip(1) {
        h.push_str(e);
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

/// The first `seed-*` run (by name) of a `--seeds` directory.
fn first_seed(dir: &Path) -> Option<PathBuf> {
    let mut s: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("seed-"))
                && p.join("history.json").is_file()
        })
        .collect();
    s.sort();
    s.into_iter().next()
}

/// Cards for the first `n` users (raw-id order of the dataset): top-5 items, each with its three
/// best-matched reasons shaded by attention weight.
fn explanation_cards(run: &Path, n: usize) -> Result<String> {
    let m = read_json(&run.join("metrics.json"))?;
    let data = m["data"].as_str().context("metrics.json: no 'data'")?;
    let ds = crate::data::prepared::read_dataset(Path::new(data))?;
    let mut s = String::new();
    for raw in ds.users.iter().take(n) {
        let recs = crate::recommend::recommend(run, raw, 5, 3)?;
        s.push_str(&format!("<div class=\"card\"><b>user {}</b><table><tr><th>#</th><th>item</th><th>score</th><th>matched reasons (weight)</th></tr>", escape(raw)));
        for (i, r) in recs.iter().enumerate() {
            let reasons: Vec<String> = r
                .reasons
                .iter()
                .map(|w| {
                    format!(
                        "<div style=\"background:rgba(214,39,40,{:.3})\">{:.2} {}</div>",
                        (w.weight as f64).clamp(0.0, 1.0) * 0.6,
                        w.weight,
                        escape(&w.text)
                    )
                })
                .collect();
            s.push_str(&format!(
                "<tr><td>{}</td><td class=\"l\">{}</td><td>{:.3}</td><td class=\"l\">{}</td></tr>",
                i + 1,
                escape(&r.title),
                r.score,
                reasons.join("")
            ));
        }
        s.push_str("</table></div>");
    }
    Ok(s)
}
