//! Alignment prompts from a prepared dataset (paper §4.2): for a target interaction, the user's
//! most recent N train items before it (with their text) and a candidate list N_ui = the target
//! plus k items the user never interacted with, shuffled. Everything random is drawn from
//! (seed, epoch, record), so a task is the same whichever batch or worker builds it.

use std::collections::{BTreeMap, HashSet};

use anyhow::Result;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::data::preprocess::{Interaction, ItemRow};
use crate::data::{Dataset, Split};
use crate::prompts::{numbered_items, Prompt};
use crate::rng::rng_for;

const NEGATIVES: u64 = 0xa11;
const SAMPLE: u64 = 0xa12;
const EVAL: u64 = 0xa13;
const EXAMPLE: u64 = 0xa14;
const SHUFFLE: u64 = 0xa15;

/// One alignment prompt's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlignTask {
    /// Stable id: the interaction's index in the time-ordered train stream (training tasks) or
    /// the user (validation tasks).
    pub record: u64,
    pub user: u32,
    pub target: u32,
    /// Oldest first.
    pub history: Vec<u32>,
    /// Shuffled; contains `target` once.
    pub candidates: Vec<u32>,
    /// The item whose title fills the prompt's format example: drawn uniformly from the shown
    /// history, so it is never a candidate. A model that copies the example earns no legal or
    /// correct reward (a candidate there would make copying a free legal answer, and the policy
    /// collapses onto it at exactly the random hit rate).
    pub example: u32,
}

/// A training interaction that can become a prompt: the user and the target's position in the
/// user's train sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub index: u64,
    pub user: u32,
    pub pos: usize,
}

/// Train interactions with at least `min_history` earlier train items, in time order (ties by
/// user, then position); `index` numbers them in that order.
pub fn train_stream(ds: &Dataset, interactions: &[Interaction], min_history: usize) -> Vec<Record> {
    let mut pos: BTreeMap<u32, usize> = BTreeMap::new();
    let mut out: Vec<(i64, u32, usize)> = Vec::new();
    for x in interactions.iter().filter(|x| x.split == Split::Train) {
        let p = pos.entry(x.user).or_insert(0);
        if *p >= min_history {
            out.push((x.timestamp, x.user, *p));
        }
        *p += 1;
    }
    debug_assert!(out.iter().all(|&(_, u, p)| p < ds.train[u as usize].len()));
    out.sort_by_key(|&(t, u, p)| (t, u, p));
    out.into_iter().enumerate().map(|(i, (_, user, pos))| Record { index: i as u64, user, pos }).collect()
}

/// A seeded sample of `n` records (all when `n` is 0 or too large), kept in time order.
pub fn sample_records(records: &[Record], n: usize, seed: u64) -> Vec<Record> {
    if n == 0 || n >= records.len() {
        return records.to_vec();
    }
    let mut idx: Vec<usize> = (0..records.len()).collect();
    idx.shuffle(&mut rng_for(seed, SAMPLE, 0));
    idx.truncate(n);
    idx.sort_unstable();
    idx.into_iter().map(|i| records[i]).collect()
}

/// Every item `user` interacted with, in any split.
pub fn seen(ds: &Dataset, user: u32) -> HashSet<u32> {
    let u = user as usize;
    let mut s: HashSet<u32> = ds.train[u].iter().copied().collect();
    s.insert(ds.valid[u]);
    s.insert(ds.test[u]);
    s
}

/// Target plus `k` distinct never-seen items drawn by `rng`, shuffled.
fn candidates(ds: &Dataset, user: u32, target: u32, k: usize, rng: &mut impl Rng) -> Result<Vec<u32>> {
    let seen = seen(ds, user);
    let unseen = ds.n_items - seen.len();
    anyhow::ensure!(unseen >= k, "user {user} has only {unseen} unseen items, {k} negatives asked for");
    let mut c = vec![target];
    while c.len() < k + 1 {
        let i = rng.random_range(0..ds.n_items as u32);
        if !seen.contains(&i) && !c.contains(&i) {
            c.push(i);
        }
    }
    c.shuffle(rng);
    Ok(c)
}

impl AlignTask {
    /// The same task with the candidates in the order drawn for completion `j` (seeded by
    /// (seed, epoch, record, j)).
    pub fn reshuffled(&self, seed: u64, epoch: u64, j: usize) -> AlignTask {
        let mut t = self.clone();
        let s = seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
        t.candidates.shuffle(&mut rng_for(s, SHUFFLE, self.record.wrapping_mul(1024).wrapping_add(j as u64)));
        t
    }
}

/// One of `items` (a prompt's history is never empty: `min_history` ≥ 1, and evaluated users have
/// train items).
fn pick(items: &[u32], rng: &mut impl Rng) -> u32 {
    items[rng.random_range(0..items.len())]
}

fn recent(items: &[u32], n: usize) -> Vec<u32> {
    items[items.len().saturating_sub(n)..].to_vec()
}

/// The task for a training record in `epoch`.
pub fn train_task(ds: &Dataset, r: &Record, history_len: usize, k: usize, seed: u64, epoch: u64) -> Result<AlignTask> {
    let seq = &ds.train[r.user as usize];
    let target = seq[r.pos];
    let s = seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let candidates = candidates(ds, r.user, target, k, &mut rng_for(s, NEGATIVES, r.index))?;
    let history = recent(&seq[..r.pos], history_len);
    let example = pick(&history, &mut rng_for(s, EXAMPLE, r.index));
    Ok(AlignTask { record: r.index, user: r.user, target, history, candidates, example })
}

/// Held-out task of `user`: train history, the validation item as target.
pub fn valid_task(ds: &Dataset, user: u32, history_len: usize, k: usize, seed: u64) -> Result<AlignTask> {
    let target = ds.target(user, Split::Valid);
    let candidates = candidates(ds, user, target, k, &mut rng_for(seed, EVAL, user as u64))?;
    let history = recent(&ds.train[user as usize], history_len);
    let example = pick(&history, &mut rng_for(seed, EXAMPLE, user as u64));
    Ok(AlignTask { record: user as u64, user, target, history, candidates, example })
}

/// Validation users to evaluate: a seeded sample of `n` (all when 0), in id order.
pub fn eval_users(ds: &Dataset, n: usize, seed: u64) -> Vec<u32> {
    let mut users: Vec<u32> = (0..ds.n_users as u32).filter(|&u| !ds.train[u as usize].is_empty()).collect();
    if n > 0 && n < users.len() {
        users.shuffle(&mut rng_for(seed, EVAL, u64::MAX));
        users.truncate(n);
        users.sort_unstable();
    }
    users
}

/// Fill the alignment template: numbered history lines with item text, numbered candidate titles.
pub fn render(prompt: &Prompt, items: &[ItemRow], task: &AlignTask) -> Result<String> {
    let values: BTreeMap<&str, String> = [
        ("history", numbered_items(items, &task.history, true)),
        ("candidates", numbered_items(items, &task.candidates, false)),
        ("example", items[task.example as usize].info.title.clone()),
    ]
    .into();
    prompt.render(&values)
}
