//! Evaluation of an aligned model on held-out prompts (validation split): greedy decoding, then
//! format rate (strictly well-formed), legal rate (the answer names a candidate) and hit rate
//! (it names the held-out item), with 95% bootstrap intervals over users.

use anyhow::Result;
use serde::Serialize;

use super::reward::{Judged, RuleReward};
use super::task::AlignTask;
use crate::eval::bootstrap::mean_ci95;
use crate::llm::{generate, CausalLm, SamplingConfig, Tokenizer};

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
    for start in (0..tasks.len()).step_by(batch.max(1)) {
        let end = (start + batch.max(1)).min(tasks.len());
        let keys: Vec<u64> = tasks[start..end].iter().map(|t| t.record).collect();
        let gens = generate(model, tok, &prompts[start..end], &keys, &cfg, adapters)?;
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

pub fn rates(rows: &[EvalRow], resamples: usize, seed: u64) -> Rates {
    let n = rows.len().max(1) as f64;
    let hits: Vec<f64> = rows.iter().map(|r| r.hit as u8 as f64).collect();
    Rates {
        n: rows.len(),
        format_rate: rows.iter().filter(|r| r.well_formed).count() as f64 / n,
        legal_rate: rows.iter().filter(|r| r.choice.is_some()).count() as f64 / n,
        hit_rate: hits.iter().sum::<f64>() / n,
        hit_rate_ci95: mean_ci95(&hits, resamples, seed),
    }
}
