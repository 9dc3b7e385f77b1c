//! The report's opening: what the run is, read from its files — the data, every trained model's
//! epochs against its cap, the features written (users, reasons, items covered), the alignment
//! steps and the replay's slices — and, when any of it is a sample (a model stopped at its epoch
//! cap, features for a sample of users), a plain warning that the numbers below are not curec's
//! converged accuracy, with a link to the converged tables.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::svg::escape;
use super::{dirs_with, jsonl, name};
use crate::io::read_json;

/// Where the converged results live, relative to the repository root.
const RESULTS: &str = "docs/results.md";

/// The "What this run is" section for the runs `dirs` below `roots`, written to `out`.
pub fn about(roots: &[PathBuf], dirs: &[PathBuf], out: &Path) -> String {
    let mut facts: Vec<String> = Vec::new();
    let mut sample = false;
    let mut data_dirs = BTreeSet::new();
    let mut capped = Vec::new();
    for d in dirs {
        let Ok(m) = read_json(&d.join("metrics.json")) else { continue };
        if let Some(p) = m["data"].as_str() {
            data_dirs.insert(p.to_string());
        }
        // The cap is the model's own `max_epochs` (CUREC and KAR keep theirs in a section).
        let c = &m["config"];
        let cap = [&c["max_epochs"], &c["curec"]["max_epochs"], &c["sasrec"]["max_epochs"]]
            .into_iter()
            .find_map(Value::as_u64);
        let (Some(epochs), Some(cap)) = (m["epochs"].as_u64(), cap) else { continue };
        if epochs >= cap && cap > 1 {
            capped.push(format!("{} ({epochs} of {cap})", name(&m)));
        }
    }
    for p in &data_dirs {
        if let Ok(s) = read_json(&Path::new(p).join("stats.json")) {
            facts.push(format!(
                "Data: {} as prepared ({} users, {} items, {} interactions).",
                s["dataset"].as_str().unwrap_or("?"),
                s["users"],
                s["items"],
                s["interactions"]
            ));
        }
    }
    if !capped.is_empty() {
        sample = true;
        facts.push(format!("Stopped at the job's epoch cap, so short of convergence: {}.", capped.join(", ")));
    }
    for f in roots.iter().flat_map(|r| dirs_with(r, "manifest.json", false)) {
        let Ok(m) = read_json(&f.join("manifest.json")) else { continue };
        // A features directory (a replay snapshot's manifest has no `limits`).
        let Some(limits) = m["limits"].as_object() else { continue };
        let sampled = limits.get("users_sampled").and_then(Value::as_u64).unwrap_or(0);
        if sampled > 0 {
            sample = true;
        }
        let of_items = match limits.get("item_reasons").and_then(Value::as_u64) {
            Some(n) => format!(", and the newest interaction of each of the {n} most popular items"),
            None => String::new(),
        };
        facts.push(format!(
            "Features ({}): patterns for {} users{}, {} reasons on {} of {} items (each sampled user's {} most recent interactions{of_items}).",
            escape(&f.display().to_string()),
            m["patterns"],
            if sampled > 0 { " (a seeded sample)" } else { "" },
            m["reasons"],
            m["items_with_reasons"],
            m["items"],
            limits.get("reasons_per_user").and_then(Value::as_u64).unwrap_or(0),
        ));
    }
    for d in roots.iter().flat_map(|r| dirs_with(r, "eval.json", false)) {
        let Ok(e) = read_json(&d.join("eval.json")) else { continue };
        if e["steps"].is_u64() {
            facts.push(format!(
                "Alignment ({}): {} GRPO steps of {} prompts × G = {}, evaluated on {} validation users.",
                escape(&d.display().to_string()),
                e["steps"],
                e["prompts_per_step"],
                e["group_size"],
                e["eval_users"]
            ));
        }
    }
    for d in roots.iter().flat_map(|r| dirs_with(r, "epochs.jsonl", false)) {
        let epochs = jsonl(&d.join("epochs.jsonl"));
        let interactions: u64 = epochs.iter().filter_map(|e| e["interactions"].as_u64()).sum();
        facts.push(format!(
            "Correction ({}): {} time slices, {interactions} interactions replayed.",
            escape(&d.display().to_string()),
            epochs.len()
        ));
    }
    let mut h = String::from("<h2>What this run is</h2><ul>");
    for f in &facts {
        h.push_str(&format!("<li>{f}</li>"));
    }
    h.push_str("</ul>");
    if sample {
        h.push_str(&format!(
            "<p><b>A sample sized to finish in minutes: the numbers below show that every stage runs, not curec's \
             accuracy.</b> The converged tables (every model to early stopping, several seeds) are in {}.</p>",
            results_link(out)
        ));
    }
    h
}

/// A link to the repository's results page from the report at `out`, when the report is written
/// inside a checkout (found by walking up from it); else the path as text.
fn results_link(out: &Path) -> String {
    let dir = std::path::absolute(out).ok().and_then(|p| p.parent().map(Path::to_path_buf));
    let mut up = String::new();
    let mut at = dir.as_deref();
    while let Some(d) = at {
        if d.join(RESULTS).is_file() && d.join("Cargo.toml").is_file() {
            return format!("<a href=\"{up}{RESULTS}\">{RESULTS}</a>");
        }
        up.push_str("../");
        at = d.parent();
    }
    format!("<code>{RESULTS}</code> of the curec repository")
}
