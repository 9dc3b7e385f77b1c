//! Control writers for the text path that need no model (`--writer oracle|shuffled`).
//!
//! - `oracle`: collaborative reasons by construction, from the train split only. The reason for
//!   (u, i) names the [`ORACLE_TITLES`] items j of u's train history before i that co-occur most
//!   with i in *other* users' train histories, by cosine: co(i, j) / √(n_i n_j) with every count
//!   over the other users (raw counts would name the same few blockbusters for every item; ties:
//!   the more recent first): "Fans of A, B and C also chose this." The target's own title is not
//!   in it, so a reason carries collaborative information about i and nothing of its description. A pattern names the user's most frequent
//!   genres (when the item text has a MovieLens-style `genres:` part) and most recent titles.
//! - `shuffled`: the same texts with no signal: the oracle's reason texts permuted over the reason
//!   rows and its pattern texts over the users (seeded by `features.seed`).
//!
//! Both write the same rows (the same jobs as the LLM writer: `features.users`,
//! `features.reasons_per_user`, `features.pattern_history`) into the same files.

use std::collections::HashMap;

use rand::seq::SliceRandom;

use super::plan::FeatureJob;
use super::store::{PatternRow, ReasonRow};
use crate::data::preprocess::ItemRow;
use crate::data::Dataset;
use crate::rng::rng_for;

/// Titles named in an oracle reason.
pub const ORACLE_TITLES: usize = 3;
/// Genres and recent titles named in an oracle pattern.
const PATTERN_GENRES: usize = 3;
const PATTERN_TITLES: usize = 5;
const SHUFFLE: u64 = 0x5f1;

/// Which users hold each item in their train sequence, as bit sets over users.
pub struct CoOccurrence {
    words: usize,
    bits: Vec<u64>,
}

impl CoOccurrence {
    pub fn new(ds: &Dataset) -> Self {
        let words = ds.n_users.div_ceil(64).max(1);
        let mut bits = vec![0u64; ds.n_items * words];
        for (u, seq) in ds.train.iter().enumerate() {
            for &i in seq {
                bits[i as usize * words + u / 64] |= 1 << (u % 64);
            }
        }
        CoOccurrence { words, bits }
    }

    fn row(&self, item: u32) -> &[u64] {
        &self.bits[item as usize * self.words..(item as usize + 1) * self.words]
    }

    /// Users other than `user` whose train sequences hold both `a` and `b`.
    pub fn count(&self, a: u32, b: u32, user: u32) -> u32 {
        let both: u32 = self.row(a).iter().zip(self.row(b)).map(|(x, y)| (x & y).count_ones()).sum();
        let own = self.row(a)[user as usize / 64] & self.row(b)[user as usize / 64] & (1 << (user % 64)) != 0;
        both - own as u32
    }

    /// Users other than `user` whose train sequences hold `a`.
    pub fn popularity(&self, a: u32, user: u32) -> u32 {
        let all: u32 = self.row(a).iter().map(|x| x.count_ones()).sum();
        all - (self.row(a)[user as usize / 64] >> (user % 64) & 1) as u32
    }

    /// co(a, b) / √(n_a n_b) over the users other than `user` (0 when either is never held).
    pub fn cosine(&self, a: u32, b: u32, user: u32) -> f64 {
        let n = self.popularity(a, user) as f64 * self.popularity(b, user) as f64;
        if n == 0.0 {
            0.0
        } else {
            self.count(a, b, user) as f64 / n.sqrt()
        }
    }
}

/// The items of `before` (oldest first) that co-occur most with `item` (cosine), most first.
pub fn top_cooccurring(co: &CoOccurrence, user: u32, item: u32, before: &[u32], k: usize) -> Vec<u32> {
    let mut scored: Vec<(f64, usize, u32)> = Vec::with_capacity(before.len());
    let mut seen = std::collections::HashSet::new();
    for (pos, &j) in before.iter().enumerate().rev() {
        if j != item && seen.insert(j) {
            scored.push((co.cosine(item, j, user), pos, j));
        }
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
    scored.into_iter().take(k).map(|s| s.2).collect()
}

fn title(items: &[ItemRow], i: u32) -> &str {
    let t = items[i as usize].info.title.as_str();
    if t.is_empty() {
        items[i as usize].raw_id.as_str()
    } else {
        t
    }
}

/// "A", "A and B", "A, B and C".
fn join_and(parts: &[&str]) -> String {
    match parts {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// The genres of an item whose text ends in `genres: a, b` (the MovieLens readers write that).
fn genres(items: &[ItemRow], i: u32) -> Vec<&str> {
    let text = &items[i as usize].info.text;
    match text.rfind("genres:") {
        Some(at) => text[at + "genres:".len()..]
            .split([',', '|'])
            .map(str::trim)
            .filter(|g| !g.is_empty() && *g != "(no genres listed)")
            .collect(),
        None => Vec::new(),
    }
}

/// The oracle reason for `(user, item)` after the user's train items `before` (oldest first).
pub fn oracle_reason(ds: &Dataset, co: &CoOccurrence, user: u32, item: u32, before: &[u32]) -> String {
    let top = top_cooccurring(co, user, item, before, ORACLE_TITLES);
    if top.is_empty() {
        return "A first choice, with nothing watched before it.".into();
    }
    let titles: Vec<&str> = top.iter().map(|&j| title(&ds.items, j)).collect();
    format!("Fans of {} also chose this.", join_and(&titles))
}

/// The oracle pattern of a user with train items `history` (oldest first).
pub fn oracle_pattern(ds: &Dataset, history: &[u32]) -> String {
    let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
    for (pos, &i) in history.iter().enumerate() {
        for g in genres(&ds.items, i) {
            let e = counts.entry(g).or_insert((0, pos));
            e.0 += 1;
            e.1 = pos;
        }
    }
    let mut gs: Vec<(&str, (usize, usize))> = counts.into_iter().collect();
    gs.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(b.1 .1.cmp(&a.1 .1)).then(a.0.cmp(b.0)));
    let gs: Vec<&str> = gs.into_iter().take(PATTERN_GENRES).map(|g| g.0).collect();
    let recent: Vec<&str> = history.iter().rev().take(PATTERN_TITLES).map(|&i| title(&ds.items, i)).collect();
    let mut s = String::new();
    if !gs.is_empty() {
        s.push_str(&format!("Favourite genres: {}. ", join_and(&gs)));
    }
    s.push_str(&format!("Recently watched: {}.", recent.join("; ")));
    s
}

/// Oracle rows for the pattern jobs `pjobs` and reason jobs `rjobs` (built as for the LLM writer).
/// A reason looks at the user's whole train history before the interaction; a pattern at the
/// history its job shows.
pub fn oracle_rows(ds: &Dataset, pjobs: &[FeatureJob], rjobs: &[FeatureJob]) -> (Vec<PatternRow>, Vec<ReasonRow>) {
    let co = CoOccurrence::new(ds);
    let patterns = pjobs
        .iter()
        .map(|j| PatternRow {
            user: j.user,
            timestamp: j.timestamp,
            text: oracle_pattern(ds, &j.history),
            parsed: true,
            tokens: 0,
        })
        .collect();
    let reasons = rjobs
        .iter()
        .map(|j| {
            let item = j.item.expect("a reason job names its item");
            let pos = (j.key & 0xffff_ffff) as usize;
            let before = &ds.train[j.user as usize][..pos];
            ReasonRow {
                user: j.user,
                item,
                timestamp: j.timestamp,
                text: oracle_reason(ds, &co, j.user, item, before),
                parsed: true,
                tokens: 0,
            }
        })
        .collect();
    (patterns, reasons)
}

/// The same rows with their texts permuted: reasons over reason rows, patterns over users.
pub fn shuffle_texts(patterns: &mut [PatternRow], reasons: &mut [ReasonRow], seed: u64) {
    let mut pt: Vec<String> = patterns.iter_mut().map(|r| std::mem::take(&mut r.text)).collect();
    pt.shuffle(&mut rng_for(seed, SHUFFLE, 0));
    for (r, t) in patterns.iter_mut().zip(pt) {
        r.text = t;
    }
    let mut rt: Vec<String> = reasons.iter_mut().map(|r| std::mem::take(&mut r.text)).collect();
    rt.shuffle(&mut rng_for(seed, SHUFFLE, 1));
    for (r, t) in reasons.iter_mut().zip(rt) {
        r.text = t;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ItemInfo;

    fn toy() -> Dataset {
        let names = ["A", "B", "C", "D", "E"];
        let items = names
            .iter()
            .map(|n| ItemRow {
                raw_id: n.to_string(),
                info: ItemInfo { title: format!("{n} (2000)"), text: format!("{n} (2000); genres: Drama, G{n}") },
            })
            .collect();
        let mut ds = Dataset::from_interactions("toy", (0..4).map(|u| u.to_string()).collect(), items, &[]);
        // Item 4 (E) co-occurs with C in users 1 and 2, with A in user 1 only, never with B.
        ds.train = vec![vec![0, 1, 2, 4], vec![0, 2, 4], vec![2, 4, 3], vec![1, 3]];
        ds
    }

    #[test]
    fn counts_exclude_the_user_and_rank_by_cooccurrence_then_recency() {
        let ds = toy();
        let co = CoOccurrence::new(&ds);
        assert_eq!(co.count(4, 2, 0), 2);
        assert_eq!(co.count(4, 0, 0), 1);
        assert_eq!(co.count(4, 1, 0), 0);
        assert_eq!(co.count(4, 2, 3), 3);
        assert_eq!((co.popularity(4, 0), co.popularity(4, 3)), (2, 3));
        assert!((co.cosine(4, 2, 0) - 1.0).abs() < 1e-12);
        assert!((co.cosine(4, 0, 0) - 1.0 / 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(top_cooccurring(&co, 0, 4, &[0, 1, 2], 3), vec![2, 0, 1]);
        // Ties (both 0 for user 3's view of item 1 … ) go to the more recent item.
        assert_eq!(top_cooccurring(&co, 3, 3, &[1, 0], 2), vec![0, 1]);
        assert_eq!(
            oracle_reason(&ds, &co, 0, 4, &[0, 1, 2]),
            "Fans of C (2000), A (2000) and B (2000) also chose this."
        );
    }

    #[test]
    fn patterns_name_frequent_genres_and_recent_titles() {
        let ds = toy();
        let p = oracle_pattern(&ds, &[0, 2, 4]);
        assert_eq!(p, "Favourite genres: Drama, GE and GC. Recently watched: E (2000); C (2000); A (2000).");
    }

    #[test]
    fn shuffling_keeps_rows_and_the_multiset_of_texts() {
        let mut ps: Vec<PatternRow> = (0..50)
            .map(|u| PatternRow { user: u, timestamp: 0, text: format!("p{u}"), parsed: true, tokens: 0 })
            .collect();
        let mut rs: Vec<ReasonRow> = (0..200)
            .map(|k| ReasonRow {
                user: k % 7,
                item: k,
                timestamp: k as i64,
                text: format!("r{k}"),
                parsed: true,
                tokens: 0,
            })
            .collect();
        let (p0, r0) = (ps.clone(), rs.clone());
        shuffle_texts(&mut ps, &mut rs, 3);
        let moved = rs.iter().zip(&r0).filter(|(a, b)| a.text != b.text).count();
        assert!(moved > 150, "only {moved} of 200 reasons moved");
        let mut a: Vec<&str> = rs.iter().map(|r| r.text.as_str()).collect();
        let mut b: Vec<&str> = r0.iter().map(|r| r.text.as_str()).collect();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        assert!(rs.iter().zip(&r0).all(|(x, y)| (x.user, x.item, x.timestamp) == (y.user, y.item, y.timestamp)));
        assert!(ps.iter().zip(&p0).any(|(x, y)| x.text != y.text));
    }
}
