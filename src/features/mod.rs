//! Feature generation (paper §4.3.1): the LLM writes an interest pattern p_u per user (Pattern
//! Generation prompt over the user's train history) and a recommendation reason q_ui per train
//! interaction (Reason Generation prompt over the history before it and the item). Outputs:
//! `patterns.parquet` (user, raw_user, timestamp, text), `reasons.parquet` (user, item, timestamp,
//! text) and `manifest.json` with every limit that shaped the run.
//!
//! Generation is batched; each job is a pure function of its record (greedy by default, or
//! sampled from (seed, record key)), so a job gives the same text in any batch or worker. Rows
//! are appended to `patterns.jsonl` / `reasons.jsonl` as batches finish; a restarted run skips
//! the rows already there (a torn last line is dropped) and the Parquet files are written at the end.

pub mod bank;
pub mod dataflow;
pub mod oracle;
pub mod plan;
pub mod store;
pub mod writer;

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

pub use plan::FeatureJob;
pub use store::Features;

/// Who writes the patterns and reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Writer {
    /// The LLM (`--model`), the paper's pipeline.
    #[default]
    Llm,
    /// Collaborative reasons by construction, no model (a control; see [`oracle`]).
    Oracle,
    /// The oracle's texts permuted over rows: the same texts without signal (a control).
    Shuffled,
}

impl Writer {
    /// Every writer, in the order the CLI lists them.
    pub const ALL: [Writer; 3] = [Writer::Llm, Writer::Oracle, Writer::Shuffled];

    pub fn name(self) -> &'static str {
        match self {
            Writer::Llm => "llm",
            Writer::Oracle => "oracle",
            Writer::Shuffled => "shuffled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesConfig {
    /// `llm` (default), or a control that needs no model: `oracle` or `shuffled`.
    pub writer: Writer,
    /// LLM (GGUF file, HF directory or pinned name) for `curec run`; the CLI's `--model` overrides.
    pub model: Option<String>,
    /// LoRA adapter to apply (e.g. the aligned model's `adapter.safetensors`).
    pub adapter: Option<PathBuf>,
    /// In `curec run`: without an explicit adapter, use the pretrain stage's (the paper's LLM_pre).
    pub aligned: bool,
    /// Most recent train items shown in the pattern prompt.
    pub pattern_history: usize,
    /// `train` (default): patterns describe the train history, as the paper writes them;
    /// `valid`: the train history and the validation item, i.e. the pattern as a replay would have
    /// rewritten it after the validation interaction, for scoring the test target with texts that
    /// are not one interaction stale (not for training or model selection: it names the
    /// validation item). Left out of the serialized config at its default, like
    /// `pattern_holdout`, so that identities (features folders, replay snapshots) written before
    /// these settings existed still match.
    #[serde(skip_serializing_if = "is_train")]
    pub patterns_through: String,
    /// Leave each user's N most recent train items out of the pattern (default 0): a pattern that
    /// ends before the targets the reward model trains on (`curec.positions_per_user`), so it
    /// cannot describe them (a control for the pattern leak, `docs/results.md`).
    #[serde(skip_serializing_if = "is_zero")]
    pub pattern_holdout: usize,
    /// Train items before a user's first reasoned interaction shown in the reason prompt; later
    /// reasons of the user also show the items since (so a user's prompts extend one another and
    /// share a cached prefix). With `reasons_per_user = 0`: the items just before each interaction.
    pub reason_history: usize,
    /// Reasons are generated for each user's most recent N train interactions (0 = all of them).
    pub reasons_per_user: usize,
    /// Users (seeded sample) that get a pattern and reasons; 0 = all.
    pub users: usize,
    /// Also a reason for the most recent train interaction of each of the N most popular train
    /// items (0 = none, the default), whoever made it: on a sample of users, the items a model
    /// recommends (mostly popular ones) then have reasons to show. Left out of the serialized
    /// config at 0, so identities written before the key existed still match.
    #[serde(skip_serializing_if = "is_zero")]
    pub item_reasons: usize,
    pub max_new_tokens_pattern: usize,
    pub max_new_tokens_reason: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// Prompts handed to the generation engine together (it decodes up to 32 at a time and fills
    /// a finished one's slot from the rest at once, so larger is better; the output does not
    /// depend on it).
    pub batch: usize,
    /// Timely worker threads, each with its own copy of the model (jobs are exchanged by user;
    /// the output does not depend on this number).
    pub workers: usize,
    /// Text after the assistant header that the completion continues.
    pub prefix: String,
    pub system: Option<String>,
    /// Directory with edited prompt templates (default: the built-in ones).
    pub prompts: Option<PathBuf>,
    pub device: String,
    pub dtype: String,
    pub seed: u64,
}

fn is_train(s: &str) -> bool {
    s == "train"
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Default for FeaturesConfig {
    fn default() -> Self {
        Self {
            writer: Writer::Llm,
            model: None,
            adapter: None,
            aligned: true,
            pattern_history: 20,
            patterns_through: "train".into(),
            pattern_holdout: 0,
            reason_history: 10,
            reasons_per_user: 4,
            users: 0,
            item_reasons: 0,
            max_new_tokens_pattern: 128,
            max_new_tokens_reason: 96,
            temperature: 0.0,
            top_p: 1.0,
            batch: 256,
            workers: 1,
            prefix: "<think>".into(),
            system: None,
            prompts: None,
            device: "cpu".into(),
            dtype: "auto".into(),
            seed: 2024,
        }
    }
}

impl FeaturesConfig {
    pub fn validate(&self) -> Result<()> {
        if self.pattern_history == 0 || self.reason_history == 0 {
            bail!("features.pattern_history and features.reason_history: expected at least 1");
        }
        if self.patterns_through != "train" && self.patterns_through != "valid" {
            bail!("features.patterns_through: expected 'train' or 'valid', found '{}'", self.patterns_through);
        }
        if self.batch == 0 || self.workers == 0 {
            bail!("features.batch and features.workers: expected at least 1");
        }
        if self.max_new_tokens_pattern == 0 || self.max_new_tokens_reason == 0 {
            bail!("features.max_new_tokens_pattern/_reason: expected at least 1");
        }
        if !(0.0..=1.0).contains(&self.top_p) || self.top_p == 0.0 {
            bail!("features.top_p: expected a number in (0, 1], found {}", self.top_p);
        }
        Ok(())
    }
}
