//! Per-user state, exchanged by user: the current interest pattern p_u and the item history in
//! event time. An event leaves annotated with the pattern and the history before it (in event
//! time: a late interaction, older than the user's newest, sees only what came before it); its
//! item then takes its place by timestamp (ties: arrival order). Pattern updates of epoch t − 1
//! replace p_u before epoch t's events. Patterns and reasons written after a late interaction
//! are not rewritten: a late row changes the history that later prompts and the reward model
//! read, not the texts already derived. A retraction takes the item out of the history (every
//! occurrence); the user's pattern stays until the user's next rewrite.

use std::sync::Arc;

use super::snapshot::{pattern_shard, Shard};
use super::{Annotated, Event, IdMap, KeyedState, Shared, Update, UpdateKind, UserEntry};
pub struct UserState {
    pub users: IdMap<UserEntry>,
    /// "w/o Update": events meet these initial patterns, while the rewrites still fold into `users`.
    pub frozen: Option<IdMap<Arc<str>>>,
    pub history_kept: usize,
    /// Whether records carry the history (the stand-in corrector does not read it).
    pub attach: bool,
}

impl UserState {
    /// The share of `all` this worker owns (`user % peers == index`).
    pub fn new(
        all: &IdMap<UserEntry>,
        index: usize,
        peers: usize,
        history_kept: usize,
        freeze: bool,
        attach: bool,
    ) -> Self {
        let users: IdMap<UserEntry> =
            all.iter().filter(|(u, _)| **u as usize % peers == index).map(|(u, e)| (*u, e.clone())).collect();
        let frozen = freeze
            .then(|| users.iter().filter_map(|(u, e)| e.pattern.as_ref().map(|(_, p)| (*u, p.clone()))).collect());
        Self { users, frozen, history_kept, attach }
    }
}

impl KeyedState for UserState {
    type In = Event;
    type Out = Annotated;
    const KIND: UpdateKind = UpdateKind::Pattern;

    fn key(e: &Event) -> u64 {
        e.user as u64
    }
    fn order(e: &Event) -> u64 {
        e.key
    }
    fn update_key(u: &Update) -> u64 {
        u.user as u64
    }

    fn apply(&mut self, updates: Vec<Update>) {
        for u in updates {
            self.users.entry(u.user).or_default().pattern = Some((u.timestamp, u.text.0));
        }
    }

    fn annotate(&mut self, events: Vec<Event>) -> Vec<Annotated> {
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            let entry = self.users.entry(e.user).or_default();
            let pattern = match &self.frozen {
                Some(f) => f.get(&e.user).cloned(),
                None => entry.pattern.as_ref().map(|(_, p)| p.clone()),
            };
            if e.retract {
                entry.retract(e.item);
                out.push(Annotated { event: e, pattern: None, history: Vec::new(), reasons: None });
                continue;
            }
            let at = entry.place(e.timestamp);
            let history = if self.attach { entry.history[..at].to_vec() } else { Vec::new() };
            entry.insert_at(at, e.item, e.timestamp, self.history_kept);
            out.push(Annotated { event: e, pattern: pattern.map(Shared), history, reasons: None });
        }
        out
    }

    fn shard(&self, keep: &dyn Fn(u32) -> bool) -> Shard {
        pattern_shard(&self.users, keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_interaction_takes_its_place_in_event_time() {
        let mut e = UserEntry::default();
        for (item, ts) in [(1, 10), (2, 20), (3, 30)] {
            e.insert(item, ts, 10);
        }
        assert_eq!(e.insert(9, 15, 10), 1, "between 10 and 20");
        assert_eq!(e.history, vec![1, 9, 2, 3]);
        assert_eq!(e.times, vec![10, 15, 20, 30]);
        assert_eq!(e.insert(8, 20, 10), 3, "a tie goes after the earlier arrival");
        e.insert(7, 40, 3);
        assert_eq!((e.history, e.times), (vec![8, 3, 7], vec![20, 30, 40]), "the oldest beyond `kept` leave");
    }
}
