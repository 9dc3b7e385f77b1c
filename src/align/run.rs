//! `curec pretrain`: recommendation-alignment pretraining end to end. The sampled train
//! interactions stream in time order, `prompts_per_step` prompts per GRPO step, for `epochs`
//! passes (capped by `max_steps`). Every `checkpoint_every` steps the trainable weights, the
//! optimizer state and the step counter are saved to `checkpoint-<step>/` (state file last, older
//! checkpoints removed after); a killed run started again with the same command and config
//! resumes from the newest complete checkpoint and produces the same weights and step log.
//! At the end: the adapter (or weights), `steps.jsonl`, `curve.svg` and `eval.json` (aligned vs
//! base vs random on validation prompts).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Var;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::eval::{evaluate, likelihood_rates, rank_by_likelihood, rates, AnswerLabel};
use super::plot::{smooth, svg, Panel, Series};
use super::reward::{RuleReward, RuleRewardConfig};
use super::task::{eval_users, render, sample_records, train_stream, train_task, valid_task, AlignTask};
use crate::data::prepared;
use crate::grpo::{Grpo, GrpoConfig, Sample, StepStats};
use crate::llm::{self, Llm, LoraConfig};
use crate::prompts::{parse_completion, Prompt, PromptKind};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    /// Model for `curec run`/job files (the CLI's `--model` overrides).
    pub model: Option<String>,
    /// Most recent train items shown before the target.
    pub history_len: usize,
    /// Interactions with fewer earlier train items do not become prompts.
    pub min_history: usize,
    /// Negatives per candidate list (k); the list has k + 1 items.
    pub negatives: usize,
    pub prompts_per_step: usize,
    /// Each completion of a group sees the candidates in its own order (a policy that answers by
    /// position then still sees its rewards vary); false: one shared prompt per group.
    pub shuffle_per_completion: bool,
    /// Candidate orders per group, each shared by G / orders completions (must divide G): between
    /// one shared prompt (cheapest: one packed row per group) and one order per completion.
    /// 0 = G with `shuffle_per_completion`, else 1.
    #[serde(skip_serializing_if = "is_zero")]
    pub orders_per_group: usize,
    /// Passes over the sampled interactions (the paper trains 2 epochs).
    pub epochs: usize,
    /// Stop after this many steps (0 = no cap).
    pub max_steps: usize,
    /// Train interactions drawn (seeded, kept in time order) to become prompts; 0 = all.
    pub sample: usize,
    /// Validation users evaluated (seeded sample; 0 = all).
    pub eval_users: usize,
    pub eval_batch: usize,
    pub eval_max_new_tokens: usize,
    /// Also rank each validation prompt's candidates by the likelihood of answering with them
    /// (`"index"` or `"title"`, as the prompt asks; unset: off), for the aligned and the base
    /// model: `likelihood_hit_rate` in eval.json and `eval_*_likelihood.jsonl`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank_answers: Option<AnswerLabel>,
    pub checkpoint_every: usize,
    /// LoRA adapters (true) or full fine-tuning (false).
    pub lora: bool,
    /// System prompt (default: the model's own).
    pub system: Option<String>,
    /// Text put after the assistant header, which the completion continues (scored with it).
    pub prefix: String,
    /// Directory with edited prompt templates (default: the built-in ones).
    pub prompts: Option<PathBuf>,
    pub reward: RuleRewardConfig,
    pub device: String,
    /// auto, f32, bf16 or f16.
    pub dtype: String,
    pub seed: u64,
    /// Bootstrap resamples for the intervals in eval.json.
    pub bootstrap: usize,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            model: None,
            history_len: 5,
            min_history: 3,
            negatives: 9,
            prompts_per_step: 2,
            shuffle_per_completion: true,
            orders_per_group: 0,
            epochs: 2,
            max_steps: 0,
            sample: 40,
            eval_users: 100,
            eval_batch: 16,
            eval_max_new_tokens: 128,
            rank_answers: None,
            checkpoint_every: 5,
            lora: true,
            system: None,
            prefix: "<think>".into(),
            prompts: None,
            reward: RuleRewardConfig::default(),
            device: "cpu".into(),
            dtype: "auto".into(),
            seed: 2024,
            bootstrap: 1000,
        }
    }
}

impl PretrainConfig {
    pub fn validate(&self) -> Result<()> {
        let check = |ok: bool, what: &str| if ok { Ok(()) } else { bail!("pretrain.{what}") };
        check(self.negatives >= 1, "negatives: expected at least 1")?;
        check(self.prompts_per_step >= 1, "prompts_per_step: expected at least 1")?;
        check(self.epochs >= 1, "epochs: expected at least 1")?;
        check(self.history_len >= 1, "history_len: expected at least 1")?;
        check(self.min_history >= 1, "min_history: expected at least 1 (the prompt shows the history)")?;
        check(self.eval_batch >= 1, "eval_batch: expected at least 1")?;
        check(self.checkpoint_every >= 1, "checkpoint_every: expected at least 1")
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Everything a pretraining run depends on, hashed so that a resume with another config fails.
#[derive(Serialize)]
struct RunIdentity<'a> {
    pretrain: &'a PretrainConfig,
    grpo: &'a GrpoConfig,
    lora: &'a LoraConfig,
    model: String,
    data: String,
}

/// The hash of a run's identity. The evaluation settings do not change training, so they are
/// left out: a finished run started again with other evaluation settings re-evaluates it.
fn config_hash(id: &RunIdentity) -> String {
    let d = PretrainConfig::default();
    let pretrain = PretrainConfig {
        eval_users: d.eval_users,
        eval_batch: d.eval_batch,
        eval_max_new_tokens: d.eval_max_new_tokens,
        rank_answers: None,
        bootstrap: d.bootstrap,
        ..id.pretrain.clone()
    };
    let id = RunIdentity {
        pretrain: &pretrain,
        grpo: id.grpo,
        lora: id.lora,
        model: id.model.clone(),
        data: id.data.clone(),
    };
    let text = serde_json::to_string(&id).unwrap_or_default();
    Sha256::digest(text.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[derive(Serialize, Deserialize)]
struct CheckpointState {
    step: usize,
    config_hash: String,
}

/// The newest complete `checkpoint-<step>` directory.
fn newest_checkpoint(out: &Path) -> Option<(usize, PathBuf)> {
    let mut best: Option<(usize, PathBuf)> = None;
    for e in std::fs::read_dir(out).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<usize>().ok()) else { continue };
        if e.path().join("state.json").exists() && best.as_ref().is_none_or(|b| step > b.0) {
            best = Some((step, e.path()));
        }
    }
    best
}

fn save_checkpoint(out: &Path, step: usize, hash: &str, vars: &[(String, Var)], grpo: &mut Grpo) -> Result<()> {
    let dir = out.join(format!("checkpoint-{step}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    crate::grpo::checkpoint::save(&dir, vars, grpo)?;
    let state = CheckpointState { step, config_hash: hash.to_string() };
    crate::io::write_json(&dir.join("state.json"), &serde_json::to_value(&state)?)?;
    for e in std::fs::read_dir(out)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("checkpoint-") && e.path() != dir {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(())
}

fn load_checkpoint(dir: &Path, hash: &str, vars: &[(String, Var)], grpo: &mut Grpo) -> Result<usize> {
    let state: CheckpointState = serde_json::from_value(crate::io::read_json(&dir.join("state.json"))?)
        .with_context(|| format!("{}: bad state.json", dir.display()))?;
    if state.config_hash != hash {
        bail!(
            "{}: written with another config (hash {} ≠ {hash}); use a new --out or delete the checkpoint",
            dir.display(),
            state.config_hash
        );
    }
    crate::grpo::checkpoint::load(dir, vars, grpo)?;
    Ok(state.step)
}

/// Keep the first `keep` lines of the step log (those before the checkpoint resumed from).
fn truncate_log(path: &Path, keep: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: String = text.lines().take(keep).map(|l| format!("{l}\n")).collect();
    crate::io::write_text(path, &kept)
}

/// The chat-rendered prompt with the prefix, tokenized.
fn prompt_ids(
    llm: &Llm,
    prompt: &Prompt,
    cfg: &PretrainConfig,
    items: &[crate::data::preprocess::ItemRow],
    task: &AlignTask,
) -> Result<Vec<u32>> {
    let user = render(prompt, items, task)?;
    llm.prompt_ids(cfg.system.as_deref(), &user, &cfg.prefix)
}

/// Run (or resume) pretraining; returns eval.json's content.
pub fn pretrain(
    data: &Path,
    model_spec: &str,
    out: &Path,
    cfg: &PretrainConfig,
    grpo_cfg: &GrpoConfig,
    lora_cfg: &LoraConfig,
) -> Result<Value> {
    pretrain_until(data, model_spec, out, cfg, grpo_cfg, lora_cfg, None)?.context("pretraining stopped early")
}

/// [`pretrain`], but stop right after the checkpoint of step `halt_after` as a kill would
/// (returns `None`); for resume tests.
pub fn pretrain_until(
    data: &Path,
    model_spec: &str,
    out: &Path,
    cfg: &PretrainConfig,
    grpo_cfg: &GrpoConfig,
    lora_cfg: &LoraConfig,
    halt_after: Option<usize>,
) -> Result<Option<Value>> {
    cfg.validate()?;
    grpo_cfg.validate()?;
    lora_cfg.validate()?;
    let ds = prepared::read_dataset(data)?;
    let interactions = prepared::read_interactions(&data.join(prepared::INTERACTIONS))?;
    let stream = train_stream(&ds, &interactions, cfg.min_history);
    if stream.is_empty() {
        bail!(
            "{}: no train interaction has {} earlier train items to build a prompt from",
            data.display(),
            cfg.min_history
        );
    }
    let records = sample_records(&stream, cfg.sample, cfg.seed);
    let per_epoch = records.len().div_ceil(cfg.prompts_per_step);
    let mut total = per_epoch * cfg.epochs;
    if cfg.max_steps > 0 {
        total = total.min(cfg.max_steps);
    }
    let prompt = Prompt::load(PromptKind::Alignment, cfg.prompts.as_deref())?;

    let dev = llm::device(&cfg.device)?;
    let dtype = crate::llm::parse_dtype(&cfg.dtype, &dev)?;
    let path = llm::resolve(model_spec)?;
    let mut llm = Llm::load(&path, &dev, dtype)?;
    let vars: Vec<(String, Var)> = if cfg.lora {
        llm.model.add_lora(lora_cfg)?;
        llm.model.lora_vars()
    } else {
        llm.model.train_full()?
    };
    let mut grpo =
        Grpo::new(&llm.model, vars.iter().map(|(_, v)| v.clone()).collect(), grpo_cfg.clone(), cfg.lora, total)?;
    let mut grpo_stop = grpo_cfg.stop.clone();
    if grpo_stop.is_empty() {
        grpo_stop.push("</answer>".into());
    }
    grpo.cfg.stop = grpo_stop;
    let g = grpo.group();
    let orders = match cfg.orders_per_group {
        0 if cfg.shuffle_per_completion => g,
        0 => 1,
        m if g % m == 0 => m,
        m => bail!("pretrain.orders_per_group = {m}: expected a divisor of the group size {g}"),
    };

    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create run directory", out.display()))?;
    let identity = RunIdentity {
        pretrain: cfg,
        grpo: grpo_cfg,
        lora: lora_cfg,
        model: path.display().to_string(),
        data: data.display().to_string(),
    };
    let hash = config_hash(&identity);
    let log_path = out.join("steps.jsonl");
    let mut start = 0;
    if let Some((_, dir)) = newest_checkpoint(out) {
        start = load_checkpoint(&dir, &hash, &vars, &mut grpo)?;
        tracing::info!("resuming from {} (step {start} of {total})", dir.display());
    }
    truncate_log(&log_path, start)?;
    crate::io::write_json(&out.join("config.json"), &serde_json::to_value(&identity)?)?;

    let reward = RuleReward { cfg: cfg.reward.clone(), items: &ds.items, prefix: cfg.prefix.clone() };
    let label = format!("pretrain {}", ds.name);
    let progress = crate::progress::bar(total, &label, "steps");
    progress.set_position(start as u64);
    let t_run = Instant::now();
    for step in start..total {
        let epoch = (step / per_epoch) as u64;
        let from = (step % per_epoch) * cfg.prompts_per_step;
        let chunk = &records[from..(from + cfg.prompts_per_step).min(records.len())];
        let mut batch = Vec::with_capacity(chunk.len());
        for r in chunk {
            let task = train_task(&ds, r, cfg.history_len, cfg.negatives, cfg.seed, epoch)?;
            let tasks = match orders {
                1 => vec![task],
                m => (0..m).map(|j| task.reshuffled(cfg.seed, epoch, j)).collect(),
            };
            let prompts = tasks
                .into_iter()
                .map(|t| Ok((prompt_ids(&llm, &prompt, cfg, &ds.items, &t)?, t)))
                .collect::<Result<_>>()?;
            batch.push(Sample { key: r.index + epoch * stream.len() as u64, prompts });
        }
        let rep = grpo.step(&llm.model, &llm.tokenizer, &batch, &reward, step)?;
        let n = rep.completions.len().max(1) as f64;
        let format_rate = rep
            .completions
            .iter()
            .filter(|c| parse_completion(&format!("{}{}", cfg.prefix, c.text)).well_formed)
            .count() as f64
            / n;
        let s = &rep.stats;
        anyhow::ensure!(s.loss.is_finite(), "{label}: loss is not finite at step {step}");
        let line = json!({
            "step": step + 1,
            "epoch": epoch,
            "records": chunk.iter().map(|r| r.index).collect::<Vec<_>>(),
            "reward": s.reward,
            "reward_std": s.reward_std,
            "format": s.parts.get("format"),
            "legal": s.parts.get("legal"),
            "accuracy": s.parts.get("correct"),
            "format_rate": format_rate,
            "kl": s.kl,
            "clip_fraction": s.clip_fraction,
            "zero_variance_share": s.zero_variance_groups as f64 / s.groups.max(1) as f64,
            "rows_trained": s.rows_trained,
            "completion_tokens": s.completion_tokens,
            "loss": s.loss,
            "grad_norm": s.grad_norm,
            "lr": s.lr,
            "seconds": s.seconds,
            "gen_tokens_per_s": s.gen_tokens_per_s,
            "train_tokens_per_s": s.train_tokens_per_s,
            "sample": rep.completions.first().map(|c| c.text.clone()),
        });
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        writeln!(f, "{line}")?;
        drop(f);
        progress.set_message(format!(
            "reward {:.2} fmt {:.2} acc {:.2} kl {:.4}",
            s.reward,
            format_rate,
            s.parts.get("correct").copied().unwrap_or(0.0),
            s.kl.unwrap_or(0.0)
        ));
        progress.inc(1);
        if (step + 1) % cfg.checkpoint_every == 0 || step + 1 == total {
            save_checkpoint(out, step + 1, &hash, &vars, &mut grpo)?;
            if halt_after == Some(step + 1) {
                return Ok(None);
            }
        }
    }
    progress.finish();
    let steps = read_steps(&log_path)?;
    // Training time of this invocation plus, after a resume, the logged phases of the steps
    // before it (a finished run started again only re-evaluates: its training time stays).
    let earlier: f64 = steps.iter().take(start).map(|(_, s)| s.seconds.total()).sum();
    let train_seconds = t_run.elapsed().as_secs_f64() + earlier;

    if cfg.lora {
        llm.model.save_lora(&out.join("adapter.safetensors"), lora_cfg)?;
    } else {
        let w = llm.model.named_weights();
        let tmp = crate::io::tmp_path(&out.join("model.safetensors"));
        safetensors::serialize_to_file(w.iter().map(|(k, v)| (k.as_str(), v)), None, &tmp)?;
        std::fs::rename(&tmp, out.join("model.safetensors"))?;
    }
    std::fs::write(out.join("curve.svg"), curve(&steps))?;

    // Evaluation on validation prompts: aligned (adapters on) vs base (off) vs random.
    let users = eval_users(&ds, cfg.eval_users, cfg.seed);
    let tasks: Vec<AlignTask> =
        users.iter().map(|&u| valid_task(&ds, u, cfg.history_len, cfg.negatives, cfg.seed)).collect::<Result<_>>()?;
    let prompts: Vec<Vec<u32>> =
        tasks.iter().map(|t| prompt_ids(&llm, &prompt, cfg, &ds.items, t)).collect::<Result<_>>()?;
    let mut results = Vec::new();
    let aligned = llm.model.merged()?;
    for (name, model) in [("aligned", &aligned), ("base", &llm.model)] {
        let b = crate::progress::bar(tasks.len(), &format!("eval {name}"), "users");
        let t0 = Instant::now();
        let rows = evaluate(
            model,
            &llm.tokenizer,
            &prompts,
            &tasks,
            &reward,
            false,
            cfg.eval_batch,
            cfg.eval_max_new_tokens,
            |k| b.inc(k as u64),
        )?;
        b.finish();
        write_rows(&out.join(format!("eval_{name}.jsonl")), &rows)?;
        results.push((rates(&rows, cfg.bootstrap, cfg.seed), t0.elapsed().as_secs_f64()));
    }
    // Likelihood ranking of the same prompts' candidates (optional).
    let mut likelihood = serde_json::Map::new();
    if let Some(label) = cfg.rank_answers {
        let titles: Vec<&str> = ds.items.iter().map(|i| i.info.title.as_str()).collect();
        let lead = if cfg.prefix.trim_end().ends_with("<think>") { "</think>" } else { "<think></think>" };
        for (name, model) in [("aligned", &aligned), ("base", &llm.model)] {
            let b = crate::progress::bar(tasks.len(), &format!("rank {name}"), "users");
            let rows = rank_by_likelihood(
                model,
                &llm.tokenizer,
                &prompts,
                &tasks,
                &titles,
                label,
                lead,
                cfg.eval_batch,
                |k| b.inc(k as u64),
            )?;
            b.finish();
            write_rows(&out.join(format!("eval_{name}_likelihood.jsonl")), &rows)?;
            let (hit, ci, top) = likelihood_rates(&rows, cfg.bootstrap, cfg.seed);
            let key = if name == "aligned" { String::new() } else { format!("{name}_") };
            likelihood.insert(format!("{key}likelihood_hit_rate"), json!(hit));
            likelihood.insert(format!("{key}likelihood_hit_rate_ci95"), json!(ci));
            likelihood.insert(format!("{key}likelihood_top_position_share"), json!(top));
        }
    }
    let (aligned, base) = (&results[0].0, &results[1].0);
    let mean = |f: &dyn Fn(&StepStats) -> f64| steps.iter().map(|s| f(&s.1)).sum::<f64>() / steps.len().max(1) as f64;
    let mut eval = json!({
        "format_rate": aligned.format_rate,
        "legal_rate": aligned.legal_rate,
        "hit_rate": aligned.hit_rate,
        "hit_rate_ci95": aligned.hit_rate_ci95,
        "base_format_rate": base.format_rate,
        "base_legal_rate": base.legal_rate,
        "base_hit_rate": base.hit_rate,
        "base_hit_rate_ci95": base.hit_rate_ci95,
        "random_hit_rate": 1.0 / (cfg.negatives + 1) as f64,
        "eval_users": aligned.n,
        "candidates": cfg.negatives + 1,
        "steps": total,
        "prompts_per_step": cfg.prompts_per_step,
        "group_size": grpo.group(),
        "train_seconds": train_seconds,
        "eval_seconds": {"aligned": results[0].1, "base": results[1].1},
        "seconds_per_step": {
            "generate": mean(&|s| s.seconds.generate),
            "reward": mean(&|s| s.seconds.reward),
            "reference": mean(&|s| s.seconds.reference),
            "old": mean(&|s| s.seconds.old),
            "train": mean(&|s| s.seconds.train),
            "train_forward": mean(&|s| s.seconds.train_forward),
            "train_backward": mean(&|s| s.seconds.train_backward),
        },
        "model": model_spec,
        "model_path": path.display().to_string(),
        "dataset": ds.name,
        "config_hash": hash,
    });
    if let Some(obj) = eval.as_object_mut() {
        obj.extend(likelihood);
    }
    crate::io::write_json(&out.join("eval.json"), &eval)?;
    Ok(Some(eval))
}

/// (step, stats) from the step log, for the curve and the timing summary.
fn read_steps(path: &Path) -> Result<Vec<(Value, StepStats)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            let v: Value =
                serde_json::from_str(l).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            let mut s = StepStats {
                reward: v["reward"].as_f64().unwrap_or(f64::NAN),
                kl: v["kl"].as_f64(),
                ..Default::default()
            };
            s.seconds = serde_json::from_value(v["seconds"].clone()).unwrap_or_default();
            Ok((v, s))
        })
        .collect()
}

fn curve(steps: &[(Value, StepStats)]) -> String {
    let series = |key: &str| -> Vec<(f64, f64)> {
        steps.iter().map(|(v, _)| (v["step"].as_f64().unwrap_or(0.0), v[key].as_f64().unwrap_or(f64::NAN))).collect()
    };
    let w = 5;
    svg(
        &[
            Panel {
                title: "reward (moving average over 5 steps)",
                series: vec![
                    Series { name: "total", color: "#1f77b4", points: smooth(&series("reward"), w) },
                    Series { name: "format rate", color: "#2ca02c", points: smooth(&series("format_rate"), w) },
                    Series { name: "legal", color: "#ff7f0e", points: smooth(&series("legal"), w) },
                    Series { name: "accuracy", color: "#d62728", points: smooth(&series("accuracy"), w) },
                ],
            },
            Panel {
                title: "KL to the reference (k3, per token)",
                series: vec![Series { name: "KL", color: "#9467bd", points: series("kl") }],
            },
        ],
        "step",
    )
}

fn write_rows<R: Serialize>(path: &Path, rows: &[R]) -> Result<()> {
    let text: String =
        rows.iter().map(|r| serde_json::to_string(r).map(|s| s + "\n")).collect::<serde_json::Result<_>>()?;
    crate::io::write_text(path, &text)
}
