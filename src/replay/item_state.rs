//! Per-item state, exchanged by item: the reason list Q_i, ordered by interaction time and capped
//! at the newest `reasons_kept`. A reason update q'_ui joins the list (Q'_i = Q_i ∪ {q'_ui});
//! it supersedes an earlier reason for the same interaction (same user and timestamp), so a
//! corrected reason replaces the one feature generation wrote rather than doubling it.

use std::sync::Arc;

use super::snapshot::{reason_shard, Shard};
use super::state_op::KeyedState;
use super::{Annotated, IdMap, Reason, Shared, Update, UpdateKind};

pub struct ItemState {
    pub items: IdMap<Arc<Vec<Reason>>>,
    /// "w/o Update": events meet these initial lists, while the rewrites still fold into `items`.
    pub frozen: Option<IdMap<Arc<Vec<Reason>>>>,
    pub reasons_kept: usize,
    /// Whether records carry the list (the stand-in corrector does not read it).
    pub attach: bool,
    empty: Arc<Vec<Reason>>,
}

impl ItemState {
    pub fn new(
        all: &IdMap<Arc<Vec<Reason>>>,
        index: usize,
        peers: usize,
        reasons_kept: usize,
        freeze: bool,
        attach: bool,
    ) -> Self {
        let items: IdMap<Arc<Vec<Reason>>> =
            all.iter().filter(|(i, _)| **i as usize % peers == index).map(|(i, l)| (*i, l.clone())).collect();
        let frozen = freeze.then(|| items.clone());
        Self { items, frozen, reasons_kept, attach, empty: Arc::new(Vec::new()) }
    }
}

/// Insert `r` into a list ordered by (timestamp, user), replacing the entry of the same
/// interaction, and keep the newest `keep`.
pub fn fold_reason(list: &mut Vec<Reason>, r: Reason, keep: usize) {
    let at = list.partition_point(|x| (x.timestamp, x.user) < (r.timestamp, r.user));
    if list.get(at).is_some_and(|x| x.timestamp == r.timestamp && x.user == r.user) {
        list[at] = r;
    } else {
        list.insert(at, r);
    }
    if list.len() > keep {
        let cut = list.len() - keep;
        list.drain(..cut);
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

    fn apply(&mut self, updates: Vec<Update>) {
        for u in updates {
            let list = self.items.entry(u.item).or_insert_with(|| Arc::new(Vec::new()));
            let r = Reason { user: u.user, timestamp: u.timestamp, text: u.text };
            fold_reason(Arc::make_mut(list), r, self.reasons_kept);
        }
    }

    fn annotate(&mut self, mut records: Vec<Annotated>) -> Vec<Annotated> {
        if self.attach {
            let source = self.frozen.as_ref().unwrap_or(&self.items);
            for a in &mut records {
                a.reasons = Shared(source.get(&a.event.item).cloned().unwrap_or_else(|| self.empty.clone()));
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
        let mut l = vec![r(1, 10, "a"), r(2, 30, "b")];
        fold_reason(&mut l, r(3, 20, "c"), 10);
        assert_eq!(l.iter().map(|x| &*x.text).collect::<Vec<_>>(), ["a", "c", "b"]);
        fold_reason(&mut l, r(3, 20, "c2"), 10);
        assert_eq!(l.iter().map(|x| &*x.text).collect::<Vec<_>>(), ["a", "c2", "b"]);
        fold_reason(&mut l, r(4, 40, "d"), 3);
        assert_eq!(l.iter().map(|x| &*x.text).collect::<Vec<_>>(), ["c2", "b", "d"]);
    }
}
