//! Running feature jobs through the LLM: a job's prompt rendered from the configured templates,
//! a batch generated with `<think>` reasoning stripped from the answer, and the rows it yields.

use super::plan::FeatureJob;
use super::FeaturesConfig;
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;

use crate::data::preprocess::ItemRow;
use crate::llm::{self, Llm, SamplingConfig};
use crate::prompts::{item_text, numbered_items, parse_completion, Prompt, PromptKind};

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
