//! The source: train interactions in time order (ties: user, then position), optionally a
//! seeded sample of users and each user's most recent N, cut into epochs (time slices) by count
//! or by duration. Each worker feeds every `peers`-th slice record; the epoch is the timely time.

use anyhow::Result;
use rand::seq::SliceRandom;

use super::{Event, ReplayConfig};
use crate::data::preprocess::Interaction;
use crate::data::Dataset;
use crate::rec::nn::rng_for;

const USERS: u64 = 0x5e1ec7;

/// The record key of position `pos` in `user`'s sequence.
pub fn key(user: u32, pos: usize) -> u64 {
    ((user as u64) << 32) | pos as u64
}

/// The replayed train events in time order. Position 0 of a sequence has no history to prompt
/// with and is never replayed (as in feature generation).
pub fn replay_events(ds: &Dataset, xs: &[Interaction], cfg: &ReplayConfig, seed: u64) -> Vec<Event> {
    let ts = crate::features::jobs::train_timestamps(ds, xs);
    let mut users: Vec<u32> = (0..ds.n_users as u32).filter(|&u| ds.train[u as usize].len() > 1).collect();
    if cfg.users > 0 && cfg.users < users.len() {
        users.shuffle(&mut rng_for(seed, USERS, 0));
        users.truncate(cfg.users);
        users.sort_unstable();
    }
    let mut events = Vec::new();
    for u in users {
        let seq = &ds.train[u as usize];
        let first = if cfg.per_user == 0 { 1 } else { seq.len().saturating_sub(cfg.per_user).max(1) };
        for (pos, &item) in seq.iter().enumerate().skip(first) {
            events.push(Event { key: key(u, pos), user: u, item, timestamp: ts[u as usize][pos] });
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

    fn ev(ts: i64, k: u64) -> Event {
        Event { key: k, user: 0, item: 0, timestamp: ts }
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
