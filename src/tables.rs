//! Markdown tables printed by the CLI and written beside runs: a metrics row per run, the
//! stage times of a job, and the alignment evaluation.

use std::path::Path;

use serde_json::Value;

use crate::io::read_json;
use crate::run_dir::STAGES;

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
