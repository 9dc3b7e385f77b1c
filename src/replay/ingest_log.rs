//! What an ingest file adds to a run's log: its rows read with raw ids (and the items' titles and
//! texts when the file has them), then admitted by the rules that keep the log true:
//! - the rating filter of `curec prepare` (ratings ≤ the prepared dataset's `rating_above` are not
//!   positives and are dropped, counted as `filtered`);
//! - deduplication by (user, item, timestamp) against the prepared log and every earlier ingest
//!   of the run, and within the file, so ingesting a file twice is a reported no-op;
//! - lateness: a row older than the newest interaction already known for its user is `late`;
//! - retractions: a row with `op = delete`, or a rating at or below the filter for a (user, item)
//!   the log holds as a positive, retracts that interaction (`retracted`): it leaves the user's
//!   history and the reasons written for it leave the item's list. A `delete` of a pair the log
//!   does not hold is `unmatched` (a no-op, so a file with deletes can be ingested twice);
//! - re-ratings: a positive rating for a (user, item) the log already holds as a positive, at
//!   another time, is `rerated` and adds nothing (`curec prepare` keeps one interaction per pair).
//!
//! Each ingest records its admitted rows in `<run>/ingested/ingest-<first>-<last>.parquet`
//! (`first`..`last`: the epochs it runs as) before its dataflow starts; a record counts only once
//! a complete snapshot at or after `last` exists, so a killed ingest is not half-remembered.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int64Type};
use arrow_array::{Float32Array, Int64Array, StringArray};
use arrow_schema::DataType;

use crate::data::prepared::{batch, column, read_parquet, write_parquet};
use crate::data::{Dataset, ItemInfo};

/// One row of an ingest file, ids as in the raw log.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRow {
    pub user: String,
    pub item: String,
    pub timestamp: i64,
    pub rating: f32,
    /// A retraction of the user's interaction with the item (not a new interaction).
    pub retract: bool,
}

/// The rows of an ingest file in file order, and the item metadata it carries (by raw item id).
pub fn read_file(path: &Path) -> Result<(Vec<NewRow>, HashMap<String, ItemInfo>)> {
    let raw = crate::data::read_raw(path, crate::data::Format::Generic)?;
    let deletes: HashSet<usize> = raw.deletes.iter().map(|&(row, _)| row).collect();
    let rows = raw
        .interactions
        .iter()
        .enumerate()
        .map(|(n, x)| NewRow {
            user: raw.users.name(x.user).to_string(),
            item: raw.items.name(x.item).to_string(),
            timestamp: x.timestamp,
            rating: x.rating,
            retract: deletes.contains(&n),
        })
        .collect();
    let info = raw.info.iter().map(|(&i, info)| (raw.items.name(i).to_string(), info.clone())).collect();
    Ok((rows, info))
}

/// Which interactions the run already holds: (user, item, timestamp), the (user, item) pairs that
/// are positives now (not retracted), and the newest timestamp per user. Raw ids are interned
/// (the prepared log's ids first), so a resident session holds millions of keys compactly.
#[derive(Default)]
pub struct Known {
    users: Interner,
    items: Interner,
    seen: HashSet<(u32, u32, i64)>,
    /// Retractions already applied, by (user, item, timestamp of the retraction).
    retractions: HashSet<(u32, u32, i64)>,
    positive: HashSet<(u32, u32)>,
    newest: HashMap<u32, i64>,
}

/// Raw id → dense id.
#[derive(Default)]
struct Interner(HashMap<String, u32>);

impl Interner {
    fn id(&mut self, raw: &str) -> u32 {
        if let Some(&i) = self.0.get(raw) {
            return i;
        }
        let i = self.0.len() as u32;
        self.0.insert(raw.to_string(), i);
        i
    }
}

impl Known {
    fn ids(&mut self, user: &str, item: &str) -> (u32, u32) {
        (self.users.id(user), self.items.id(item))
    }

    fn add_ids(&mut self, u: u32, i: u32, ts: i64) {
        self.seen.insert((u, i, ts));
        self.positive.insert((u, i));
        let n = self.newest.entry(u).or_insert(ts);
        *n = (*n).max(ts);
    }

    #[cfg(test)]
    fn add(&mut self, user: &str, item: &str, ts: i64) {
        let (u, i) = self.ids(user, item);
        self.add_ids(u, i, ts);
    }

    fn retract_ids(&mut self, u: u32, i: u32, ts: i64) -> bool {
        let held = self.positive.remove(&(u, i));
        if held {
            self.retractions.insert((u, i, ts));
        }
        held
    }

    /// What the prepared log `log` of `ds` (every split) and the run's ingests completed by
    /// snapshot epoch `upto` hold for `users` (the users of the file being ingested: the rest
    /// cannot collide with it, so a small ingest into a large log stays cheap), or for every
    /// user (`None`: a resident session, whose later batches may hold anyone).
    pub fn load(
        log: &[crate::data::preprocess::Interaction],
        raw_users: &[String],
        raw_items: &[crate::data::preprocess::ItemRow],
        run: &Path,
        upto: u64,
        users: Option<&HashSet<&str>>,
    ) -> Result<Known> {
        let wanted = |u: &str| users.is_none_or(|s| s.contains(u));
        let mut k = Known::default();
        // The prepared log's dense ids are the interner's first ids.
        for u in raw_users {
            k.users.id(u);
        }
        for i in raw_items {
            k.items.id(&i.raw_id);
        }
        let keep: Vec<bool> = raw_users.iter().map(|u| wanted(u)).collect();
        for x in log {
            if keep[x.user as usize] {
                k.add_ids(x.user, x.item, x.timestamp);
            }
        }
        for (_, last, path) in logs(run)? {
            if last <= upto {
                for r in read_log(&path)? {
                    if !wanted(r.user.as_str()) {
                        continue;
                    }
                    let (u, i) = k.ids(&r.user, &r.item);
                    if r.retract {
                        k.retract_ids(u, i, r.timestamp);
                    } else {
                        k.add_ids(u, i, r.timestamp);
                    }
                }
            }
        }
        Ok(k)
    }
}

/// An ingest file's rows after the rules of the module docs, in event-time order (ties: file
/// order).
#[derive(Debug, Default)]
pub struct Admitted {
    pub rows: Vec<NewRow>,
    pub filtered: usize,
    pub duplicates: usize,
    pub late: usize,
    /// Retractions admitted (rows of `rows` with `retract`).
    pub retracted: usize,
    /// Deletes of pairs the log does not hold.
    pub unmatched: usize,
    pub rerated: usize,
}

pub fn admit(rows: Vec<NewRow>, known: &mut Known, rating_above: f32) -> Admitted {
    let mut a = Admitted::default();
    let mut rows: Vec<(usize, NewRow)> = rows.into_iter().enumerate().collect();
    rows.sort_by_key(|(pos, r)| (r.timestamp, *pos));
    for (_, mut r) in rows {
        // A delete, or a rating below the filter for a pair the log holds: a retraction.
        let (u, i) = known.ids(&r.user, &r.item);
        if r.retract || (r.rating <= rating_above && known.positive.contains(&(u, i))) {
            if known.retractions.contains(&(u, i, r.timestamp)) {
                a.duplicates += 1;
            } else if known.retract_ids(u, i, r.timestamp) {
                r.retract = true;
                a.retracted += 1;
                a.rows.push(r);
            } else {
                a.unmatched += 1;
            }
            continue;
        }
        if r.rating <= rating_above {
            a.filtered += 1;
            continue;
        }
        if known.seen.contains(&(u, i, r.timestamp)) {
            a.duplicates += 1;
            continue;
        }
        if known.positive.contains(&(u, i)) {
            a.rerated += 1;
            continue;
        }
        if known.newest.get(&u).is_some_and(|&n| r.timestamp < n) {
            a.late += 1;
        }
        known.add_ids(u, i, r.timestamp);
        a.rows.push(r);
    }
    a
}

fn dir(run: &Path) -> PathBuf {
    run.join("ingested")
}

/// The run's ingest records: (first epoch, last epoch, path), oldest first.
fn logs(run: &Path) -> Result<Vec<(u64, u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir(run)).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(span) = name.strip_prefix("ingest-").and_then(|s| s.strip_suffix(".parquet")) else { continue };
        if let Some((a, b)) = span.split_once('-') {
            if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
                out.push((a, b, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Record an ingest's admitted rows, which run as epochs `first..=last` after the snapshot of
/// epoch `upto`. Records of ingests that never completed (ending after `upto`) are removed first,
/// so that a later snapshot cannot make them count.
pub fn write_log(run: &Path, upto: u64, first: u64, last: u64, rows: &[NewRow]) -> Result<()> {
    let d = dir(run);
    std::fs::create_dir_all(&d).with_context(|| format!("{}: cannot create", d.display()))?;
    for (_, l, path) in logs(run)? {
        if l > upto {
            std::fs::remove_file(&path).with_context(|| format!("{}: cannot remove", path.display()))?;
        }
    }
    let b = batch(
        vec![
            ("user", DataType::Utf8),
            ("item", DataType::Utf8),
            ("timestamp", DataType::Int64),
            ("rating", DataType::Float32),
            ("op", DataType::Utf8),
        ],
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.user.as_str()))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.item.as_str()))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.timestamp))),
            Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.rating))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| if r.retract { "delete" } else { "add" }))),
        ],
    );
    write_parquet(&d.join(format!("ingest-{first:08}-{last:08}.parquet")), &b)?;
    Ok(())
}

fn read_log(path: &Path) -> Result<Vec<NewRow>> {
    let b = read_parquet(path)?;
    let user = column(path, &b, "user", DataType::Utf8)?.as_string::<i32>();
    let item = column(path, &b, "item", DataType::Utf8)?.as_string::<i32>();
    let ts = column(path, &b, "timestamp", DataType::Int64)?.as_primitive::<Int64Type>();
    let rating = column(path, &b, "rating", DataType::Float32)?.as_primitive::<Float32Type>();
    // Records written before retractions existed have no `op` column: additions.
    let op = match b.schema().index_of("op") {
        Ok(_) => Some(column(path, &b, "op", DataType::Utf8)?.as_string::<i32>()),
        Err(_) => None,
    };
    Ok((0..b.num_rows())
        .map(|r| NewRow {
            user: user.value(r).to_string(),
            item: item.value(r).to_string(),
            timestamp: ts.value(r),
            rating: rating.value(r),
            retract: op.is_some_and(|o| o.value(r) == "delete"),
        })
        .collect())
}

/// A user's prepared history (`(timestamp, item)` in the prepared order, which is time order)
/// with ingested interactions (any order) merged in by event time: an ingested interaction goes
/// after every prepared one at or before its timestamp, and ingested ones at the same time keep
/// their order. A late interaction thus takes its place in the history instead of its end.
pub fn merge_event_time(prepared: &[(i64, u32)], ingested: &[(i64, u32)]) -> Vec<u32> {
    let mut late: Vec<(i64, u32)> = ingested.to_vec();
    late.sort_by_key(|&(t, _)| t); // stable
    let mut out = Vec::with_capacity(prepared.len() + late.len());
    let mut j = 0;
    for &(t, item) in prepared {
        while j < late.len() && late[j].0 < t {
            out.push(late[j].1);
            j += 1;
        }
        out.push(item);
    }
    out.extend(late[j..].iter().map(|&(_, i)| i));
    out
}

/// What a run's completed ingests change in its users' histories (ids of the model's dataset).
#[derive(Debug, Default)]
pub struct Ingested {
    /// Each user's ingested items, with their timestamps, in event time (retracted ones removed).
    pub added: HashMap<u32, Vec<(i64, u32)>>,
    /// (user, item) pairs whose interaction in the prepared log was retracted.
    pub retracted: HashSet<(u32, u32)>,
}

/// What a run's completed ingests add to its dataset for recommendation: users new to the
/// model are appended to `ds` (ids after the dataset's, in order of first appearance, with empty
/// train sequences), and each user's ingested items known to the model are returned with their
/// timestamps, in event time (items added by ingestion have no ID embedding and are left out),
/// with the retractions of prepared interactions. [`merge_event_time`] puts the added items into
/// the prepared history.
pub fn ingested_sequences(run: &Path, ds: &mut Dataset) -> Result<Ingested> {
    let mut out: HashMap<u32, Vec<(i64, u32)>> = HashMap::new();
    let mut retracted: HashSet<(u32, u32)> = HashSet::new();
    // Read-only: a reader must not remove the snapshot an ingest is writing right now.
    let Some((upto, _)) = super::snapshot::complete(&run.join("snapshots")).pop() else {
        return Ok(Ingested::default());
    };
    let mut uid: HashMap<String, u32> = ds.users.iter().enumerate().map(|(i, u)| (u.clone(), i as u32)).collect();
    let iid: HashMap<&str, u32> = ds.items.iter().enumerate().map(|(i, r)| (r.raw_id.as_str(), i as u32)).collect();
    let mut new_users = Vec::new();
    for (_, last, path) in logs(run)? {
        if last > upto {
            continue;
        }
        for r in read_log(&path)? {
            let u = *uid.entry(r.user.clone()).or_insert_with(|| {
                new_users.push(r.user.clone());
                (ds.users.len() + new_users.len() - 1) as u32
            });
            let Some(&i) = iid.get(r.item.as_str()) else { continue };
            if r.retract {
                // Whichever holds the pair: an earlier ingest, else the prepared log.
                let v = out.entry(u).or_default();
                let before = v.len();
                v.retain(|&(_, x)| x != i);
                if v.len() == before {
                    retracted.insert((u, i));
                }
            } else {
                out.entry(u).or_default().push((r.timestamp, i));
            }
        }
    }
    for u in new_users {
        ds.users.push(u);
        ds.train.push(Vec::new());
        ds.valid.push(u32::MAX);
        ds.test.push(u32::MAX);
        ds.n_users += 1;
    }
    let added = out
        .into_iter()
        .map(|(u, mut v)| {
            v.sort_by_key(|&(t, _)| t);
            (u, v)
        })
        .collect();
    Ok(Ingested { added, retracted })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(user: &str, item: &str, timestamp: i64, rating: f32) -> NewRow {
        NewRow { user: user.into(), item: item.into(), timestamp, rating, retract: false }
    }

    #[test]
    fn late_interactions_take_their_place_in_event_time() {
        let prepared = [(10, 1), (20, 2), (20, 3), (30, 4)];
        // Late (5, 15), tied with prepared ones (20: after them), after the end (40), and two at
        // the same time in arrival order.
        let ingested = [(40, 9), (20, 7), (5, 5), (15, 6), (20, 8)];
        assert_eq!(merge_event_time(&prepared, &ingested), vec![5, 1, 6, 2, 3, 7, 8, 4, 9]);
        assert_eq!(merge_event_time(&prepared, &[]), vec![1, 2, 3, 4]);
        assert_eq!(merge_event_time(&[], &ingested), vec![5, 6, 7, 8, 9]);
    }

    #[test]
    fn retractions_re_ratings_and_unmatched_deletes() {
        let mut known = Known::default();
        known.add("a", "x", 100);
        known.add("a", "y", 110);
        let del = |u: &str, i: &str, t: i64| NewRow { retract: true, ..row(u, i, t, 5.0) };
        let rows = vec![
            del("a", "x", 200),      // held: retracted
            row("a", "y", 210, 2.0), // a held pair rated under the filter: retracted
            del("a", "z", 220),      // never held: unmatched
            row("a", "x", 230, 5.0), // after its retraction: a new interaction again
            row("a", "x", 240, 4.0), // held again: a re-rating, nothing new
        ];
        let a = admit(rows.clone(), &mut known, 3.0);
        assert_eq!((a.retracted, a.unmatched, a.rerated, a.filtered), (2, 1, 1, 0));
        let kinds: Vec<(&str, bool)> = a.rows.iter().map(|r| (r.item.as_str(), r.retract)).collect();
        assert_eq!(kinds, [("x", true), ("y", true), ("x", false)]);
        // The same file again changes nothing.
        let again = admit(rows, &mut known, 3.0);
        assert!(again.rows.is_empty(), "{:?}", again.rows);
        assert_eq!((again.retracted, again.duplicates, again.unmatched), (0, 2, 1));
    }

    #[test]
    fn only_completed_ingests_count() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        // An ingest that ran as epochs 6..7 after the snapshot of epoch 5 and was killed.
        write_log(run, 5, 6, 7, &[row("a", "x", 1, 5.0)]).unwrap();
        // The next ingest starts again from epoch 5 and runs as 6..6: the stale record goes.
        write_log(run, 5, 6, 6, &[row("a", "y", 2, 5.0)]).unwrap();
        let spans: Vec<(u64, u64)> = logs(run).unwrap().into_iter().map(|(f, l, _)| (f, l)).collect();
        assert_eq!(spans, vec![(6, 6)]);
    }

    #[test]
    fn filter_dedup_and_lateness() {
        let mut known = Known::default();
        known.add("a", "x", 100);
        let rows = vec![
            row("a", "y", 200, 5.0),
            row("a", "x", 100, 5.0), // already in the log
            row("b", "x", 50, 2.0),  // not a positive
            row("a", "z", 150, 4.0), // after the known 100: in time, although after y in the file
            row("a", "y", 200, 4.0), // the same (user, item, timestamp) twice in the file
        ];
        let a = admit(rows.clone(), &mut known, 3.0);
        assert_eq!((a.filtered, a.duplicates), (1, 2));
        // Admitted in event time (z at 150 before y at 200), none older than a's known 100.
        assert_eq!(a.late, 0);
        assert_eq!(a.rows.iter().map(|r| r.item.as_str()).collect::<Vec<_>>(), vec!["z", "y"]);
        // The same file again: a no-op.
        let again = admit(rows, &mut known, 3.0);
        assert!(again.rows.is_empty());
        assert_eq!(again.duplicates, 4);
        // A row older than what a user already has is late.
        let late = admit(vec![row("a", "w", 120, 5.0)], &mut known, 3.0);
        assert_eq!((late.rows.len(), late.late), (1, 1));
    }
}
