//! Per-user state, exchanged by user: the current interest pattern p_u and the item history.
//! An event leaves annotated with the pattern and the history before it; the history then grows
//! by the event's item. Pattern updates of epoch t − 1 replace p_u before epoch t's events.

use std::sync::Arc;

use super::snapshot::{pattern_shard, Shard};
use super::state_op::KeyedState;
use super::{Annotated, Event, IdMap, Shared, Update, UpdateKind};

#[derive(Debug, Clone, Default)]
pub struct UserEntry {
    pub pattern: Option<(i64, Arc<str>)>,
    pub history: Vec<u32>,
}

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
            let history = if self.attach { entry.history.clone() } else { Vec::new() };
            entry.history.push(e.item);
            if entry.history.len() > self.history_kept {
                let cut = entry.history.len() - self.history_kept;
                entry.history.drain(..cut);
            }
            out.push(Annotated { event: e, pattern: pattern.map(Shared), history, reasons: None });
        }
        out
    }

    fn shard(&self) -> Shard {
        pattern_shard(&self.users)
    }
}
