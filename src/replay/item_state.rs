//! Per-item state, exchanged by item: the reason list Q_i, ordered by interaction time and capped
//! at the newest `reasons_kept`. A reason update q'_ui joins the list (Q'_i = Q_i ∪ {q'_ui});
//! it supersedes an earlier reason for the same interaction (same user and timestamp), so a
//! corrected reason replaces the one feature generation wrote rather than doubling it. A
//! retraction of (user, item) removes the reasons the user wrote for the item, and a rewrite of
//! that interaction arriving after it (one epoch later, through the loop) is dropped.

use std::sync::Arc;

use super::snapshot::{reason_shard, Shard};
use super::{Annotated, IdMap, KeyedState, Reason, ReasonList, Shared, Update, UpdateKind};
pub struct ItemState {
    pub items: IdMap<Arc<ReasonList>>,
    /// "w/o Update": events meet these initial lists, while the rewrites still fold into `items`.
    pub frozen: Option<IdMap<Arc<ReasonList>>>,
    pub reasons_kept: usize,
    /// Whether records carry the list (the stand-in corrector does not read it).
    pub attach: bool,
    empty: Arc<ReasonList>,
    /// (item, user) → time of the retraction: rewrites of interactions up to it are dropped.
    retracted: std::collections::HashMap<(u32, u32), i64>,
}

impl ItemState {
    pub fn new(
        all: &IdMap<Arc<ReasonList>>,
        index: usize,
        peers: usize,
        reasons_kept: usize,
        freeze: bool,
        attach: bool,
    ) -> Self {
        let items: IdMap<Arc<ReasonList>> =
            all.iter().filter(|(i, _)| **i as usize % peers == index).map(|(i, l)| (*i, l.clone())).collect();
        let frozen = freeze.then(|| items.clone());
        Self { items, frozen, reasons_kept, attach, empty: Arc::new(ReasonList::new()), retracted: Default::default() }
    }
}

impl KeyedState for ItemState {
    type In = Annotated;
    type Out = Annotated;
    const KIND: UpdateKind = UpdateKind::Reason;

    fn key(a: &Annotated) -> u64 {
        a.event.item as u64
    }
    fn order(a: &Annotated) -> u64 {
        a.event.key
    }
    fn update_key(u: &Update) -> u64 {
        u.item as u64
    }

    fn apply(&mut self, mut updates: Vec<Update>) {
        // By item, then time: one lookup per item, and each reason usually joins at the back.
        // (Two updates of one epoch never share an interaction, so the order is free.)
        updates.retain(|u| self.retracted.get(&(u.item, u.user)).is_none_or(|&t| u.timestamp > t));
        updates.sort_unstable_by_key(|u| (u.item, u.timestamp, u.user));
        let mut it = updates.into_iter().peekable();
        while let Some(first) = it.next() {
            let item = first.item;
            let list = Arc::make_mut(self.items.entry(item).or_insert_with(|| Arc::new(ReasonList::new())));
            let mut u = Some(first);
            while let Some(x) = u {
                super::fold_reason(
                    list,
                    Reason { user: x.user, timestamp: x.timestamp, text: x.text },
                    self.reasons_kept,
                );
                u = it.next_if(|n| n.item == item);
            }
        }
    }

    fn annotate(&mut self, mut records: Vec<Annotated>) -> Vec<Annotated> {
        for a in records.iter().filter(|a| a.event.retract) {
            let (item, user) = (a.event.item, a.event.user);
            self.retracted.insert((item, user), a.event.timestamp);
            for lists in std::iter::once(&mut self.items).chain(self.frozen.as_mut()) {
                if let Some(l) = lists.get_mut(&item) {
                    if l.iter().any(|r| r.user == user) {
                        Arc::make_mut(l).retain(|r| r.user != user);
                    }
                }
            }
        }
        if self.attach {
            let source = self.frozen.as_ref().unwrap_or(&self.items);
            for a in &mut records {
                a.reasons = Some(Shared(source.get(&a.event.item).cloned().unwrap_or_else(|| self.empty.clone())));
            }
        }
        records
    }

    fn shard(&self, keep: &dyn Fn(u32) -> bool) -> Shard {
        reason_shard(&self.items, keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(user: u32, ts: i64, t: &str) -> Reason {
        Reason { user, timestamp: ts, text: Shared::from(t) }
    }

    #[test]
    fn a_retraction_removes_the_users_reasons_and_drops_its_late_rewrite() {
        use crate::replay::{Event, Update};
        let list: ReasonList = [r(1, 10, "a"), r(2, 20, "b")].into_iter().collect();
        let all: IdMap<Arc<ReasonList>> = [(7u32, Arc::new(list))].into_iter().collect();
        let mut st = ItemState::new(&all, 0, 1, 10, false, true);
        let ev = |user: u32, ts: i64, retract: bool| Annotated {
            event: Event { key: ts as u64, user, item: 7, timestamp: ts, retract },
            pattern: None,
            history: Vec::new(),
            reasons: None,
        };
        let out = st.annotate(vec![ev(1, 30, true)]);
        assert_eq!(out.len(), 1);
        let texts = |st: &ItemState| st.items[&7].iter().map(|x| x.text.to_string()).collect::<Vec<_>>();
        assert_eq!(texts(&st), ["b"]);
        // The rewrite of user 1's interaction (at 10) arrives an epoch later: dropped. A new
        // interaction of user 1 after the retraction (at 40) is kept.
        let up = |user: u32, ts: i64, t: &str| {
            Update::reason(&Event { key: 0, user, item: 7, timestamp: ts, retract: false }, Arc::from(t))
        };
        st.apply(vec![up(1, 10, "a2"), up(1, 40, "c")]);
        assert_eq!(texts(&st), ["b", "c"]);
    }

    #[test]
    fn reasons_fold_in_time_order_replace_the_same_interaction_and_keep_the_newest() {
        let mut l: ReasonList = [r(1, 10, "a"), r(2, 30, "b")].into_iter().collect();
        crate::replay::fold_reason(&mut l, r(3, 20, "c"), 10);
        assert_eq!(l.iter().map(|x| &*x.text).collect::<Vec<_>>(), ["a", "c", "b"]);
        crate::replay::fold_reason(&mut l, r(3, 20, "c2"), 10);
        assert_eq!(l.iter().map(|x| &*x.text).collect::<Vec<_>>(), ["a", "c2", "b"]);
        crate::replay::fold_reason(&mut l, r(4, 40, "d"), 3);
        assert_eq!(l.iter().map(|x| &*x.text).collect::<Vec<_>>(), ["c2", "b", "d"]);
    }
}
