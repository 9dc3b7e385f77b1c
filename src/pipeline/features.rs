//! `curec features`: the resumable stage that writes a pattern per sampled user and a reason
//! per recent train interaction (with the LLM over timely workers, or as a control without
//! one), appending rows as batches finish and writing the Parquet files and the manifest last.

use crate::features::dataflow::{generate_on_workers, Generated, WorkerContext};
use crate::features::plan::{feature_users, pattern_jobs, reason_jobs, train_timestamps, FeatureJob};
use crate::features::store::{self, PatternRow, ReasonRow};
use crate::features::writer::FeaturePrompts;
use crate::features::{oracle, FeaturesConfig, Writer};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use serde_json::{json, Value};

use crate::data::prepared;
use crate::llm::{self, Llm};

/// What the outputs depend on (not the batch size or worker count: a job's text depends on its record alone).
fn identity(cfg: &FeaturesConfig, model: &str, data: &Path) -> Value {
    let mut c = serde_json::to_value(cfg).unwrap_or_default();
    if let Some(o) = c.as_object_mut() {
        o.remove("batch");
        o.remove("workers");
        // Directories written before the control writers existed stay resumable.
        if cfg.writer == Writer::Llm {
            o.remove("writer");
        }
    }
    json!({"features": c, "model": model, "data": data.display().to_string()})
}

/// The generation rate in the bar's message (a terminal draws it; logs get it every few seconds).
fn log_progress(progress: &ProgressBar, tokens: usize, t0: &Instant) {
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    let tps = tokens as f64 / secs;
    progress.set_message(format!("{tps:.0} tok/s"));
}

/// `curec features`: generate (or finish generating) patterns and reasons into `out`; returns the
/// manifest. `model_spec` names the LLM (`features.writer = llm`); the control writers ignore it.
pub fn generate_features(data: &Path, model_spec: &str, out: &Path, cfg: &FeaturesConfig) -> Result<Value> {
    cfg.validate()?;
    let model_spec = if cfg.writer == Writer::Llm { model_spec } else { cfg.writer.name() };
    let ds = prepared::read_dataset(data)?;
    let xs = prepared::read_interactions(&data.join(prepared::INTERACTIONS))?;
    let ts = train_timestamps(&ds, &xs);
    let prompts = FeaturePrompts::load(cfg.prompts.as_deref())?;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let manifest_path = out.join(store::MANIFEST);
    let id = identity(cfg, model_spec, data);
    if manifest_path.is_file() {
        let m = crate::io::read_json(&manifest_path)?;
        if m.get("identity") == Some(&id) && out.join(store::PATTERNS).is_file() && out.join(store::REASONS).is_file() {
            tracing::info!("{}: features already complete", out.display());
            return Ok(m);
        }
        bail!("{}: holds features made with another config or model; use a new --out or delete it", out.display());
    }
    let id_path = out.join("identity.json");
    if id_path.is_file() {
        if crate::io::read_json(&id_path)? != id {
            bail!(
                "{}: a partial run with another config or model is here; use a new --out or delete it",
                out.display()
            );
        }
    } else {
        crate::io::write_json(&id_path, &id)?;
    }

    let users = feature_users(&ds, cfg.users, cfg.seed);
    let pjobs = pattern_jobs(&ds, &ts, &users, cfg);
    let rjobs = reason_jobs(&ds, &ts, &users, cfg);
    let plog = out.join("patterns.jsonl");
    let rlog = out.join("reasons.jsonl");
    let mut prows: Vec<PatternRow> = store::read_log(&plog)?;
    let mut rrows: Vec<ReasonRow> = store::read_log(&rlog)?;
    let pdone: HashSet<u32> = prows.iter().map(|r| r.user).collect();
    let rdone: HashSet<(u32, u32, i64)> = rrows.iter().map(|r| (r.user, r.item, r.timestamp)).collect();
    let ptodo: Vec<&FeatureJob> = pjobs.iter().filter(|j| !pdone.contains(&j.user)).collect();
    let rtodo: Vec<&FeatureJob> =
        rjobs.iter().filter(|j| !rdone.contains(&(j.user, j.item.unwrap_or(0), j.timestamp))).collect();

    let t0 = Instant::now();
    let mut tokens = 0usize;
    let todo: Vec<FeatureJob> = ptodo.iter().chain(&rtodo).map(|j| (*j).clone()).collect();
    if cfg.writer != Writer::Llm {
        // The controls are computed whole in a second or two: nothing to resume.
        (prows, rrows) = oracle::oracle_rows(&ds, &pjobs, &rjobs);
        if cfg.writer == Writer::Shuffled {
            oracle::shuffle_texts(&mut prows, &mut rrows, cfg.seed);
        }
    } else if !todo.is_empty() {
        let progress = crate::progress::bar(todo.len(), &format!("features {}", ds.name), "jobs");
        progress.set_message(format!("{} done before", prows.len() + rrows.len()));
        let (spec, adapter, device, dtype) =
            (model_spec.to_string(), cfg.adapter.clone(), cfg.device.clone(), cfg.dtype.clone());
        let load = move || -> Result<Llm> {
            let dev = llm::device(&device)?;
            let dtype = llm::parse_dtype(&dtype, &dev)?;
            let mut model = Llm::load(&llm::resolve(&spec)?, &dev, dtype)?;
            if let Some(a) = &adapter {
                model.model.load_lora(a).with_context(|| format!("features.adapter {}", a.display()))?;
                model.model = model.model.merged()?;
            } else if dev.is_cpu() && model.source.is_file() {
                // No adapter: the engine reads the GGUF file's own blocks (4-bit stays 4-bit).
                let (q, _) = llm::engine::QModel::load_gguf(&model.source, llm::kernels::gguf::Quantize::Auto)?;
                model.set_engine_model(q);
            }
            Ok(model)
        };
        let ctx = Arc::new(WorkerContext { items: ds.items.clone(), prompts, cfg: cfg.clone(), load: Box::new(load) });
        let state = Arc::new(Mutex::new((Vec::<PatternRow>::new(), Vec::<ReasonRow>::new(), 0usize)));
        let (st, pl, rl, bar) = (state.clone(), plog.clone(), rlog.clone(), progress.clone());
        let sink = move |batch: Vec<Generated>| -> Result<()> {
            let mut st = st.lock().expect("state lock");
            let (mut ps, mut rs) = (Vec::new(), Vec::new());
            for (j, text, parsed, n) in batch {
                st.2 += n;
                match j.item {
                    None => ps.push(PatternRow { user: j.user, timestamp: j.timestamp, text, parsed, tokens: n }),
                    Some(item) => {
                        rs.push(ReasonRow { user: j.user, item, timestamp: j.timestamp, text, parsed, tokens: n })
                    }
                }
            }
            if !ps.is_empty() {
                store::append_log(&pl, &ps)?;
            }
            if !rs.is_empty() {
                store::append_log(&rl, &rs)?;
            }
            bar.inc((ps.len() + rs.len()) as u64);
            log_progress(&bar, st.2, &t0);
            st.0.extend(ps);
            st.1.extend(rs);
            Ok(())
        };
        generate_on_workers(todo, cfg.workers, ctx, Arc::new(Mutex::new(sink)))?;
        progress.finish_and_clear();
        let mut st = state.lock().expect("state lock");
        prows.append(&mut st.0);
        rrows.append(&mut st.1);
        tokens = st.2;
    }
    let seconds = t0.elapsed().as_secs_f64();
    prows.sort_by_key(|r| r.user);
    rrows.sort_by_key(|r| (r.timestamp, r.user, r.item));
    let raw_items: Vec<String> = ds.items.iter().map(|i| i.raw_id.clone()).collect();
    store::write_patterns(&out.join(store::PATTERNS), &prows, &ds.users)?;
    store::write_reasons(&out.join(store::REASONS), &rrows, &raw_items)?;
    let items_with_reasons = rrows.iter().map(|r| r.item).collect::<HashSet<_>>().len();
    let mut manifest = json!({
        "identity": id,
        "writer": cfg.writer.name(),
        "dataset": ds.name,
        "users": users.len(),
        "patterns": prows.len(),
        "reasons": rrows.len(),
        "items": ds.n_items,
        "items_with_reasons": items_with_reasons,
        "unparsed_patterns": prows.iter().filter(|r| !r.parsed).count(),
        "unparsed_reasons": rrows.iter().filter(|r| !r.parsed).count(),
        "limits": {
            "users_sampled": cfg.users,
            "pattern_history": cfg.pattern_history,
            "patterns_through": cfg.patterns_through,
            "pattern_holdout": cfg.pattern_holdout,
            "reason_history": cfg.reason_history,
            "reasons_per_user": cfg.reasons_per_user,
            "max_new_tokens_pattern": cfg.max_new_tokens_pattern,
            "max_new_tokens_reason": cfg.max_new_tokens_reason,
            "train_interactions": ds.train.iter().map(Vec::len).sum::<usize>(),
        },
        "generated_tokens_this_run": tokens,
        "seconds": seconds,
        "seconds_this_run": seconds,
        "tokens_per_s": if seconds > 0.0 { tokens as f64 / seconds } else { 0.0 },
    });
    if cfg.item_reasons > 0 {
        manifest["limits"]["item_reasons"] = json!(cfg.item_reasons);
    }
    crate::io::write_json(&manifest_path, &manifest)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_added_later_leave_older_identities_unchanged() {
        // A features folder written before `patterns_through`/`pattern_holdout` existed must stay
        // resumable: at their defaults they are not part of the identity.
        let cfg = FeaturesConfig::default();
        let id = identity(&cfg, "m", Path::new("d"));
        for k in ["patterns_through", "pattern_holdout", "writer", "batch", "workers"] {
            assert!(id["features"].get(k).is_none(), "{k} in {id}");
        }
        let cfg = FeaturesConfig { pattern_holdout: 32, patterns_through: "valid".into(), ..Default::default() };
        let id = identity(&cfg, "m", Path::new("d"));
        assert_eq!(
            (id["features"]["pattern_holdout"].as_u64(), id["features"]["patterns_through"].as_str()),
            (Some(32), Some("valid"))
        );
    }
}
