//! The source: train interactions in time order (ties: user, then position), optionally a
//! seeded sample of users, each user's most recent N and the last N seconds of the log, cut into epochs (time slices) by count
//! or by duration. Each worker feeds every `peers`-th slice record; the epoch is the timely time.

use anyhow::Result;
use rand::seq::SliceRandom;

use super::{Event, ReplayConfig};
use crate::data::preprocess::Interaction;
use crate::data::Dataset;
use crate::rng::rng_for;

const USERS: u64 = 0x5e1ec7;

/// The record key of position `pos` in `user`'s sequence.
pub fn key(user: u32, pos: usize) -> u64 {
    ((user as u64) << 32) | pos as u64
}

/// The replayed train events in time order. Position 0 of a sequence has no history to prompt
/// with and is never replayed (as in feature generation).
pub fn replay_events(ds: &Dataset, xs: &[Interaction], cfg: &ReplayConfig, seed: u64) -> Vec<Event> {
    let ts = crate::features::plan::train_timestamps(ds, xs);
    let mut users: Vec<u32> = (0..ds.n_users as u32).filter(|&u| ds.train[u as usize].len() > 1).collect();
    if cfg.users > 0 && cfg.users < users.len() {
        users.shuffle(&mut rng_for(seed, USERS, 0));
        users.truncate(cfg.users);
        users.sort_unstable();
    }
    let mut events = Vec::new();
    // The window is measured from the newest train interaction of the whole log.
    let newest = ts.iter().flatten().max().copied().unwrap_or(0);
    let from = if cfg.last_seconds == 0 { i64::MIN } else { newest.saturating_sub(cfg.last_seconds as i64) };
    for u in users {
        let seq = &ds.train[u as usize];
        let first = if cfg.per_user == 0 { 1 } else { seq.len().saturating_sub(cfg.per_user).max(1) };
        for (pos, &item) in seq.iter().enumerate().skip(first) {
            if ts[u as usize][pos] >= from {
                events.push(Event { key: key(u, pos), user: u, item, timestamp: ts[u as usize][pos], retract: false });
            }
        }
    }
    events.sort_by_key(|e| (e.timestamp, e.key));
    events
}

/// Epoch of each event (events in time order): `count` slices of `slice` events, or `seconds`
/// windows of `slice` seconds from the first event, numbered densely (empty windows skipped),
/// starting at `first`.
pub fn epochs(events: &[Event], cfg: &ReplayConfig, first: u64) -> Result<Vec<u64>> {
    cfg.validate()?;
    if cfg.slice_by == "count" {
        return Ok((0..events.len()).map(|i| first + (i as u64) / cfg.slice).collect());
    }
    let t0 = events.first().map_or(0, |e| e.timestamp);
    let mut out = Vec::with_capacity(events.len());
    let (mut last_window, mut epoch) = (None, first);
    for e in events {
        let w = (e.timestamp - t0).max(0) as u64 / cfg.slice;
        match last_window {
            Some(l) if l != w => epoch += 1,
            _ => {}
        }
        last_window = Some(w);
        out.push(epoch);
    }
    Ok(out)
}

/// Events grouped by epoch: `(epoch, events)` in epoch order.
pub fn by_epoch(events: Vec<Event>, epochs: &[u64]) -> Vec<(u64, Vec<Event>)> {
    let mut out: Vec<(u64, Vec<Event>)> = Vec::new();
    for (e, t) in events.into_iter().zip(epochs) {
        match out.last_mut() {
            Some((last, v)) if last == t => v.push(e),
            _ => out.push((*t, vec![e])),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_window_keeps_every_train_interaction_inside_it() {
        use crate::data::{preprocess::ItemRow, Split};
        let items = (0..5).map(|i| ItemRow { raw_id: i.to_string(), info: Default::default() }).collect();
        let x = |user, item, timestamp| Interaction { user, item, timestamp, rating: 5.0, split: Split::Train };
        // User 0 at times 10, 20, 95, 99; user 1 at 50, 96; newest train time 99.
        let xs = vec![x(0, 0, 10), x(0, 1, 20), x(0, 2, 95), x(0, 3, 99), x(1, 4, 50), x(1, 0, 96)];
        let ds = Dataset::from_interactions("w", vec!["a".into(), "b".into()], items, &xs);
        let cfg = ReplayConfig { last_seconds: 5, ..Default::default() };
        let got: Vec<(u32, i64)> = replay_events(&ds, &xs, &cfg, 1).iter().map(|e| (e.user, e.timestamp)).collect();
        assert_eq!(got, vec![(0, 95), (1, 96), (0, 99)]);
        let all = replay_events(&ds, &xs, &ReplayConfig::default(), 1);
        assert_eq!(all.len(), 4, "position 0 of each user is never replayed");
    }

    fn ev(ts: i64, k: u64) -> Event {
        Event { key: k, user: 0, item: 0, timestamp: ts, retract: false }
    }

    #[test]
    fn slices_by_count_and_by_duration() {
        let events = vec![ev(0, 1), ev(5, 2), ev(9, 3), ev(30, 4), ev(31, 5)];
        let cfg = ReplayConfig { slice: 2, ..Default::default() };
        assert_eq!(epochs(&events, &cfg, 0).unwrap(), vec![0, 0, 1, 1, 2]);
        let cfg = ReplayConfig { slice_by: "seconds".into(), slice: 10, ..Default::default() };
        // Windows 0, 0, 0, 3, 3 → dense epochs 7, 7, 7, 8, 8.
        assert_eq!(epochs(&events, &cfg, 7).unwrap(), vec![7, 7, 7, 8, 8]);
        let grouped = by_epoch(events, &[7, 7, 7, 8, 8]);
        assert_eq!(grouped.iter().map(|(t, v)| (*t, v.len())).collect::<Vec<_>>(), vec![(7, 3), (8, 2)]);
        let bad = ReplayConfig { slice_by: "days".into(), ..Default::default() };
        assert!(epochs(&[], &bad, 0).unwrap_err().to_string().contains("replay.slice_by"));
    }
}
