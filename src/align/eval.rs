//! Evaluation of an aligned model on held-out prompts (validation split): greedy decoding, then
//! format rate (strictly well-formed), legal rate (the answer names a candidate) and hit rate
//! (it names the held-out item), with 95% bootstrap intervals over users.

use anyhow::Result;
use serde::Serialize;

use super::reward::{Judged, RuleReward};
use super::task::AlignTask;
use crate::eval::bootstrap::mean_ci95;
use crate::llm::generate::Generator;
use crate::llm::{CausalLm, SamplingConfig, Tokenizer};

/// One evaluated prompt.
#[derive(Debug, Clone, Serialize)]
pub struct EvalRow {
    pub user: u32,
    pub target: u32,
    pub choice: Option<u32>,
    /// 1-based position of the chosen candidate in the prompt's list (position bias shows here).
    pub position: Option<usize>,
    pub well_formed: bool,
    pub hit: bool,
    pub completion: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rates {
    pub n: usize,
    pub format_rate: f64,
    pub legal_rate: f64,
    pub hit_rate: f64,
    pub hit_rate_ci95: (f64, f64),
}

/// Greedy completions for `prompts` (in batches), judged by `reward`.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &CausalLm,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    tasks: &[AlignTask],
    reward: &RuleReward,
    adapters: bool,
    batch: usize,
    max_new_tokens: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<EvalRow>> {
    let cfg = SamplingConfig { stop: vec!["</answer>".into()], ..SamplingConfig::greedy(max_new_tokens) };
    let mut rows = Vec::with_capacity(tasks.len());
    let generator = Generator::for_model(model, adapters)?;
    for start in (0..tasks.len()).step_by(batch.max(1)) {
        let end = (start + batch.max(1)).min(tasks.len());
        let keys: Vec<u64> = tasks[start..end].iter().map(|t| t.record).collect();
        let gens = generator.generate(tok, &prompts[start..end], &keys, &cfg)?;
        for (t, g) in tasks[start..end].iter().zip(gens) {
            let text = tok.decode(&g.tokens, true)?;
            let (j, _): (Judged, f32) = reward.judge(t, &text);
            rows.push(EvalRow {
                user: t.user,
                target: t.target,
                choice: j.choice.map(|c| t.candidates[c]),
                position: j.choice.map(|c| c + 1),
                well_formed: j.well_formed,
                hit: j.correct,
                completion: text,
            });
        }
        progress(end - start);
    }
    Ok(rows)
}

/// Share of hits with its 95% bootstrap interval over prompts.
fn hit_rate(hits: impl Iterator<Item = bool>, resamples: usize, seed: u64) -> (f64, (f64, f64)) {
    let hits: Vec<f64> = hits.map(|h| h as u8 as f64).collect();
    (hits.iter().sum::<f64>() / hits.len().max(1) as f64, mean_ci95(&hits, resamples, seed))
}

pub fn rates(rows: &[EvalRow], resamples: usize, seed: u64) -> Rates {
    let n = rows.len().max(1) as f64;
    let (hit_rate, hit_rate_ci95) = hit_rate(rows.iter().map(|r| r.hit), resamples, seed);
    Rates {
        n: rows.len(),
        format_rate: rows.iter().filter(|r| r.well_formed).count() as f64 / n,
        legal_rate: rows.iter().filter(|r| r.choice.is_some()).count() as f64 / n,
        hit_rate,
        hit_rate_ci95,
    }
}

/// How a candidate is named in the forced answers of [`rank_by_likelihood`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerLabel {
    /// Its 1-based number in the prompt's list (prompts that ask for the number).
    Index,
    /// Its title (prompts that ask for the title).
    Title,
}

/// One prompt ranked by likelihood: the candidate whose forced answer the model finds most
/// likely, and whether it is the held-out item.
#[derive(Debug, Clone, Serialize)]
pub struct LikelihoodRow {
    pub user: u32,
    pub target: u32,
    pub choice: u32,
    /// 1-based position of the choice in the prompt's list.
    pub position: usize,
    pub hit: bool,
    /// Mean log-prob per token of each candidate's forced answer, in list order.
    pub scores: Vec<f32>,
}

/// Rank each prompt's candidates by the model's likelihood of answering with them: the forced
/// completion `{lead}<answer>{label}</answer>` (e.g. lead `</think>` after a `<think>` prefix:
/// no reasoning), scored by its mean log-prob per token. This is the ranking protocol of
/// likelihood-based LLM recommenders; it shows whether the model prefers the held-out item even
/// when greedy decoding collapses onto one position. The candidates of a prompt share one packed
/// row (the prompt is computed once).
#[allow(clippy::too_many_arguments)]
pub fn rank_by_likelihood(
    model: &CausalLm,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    tasks: &[AlignTask],
    titles: &[&str],
    label: AnswerLabel,
    lead: &str,
    batch: usize,
    mut progress: impl FnMut(usize),
) -> Result<Vec<LikelihoodRow>> {
    let mut rows = Vec::with_capacity(tasks.len());
    for start in (0..tasks.len()).step_by(batch.max(1)) {
        let end = (start + batch.max(1)).min(tasks.len());
        let mut pairs = Vec::new();
        for (p, t) in prompts[start..end].iter().zip(&tasks[start..end]) {
            for (j, &c) in t.candidates.iter().enumerate() {
                let name = match label {
                    AnswerLabel::Index => (j + 1).to_string(),
                    AnswerLabel::Title => titles[c as usize].to_string(),
                };
                pairs.push((p.clone(), tok.encode(&format!("{lead}<answer>{name}</answer>"))?));
            }
        }
        let (lp, _) = crate::llm::log_probs_with(model, &pairs, false, crate::llm::Grad::None)?;
        let sums: Vec<f32> = lp.log_probs.sum(1)?.to_vec1()?;
        let mut k = 0;
        for t in &tasks[start..end] {
            let scores: Vec<f32> =
                (0..t.candidates.len()).map(|j| sums[k + j] / pairs[k + j].1.len().max(1) as f32).collect();
            k += t.candidates.len();
            let best = (0..scores.len()).fold(0, |b, j| if scores[j] > scores[b] { j } else { b });
            rows.push(LikelihoodRow {
                user: t.user,
                target: t.target,
                choice: t.candidates[best],
                position: best + 1,
                hit: t.candidates[best] == t.target,
                scores,
            });
        }
        progress(end - start);
    }
    Ok(rows)
}

/// Hit rate of a likelihood ranking with its 95% bootstrap interval, and the share of prompts
/// whose choice sits at the most frequent position (1/k for no position bias).
pub fn likelihood_rates(rows: &[LikelihoodRow], resamples: usize, seed: u64) -> (f64, (f64, f64), f64) {
    let (rate, ci) = hit_rate(rows.iter().map(|r| r.hit), resamples, seed);
    let mut counts = std::collections::BTreeMap::new();
    for r in rows {
        *counts.entry(r.position).or_insert(0usize) += 1;
    }
    let top = counts.values().copied().max().unwrap_or(0) as f64 / rows.len().max(1) as f64;
    (rate, ci, top)
}
