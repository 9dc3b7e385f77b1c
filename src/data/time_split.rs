//! The time split (`preprocess.split = "time"`): what a live system knows at a point in time.
//! The first `head` of the positives by time (ties in file order) are the prepared dataset: the
//! core filter and the dense ids come from the head alone, and its users are split leave-one-out
//! as usual (for training and model selection). Every later positive is the stream, in time
//! order, new users and items included: a new item's text is in `items.parquet` from the start
//! (the catalogue holds it before its first interaction), a new user's raw id is in the stream's
//! `raw_user` column. Filtering the whole log first would hide the new items: with the core
//! filter on the past only, a tenth of ML-100K's last 20% are interactions with items the past
//! never saw.

use std::collections::HashMap;

use super::preprocess::{check_core, core, dense, item_row, positives, PrepareConfig, Prepared};
use super::{DataError, RawLog};

/// One stream interaction, ids dense: head users and items keep theirs, new ones get the next
/// ids in order of first appearance.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRow {
    pub user: u32,
    pub item: u32,
    pub timestamp: i64,
    pub rating: f32,
}

/// The stream after the head.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stream {
    pub rows: Vec<StreamRow>,
    /// Raw ids of the users the head does not hold (dense ids from the head's user count on).
    pub new_users: Vec<String>,
    /// Items of the catalogue the head does not hold (appended to the prepared items).
    pub new_items: usize,
    /// Stream interactions with an item the head does not hold (every interaction of a new item).
    pub new_item_interactions: usize,
    pub new_user_interactions: usize,
}

/// Split `log` by time: the head as a prepared dataset (its items followed by the stream's new
/// items) and the stream.
pub fn split_time(log: &RawLog, cfg: &PrepareConfig) -> Result<(Prepared, Stream), DataError> {
    check_core(cfg)?;
    let (mut counts, kept) = positives(log, cfg);
    // Global time order, ties in file order.
    let mut by_time = kept;
    by_time.sort_by_key(|(pos, r)| (r.timestamp, *pos));
    let n_head = ((by_time.len() as f64) * cfg.head) as usize;
    if n_head == 0 || n_head >= by_time.len() {
        return Err(DataError::msg(format!(
            "preprocess.head = {}: {} of {} positives in the head leaves the head or the stream empty",
            cfg.head,
            n_head,
            by_time.len()
        )));
    }
    let stream_raw = by_time.split_off(n_head);
    let mut head = by_time;
    // `dense` expects (raw user, time, file position) order.
    head.sort_by_key(|(pos, r)| (r.user, r.timestamp, *pos));
    let head = core(head, cfg, &mut counts)?;
    let mut p = dense(log, &head, counts);

    let mut users: HashMap<&str, u32> = p.users.iter().enumerate().map(|(i, u)| (u.as_str(), i as u32)).collect();
    let mut items: HashMap<String, u32> =
        p.items.iter().enumerate().map(|(i, it)| (it.raw_id.clone(), i as u32)).collect();
    let (n_users, n_items) = (p.users.len(), p.items.len());
    let mut stream = Stream::default();
    let mut new_raw_users: Vec<String> = Vec::new();
    for (_, r) in &stream_raw {
        let raw_user = log.users.name(r.user);
        let user = match users.get(raw_user) {
            Some(&u) => u,
            None => {
                let u = (n_users + new_raw_users.len()) as u32;
                new_raw_users.push(raw_user.to_string());
                users.insert(raw_user, u);
                u
            }
        };
        let raw_item = log.items.name(r.item);
        let item = match items.get(raw_item) {
            Some(&i) => i,
            None => {
                let i = p.items.len() as u32;
                p.items.push(item_row(log, r.item));
                items.insert(raw_item.to_string(), i);
                i
            }
        };
        if item as usize >= n_items {
            stream.new_item_interactions += 1;
        }
        if user as usize >= n_users {
            stream.new_user_interactions += 1;
        }
        stream.rows.push(StreamRow { user, item, timestamp: r.timestamp, rating: r.rating });
    }
    stream.new_users = new_raw_users;
    stream.new_items = p.items.len() - n_items;
    Ok((p, stream))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Split;

    #[test]
    fn the_core_and_ids_come_from_the_head_and_the_stream_keeps_every_later_positive() {
        let mut log = RawLog::default();
        // Head (t ≤ 8): users a, b with items x, y, z; c's one head interaction fails the core.
        for (u, i, t) in [("a", "x", 1), ("a", "y", 2), ("a", "z", 3), ("b", "x", 4), ("b", "y", 5)] {
            log.push(u, i, t, 5.0);
        }
        for (u, i, t) in [("b", "z", 6), ("c", "x", 7), ("a", "w", 8)] {
            log.push(u, i, t, 5.0);
        }
        // Stream (the last 20% by time): a known user with a new item, a dropped and a new user.
        log.push("a", "q", 9, 5.0);
        log.push("d", "x", 10, 5.0);
        log.push("c", "q", 11, 2.0); // not a positive
        log.push("b", "q", 12, 4.0);
        log.push("a", "x", 13, 5.0); // a repeat of a head pair: dropped
        let cfg = PrepareConfig { user_core: 3, item_core: 2, split: "time".into(), head: 0.75, ..Default::default() };
        let (p, s) = split_time(&log, &cfg).unwrap();
        assert_eq!(p.users, vec!["a", "b"], "c and the stream's users are not in the head's core");
        let raw: Vec<&str> = p.items.iter().map(|i| i.raw_id.as_str()).collect();
        assert_eq!(raw, vec!["x", "y", "z", "q"], "the head's items, then the stream's new ones");
        assert!(p.interactions.iter().all(|x| x.item < 3 && x.timestamp <= 8));
        assert_eq!(p.interactions.iter().filter(|x| x.split == Split::Test).count(), 2);
        let rows: Vec<(u32, u32, i64)> = s.rows.iter().map(|r| (r.user, r.item, r.timestamp)).collect();
        assert_eq!(rows, vec![(0, 3, 9), (2, 0, 10), (1, 3, 12)]);
        assert_eq!(s.new_users, vec!["d"]);
        assert_eq!((s.new_items, s.new_item_interactions, s.new_user_interactions), (1, 2, 1));
    }

    #[test]
    fn a_head_that_leaves_nothing_is_refused() {
        let mut log = RawLog::default();
        log.push("a", "x", 1, 5.0);
        let cfg = PrepareConfig { user_core: 3, split: "time".into(), head: 0.9, ..Default::default() };
        let e = split_time(&log, &cfg).unwrap_err().to_string();
        assert!(e.contains("preprocess.head = 0.9"), "{e}");
    }
}
