//! The LLM corrector (paper §4.4). Per epoch:
//!
//! 1. **GRPO step** (§4.4.1): for each interaction, the Reason Generation prompt over the history
//!    before it; G sampled reasons; each is appended to the item's reason list Q_i and scored by
//!    the trained reward model, r = ŷ_ui = f(p_u, Q_i ∪ {q'_ui}, S_u, i) (Eq. 12); one GRPO update.
//! 2. **Update** (§4.4.2): the updated LLM answers the Pattern Update prompt (p_u, i) greedily;
//!    its `Pattern:` line becomes p'_u and its `Reason:` line q'_ui (Eq. 14–15).
//!
//! The policy is the LLM with LoRA adapters (the pretrain stage's, when given); its weights and
//! optimizer state are saved into each snapshot and loaded on resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Var;

use super::policy::{Corrector, EpochOutput};
use super::snapshot::POLICY;
use super::EpochMetrics;
use super::{Annotated, ReplayConfig, Update};
use crate::data::preprocess::ItemRow;
use crate::embed::{EmbeddingCache, Encoder};
use crate::features::writer::answer_text;
use crate::features::FeaturesConfig;
use crate::grpo::{Grpo, GrpoConfig, Reward, Sample, Scored};
use crate::llm::generate::Generator;
use crate::llm::{self, Llm, LoraConfig, SamplingConfig};
use crate::prompts::{item_text, numbered_items, parse_pattern_update, Prompt, PromptKind};
use crate::rec::curec::Curec;

/// What the reward needs to score a sampled reason.
pub struct ReasonTask {
    pub user: u32,
    pub item: u32,
    pub timestamp: i64,
    pub history: Vec<u32>,
    pub pattern: Vec<f32>,
    /// Q_i, encoded: (author, timestamp, vector), ordered by time.
    pub reasons: Vec<(u32, i64, Vec<f32>)>,
}

/// The reward model as a GRPO reward: each completion's answer joins the item's list.
pub struct ModelReward<'a> {
    pub model: &'a Curec,
    pub encoder: &'a dyn Encoder,
    pub cache: std::cell::RefCell<&'a mut EmbeddingCache>,
    pub prefix: String,
    pub keep: usize,
    /// `replay.min_reason_words`: answers shorter than this are not reasons (see [`gate_unwritten`]).
    pub min_words: usize,
}

/// The format gate on a group's rewards: a completion whose answer has fewer than `min_words`
/// words (typically an empty answer: the policy stopped at once) scores 1 below the group's
/// lowest written reason, and when no completion of the group wrote one, all of them score the
/// same (the lowest of their scores, less 1), so the group gives no gradient. Without it the
/// reward model's score of an empty text can beat real reasons and GRPO teaches the policy to
/// stop writing: on ML-100K's 48-hour window SmolLM2 wrote no reason from the fourth slice on.
pub fn gate_unwritten(scores: &mut [f32], written: &[bool]) {
    let floor = scores.iter().zip(written).filter(|(_, &w)| w).map(|(&s, _)| s).fold(f32::INFINITY, f32::min);
    let floor = if floor.is_finite() { floor } else { scores.iter().copied().fold(f32::INFINITY, f32::min) };
    for (s, &w) in scores.iter_mut().zip(written) {
        if !w {
            *s = floor - 1.0;
        }
    }
}

impl Reward<ReasonTask> for ModelReward<'_> {
    fn names(&self) -> Vec<String> {
        vec!["reward_model".into()]
    }

    fn score(&self, batch: &[(&ReasonTask, &str)]) -> Result<Vec<Scored>> {
        let texts: Vec<String> = batch.iter().map(|(_, c)| answer_text(&self.prefix, c).0).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let vecs = self.cache.borrow_mut().embed(self.encoder, &refs, |_, _| {})?;
        let mut out = Vec::with_capacity(batch.len());
        let mut i = 0;
        while i < batch.len() {
            // Consecutive completions of one task are scored together.
            let task = batch[i].0;
            let mut j = i;
            while j < batch.len() && std::ptr::eq(batch[j].0, task) {
                j += 1;
            }
            let lists: Vec<Vec<Vec<f32>>> = (i..j).map(|k| with_candidate(task, &vecs[k], self.keep)).collect();
            let mut scores = self.model.score_lists(&task.history, &task.pattern, task.item, &lists)?;
            let written: Vec<bool> = (i..j).map(|k| texts[k].split_whitespace().count() >= self.min_words).collect();
            gate_unwritten(&mut scores, &written);
            out.extend(scores.into_iter().map(|s| Scored { total: s, parts: vec![s] }));
            i = j;
        }
        Ok(out)
    }
}

/// Q_i ∪ {q'_ui} as vectors: the candidate joins the time-ordered list, replacing a reason of the
/// same interaction, and the newest `keep` remain (as the item state folds it).
fn with_candidate(task: &ReasonTask, cand: &[f32], keep: usize) -> Vec<Vec<f32>> {
    let key = (task.timestamp, task.user);
    let mut l: Vec<&[f32]> = Vec::with_capacity(task.reasons.len() + 1);
    let mut placed = false;
    for (u, ts, v) in &task.reasons {
        if !placed && (*ts, *u) >= key {
            l.push(cand);
            placed = true;
            if (*ts, *u) == key {
                continue;
            }
        }
        l.push(v);
    }
    if !placed {
        l.push(cand);
    }
    l[l.len().saturating_sub(keep)..].iter().map(|v| v.to_vec()).collect()
}

/// Everything the corrector is built from.
#[derive(Clone)]
pub struct LlmSetup {
    pub model: String,
    pub adapter: Option<PathBuf>,
    pub features: FeaturesConfig,
    pub grpo: GrpoConfig,
    pub lora: LoraConfig,
    pub replay: ReplayConfig,
    pub items: Vec<ItemRow>,
    /// Take GRPO steps (false: only rewrite the state, e.g. ingest without `grpo_on_ingest`).
    pub train: bool,
    /// Snapshot to resume the policy from.
    pub resume: Option<PathBuf>,
    /// Where the embedding cache lives (the run directory).
    pub cache_dir: PathBuf,
    /// Total GRPO steps planned (the schedule's length).
    pub total_steps: usize,
    /// Start a new warm-up + cosine schedule at the resumed step (ingest) instead of continuing
    /// the saved one (a resumed replay).
    pub fresh_schedule: bool,
}

pub struct LlmCorrector {
    setup: LlmSetup,
    llm: Llm,
    vars: Vec<(String, Var)>,
    lora: LoraConfig,
    grpo: Grpo,
    step: usize,
    /// Step at which this run's schedule starts.
    base_step: usize,
    reward_model: Curec,
    encoder: Box<dyn Encoder>,
    cache: EmbeddingCache,
    reason_prompt: Prompt,
    update_prompt: Prompt,
}

impl LlmCorrector {
    pub fn new(setup: LlmSetup, reward_model: Curec, encoder: Box<dyn Encoder>) -> Result<Self> {
        let dev = llm::device(&setup.features.device)?;
        let dtype = llm::parse_dtype(&setup.features.dtype, &dev)?;
        let mut model = Llm::load(&llm::resolve(&setup.model)?, &dev, dtype)?;
        let lora = match &setup.adapter {
            Some(a) => model.model.load_lora(a).with_context(|| format!("adapter {}", a.display()))?,
            None => {
                model.model.add_lora(&setup.lora)?;
                setup.lora.clone()
            }
        };
        let vars = model.model.lora_vars();
        let mut gcfg = setup.grpo.clone();
        gcfg.max_new_tokens = setup.replay.max_new_tokens_reason;
        if gcfg.stop.is_empty() {
            gcfg.stop.push("</answer>".into());
        }
        let mut grpo =
            Grpo::new(&model.model, vars.iter().map(|(_, v)| v.clone()).collect(), gcfg, true, setup.total_steps)?;
        let mut step = 0;
        if let Some(dir) = &setup.resume {
            step = load_policy(&dir.join(POLICY), &vars, &mut grpo)?;
        }
        let base_step = if setup.fresh_schedule { step } else { 0 };
        let cache = EmbeddingCache::open(&setup.cache_dir, encoder.as_ref())?;
        let prompts = setup.features.prompts.clone();
        Ok(Self {
            reason_prompt: Prompt::load(PromptKind::Reason, prompts.as_deref())?,
            update_prompt: Prompt::load(PromptKind::PatternUpdate, prompts.as_deref())?,
            setup,
            llm: model,
            vars,
            lora,
            grpo,
            step,
            base_step,
            reward_model,
            encoder,
            cache,
        })
    }

    fn reason_ids(&self, a: &Annotated) -> Result<Vec<u32>> {
        let f = &self.setup.features;
        let h = &a.history[a.history.len().saturating_sub(f.reason_history)..];
        let mut v: BTreeMap<&str, String> = BTreeMap::new();
        v.insert("history", numbered_items(&self.setup.items, h, true));
        v.insert("item", item_text(&self.setup.items, a.event.item).to_string());
        self.llm.prompt_ids(f.system.as_deref(), &self.reason_prompt.render(&v)?, &f.prefix)
    }

    fn update_ids(&self, a: &Annotated) -> Result<Vec<u32>> {
        let f = &self.setup.features;
        let mut v: BTreeMap<&str, String> = BTreeMap::new();
        v.insert(
            "pattern",
            a.pattern.as_ref().map_or_else(|| "(no pattern yet: this is their first choice)".into(), |p| p.to_string()),
        );
        v.insert("item", item_text(&self.setup.items, a.event.item).to_string());
        self.llm.prompt_ids(f.system.as_deref(), &self.update_prompt.render(&v)?, &f.prefix)
    }

    fn task(&mut self, a: &Annotated) -> Result<ReasonTask> {
        let list: &[super::Reason] = &[];
        let reasons: Vec<&super::Reason> = match &a.reasons {
            Some(l) => l.iter().collect(),
            None => list.iter().collect(),
        };
        let mut texts: Vec<&str> = reasons.iter().map(|r| &*r.text).collect();
        let pattern = a.pattern.as_deref().unwrap_or("");
        texts.push(pattern);
        let mut vecs = self.cache.embed(self.encoder.as_ref(), &texts, |_, _| {})?;
        let pv = vecs.pop().expect("pattern vector");
        let pv = if a.pattern.is_some() { pv } else { vec![0.0; pv.len()] };
        Ok(ReasonTask {
            user: a.event.user,
            item: a.event.item,
            timestamp: a.event.timestamp,
            history: a.history.clone(),
            pattern: pv,
            reasons: reasons.iter().zip(vecs).map(|(r, v)| (r.user, r.timestamp, v)).collect(),
        })
    }

    fn grpo_step(&mut self, epoch: u64, records: &[Annotated], m: &mut EpochMetrics) -> Result<()> {
        let cap = if self.setup.replay.max_groups_per_step == 0 {
            records.len()
        } else {
            self.setup.replay.max_groups_per_step
        };
        // Records without history cannot be scored by the reward model's tower.
        // and items it has no embedding for (new ones from ingestion) cannot be scored.
        let n_items = self.reward_model.n_items() as u32;
        let chosen: Vec<&Annotated> = records
            .iter()
            .filter(|a| !a.history.is_empty() && a.event.item < n_items && a.history.iter().all(|&i| i < n_items))
            .take(cap)
            .collect();
        if chosen.is_empty() {
            return Ok(());
        }
        let mut batch = Vec::with_capacity(chosen.len());
        for a in &chosen {
            let ids = self.reason_ids(a)?;
            let task = self.task(a)?;
            batch.push(Sample::shared(a.event.key, ids, task));
        }
        let reward = ModelReward {
            model: &self.reward_model,
            encoder: self.encoder.as_ref(),
            cache: std::cell::RefCell::new(&mut self.cache),
            prefix: self.setup.features.prefix.clone(),
            keep: self.setup.replay.reasons_kept,
            min_words: self.setup.replay.min_reason_words,
        };
        let rep = self.grpo.step(&self.llm.model, &self.llm.tokenizer, &batch, &reward, self.step - self.base_step)?;
        self.step += 1;
        let s = &rep.stats;
        anyhow::ensure!(s.loss.is_finite(), "GRPO loss is not finite at epoch {epoch}");
        m.groups += s.groups as u64;
        m.zero_variance_groups += s.zero_variance_groups as u64;
        m.reward_sum += rep.completions.iter().map(|c| c.reward.total as f64).sum::<f64>();
        m.reward_count += rep.completions.len() as u64;
        if let Some(kl) = s.kl {
            m.kl_sum += kl;
            m.kl_count += 1;
        }
        m.loss = s.loss;
        m.generated_tokens += rep.completions.iter().map(|c| c.tokens as u64).sum::<u64>();
        Ok(())
    }

    fn rewrite(&mut self, records: &[Annotated], m: &mut EpochMetrics) -> Result<Vec<Update>> {
        let policy = Generator::for_model(&self.llm.model, true)?;
        let sampling = SamplingConfig::greedy(self.setup.replay.max_new_tokens_update);
        let sampling = SamplingConfig { stop: vec!["</answer>".into()], ..sampling };
        let mut updates = Vec::with_capacity(2 * records.len());
        for chunk in records.chunks(self.setup.features.batch.max(1)) {
            let ids = chunk.iter().map(|a| self.update_ids(a)).collect::<Result<Vec<_>>>()?;
            let keys: Vec<u64> = chunk.iter().map(|a| a.event.key).collect();
            let gens = policy.generate(&self.llm.tokenizer, &ids, &keys, &sampling)?;
            for (a, g) in chunk.iter().zip(gens) {
                m.generated_tokens += g.tokens.len() as u64;
                let (answer, _) = answer_text(&self.setup.features.prefix, &g.text);
                let (pattern, reason) = match parse_pattern_update(&answer) {
                    Some(pr) => pr,
                    None => {
                        // No "Pattern:/Reason:" split: the answer is the reason; the pattern is
                        // kept, or for a user without one (a new user) the answer is the first.
                        m.unparsed += 1;
                        let first = if a.pattern.is_none() { answer.clone() } else { String::new() };
                        (first, answer)
                    }
                };
                if !pattern.is_empty() {
                    updates.push(Update::pattern(&a.event, Arc::from(pattern.as_str())));
                    m.patterns_written += 1;
                }
                if !reason.is_empty() {
                    updates.push(Update::reason(&a.event, Arc::from(reason.as_str())));
                    m.reasons_written += 1;
                }
            }
        }
        Ok(updates)
    }
}

impl Corrector for LlmCorrector {
    fn epoch(&mut self, epoch: u64, records: Vec<Annotated>) -> Result<EpochOutput> {
        let t0 = Instant::now();
        let mut m = EpochMetrics { epoch, interactions: records.len() as u64, ..Default::default() };
        if self.setup.train {
            self.grpo_step(epoch, &records, &mut m)?;
        }
        let updates = self.rewrite(&records, &mut m)?;
        tracing::debug!("epoch {epoch}: {} records in {:.1} s", records.len(), t0.elapsed().as_secs_f64());
        Ok(EpochOutput { updates, metrics: m })
    }

    fn save(&mut self, dir: &Path) -> Result<()> {
        self.cache.save()?;
        let dir = dir.join(POLICY);
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        self.llm.model.save_lora(&dir.join("adapter.safetensors"), &self.lora)?;
        crate::grpo::checkpoint::save(&dir, &self.vars, &mut self.grpo)?;
        crate::io::write_json(&dir.join("state.json"), &serde_json::json!({"step": self.step}))
    }
}

/// Restore the trainable weights, optimizer and step count saved by [`LlmCorrector::save`].
fn load_policy(dir: &Path, vars: &[(String, Var)], grpo: &mut Grpo) -> Result<usize> {
    crate::grpo::checkpoint::load(dir, vars, grpo)?;
    let state = crate::io::read_json(&dir.join("state.json"))?;
    state["step"].as_u64().map(|s| s as usize).with_context(|| format!("{}: no step in state.json", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_joins_in_time_order_and_replaces_its_own_interaction() {
        let task = ReasonTask {
            user: 7,
            item: 0,
            timestamp: 20,
            history: vec![1],
            pattern: vec![],
            reasons: vec![(1, 10, vec![1.0]), (7, 20, vec![2.0]), (3, 30, vec![3.0])],
        };
        assert_eq!(with_candidate(&task, &[9.0], 10), vec![vec![1.0], vec![9.0], vec![3.0]]);
        let later = ReasonTask { timestamp: 40, ..task };
        assert_eq!(with_candidate(&later, &[9.0], 3), vec![vec![2.0], vec![3.0], vec![9.0]]);
    }

    #[test]
    fn an_unwritten_reason_never_beats_a_written_one_and_an_empty_group_gives_no_gradient() {
        // The empty answer scored highest by the model; gated, it scores below the lowest written.
        let mut s = vec![0.5, 3.0, -0.25, 1.0];
        gate_unwritten(&mut s, &[true, false, true, true]);
        assert_eq!(s, vec![0.5, -1.25, -0.25, 1.0]);
        // No completion wrote a reason: all equal, so the group's advantages are all zero.
        let mut s = vec![2.0, 0.5, 1.0];
        gate_unwritten(&mut s, &[false, false, false]);
        assert_eq!(s, vec![-0.5, -0.5, -0.5]);
        // All written: unchanged.
        let mut s = vec![2.0, 0.5];
        gate_unwritten(&mut s, &[true, true]);
        assert_eq!(s, vec![2.0, 0.5]);
    }
}
