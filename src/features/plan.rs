//! What the LLM is asked to write: one pattern job per sampled user (its train history, or up
//! to the validation item) and one reason job per recent train interaction (the history before
//! it and the item), each with a stable key that seeds its sampling and names it on resume.

use std::collections::HashSet;

use super::FeaturesConfig;

use rand::seq::SliceRandom;

use crate::data::preprocess::Interaction;
use crate::data::{Dataset, Split};
use crate::rng::rng_for;

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
    jobs.extend(item_reason_jobs(ds, ts, cfg.item_reasons, cfg.reason_history, &jobs));
    jobs
}

/// `features.item_reasons`: the most recent train interaction (by time, then user) of each of
/// the `n` most popular train items (by their count of reasonable interactions, i.e. every train
/// position but a user's first, then by id), as reason jobs with the `history` items before it;
/// interactions `have` already holds are not repeated. In item order.
fn item_reason_jobs(ds: &Dataset, ts: &[Vec<i64>], n: usize, history: usize, have: &[FeatureJob]) -> Vec<FeatureJob> {
    if n == 0 {
        return Vec::new();
    }
    let mut count = vec![0usize; ds.n_items];
    // The newest (timestamp, user, position) of each item.
    let mut newest: Vec<Option<(i64, u32, usize)>> = vec![None; ds.n_items];
    for (u, seq) in ds.train.iter().enumerate() {
        // Position 0 has no history before it to reason from, as in `reason_jobs`.
        for (pos, &i) in seq.iter().enumerate().skip(1) {
            count[i as usize] += 1;
            let at = (ts[u][pos], u as u32, pos);
            if newest[i as usize].is_none_or(|b| at > b) {
                newest[i as usize] = Some(at);
            }
        }
    }
    let mut popular: Vec<u32> = (0..ds.n_items as u32).filter(|&i| count[i as usize] > 0).collect();
    popular.sort_by_key(|&i| (std::cmp::Reverse(count[i as usize]), i));
    popular.truncate(n);
    popular.sort_unstable();
    let have: HashSet<u64> = have.iter().map(|j| j.key).collect();
    popular
        .into_iter()
        .filter_map(|i| {
            let (timestamp, u, pos) = newest[i as usize]?;
            let key = ((u as u64) << 32) | pos as u64;
            let seq = &ds.train[u as usize];
            (!have.contains(&key)).then(|| FeatureJob {
                key,
                user: u,
                item: Some(i),
                history: seq[pos.saturating_sub(history)..pos].to_vec(),
                timestamp,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::preprocess::ItemRow;

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

    #[test]
    fn item_reasons_cover_the_newest_interaction_of_the_most_popular_items_once() {
        let items = (0..5).map(|i| ItemRow { raw_id: i.to_string(), info: Default::default() }).collect();
        let mut ds = Dataset::from_interactions("toy", vec!["a".into(), "b".into(), "c".into()], items, &[]);
        // Item 2 three times (after position 0), item 1 twice, item 4 once.
        ds.train = vec![vec![0, 2, 1], vec![3, 2, 4], vec![0, 1, 2]];
        let ts = vec![vec![1, 2, 3], vec![1, 5, 6], vec![1, 2, 4]];
        let cfg = FeaturesConfig { reasons_per_user: 1, item_reasons: 2, reason_history: 1, ..Default::default() };
        let jobs = reason_jobs(&ds, &ts, &[0], &cfg);
        let got: Vec<(u32, Option<u32>, Vec<u32>, i64)> =
            jobs.iter().map(|j| (j.user, j.item, j.history.clone(), j.timestamp)).collect();
        // User 0's own newest reason (item 1 at t = 3) already is item 1's newest interaction;
        // item 2's newest is user 1's at t = 5.
        assert_eq!(got, vec![(0, Some(1), vec![2], 3), (1, Some(2), vec![3], 5)]);
        let keys: HashSet<u64> = jobs.iter().map(|j| j.key).collect();
        assert_eq!(keys.len(), jobs.len(), "no interaction twice");
        let none = FeaturesConfig { item_reasons: 0, ..cfg };
        assert_eq!(reason_jobs(&ds, &ts, &[0], &none).len(), 1);
    }
}
