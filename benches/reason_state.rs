//! Issue 21, item 1: the correction's per-item reason lists kept two ways on the same stream of
//! reason writes, to choose between them by measurement.
//!
//! - **operators** (what `curec replay` runs, `ItemState::apply`): each epoch's writes sorted by
//!   (item, time, user) and folded into a ring per item with `fold_reason`: a write replaces the
//!   reason of the same interaction, and the oldest beyond `keep` leave.
//! - **differential**: the writes as a differential collection ((item, time, user), (epoch, text)),
//!   one `reduce` keeping each interaction's newest write and a second one keeping each item's
//!   newest `keep` reasons; one worker, each epoch stepped until the probe passes it.
//!
//! The stream is the replay bench's synthetic log (seeded users and items, one interaction per
//! time unit, epochs of `--slice`): the reasons of epoch e's interactions are written in epoch
//! e + 1 (the feedback loop's delay), and one in ten interactions of epoch e − 1 is rewritten then
//! too (a correction replacing its reason). Without retractions both keep the same lists, and the
//! bench checks that they do (exit 1 if not). Prints one JSON line: seconds and writes per second
//! of each, and the ratio.
//!
//!   cargo bench --bench reason_state -- [--interactions N] [--items I] [--slice S] [--keep K]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::Instant;

use curec::replay::fold_reason;
use curec::replay::{Reason, ReasonList, Shared};
use differential_dataflow::input::Input;
use rand::{Rng, SeedableRng};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// One reason write: the interaction (item, time, user) and its text.
#[derive(Clone)]
struct Write {
    item: u32,
    ts: i64,
    user: u32,
    text: String,
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().unwrap_or_else(|_| panic!("{name}: expected a positive integer, found '{v}'")))
}

/// The writes of each epoch, in epoch order.
fn stream(interactions: usize, users: u32, items: u32, slice: usize) -> Vec<(u64, Vec<Write>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    let log: Vec<(u32, u32)> =
        (0..interactions).map(|_| (rng.random_range(0..users), rng.random_range(0..items))).collect();
    let epochs = interactions.div_ceil(slice);
    let mut out = Vec::new();
    for w in 1..=epochs as u64 {
        let mut writes = Vec::new();
        let e = (w - 1) as usize;
        let from = e * slice;
        for (n, &(user, item)) in log.iter().enumerate().take((from + slice).min(interactions)).skip(from) {
            writes.push(Write { item, ts: n as i64, user, text: format!("reason for interaction {n}") });
        }
        if e >= 1 {
            for (n, &(user, item)) in log.iter().enumerate().take(from).skip(from - slice) {
                if rng.random_range(0..10) == 0 {
                    writes.push(Write { item, ts: n as i64, user, text: format!("corrected reason {n}") });
                }
            }
        }
        out.push((w, writes));
    }
    out
}

type Lists = BTreeMap<u32, Vec<(i64, u32, String)>>;
/// Accumulated output of the differential lists: (item, (time, user, text)) → multiplicity.
type Accumulated = HashMap<(u32, (i64, u32, String)), isize>;

fn operators(stream: &[(u64, Vec<Write>)], keep: usize) -> (f64, Lists) {
    let t0 = Instant::now();
    let mut lists: HashMap<u32, ReasonList> = HashMap::new();
    for (_, writes) in stream {
        let mut ws = writes.clone();
        ws.sort_unstable_by_key(|w| (w.item, w.ts, w.user));
        for w in ws {
            let r = Reason { user: w.user, timestamp: w.ts, text: Shared::from(w.text.as_str()) };
            fold_reason(lists.entry(w.item).or_default(), r, keep);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let out = lists
        .into_iter()
        .map(|(i, l)| (i, l.into_iter().map(|r| (r.timestamp, r.user, r.text.to_string())).collect()))
        .collect();
    (secs, out)
}

fn differential(stream: &[(u64, Vec<Write>)], keep: usize) -> (f64, Lists) {
    let stream = stream.to_vec();
    timely::execute_directly(move |worker| {
        let result: Rc<RefCell<Accumulated>> = Rc::default();
        let sink = result.clone();
        let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (input, writes) = scope.new_collection::<((u32, i64, u32), (u64, String)), isize>();
            // Each interaction's newest write (values sorted by epoch: the last one).
            let current = writes.reduce(|_, vals, out| out.push((vals[vals.len() - 1].0.clone(), 1)));
            // Each item's newest `keep` reasons (values sorted by (time, user)).
            let lists =
                current.map(|((item, ts, user), (_, text))| (item, (ts, user, text))).reduce(move |_, vals, out| {
                    for (v, _) in &vals[vals.len().saturating_sub(keep)..] {
                        out.push(((*v).clone(), 1));
                    }
                });
            let (probe, lists) = lists.probe();
            lists.inspect(move |(d, _, r)| *sink.borrow_mut().entry(d.clone()).or_insert(0) += r);
            (input, probe)
        });
        let t0 = Instant::now();
        for (epoch, writes) in stream.iter() {
            input.advance_to(*epoch);
            for w in writes {
                input.insert(((w.item, w.ts, w.user), (*epoch, w.text.clone())));
            }
            input.advance_to(epoch + 1);
            input.flush();
            worker.step_while(|| probe.less_than(input.time()));
        }
        let secs = t0.elapsed().as_secs_f64();
        let mut lists = Lists::new();
        for ((item, v), r) in result.borrow().iter() {
            assert!(*r == 0 || *r == 1, "multiplicity {r}");
            if *r == 1 {
                lists.entry(*item).or_default().push(v.clone());
            }
        }
        for l in lists.values_mut() {
            l.sort();
        }
        (secs, lists)
    })
}

fn main() {
    let interactions = arg("--interactions", 1_000_000);
    let users = arg("--users", 100_000) as u32;
    let items = arg("--items", 50_000) as u32;
    let slice = arg("--slice", 100_000);
    let keep = arg("--keep", 20);
    let s = stream(interactions, users, items, slice);
    let writes: usize = s.iter().map(|(_, w)| w.len()).sum();
    let (op_s, op) = operators(&s, keep);
    let (dd_s, dd) = differential(&s, keep);
    let same = op == dd;
    println!(
        "{}",
        serde_json::json!({
            "bench": "reason-state",
            "interactions": interactions, "items": items, "slice": slice, "keep": keep, "writes": writes,
            "operators_seconds": op_s, "differential_seconds": dd_s,
            "operators_writes_per_s": writes as f64 / op_s, "differential_writes_per_s": writes as f64 / dd_s,
            "differential_over_operators": dd_s / op_s,
            "items_with_reasons": op.len(), "same_lists": same,
        })
    );
    if !same {
        eprintln!("the two states differ");
        std::process::exit(1);
    }
}
