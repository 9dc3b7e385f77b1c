//! Building the pattern and reason jobs from a prepared dataset, running them through the LLM in
//! batches, and the resumable `curec features` stage around that.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use rand::seq::SliceRandom;
use serde_json::{json, Value};

use std::sync::{Arc, Mutex};

use super::dataflow::{generate_on_workers, Generated, WorkerContext};
use super::store::{self, PatternRow, ReasonRow};
use super::{oracle, FeaturesConfig, Writer};
use crate::data::preprocess::{Interaction, ItemRow};
use crate::data::{prepared, Dataset, Split};
use crate::llm::prompts::{item_text, numbered_items, parse_completion, Prompt, PromptKind};
use crate::llm::{self, Llm, SamplingConfig};
use crate::rec::nn::rng_for;

const USERS: u64 = 0xfe1;

/// One generation job: a pattern for `user` (item `None`) or a reason for (user, item).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FeatureJob {
    /// Stable record key: the RNG stream and the resume key.
    pub key: u64,
    pub user: u32,
    pub item: Option<u32>,
    /// Items shown, oldest first.
    pub history: Vec<u32>,
    pub timestamp: i64,
}

/// Generated features in memory.
#[derive(Debug, Clone, Default)]
pub struct Features {
    pub patterns: Vec<PatternRow>,
    pub reasons: Vec<ReasonRow>,
}

impl Features {
    pub fn load(dir: &Path) -> Result<Self> {
        if store::kind_files(dir, "patterns").is_empty() || store::kind_files(dir, "reasons").is_empty() {
            bail!(
                "{}: not a features directory (expected patterns.parquet and reasons.parquet from `curec features`, or a replay snapshot)",
                dir.display()
            );
        }
        Ok(Self { patterns: store::read_patterns_in(dir)?, reasons: store::read_reasons_in(dir)? })
    }
}

/// Train interactions' timestamps per user, in the order of `ds.train`.
pub fn train_timestamps(ds: &Dataset, xs: &[Interaction]) -> Vec<Vec<i64>> {
    let mut ts = vec![Vec::new(); ds.n_users];
    for x in xs.iter().filter(|x| x.split == Split::Train) {
        ts[x.user as usize].push(x.timestamp);
    }
    ts
}

/// Users that get features: all with a train history, or a seeded sample of `n`.
pub fn feature_users(ds: &Dataset, n: usize, seed: u64) -> Vec<u32> {
    let mut users: Vec<u32> = (0..ds.n_users as u32).filter(|&u| !ds.train[u as usize].is_empty()).collect();
    if n > 0 && n < users.len() {
        users.shuffle(&mut rng_for(seed, USERS, 0));
        users.truncate(n);
        users.sort_unstable();
    }
    users
}

fn recent(items: &[u32], n: usize) -> Vec<u32> {
    items[items.len().saturating_sub(n)..].to_vec()
}

/// Where the history of the reason at `pos` starts. With a bounded number of reasons per user
/// (`first` = the first reasoned position), every reason of a user starts its history at the same
/// item, `reason_history` items before the first reason: each prompt then extends the previous
/// one's history by the items since, so a user's prompts share one cached prefix (the engine's
/// prefix cache computes it once). With every interaction reasoned (`reasons_per_user = 0`) the
/// history is the sliding window of the `reason_history` items before `pos`.
fn reason_history_start(first: usize, pos: usize, cfg: &FeaturesConfig) -> usize {
    if cfg.reasons_per_user == 0 {
        pos.saturating_sub(cfg.reason_history)
    } else {
        first.saturating_sub(cfg.reason_history)
    }
}

pub fn pattern_jobs(ds: &Dataset, ts: &[Vec<i64>], users: &[u32], cfg: &FeaturesConfig) -> Vec<FeatureJob> {
    users
        .iter()
        .map(|&u| {
            let train = &ds.train[u as usize];
            let mut seen = train[..train.len().saturating_sub(cfg.pattern_holdout)].to_vec();
            if cfg.patterns_through == "valid" && (ds.valid[u as usize] as usize) < ds.n_items {
                seen.push(ds.valid[u as usize]);
            }
            FeatureJob {
                // Position 0 never gets a reason, so pattern and reason keys never collide.
                key: (u as u64) << 32,
                user: u,
                item: None,
                history: recent(&seen, cfg.pattern_history),
                timestamp: ts[u as usize].last().copied().unwrap_or(0),
            }
        })
        .collect()
}

pub fn reason_jobs(ds: &Dataset, ts: &[Vec<i64>], users: &[u32], cfg: &FeaturesConfig) -> Vec<FeatureJob> {
    let mut jobs = Vec::new();
    for &u in users {
        let seq = &ds.train[u as usize];
        let first = if cfg.reasons_per_user == 0 { 1 } else { seq.len().saturating_sub(cfg.reasons_per_user).max(1) };
        for pos in first..seq.len() {
            jobs.push(FeatureJob {
                key: ((u as u64) << 32) | pos as u64,
                user: u,
                item: Some(seq[pos]),
                history: seq[reason_history_start(first, pos, cfg)..pos].to_vec(),
                timestamp: ts[u as usize][pos],
            });
        }
    }
    jobs
}

/// The user message of a job.
pub fn render(prompts: &FeaturePrompts, items: &[ItemRow], job: &FeatureJob) -> Result<String> {
    let mut values: BTreeMap<&str, String> = BTreeMap::new();
    values.insert("history", numbered_items(items, &job.history, true));
    match job.item {
        None => prompts.pattern.render(&values),
        Some(i) => {
            values.insert("item", item_text(items, i).to_string());
            prompts.reason.render(&values)
        }
    }
}

pub struct FeaturePrompts {
    pub pattern: Prompt,
    pub reason: Prompt,
}

impl FeaturePrompts {
    pub fn load(dir: Option<&Path>) -> Result<Self> {
        Ok(Self { pattern: Prompt::load(PromptKind::Pattern, dir)?, reason: Prompt::load(PromptKind::Reason, dir)? })
    }
}

/// The answer of a completion (which continues `prefix`), or the completion without its tags
/// when there is no answer section; and whether an answer section was found.
pub fn answer_text(prefix: &str, completion: &str) -> (String, bool) {
    let parsed = parse_completion(&format!("{prefix}{completion}"));
    match parsed.answer {
        Some(a) => (a, true),
        None => {
            let mut t = completion.to_string();
            for tag in ["<think>", "</think>", "<answer>", "</answer>"] {
                t = t.replace(tag, " ");
            }
            (t.split_whitespace().collect::<Vec<_>>().join(" "), false)
        }
    }
}

/// Generate one batch of jobs; returns (text, parsed, completion tokens) per job.
pub fn run_batch(
    llm: &Llm,
    prompts: &FeaturePrompts,
    items: &[ItemRow],
    jobs: &[FeatureJob],
    cfg: &FeaturesConfig,
    max_new_tokens: usize,
) -> Result<Vec<(String, bool, usize)>> {
    let ids = jobs
        .iter()
        .map(|j| {
            let user = render(prompts, items, j)?;
            llm.prompt_ids(cfg.system.as_deref(), &user, &cfg.prefix)
        })
        .collect::<Result<Vec<_>>>()?;
    let keys: Vec<u64> = jobs.iter().map(|j| j.key).collect();
    let sampling = SamplingConfig {
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        max_new_tokens,
        stop: vec!["</answer>".into()],
        seed: cfg.seed,
    };
    let gens = if llm::generate::engine_enabled(llm.model.device()) {
        let gens = llm.generate_engine(&ids, &keys, &sampling)?;
        if let Ok(st) = llm.engine_stats.lock() {
            tracing::info!(
                "engine so far: {} prompt tokens computed, {} reused from the prefix cache ({:.0}%), {} decoded; {:.0} s prefill, {:.0} s decode",
                st.prefill_tokens,
                st.prefix.tokens_reused,
                100.0 * st.prefix.token_hit_rate(),
                st.decode_tokens,
                st.prefill_seconds,
                st.decode_seconds
            );
        }
        gens
    } else {
        llm::generate(&llm.model, &llm.tokenizer, &ids, &keys, &sampling, true)?
    };
    Ok(gens
        .into_iter()
        .map(|g| {
            let (text, ok) = answer_text(&cfg.prefix, &g.text);
            (text, ok, g.tokens.len())
        })
        .collect())
}

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
        let m = crate::jobs::read_json(&manifest_path)?;
        if m.get("identity") == Some(&id) && out.join(store::PATTERNS).is_file() && out.join(store::REASONS).is_file() {
            tracing::info!("{}: features already complete", out.display());
            return Ok(m);
        }
        bail!("{}: holds features made with another config or model; use a new --out or delete it", out.display());
    }
    let id_path = out.join("identity.json");
    if id_path.is_file() {
        if crate::jobs::read_json(&id_path)? != id {
            bail!(
                "{}: a partial run with another config or model is here; use a new --out or delete it",
                out.display()
            );
        }
    } else {
        crate::jobs::write_json(&id_path, &id)?;
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
    let manifest = json!({
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
    crate::jobs::write_json(&manifest_path, &manifest)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::preprocess::ItemRow;

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

    #[test]
    fn patterns_through_valid_add_the_validation_item_and_nothing_else() {
        let items = (0..6).map(|i| ItemRow { raw_id: i.to_string(), info: Default::default() }).collect();
        let mut ds = Dataset::from_interactions("toy", vec!["a".into(), "b".into()], items, &[]);
        ds.train = vec![vec![0, 1, 2], vec![3, 4]];
        ds.valid = vec![5, 0];
        ds.test = vec![3, 1];
        let ts = vec![vec![10, 20, 30], vec![5, 6]];
        let mut cfg = FeaturesConfig { pattern_history: 3, ..Default::default() };
        let train: Vec<Vec<u32>> = pattern_jobs(&ds, &ts, &[0, 1], &cfg).into_iter().map(|j| j.history).collect();
        assert_eq!(train, vec![vec![0, 1, 2], vec![3, 4]]);
        cfg.patterns_through = "valid".into();
        let valid: Vec<Vec<u32>> = pattern_jobs(&ds, &ts, &[0, 1], &cfg).into_iter().map(|j| j.history).collect();
        assert_eq!(valid, vec![vec![1, 2, 5], vec![3, 4, 0]], "the validation item, never the test item");
        cfg.pattern_holdout = 1;
        let held: Vec<Vec<u32>> = pattern_jobs(&ds, &ts, &[0, 1], &cfg).into_iter().map(|j| j.history).collect();
        assert_eq!(held, vec![vec![0, 1, 5], vec![3, 0]], "the newest train item left out");
        cfg.patterns_through = "test".into();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains("features.patterns_through") && e.contains("'test'"), "{e}");
    }
}
