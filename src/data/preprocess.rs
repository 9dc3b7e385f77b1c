//! The CUREC preprocessing (paper §5.1.1, §5.1.3): keep ratings above a threshold, drop repeated
//! (user, item) pairs, iterate the user/item k-core until stable, order each user's interactions
//! by time (ties keep file order), assign dense ids, and split leave-one-out.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::dataset::Split;
use super::{DataError, ItemInfo, RawInteraction, RawLog};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrepareConfig {
    /// Keep interactions whose rating is strictly above this (paper: > 3).
    pub rating_above: f32,
    /// Minimum interactions per user after filtering (paper: 30).
    pub user_core: usize,
    /// Minimum interactions per item after filtering (paper: 10).
    pub item_core: usize,
    /// Keep only the earliest interaction of a repeated (user, item) pair.
    pub dedup: bool,
    /// `leave-one-out` (the paper's protocol, default) or `time`: the first `head` of the
    /// positives by time are the prepared dataset (core filter and dense ids from them alone),
    /// every later positive is the stream (`stream.parquet`, new users and items included).
    /// Left out of the serialized config at its default, like `head`, so configs written before
    /// the key existed keep their identity.
    #[serde(skip_serializing_if = "is_leave_one_out")]
    pub split: String,
    /// With `split = "time"`: the share of positives, by time, in the head (0, 1).
    #[serde(skip_serializing_if = "is_default_head")]
    pub head: f64,
}

/// The default split.
pub const LEAVE_ONE_OUT: &str = "leave-one-out";
const HEAD: f64 = 0.8;

fn is_leave_one_out(s: &str) -> bool {
    s == LEAVE_ONE_OUT
}

fn is_default_head(h: &f64) -> bool {
    *h == HEAD
}

impl Default for PrepareConfig {
    fn default() -> Self {
        PrepareConfig {
            rating_above: 3.0,
            user_core: 30,
            item_core: 10,
            dedup: true,
            split: LEAVE_ONE_OUT.into(),
            head: HEAD,
        }
    }
}

/// One prepared interaction with dense ids.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interaction {
    pub user: u32,
    pub item: u32,
    pub timestamp: i64,
    pub rating: f32,
    pub split: Split,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ItemRow {
    pub raw_id: String,
    pub info: ItemInfo,
}

/// The preprocessed dataset: dense ids, interactions grouped by user in time order.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Raw user id of each dense user.
    pub users: Vec<String>,
    pub items: Vec<ItemRow>,
    pub interactions: Vec<Interaction>,
    pub counts: Counts,
}

/// How many interactions survive each step (reported in stats.json).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Counts {
    pub raw: usize,
    pub after_rating_filter: usize,
    pub after_dedup: usize,
    pub kcore_rounds: usize,
}

pub fn preprocess(log: &RawLog, cfg: &PrepareConfig) -> Result<Prepared, DataError> {
    check_core(cfg)?;
    let (mut counts, kept) = positives(log, cfg);
    let kept = core(kept, cfg, &mut counts)?;
    Ok(dense(log, &kept, counts))
}

/// Leave-one-out needs a train, a valid and a test item per user.
pub(super) fn check_core(cfg: &PrepareConfig) -> Result<(), DataError> {
    if cfg.user_core < 3 {
        return Err(DataError::msg(format!(
            "user_core = {}: leave-one-out needs at least 3 interactions per user (train, valid, test)",
            cfg.user_core
        )));
    }
    Ok(())
}

/// The positives (rating above the threshold) with their file positions, in (raw user, time,
/// file position) order; a repeated (user, item) pair keeps its earliest.
pub(super) fn positives(log: &RawLog, cfg: &PrepareConfig) -> (Counts, Vec<(usize, RawInteraction)>) {
    let mut counts = Counts { raw: log.interactions.len(), ..Default::default() };
    // File order is the tie-breaker for equal timestamps, so carry the original position.
    let mut kept: Vec<(usize, RawInteraction)> =
        log.interactions.iter().copied().enumerate().filter(|(_, r)| r.rating > cfg.rating_above).collect();
    counts.after_rating_filter = kept.len();
    kept.sort_by_key(|(pos, r)| (r.user, r.timestamp, *pos));
    if cfg.dedup {
        let mut seen = std::collections::HashSet::new();
        kept.retain(|(_, r)| seen.insert((r.user, r.item)));
    }
    counts.after_dedup = kept.len();
    (counts, kept)
}

/// The user/item k-core of `kept`, iterated until nothing changes (order kept).
pub(super) fn core(
    mut kept: Vec<(usize, RawInteraction)>,
    cfg: &PrepareConfig,
    counts: &mut Counts,
) -> Result<Vec<(usize, RawInteraction)>, DataError> {
    loop {
        counts.kcore_rounds += 1;
        let mut per_user: HashMap<u32, usize> = HashMap::new();
        let mut per_item: HashMap<u32, usize> = HashMap::new();
        for (_, r) in &kept {
            *per_user.entry(r.user).or_default() += 1;
            *per_item.entry(r.item).or_default() += 1;
        }
        let before = kept.len();
        kept.retain(|(_, r)| per_user[&r.user] >= cfg.user_core && per_item[&r.item] >= cfg.item_core);
        if kept.len() == before {
            break;
        }
    }
    if kept.is_empty() {
        return Err(DataError::msg(format!(
            "no interactions left after keeping ratings > {} and the {}-user/{}-item core; lower user_core/item_core",
            cfg.rating_above, cfg.user_core, cfg.item_core
        )));
    }
    Ok(kept)
}

/// The item row of raw item `i` (its title and text, or the raw id when the log has none).
pub(super) fn item_row(log: &RawLog, i: u32) -> ItemRow {
    let raw_id = log.items.name(i).to_string();
    let info = log.info.get(&i).cloned().unwrap_or_else(|| ItemInfo { title: raw_id.clone(), text: raw_id.clone() });
    ItemRow { raw_id, info }
}

/// Dense ids in raw-id order, each user's interactions in time order, leave-one-out splits.
/// `kept` is in (raw user, time, file position) order.
pub(super) fn dense(log: &RawLog, kept: &[(usize, RawInteraction)], counts: Counts) -> Prepared {
    let user_ids = dense_ids(kept.iter().map(|(_, r)| r.user), |u| log.users.name(u));
    let item_ids = dense_ids(kept.iter().map(|(_, r)| r.item), |i| log.items.name(i));
    let users: Vec<String> = user_ids.order.iter().map(|&u| log.users.name(u).to_string()).collect();
    let items: Vec<ItemRow> = item_ids.order.iter().map(|&i| item_row(log, i)).collect();

    let mut interactions: Vec<Interaction> = kept
        .iter()
        .map(|(_, r)| Interaction {
            user: user_ids.dense[&r.user],
            item: item_ids.dense[&r.item],
            timestamp: r.timestamp,
            rating: r.rating,
            split: Split::Train,
        })
        .collect();
    // `kept` is in (raw user, time, file position) order; a stable sort by dense user keeps time order.
    interactions.sort_by_key(|x| x.user);
    let mut end = interactions.len();
    while end > 0 {
        let user = interactions[end - 1].user;
        let start = interactions[..end].iter().rposition(|x| x.user != user).map_or(0, |p| p + 1);
        interactions[end - 1].split = Split::Test;
        interactions[end - 2].split = Split::Valid;
        end = start;
    }
    Prepared { users, items, interactions, counts }
}

struct DenseIds {
    order: Vec<u32>,
    dense: HashMap<u32, u32>,
}

/// Dense ids in raw-id order: numeric when every raw id is a number, else lexicographic.
fn dense_ids<'a>(ids: impl Iterator<Item = u32>, name: impl Fn(u32) -> &'a str) -> DenseIds {
    let mut order: Vec<u32> = ids.collect::<std::collections::HashSet<_>>().into_iter().collect();
    let numeric = order.iter().all(|&i| name(i).parse::<u64>().is_ok());
    if numeric {
        order.sort_by_key(|&i| name(i).parse::<u64>().unwrap_or(0));
    } else {
        order.sort_by(|&a, &b| name(a).cmp(name(b)));
    }
    let dense = order.iter().enumerate().map(|(d, &i)| (i, d as u32)).collect();
    DenseIds { order, dense }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(rows: &[(&str, &str, i64, f32)]) -> RawLog {
        let mut l = RawLog::default();
        for (u, i, t, r) in rows {
            l.push(u, i, *t, *r);
        }
        l
    }

    #[test]
    fn kcore_iterates_until_stable() {
        // Users a,b,c rate x,y; user d rates x,y,z; item z has one rating → dropped, then d has 2 → still ≥ 2.
        // With user_core 3: after z goes, d has 2 < 3 and must go too; x,y keep 3 ratings each.
        let rows = [
            ("a", "x", 1, 5.0),
            ("a", "y", 2, 5.0),
            ("a", "w", 3, 5.0),
            ("b", "x", 1, 5.0),
            ("b", "y", 2, 5.0),
            ("b", "w", 3, 5.0),
            ("c", "x", 1, 5.0),
            ("c", "y", 2, 5.0),
            ("c", "w", 3, 5.0),
            ("d", "x", 1, 5.0),
            ("d", "y", 2, 5.0),
            ("d", "z", 3, 5.0),
        ];
        let cfg = PrepareConfig { user_core: 3, item_core: 3, ..Default::default() };
        let p = preprocess(&log(&rows), &cfg).unwrap();
        assert_eq!(p.users, vec!["a", "b", "c"]);
        assert_eq!(p.items.len(), 3);
        assert_eq!(p.interactions.len(), 9);
        assert!(p.counts.kcore_rounds >= 3);
    }

    #[test]
    fn ratings_at_threshold_are_dropped_and_ties_keep_file_order() {
        let rows = [("1", "b", 5, 4.0), ("1", "a", 5, 4.0), ("1", "c", 1, 3.5), ("1", "d", 9, 3.0), ("1", "e", 0, 5.0)];
        let cfg = PrepareConfig { user_core: 3, item_core: 1, ..Default::default() };
        let p = preprocess(&log(&rows), &cfg).unwrap();
        let raw: Vec<&str> = p.interactions.iter().map(|x| p.items[x.item as usize].raw_id.as_str()).collect();
        assert_eq!(raw, vec!["e", "c", "b", "a"]);
        let splits: Vec<Split> = p.interactions.iter().map(|x| x.split).collect();
        assert_eq!(splits, vec![Split::Train, Split::Train, Split::Valid, Split::Test]);
    }

    #[test]
    fn numeric_ids_sort_numerically_and_duplicates_keep_the_earliest() {
        let rows = [
            ("10", "7", 3, 5.0),
            ("9", "7", 1, 5.0),
            ("10", "7", 1, 5.0),
            ("9", "8", 2, 5.0),
            ("10", "8", 4, 5.0),
            ("9", "70", 3, 5.0),
            ("10", "70", 5, 5.0),
        ];
        let cfg = PrepareConfig { user_core: 3, item_core: 1, ..Default::default() };
        let p = preprocess(&log(&rows), &cfg).unwrap();
        assert_eq!(p.users, vec!["9", "10"]);
        let raw: Vec<&str> = p.items.iter().map(|i| i.raw_id.as_str()).collect();
        assert_eq!(raw, vec!["7", "8", "70"]);
        assert_eq!(p.counts.after_dedup, 6);
        let u10: Vec<i64> = p.interactions.iter().filter(|x| x.user == 1).map(|x| x.timestamp).collect();
        assert_eq!(u10, vec![1, 4, 5]);
    }
}
