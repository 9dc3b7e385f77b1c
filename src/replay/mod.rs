//! Chronological CoT correction (paper §4.4) as a timely dataflow, and incremental ingestion
//! through the same operators.
//!
//! The train log replays in time order; each time slice is one epoch of the dataflow:
//!
//! ```text
//! source ─▶ user_state ─▶ item_state ─▶ policy ─┐   (exchanged by user / by item / to the policy's worker)
//!              ▲              ▲                  │
//!              └── patterns ──┴──── reasons ─────┘   (feedback: epoch t's updates are read at t + 1)
//! ```
//!
//! * [`source`]: interactions in time order, cut into epochs (by count or by duration).
//! * [`user_state`]: per-user pattern and item history, exchanged by user.
//! * [`item_state`]: per-item reason list, exchanged by item.
//! * [`policy`]: once the frontier passes an epoch, hands its records (sorted by key) to a
//!   [`Corrector`]: the LLM one ([`llm_corrector`]) samples G reasons per interaction, scores each
//!   appended to the item's list with the reward model, takes one GRPO step, and rewrites the
//!   user's pattern and a new reason with the Pattern Update prompt; the stand-in
//!   ([`standin`]) writes fixed-cost text and is used only to measure the dataflow.
//! * [`snapshot`]: every N epochs each state operator writes its shard, the policy its weights,
//!   and the last one to finish merges the shards and writes the manifest (the mark of a complete
//!   snapshot).
//!
//! Every random draw is seeded from (seed, record key), and every operator processes an epoch's
//! records in key order, so the results do not depend on the number of workers.

pub mod board;
pub mod graph;
pub mod ingest_log;
pub mod item_state;
pub mod llm_corrector;
pub mod policy;
pub mod resident;
pub mod shared;
pub mod snapshot;
pub mod snapshot_op;
pub mod source;
pub mod standin;
pub mod state_op;
pub mod user_state;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

pub use graph::{run_dataflow, DataflowOutcome, Initial, Topology};
pub use policy::{Corrector, EpochOutput};
pub use shared::{IdMap, Shared};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// How the log is cut into time slices: `count` (interactions per slice) or `seconds`.
    pub slice_by: String,
    /// Interactions per slice, or seconds per slice.
    pub slice: u64,
    /// Users replayed (seeded sample; 0 = all).
    pub users: usize,
    /// Each replayed user's most recent N train interactions (0 = all of them).
    pub per_user: usize,
    /// Only the train interactions of the last N seconds of the train log (0 = no window): every
    /// interaction of a time window, so that users and items meet their rewritten patterns and
    /// reasons again in later slices. Applied after `users` and `per_user`. Left out of the
    /// serialized config at 0, so replays written before the key existed keep their identity.
    #[serde(skip_serializing_if = "is_zero")]
    pub last_seconds: u64,
    /// Write a snapshot every N epochs (and after the last one).
    pub snapshot_every: u64,
    /// Reasons kept per item in the state (the newest; the reward model reads `curec.reasons_per_item`).
    pub reasons_kept: usize,
    /// Items kept per user history in the state (the reward model's tower reads up to `sasrec.max_len`).
    pub history_kept: usize,
    /// Trained reward model (a `curec train curec` run directory); `curec replay` defaults to the
    /// job's `curec-attention` run.
    pub reward_model: Option<PathBuf>,
    /// Rewrite patterns and reason lists during the replay (false = the paper's "w/o Update": the
    /// LLM trains against the initial features; its rewrites are applied only at the end).
    pub update: bool,
    /// Run the correction at all (false = "w/o Corr.": the reward model on the initial features).
    pub correct: bool,
    /// Take GRPO steps during `curec ingest` (default: only rewrite the state).
    pub grpo_on_ingest: bool,
    /// Timely worker threads.
    pub workers: usize,
    /// Tokens for the Pattern Update answer (pattern + reason).
    pub max_new_tokens_update: usize,
    /// Tokens for each sampled reason in the GRPO step.
    pub max_new_tokens_reason: usize,
    /// A sampled reason with fewer words than this (e.g. an empty answer) scores below every
    /// written reason of its group in the GRPO step, so stopping at once is never rewarded.
    pub min_reason_words: usize,
    /// Cap on prompts per GRPO step (the slice's records beyond it still update the state).
    pub max_groups_per_step: usize,
    /// Stand-in generator only: busy work per record, in nanoseconds (the bench's fixed cost).
    pub standin_cost_ns: u64,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            slice_by: "count".into(),
            slice: 8,
            users: 0,
            per_user: 0,
            last_seconds: 0,
            snapshot_every: 4,
            reasons_kept: 20,
            history_kept: 200,
            reward_model: None,
            update: true,
            correct: true,
            grpo_on_ingest: false,
            workers: 1,
            max_new_tokens_update: 128,
            max_new_tokens_reason: 64,
            min_reason_words: 3,
            max_groups_per_step: 0,
            standin_cost_ns: 0,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ReplayConfig {
    pub fn validate(&self) -> Result<()> {
        if self.slice_by != "count" && self.slice_by != "seconds" {
            bail!("replay.slice_by: expected 'count' or 'seconds', found '{}'", self.slice_by);
        }
        if self.slice == 0 || self.snapshot_every == 0 || self.workers == 0 {
            bail!("replay.slice, replay.snapshot_every and replay.workers: expected at least 1");
        }
        if self.reasons_kept == 0 || self.history_kept == 0 {
            bail!("replay.reasons_kept and replay.history_kept: expected at least 1");
        }
        Ok(())
    }
}

/// One interaction flowing through the dataflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Stable record key `(user << 32) | position in the user's sequence`: the RNG stream and the
    /// processing order within an epoch.
    pub key: u64,
    pub user: u32,
    pub item: u32,
    pub timestamp: i64,
    /// A retraction (`curec ingest`, `op = delete` or a rating under the filter): the user's
    /// interaction with the item leaves the history, the reasons written for it leave the item's
    /// list, and the corrector does not see it.
    #[serde(default)]
    pub retract: bool,
}

/// The source's word to every operator of its worker that epoch `epoch` exists (every epoch
/// with records gets one) and whether a snapshot is written after it. Ticks travel on their own
/// input, worker-local, and give the operators the capability to report at that epoch, so epochs
/// and snapshots need not be known when the dataflow starts (`curec serve` feeds batches as they
/// come).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    pub epoch: u64,
    pub snapshot: bool,
}

/// An item's reason list, oldest first (a ring: the newest joins at the back, the oldest leaves
/// at the front).
pub type ReasonList = std::collections::VecDeque<Reason>;

/// One entry of an item's reason list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    pub user: u32,
    pub timestamp: i64,
    pub text: Shared<str>,
}

/// An event with the state it meets: the user's pattern and history (before this event) and the
/// item's reason list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Annotated {
    pub event: Event,
    pub pattern: Option<Shared<str>>,
    /// Items before this one, oldest first (at most `replay.history_kept`).
    pub history: Vec<u32>,
    /// The item's reason list (`None` when the corrector does not read it).
    pub reasons: Option<Shared<ReasonList>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateKind {
    Pattern,
    Reason,
}

/// A state rewrite produced by the policy at epoch t, read by the state operators at t + 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub kind: UpdateKind,
    /// The event's key (the order in which an epoch's updates apply).
    pub key: u64,
    pub user: u32,
    pub item: u32,
    pub timestamp: i64,
    pub text: Shared<str>,
}

impl Update {
    pub fn pattern(e: &Event, text: Arc<str>) -> Self {
        Self {
            kind: UpdateKind::Pattern,
            key: e.key,
            user: e.user,
            item: e.item,
            timestamp: e.timestamp,
            text: Shared(text),
        }
    }
    pub fn reason(e: &Event, text: Arc<str>) -> Self {
        Self {
            kind: UpdateKind::Reason,
            key: e.key,
            user: e.user,
            item: e.item,
            timestamp: e.timestamp,
            text: Shared(text),
        }
    }
}

/// What one epoch did, summed over workers. Only deterministic quantities: timings go to the
/// progress log, so that snapshots are the same bytes run after run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EpochMetrics {
    pub epoch: u64,
    pub interactions: u64,
    pub patterns_written: u64,
    pub reasons_written: u64,
    /// Interactions whose update answer could not be split into pattern and reason.
    pub unparsed: u64,
    /// GRPO groups (one per interaction in the step) and those with equal rewards.
    pub groups: u64,
    pub zero_variance_groups: u64,
    pub reward_sum: f64,
    pub reward_count: u64,
    pub kl_sum: f64,
    pub kl_count: u64,
    pub loss: f64,
    pub generated_tokens: u64,
}

impl EpochMetrics {
    pub fn merge(&mut self, o: &EpochMetrics) {
        self.interactions += o.interactions;
        self.patterns_written += o.patterns_written;
        self.reasons_written += o.reasons_written;
        self.unparsed += o.unparsed;
        self.groups += o.groups;
        self.zero_variance_groups += o.zero_variance_groups;
        self.reward_sum += o.reward_sum;
        self.reward_count += o.reward_count;
        self.kl_sum += o.kl_sum;
        self.kl_count += o.kl_count;
        self.loss += o.loss;
        self.generated_tokens += o.generated_tokens;
    }
    pub fn mean_reward(&self) -> Option<f64> {
        (self.reward_count > 0).then(|| self.reward_sum / self.reward_count as f64)
    }
    pub fn mean_kl(&self) -> Option<f64> {
        (self.kl_count > 0).then(|| self.kl_sum / self.kl_count as f64)
    }
}

#[derive(Debug, Clone, Default)]
pub struct UserEntry {
    pub pattern: Option<(i64, Arc<str>)>,
    pub history: Vec<u32>,
    /// Event time of each history item (parallel to `history`, non-decreasing).
    pub times: Vec<i64>,
}

impl UserEntry {
    /// Where an item of `timestamp` goes in event time (ties keep arrival order): the items
    /// before that position are its history.
    pub fn place(&self, timestamp: i64) -> usize {
        self.times.partition_point(|&t| t <= timestamp)
    }

    /// Insert `item` at position `at` (from [`Self::place`]); the oldest items beyond `kept` are
    /// dropped.
    pub fn insert_at(&mut self, at: usize, item: u32, timestamp: i64, kept: usize) {
        self.history.insert(at, item);
        self.times.insert(at, timestamp);
        if self.history.len() > kept {
            let cut = self.history.len() - kept;
            self.history.drain(..cut);
            self.times.drain(..cut);
        }
    }

    /// Take every occurrence of `item` out of the history.
    pub fn retract(&mut self, item: u32) {
        (self.history, self.times) =
            self.history.iter().zip(&self.times).filter(|&(&i, _)| i != item).map(|(&i, &t)| (i, t)).unzip();
    }

    /// Insert `item` at its place in event time; returns that position.
    pub fn insert(&mut self, item: u32, timestamp: i64, kept: usize) -> usize {
        let at = self.place(timestamp);
        self.insert_at(at, item, timestamp, kept);
        at
    }
}

/// Insert `r` into a list ordered by (timestamp, user), replacing the entry of the same
/// interaction, and keep the newest `keep`.
pub fn fold_reason(list: &mut ReasonList, r: Reason, keep: usize) {
    let key = (r.timestamp, r.user);
    if list.back().is_none_or(|x| (x.timestamp, x.user) < key) {
        // The common case in a time-ordered replay: the newest reason.
        list.push_back(r);
    } else {
        let at = list.partition_point(|x| (x.timestamp, x.user) < key);
        if list.get(at).is_some_and(|x| (x.timestamp, x.user) == key) {
            list[at] = r;
        } else {
            list.insert(at, r);
        }
    }
    while list.len() > keep {
        list.pop_front();
    }
}

/// State partitioned by a key (user or item).
pub trait KeyedState: 'static {
    type In: Clone + Send + serde::Serialize + for<'a> serde::Deserialize<'a> + 'static;
    type Out: Clone + Send + serde::Serialize + for<'a> serde::Deserialize<'a> + 'static;
    /// Which updates this state folds.
    const KIND: UpdateKind;
    /// The exchange key of a record.
    fn key(rec: &Self::In) -> u64;
    /// The processing order of a record within an epoch (the event key).
    fn order(rec: &Self::In) -> u64;
    /// The exchange key of an update of [`Self::KIND`].
    fn update_key(u: &Update) -> u64;
    /// Fold one epoch's updates (sorted by key).
    fn apply(&mut self, updates: Vec<Update>);
    /// Annotate one epoch's records (sorted by key), folding what they change (e.g. histories).
    fn annotate(&mut self, records: Vec<Self::In>) -> Vec<Self::Out>;
    /// The rows of this worker's state whose key `keep` accepts, for a snapshot.
    fn shard(&self, keep: &dyn Fn(u32) -> bool) -> snapshot::Shard;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replay's identity serializes its config: a key added later must not change the identity
    /// of replays written before it, so `last_seconds` is left out at its default and kept otherwise.
    #[test]
    fn last_seconds_serialized_only_when_set() {
        let plain = serde_json::to_value(ReplayConfig::default()).unwrap();
        assert!(plain.get("last_seconds").is_none(), "{plain}");
        let set = serde_json::to_value(ReplayConfig { last_seconds: 86_400, ..Default::default() }).unwrap();
        assert_eq!(set["last_seconds"], 86_400);
        let back: ReplayConfig = serde_json::from_value(plain).unwrap();
        assert_eq!(back, ReplayConfig::default());
    }
}
