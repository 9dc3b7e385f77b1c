//! Per-item state, exchanged by item: the reason list Q_i, ordered by interaction time and capped
//! at the newest `reasons_kept`. A reason update q'_ui joins the list (Q'_i = Q_i ∪ {q'_ui});
//! it supersedes an earlier reason for the same interaction (same user and timestamp), so a
//! corrected reason replaces the one feature generation wrote rather than doubling it.

use std::sync::Arc;

use super::snapshot::{reason_shard, Shard};
use super::state_op::KeyedState;
use super::{Annotated, IdMap, Reason, ReasonList, Shared, Update, UpdateKind};

pub struct ItemState {
    pub items: IdMap<Arc<ReasonList>>,
    /// "w/o Update": events meet these initial lists, while the rewrites still fold into `items`.
    pub frozen: Option<IdMap<Arc<ReasonList>>>,
    pub reasons_kept: usize,
    /// Whether records carry the list (the stand-in corrector does not read it).
    pub attach: bool,
    empty: Arc<ReasonList>,
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
        Self { items, frozen, reasons_kept, attach, empty: Arc::new(ReasonList::new()) }
    }
}

/// Insert `r` into a list ordered by (timestamp, user), replacing the entry of the same
/// interaction, and keep the newest `keep`.
pub fn fold_reason(list: &mut ReasonList, r: Reason, keep: usize) {
    let key = (r.timestamp, r.user);
    if list.back().is_none_or(|x| (x.timestamp, x.user) < key) {
        // The common case in a time-ordered replay: the newest reason.
        list.push_back(r);
    } else {
        let at = list.partition_point(|x| (x.timestamp, x.user) < key);
        if list.get(at).is_some_and(|x| (x.timestamp, x.user) == key) {
            list[at] = r;
        } else {
            list.insert(at, r);
        }
    }
    while list.len() > keep {
        list.pop_front();
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
        updates.sort_unstable_by_key(|u| (u.item, u.timestamp, u.user));
        let mut it = updates.into_iter().peekable();
        while let Some(first) = it.next() {
            let item = first.item;
            let list = Arc::make_mut(self.items.entry(item).or_insert_with(|| Arc::new(ReasonList::new())));
            let mut u = Some(first);
            while let Some(x) = u {
                fold_reason(list, Reason { user: x.user, timestamp: x.timestamp, text: x.text }, self.reasons_kept);
                u = it.next_if(|n| n.item == item);
            }
        }
    }

    fn annotate(&mut self, mut records: Vec<Annotated>) -> Vec<Annotated> {
        if self.attach {
            let source = self.frozen.as_ref().unwrap_or(&self.items);
            for a in &mut records {
                a.reasons = Some(Shared(source.get(&a.event.item).cloned().unwrap_or_else(|| self.empty.clone())));
            }
        }
        records
    }

    fn shard(&self) -> Shard {
        reason_shard(&self.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(user: u32, ts: i64, t: &str) -> Reason {
        Reason { user, timestamp: ts, text: Shared::from(t) }
    }

    #[test]
    fn reasons_fold_in_time_order_replace_the_same_interaction_and_keep_the_newest() {
        let mut l: ReasonList = [r(1, 10, "a"), r(2, 30, "b")].into_iter().collect();
        fold_reason(&mut l, r(3, 20, "c"), 10);
        assert_eq!(l.iter().map(|x| &*x.text).collect::<Vec<_>>(), ["a", "c", "b"]);
        fold_reason(&mut l, r(3, 20, "c2"), 10);
        assert_eq!(l.iter().map(|x| &*x.text).collect::<Vec<_>>(), ["a", "c2", "b"]);
        fold_reason(&mut l, r(4, 40, "d"), 3);
        assert_eq!(l.iter().map(|x| &*x.text).collect::<Vec<_>>(), ["c2", "b", "d"]);
    }
}
