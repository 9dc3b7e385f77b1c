//! Full-ranking evaluation (paper §5.1.3): every item is a candidate, the user's history is
//! excluded, and an item scoring equal to the target ranks above it (pessimistic ties), so a
//! constant scorer gets the worst rank instead of a lucky one.

pub mod bootstrap;
pub mod compare;

use std::collections::BTreeMap;

use crate::data::{Dataset, Split};

/// Per-user ranks of the held-out item (0 = top; users in id order) of a run, for paired
/// comparisons between runs (`curec compare`).
pub const RANKS: &str = "ranks.json";

/// Cut-offs reported everywhere.
pub const KS: [usize; 4] = [1, 5, 10, 20];

/// 0-based rank of `target` among all items not in `excluded` (the target itself is never excluded).
/// Items with a score >= the target's count as ranked above it; a NaN target ranks last.
pub fn rank_of_target(scores: &[f32], target: u32, excluded: &[u32], mask: &mut Vec<bool>) -> usize {
    let t = scores[target as usize];
    let n = scores.len();
    if t.is_nan() {
        mask.clear();
        mask.resize(n, false);
        for &e in excluded {
            mask[e as usize] = true;
        }
        mask[target as usize] = true;
        return n - mask.iter().filter(|&&m| m).count();
    }
    let mut above = scores.iter().filter(|&&s| s >= t).count() - 1;
    mask.clear();
    mask.resize(n, false);
    for &e in excluded {
        let e = e as usize;
        if e != target as usize && !mask[e] {
            mask[e] = true;
            if scores[e] >= t {
                above -= 1;
            }
        }
    }
    above
}

/// Recall@K for one user with one held-out item: 1 if it is in the top K.
pub fn recall_at(rank: usize, k: usize) -> f64 {
    if rank < k {
        1.0
    } else {
        0.0
    }
}

/// NDCG@K for one relevant item: 1/log2(rank + 2) inside the top K (the ideal DCG is 1).
pub fn ndcg_at(rank: usize, k: usize) -> f64 {
    if rank < k {
        1.0 / ((rank + 2) as f64).log2()
    } else {
        0.0
    }
}

/// Metrics averaged over users, keyed `recall@K` / `ndcg@K`.
pub fn metrics_from_ranks(ranks: &[usize]) -> BTreeMap<String, f64> {
    let n = ranks.len().max(1) as f64;
    let mut m = BTreeMap::new();
    for k in KS {
        m.insert(format!("recall@{k}"), ranks.iter().map(|&r| recall_at(r, k)).sum::<f64>() / n);
        m.insert(format!("ndcg@{k}"), ranks.iter().map(|&r| ndcg_at(r, k)).sum::<f64>() / n);
    }
    m
}

/// Something that scores every item for a batch of users, given what the split lets it see.
pub trait Scorer {
    /// Scores for each user in `users`, row-major `users.len() × n_items`.
    fn score(&self, ds: &Dataset, users: &[u32], split: Split) -> anyhow::Result<Vec<f32>>;
}

/// The ranks of each user's held-out item under `scorer` (users in id order).
pub fn ranks(scorer: &dyn Scorer, ds: &Dataset, split: Split, batch: usize) -> anyhow::Result<Vec<usize>> {
    let users: Vec<u32> = (0..ds.n_users as u32).collect();
    let mut out = Vec::with_capacity(users.len());
    let mut mask = Vec::new();
    for chunk in users.chunks(batch.max(1)) {
        let scores = scorer.score(ds, chunk, split)?;
        anyhow::ensure!(
            scores.len() == chunk.len() * ds.n_items,
            "scorer returned {} scores for {} users",
            scores.len(),
            chunk.len()
        );
        for (row, &u) in scores.chunks(ds.n_items).zip(chunk) {
            out.push(rank_of_target(row, ds.target(u, split), &ds.history(u, split), &mut mask));
        }
    }
    Ok(out)
}

/// Evaluate a scorer on a split: averaged metrics.
pub fn evaluate(scorer: &dyn Scorer, ds: &Dataset, split: Split, batch: usize) -> anyhow::Result<Evaluation> {
    let ranks = ranks(scorer, ds, split, batch)?;
    Ok(Evaluation { metrics: metrics_from_ranks(&ranks), ranks })
}

#[derive(Debug, Clone)]
pub struct Evaluation {
    pub ranks: Vec<usize>,
    pub metrics: BTreeMap<String, f64>,
}

impl Evaluation {
    pub fn get(&self, key: &str) -> f64 {
        self.metrics.get(key).copied().unwrap_or(f64::NAN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_rank_pessimistically_and_history_is_excluded() {
        let mut m = Vec::new();
        // target 2 scores 0.5; items 0 and 3 score higher, item 1 ties.
        let s = [0.9, 0.5, 0.5, 0.7, 0.1];
        assert_eq!(rank_of_target(&s, 2, &[], &mut m), 3);
        // Excluding item 0 (history) removes one item above.
        assert_eq!(rank_of_target(&s, 2, &[0], &mut m), 2);
        // Repeated history entries are excluded once; excluding the target itself is ignored.
        assert_eq!(rank_of_target(&s, 2, &[0, 0, 2], &mut m), 2);
        // A constant scorer puts the target last among the candidates.
        assert_eq!(rank_of_target(&[1.0; 6], 4, &[0], &mut m), 4);
        // A NaN target ranks last.
        assert_eq!(rank_of_target(&[0.1, f32::NAN, 0.2], 1, &[], &mut m), 2);
    }

    #[test]
    fn metrics_match_hand_computed_values() {
        // Ranks 0, 1, 4, 30 → recall@1 = 1/4, recall@5 = 3/4, recall@20 = 3/4;
        // ndcg@5 = (1 + 1/log2(3) + 1/log2(6)) / 4.
        let m = metrics_from_ranks(&[0, 1, 4, 30]);
        assert!((m["recall@1"] - 0.25).abs() < 1e-12);
        assert!((m["recall@5"] - 0.75).abs() < 1e-12);
        assert!((m["recall@20"] - 0.75).abs() < 1e-12);
        let want = (1.0 + 1.0 / 3f64.log2() + 1.0 / 6f64.log2()) / 4.0;
        assert!((m["ndcg@5"] - want).abs() < 1e-12);
        assert!((m["ndcg@1"] - 0.25).abs() < 1e-12);
    }
}
