//! The chronological-correction dataflow: worker-count independence, resume after a kill (same
//! bytes), the `curec replay` / `curec ingest` contracts, and their one-line errors.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::chain;
use curec::bench::replay::{synthetic, BenchSpec};
use curec::replay::board::Board;
use curec::replay::graph::{run_dataflow, CorrectorFactory, Initial, Topology};
use curec::replay::policy::Corrector;
use curec::replay::snapshot::{self, State};
use curec::replay::standin::StandIn;
use serde_json::{json, Value};

fn curec_cli(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_curec")).args(args).env("CUREC_LOG", "warn").output().unwrap()
}

/// `curec ingest --from run file [extra]`, which must succeed; its JSON summary line.
fn ingest_ok(run: &Path, file: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["ingest", "--from", run.to_str().unwrap(), file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = curec_cli(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The snapshot's state files (every partition, and the metrics) are the same, byte for byte.
fn same_state(a: &Path, b: &Path, what: &str) {
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".parquet") && !n.starts_with("embeddings-"))
            .collect();
        v.sort();
        v
    };
    let (na, nb) = (names(a), names(b));
    assert_eq!(na, nb, "{what}: different files");
    assert_eq!(na.len(), 3 * snapshot::PARTITIONS + 1, "{what}: {na:?}");
    for f in na {
        assert!(read(&a.join(&f)) == read(&b.join(&f)), "{f}: {what}");
    }
}

/// Two timely processes on localhost: a host file with two free ports written at `hostfile`,
/// then `command(i) --hostfile <hostfile>` for process i = 0, 1, run together; both must succeed.
fn two_processes(hostfile: &Path, command: impl Fn(usize) -> Command) -> Vec<Output> {
    let ls: Vec<_> = (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let ports: Vec<u16> = ls.iter().map(|l| l.local_addr().unwrap().port()).collect();
    drop(ls);
    std::fs::write(hostfile, format!("# two processes\n127.0.0.1:{}\n127.0.0.1:{}\n", ports[0], ports[1])).unwrap();
    let children: Vec<_> = (0..2)
        .map(|i| {
            command(i)
                .args(["--hostfile", hostfile.to_str().unwrap()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .enumerate()
        .map(|(i, child)| {
            let o = child.wait_with_output().unwrap();
            assert!(o.status.success(), "process {i}: {}", String::from_utf8_lossy(&o.stderr));
            o
        })
        .collect()
}

/// Run the state-sensitive stand-in dataflow over `epochs` from `state` into `root` (`freeze`:
/// records meet the initial state, as in "w/o Update").
fn standin_run(
    root: &Path,
    epochs: Vec<(u64, Vec<curec::replay::Event>)>,
    state: State,
    workers: usize,
    snaps: BTreeSet<u64>,
    done: Vec<curec::replay::EpochMetrics>,
    freeze: bool,
) {
    let board = Arc::new(Board::new(
        root.to_path_buf(),
        workers,
        snaps,
        json!({"test": 1}),
        (0..50).map(|u| format!("u{u}")).collect(),
        (0..30).map(|i| format!("i{i}")).collect(),
        json!({}),
        done,
        Box::new(|_, _| {}),
    ));
    let initial = Arc::new(Initial {
        state,
        history_kept: 5,
        reasons_kept: 3,
        freeze,
        attach_reasons: true,
        single_policy: false,
    });
    let factory: CorrectorFactory = Arc::new(|_, _| -> anyhow::Result<Option<Box<dyn Corrector>>> {
        Ok(Some(Box::new(StandIn::reading_state(7))))
    });
    run_dataflow(epochs, initial, factory, board, &Topology::threads(workers)).unwrap();
}

#[test]
fn dataflow_state_is_the_same_for_one_two_three_and_four_workers_and_after_a_resume() {
    let spec =
        BenchSpec { interactions: 3000, users: 50, items: 30, slice: 100, snapshot_every: 10, cost_ns: 0, seed: 3 };
    let epochs = synthetic(&spec);
    assert_eq!(epochs.len(), 30);
    let snaps: BTreeSet<u64> = [9, 19, 29].into_iter().collect();
    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one");
    let two = tmp.path().join("two");
    standin_run(&one, epochs.clone(), State::default(), 1, snaps.clone(), vec![], false);
    standin_run(&two, epochs.clone(), State::default(), 2, snaps.clone(), vec![], false);
    let (e1, d1) = snapshot::newest(&one.clone()).unwrap();
    let (e2, d2) = snapshot::newest(&two).unwrap();
    assert_eq!((e1, e2), (29, 29));
    same_state(&d1, &d2, "1 vs 2 workers");
    // 3 workers do not divide the partition count: the board merges the rows instead.
    let three = tmp.path().join("three");
    standin_run(&three, epochs.clone(), State::default(), 3, snaps.clone(), vec![], false);
    same_state(&d1, &snapshot::newest(&three).unwrap().1, "1 vs 3 workers");
    // 4 workers: one partition each.
    let four = tmp.path().join("four");
    standin_run(&four, epochs.clone(), State::default(), 4, snaps.clone(), vec![], false);
    same_state(&d1, &snapshot::newest(&four).unwrap().1, "1 vs 4 workers");
    let m = snapshot::manifest(&d1).unwrap();
    assert_eq!(m["interactions"], 3000);
    // The stand-in's texts depend on the state each record meets, so the equalities above also
    // check when rewrites are read; and they are read: records that meet the initial state
    // throughout ("w/o Update") leave other patterns.
    let frozen = tmp.path().join("frozen");
    standin_run(&frozen, epochs.clone(), State::default(), 1, snaps.clone(), vec![], true);
    let df = snapshot::newest(&frozen).unwrap().1;
    let p = |d: &Path| read(&snapshot::part_path(d, "patterns", 0));
    assert!(p(&d1) != p(&df), "patterns do not depend on the rewrites read");
    // Only the newest two complete snapshots are kept.
    assert_eq!(snapshot::complete(&one).iter().map(|s| s.0).collect::<Vec<_>>(), vec![19, 29]);

    // Resume: a run that stopped after epoch 19, continued from its snapshot on 2 workers.
    let part = tmp.path().join("part");
    standin_run(&part, epochs[..20].to_vec(), State::default(), 1, [9, 19].into_iter().collect(), vec![], false);
    let (e, dir) = snapshot::newest(&part).unwrap();
    assert_eq!(e, 19);
    // A half-written newer snapshot (a kill during writing) is ignored and removed.
    std::fs::create_dir_all(part.join("snapshots-ignored")).unwrap();
    let torn = snapshot::epoch_dir(&part, 25);
    std::fs::create_dir_all(&torn).unwrap();
    std::fs::write(torn.join("patterns.w0.parquet"), b"torn").unwrap();
    assert_eq!(snapshot::newest(&part).unwrap().0, 19);
    assert!(!torn.exists());
    let state = State::load(&dir, 3).unwrap();
    let done = snapshot::read_metrics(&dir.join(snapshot::METRICS)).unwrap();
    standin_run(&part, epochs[20..].to_vec(), state, 2, [29].into_iter().collect(), done, false);
    let (_, d3) = snapshot::newest(&part).unwrap();
    same_state(&d1, &d3, "uninterrupted vs resumed");
}

fn final_snapshot(run: &Path) -> PathBuf {
    snapshot::newest(&run.join("snapshots")).unwrap().1
}

#[test]
fn replay_resumes_after_a_kill_with_the_same_bytes_and_ingest_grows_the_state() {
    let c = chain();
    let job = c.job.to_str().unwrap();

    // Uninterrupted, on 2 workers.
    let a = c.base.join("a");
    let o = curec_cli(&["replay", job, "--out", a.to_str().unwrap(), "-w", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: Value = serde_json::from_slice(&read(&a.join("metrics.json"))).unwrap();
    assert_eq!(m["variant"], "correction");
    for k in ["ndcg@10", "recall@10", "train_seconds"] {
        assert!(m[k].as_f64().is_some(), "metrics.json lacks {k}");
    }
    assert_eq!(m["replay"]["interactions"], 12);
    assert_eq!(m["replay"]["epochs"], 6);
    // The main job's report: the replay's slices and its own row.
    let page = std::fs::read_to_string(a.join("report.html")).expect("replay writes report.html");
    assert!(page.contains("<h2>Replay") && page.contains("data-run=\""), "report lacks the replay");
    let stages: Value = serde_json::from_slice(&read(&a.join("stages.json"))).unwrap();
    for s in ["correction", "report"] {
        assert!(stages[s].as_f64().is_some_and(|t| t >= 0.0), "stages.json lacks {s}: {stages}");
    }
    assert!(String::from_utf8_lossy(&o.stdout).contains("| **total** |"), "the job prints its stage times");
    assert!(page.contains("<h2>Stage times") && page.contains("<td>correction</td>"), "report lacks the stage times");
    let da = final_snapshot(&a);
    let manifest = snapshot::manifest(&da).unwrap();
    assert_eq!(manifest["epoch"], 5);
    assert!(da.join("policy/adapter.safetensors").is_file());
    // The same command over the finished run is accepted (same identity) and changes nothing.
    let o = curec_cli(&["replay", job, "--out", a.to_str().unwrap()]);
    assert!(o.status.success(), "a second run over a finished replay: {}", String::from_utf8_lossy(&o.stderr));
    let again: Value = serde_json::from_slice(&read(&a.join("metrics.json"))).unwrap();
    assert_eq!(again["ndcg@10"], m["ndcg@10"]);

    // Two timely processes of one worker each, on localhost, give the same bytes as one process
    // with two workers.
    let p = c.base.join("p");
    let hostfile = c.base.join("hosts");
    let outs = two_processes(&hostfile, |i| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_curec"));
        cmd.args(["replay", job, "--out", p.to_str().unwrap(), "-w", "1", "--processes", "2"]);
        cmd.args(["--process", &i.to_string()]).env("CUREC_LOG", "warn");
        cmd
    });
    assert!(String::from_utf8_lossy(&outs[1].stdout).contains("process 1 of 2"), "process 1 says it is done");
    let dp = final_snapshot(&p);
    same_state(&da, &dp, "2 processes × 1 worker vs 1 process × 2 workers");
    for f in ["policy/trainable.safetensors", "policy/optimizer.safetensors"] {
        assert!(read(&da.join(f)) == read(&dp.join(f)), "{f}: 2 processes ≠ 1 process");
    }
    let mp: Value = serde_json::from_slice(&read(&p.join("metrics.json"))).unwrap();
    assert_eq!(mp["ndcg@10"], m["ndcg@10"]);
    assert_eq!(mp["replay"]["interactions"], 12);
    // A bad host file is one line naming the file and the line.
    std::fs::write(&hostfile, "127.0.0.1:1\nnot-a-host\n").unwrap();
    let o = curec_cli(&["replay", job, "--out", p.to_str().unwrap(), "--processes", "2", "--hostfile"]);
    assert!(!o.status.success());
    let o = curec_cli(&[
        "replay",
        job,
        "--out",
        c.base.join("q").to_str().unwrap(),
        "--processes",
        "2",
        "--hostfile",
        hostfile.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("hosts:2: expected host:port"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Killed once its first snapshot is complete, then the same command again (1 worker).
    let b = c.base.join("b");
    let mut child = Command::new(env!("CARGO_BIN_EXE_curec"))
        .args(["replay", job, "--out", b.to_str().unwrap()])
        .env("CUREC_LOG", "warn")
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while snapshot::complete(&b.join("snapshots")).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(300), "no snapshot after 300 s");
        assert!(child.try_wait().unwrap().is_none(), "replay ended before the first snapshot");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!b.join("metrics.json").exists(), "the replay finished before it could be killed");
    let o = curec_cli(&["replay", job, "--out", b.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let db = final_snapshot(&b);
    same_state(&da, &db, "resumed (1 worker) vs uninterrupted (2 workers)");
    for f in ["policy/trainable.safetensors", "policy/optimizer.safetensors"] {
        assert!(read(&da.join(f)) == read(&db.join(f)), "{f}: resumed (1 worker) ≠ uninterrupted (2 workers)");
    }
    // The per-epoch log has each epoch once, as the uninterrupted run's.
    let epochs_of = |d: &Path| -> Vec<u64> {
        let text = String::from_utf8(read(&d.join("epochs.jsonl"))).unwrap();
        text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["epoch"].as_u64().unwrap()).collect()
    };
    assert_eq!(epochs_of(&b), (0..6).collect::<Vec<u64>>());
    assert_eq!(epochs_of(&a), (0..6).collect::<Vec<u64>>());
    let mb: Value = serde_json::from_slice(&read(&b.join("metrics.json"))).unwrap();
    assert_eq!(mb["ndcg@10"], m["ndcg@10"]);

    // The ablations write their variant.
    let o = curec_cli(&["replay", job, "--out", c.base.join("nc").to_str().unwrap(), "--no-correction"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let nc: Value = serde_json::from_slice(&read(&c.base.join("nc/metrics.json"))).unwrap();
    assert_eq!(nc["variant"], "no-correction");
    // Replay runs carry their per-user ranks, so `curec compare` pairs two variants user by user.
    let o = curec_cli(&["compare", a.to_str().unwrap(), c.base.join("nc").to_str().unwrap()]);
    let cmp = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "compare of two replay variants: {}", String::from_utf8_lossy(&o.stderr));
    assert!(cmp.contains("ndcg@10"), "compare prints the paired ndcg@10: {cmp}");

    // Ingest: a known user, a new user and a new item.
    let data = c.base.join("data");
    let ds = curec::data::prepared::read_dataset(&data).unwrap();
    // Items neither of the first two users holds (a positive the log already holds would be a
    // re-rating, not a new interaction).
    let held = |u: u32| {
        let mut h = ds.history(u, curec::data::Split::Test);
        h.push(ds.test[u as usize]);
        h
    };
    let fresh: Vec<u32> =
        (0..ds.n_items as u32).filter(|i| !held(0).contains(i) && !held(1).contains(i)).take(3).collect();
    assert_eq!(fresh.len(), 3, "the chain fixture leaves items unseen by users 0 and 1");
    let [f0, f1, f2] = [fresh[0], fresh[1], fresh[2]];
    let (u0, i0) = (&ds.users[0], &ds.items[f0 as usize].raw_id);
    let new = c.base.join("new.csv");
    std::fs::write(
        &new,
        format!("user,item,timestamp,rating\n{u0},{i0},2000000000,5\nnewbie,{i0},2000000001,4\n{u0},brand-new-item,2000000002,5\n"),
    )
    .unwrap();
    let line = ingest_ok(&a, &new, &[]);
    assert_eq!(
        (line["interactions"].as_u64(), line["new_users"].as_u64(), line["new_items"].as_u64()),
        (Some(3), Some(1), Some(1))
    );
    assert!(line["seconds"].as_f64().unwrap() > 0.0);
    let (e, dir) = snapshot::newest(&a.join("snapshots")).unwrap();
    assert!(e > 5, "ingest continues the epochs");
    let pats = curec::features::store::read_patterns_in(&dir).unwrap();
    let newbie = (ds.n_users) as u32;
    assert!(pats.iter().any(|p| p.user == newbie), "the new user has a first pattern");
    let reasons = curec::features::store::read_reasons_in(&dir).unwrap();
    assert!(reasons.iter().any(|r| r.item == ds.n_items as u32), "the new item has a reason list");
    let grown = &snapshot::manifest(&dir).unwrap()["grown"];
    assert_eq!(grown["users"], json!(["newbie"]));
    assert_eq!(grown["items"], json!(["brand-new-item"]));
    // Ingest with GRPO steps: the policy takes one step per slice (2 slices of 2 here).
    let step_of = |d: &Path| -> u64 {
        let v: Value = serde_json::from_slice(&read(&d.join("policy/state.json"))).unwrap();
        v["step"].as_u64().unwrap()
    };
    let before = step_of(&dir);
    let more = c.base.join("more.csv");
    std::fs::write(
        &more,
        format!("user,item,timestamp,rating\n{u0},{i1},2000000100,5\n{u1},{i1},2000000101,5\n{u1},{i0},2000000102,4\n{u0},{i2},2000000103,4\n",
            u1 = ds.users[1], i1 = ds.items[f1 as usize].raw_id, i2 = ds.items[f2 as usize].raw_id),
    )
    .unwrap();
    ingest_ok(&a, &more, &["--grpo"]);
    let (_, dir2) = snapshot::newest(&a.join("snapshots")).unwrap();
    assert_eq!(step_of(&dir2), before + 2);
    let m2 = snapshot::read_metrics(&dir2.join(snapshot::METRICS)).unwrap();
    assert!(m2.last().unwrap().reward_count > 0, "the ingest's GRPO step scored rewards");
    // The ingests keep the log true. The same file again is a reported no-op (no new epoch).
    let line = ingest_ok(&a, &more, &[]);
    assert_eq!((line["interactions"].as_u64(), line["duplicates"].as_u64()), (Some(0), Some(4)), "{line}");
    assert_eq!(snapshot::newest(&a.join("snapshots")).unwrap().1, dir2, "a no-op writes no snapshot");
    // A rating at or below prepare's threshold is dropped, a row older than its user's newest
    // interaction is late, and a new item takes its title and text from the file.
    let third = c.base.join("third.csv");
    std::fs::write(
        &third,
        format!(
            "user,item,timestamp,rating,title,text\nnewbie,{i2},2000000200,2,,\n{u1},{i2},1000,5,,\n{u1},shiny,2000000300,5,Shiny Movie (2031),A film about shine.\n",
            u1 = ds.users[1], i2 = ds.items[f2 as usize].raw_id
        ),
    )
    .unwrap();
    let line = ingest_ok(&a, &third, &[]);
    let counts: Vec<Option<u64>> =
        ["interactions", "filtered", "late", "duplicates", "new_items"].iter().map(|k| line[*k].as_u64()).collect();
    assert_eq!(counts, [Some(2), Some(1), Some(1), Some(0), Some(1)], "{line}");
    let (_, dir3) = snapshot::newest(&a.join("snapshots")).unwrap();
    let grown = &snapshot::manifest(&dir3).unwrap()["grown"];
    assert_eq!(grown["info"]["shiny"], json!(["Shiny Movie (2031)", "A film about shine."]));
    // Histories stay in event time, the late row included.
    let state = snapshot::State::load(&dir3, 100).unwrap();
    for (u, e) in &state.users {
        assert_eq!(e.times.len(), e.history.len());
        assert!(e.times.windows(2).all(|w| w[0] <= w[1]), "user {u}: history out of time order {:?}", e.times);
    }
    // Three ingests later the replay's own final snapshot is still there (the two newest and it).
    assert!(snapshot::manifest(&da).is_ok(), "the replay's final snapshot was pruned");
    assert_eq!(snapshot::complete(&a.join("snapshots")).len(), 3);
    // A torn newest manifest: the next reader falls back to the last complete snapshot.
    std::fs::write(dir3.join(snapshot::MANIFEST), b"{\"epoch\": 1").unwrap();
    assert_eq!(snapshot::newest(&a.join("snapshots")).unwrap().1, dir2);
    assert!(!dir3.exists(), "the torn snapshot is removed");
    // Recommendations read the updated state.
    let o = curec_cli(&["recommend", "--model-dir", a.to_str().unwrap(), "--user", u0, "-k", "3", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A user added by ingestion is served, from the items it was ingested with.
    let o = curec_cli(&["recommend", "--model-dir", a.to_str().unwrap(), "--user", "newbie", "-k", "3", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recs: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(recs.len(), 3);
    assert!(recs.iter().all(|r| r["item"] != json!(i0)), "an item the user has seen is not recommended");

    // Retractions (the newest complete snapshot is the second ingest's now): an `op = delete` of a
    // pair the log holds, a delete of a pair it never held, and a re-rating of a held pair.
    let (u1, i1) = (&ds.users[1], &ds.items[f1 as usize].raw_id);
    let (u1_id, i1_id) = (1u32, f1);
    let before = curec::recommend::Recommender::open(&a).unwrap().history(u1).unwrap();
    assert!(before.contains(i1), "the second ingest gave {u1} item {i1}");
    let had_reason = |d: &Path| {
        curec::features::store::read_reasons_in(d).unwrap().iter().any(|r| r.item == i1_id && r.user == u1_id)
    };
    assert!(had_reason(&dir2), "the second ingest wrote a reason for ({u1}, {i1})");
    let fourth = c.base.join("fourth.csv");
    std::fs::write(
        &fourth,
        format!("user,item,timestamp,rating,op\n{u1},{i1},2000000400,5,delete\n{u1},brand-new-item,2000000401,5,delete\n{u0},{i1},2000000402,5,\n{u0},{i1},2000000403,4,add\n"),
    )
    .unwrap();
    let line = ingest_ok(&a, &fourth, &[]);
    let counts: Vec<Option<u64>> =
        ["interactions", "retracted", "unmatched", "rerated"].iter().map(|k| line[*k].as_u64()).collect();
    assert_eq!(counts, [Some(0), Some(1), Some(1), Some(2)], "{line}");
    let (_, dir4) = snapshot::newest(&a.join("snapshots")).unwrap();
    assert!(!had_reason(&dir4), "the retracted interaction's reason left the item's list");
    let state = snapshot::State::load(&dir4, 100).unwrap();
    assert!(!state.users[&u1_id].history.contains(&i1_id), "the retracted item left the history in the state");
    let after = curec::recommend::Recommender::open(&a).unwrap().history(u1).unwrap();
    let mut expect = before.clone();
    expect.retain(|x| x != i1);
    assert_eq!(after, expect, "the retracted item left the served history, nothing else did");
    // The same file again: the retraction is a duplicate now, nothing changes.
    let line = ingest_ok(&a, &fourth, &[]);
    assert_eq!((line["interactions"].as_u64(), line["retracted"].as_u64()), (Some(0), Some(0)), "{line}");
    // `curec prepare` refuses deletes, naming the line; a bad op names its line too.
    let o = curec_cli(&["prepare", "--input", fourth.to_str().unwrap(), "--out", c.base.join("p4").to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("fourth.csv:2:") && e.contains("curec ingest"), "{e}");
    let bad = c.base.join("bad-op.csv");
    std::fs::write(&bad, format!("user,item,timestamp,rating,op\n{u1},{i1},2000000500,5,remove\n")).unwrap();
    let o = curec_cli(&["ingest", "--from", a.to_str().unwrap(), bad.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("bad-op.csv:2:") && e.contains("'remove'"), "{e}");
}

/// Every file under `dir`, relative, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// The bench contract: `curec bench replay --out` prints `per_worker_per_s`, leaves a run that
/// `curec ingest --from` accepts, and 2 processes × 1 worker leave the same snapshot files as 1
/// process × 2 workers.
#[test]
fn bench_replay_leaves_a_run_that_ingest_accepts_and_processes_change_no_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let size = ["--interactions", "20000", "--users", "500", "--items", "300", "--slice", "2000"];
    let bench = |out: &Path, extra: &[&str]| -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_curec"));
        c.args(["bench", "replay", "--snapshot-every", "3", "--out", out.to_str().unwrap()]).args(size).args(extra);
        c.env("CUREC_LOG", "warn");
        c
    };
    let one = tmp.path().join("one");
    let o = bench(&one, &["-w", "2"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(line["per_worker_per_s"].as_f64().unwrap() > 0.0, "{line}");
    assert_eq!(line["run"]["peers"], 2);

    let two = tmp.path().join("two");
    let outs = two_processes(&tmp.path().join("hosts"), |i| {
        bench(&two, &["-w", "1", "--processes", "2", "--process", &i.to_string()])
    });
    for (i, o) in outs.iter().enumerate() {
        let l: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!((l["processes"].as_u64(), l["process"].as_u64()), (Some(2), Some(i as u64)));
    }
    let (fa, fb) = (files_under(&one.join("snapshots")), files_under(&two.join("snapshots")));
    assert_eq!(fa, fb, "the same snapshot files");
    assert!(fa.iter().any(|f| f.ends_with("manifest.json")) && fa.len() > 10, "{fa:?}");
    for f in &fa {
        assert!(read(&one.join("snapshots").join(f)) == read(&two.join("snapshots").join(f)), "{}", f.display());
    }
    // The final snapshot holds every interaction and a pattern per user that had one.
    let (last, dir) = snapshot::newest(&one.join("snapshots")).unwrap();
    assert_eq!(last, 9);
    let m = snapshot::manifest(&dir).unwrap();
    assert_eq!(m["interactions"], 20000);
    assert_eq!(m["patterns"], 500);

    // Ingest into the bench run: the stand-in writes the texts.
    let file = tmp.path().join("new.csv");
    std::fs::write(
        &file,
        "user,item,timestamp,rating\n1,5,30000,5\nnewcomer,7,30001,5\n2,new-item,30002,5\n3,8,100,5\n",
    )
    .unwrap();
    let v = ingest_ok(&one, &file, &[]);
    assert_eq!(
        (&v["interactions"], &v["new_users"], &v["new_items"], &v["late"], &v["duplicates"]),
        (&json!(4), &json!(1), &json!(1), &json!(1), &json!(0)),
        "{v}"
    );
    let (e, dir) = snapshot::newest(&one.join("snapshots")).unwrap();
    assert_eq!(e, 10);
    assert_eq!(snapshot::manifest(&dir).unwrap()["interactions"], 20004);
    let v = ingest_ok(&one, &file, &[]);
    assert_eq!((&v["interactions"], &v["duplicates"]), (&json!(0), &json!(4)), "{v}");
    // A bench run has no LLM to train, and its --out is not written over.
    let o = curec_cli(&["ingest", "--from", one.to_str().unwrap(), file.to_str().unwrap(), "--grpo"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--grpo") && err.trim().lines().count() == 1, "{err}");
    let o = bench(&one, &["-w", "1"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("already holds a bench run"), "{err}");
}

#[test]
fn replay_and_ingest_errors_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let o = curec_cli(&["ingest", "--from", tmp.path().to_str().unwrap(), "x.csv"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("no complete snapshot"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    let job = tmp.path().join("j.toml");
    std::fs::write(&job, "[replay]\nslice_by = \"days\"\n").unwrap();
    let o = curec_cli(&["replay", job.to_str().unwrap(), "--out", tmp.path().join("r").to_str().unwrap()]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("replay.slice_by") && e.contains("days"), "{e}");
    std::fs::write(&job, "[replay]\nslices = 3\n").unwrap();
    let o = curec_cli(&["replay", job.to_str().unwrap(), "--out", tmp.path().join("r").to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("slices"), "{e}");
}

/// `curec serve`'s resident session (one dataflow kept up, batches fed as they come) ends in the
/// same snapshot, byte for byte, as the same batches ingested one-shot by `curec ingest`: new
/// users and items (with a title from the file), late rows, duplicates, the rating filter and a
/// retraction included.
#[test]
fn a_resident_session_writes_the_same_bytes_as_one_shot_ingests() {
    use curec::pipeline::session::{Rows, Session};
    use curec::replay::ingest_log::read_file;
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let o = curec_cli(&[
        "bench",
        "replay",
        "--interactions",
        "20000",
        "--users",
        "500",
        "--items",
        "300",
        "--slice",
        "2000",
        "--snapshot-every",
        "3",
        "-w",
        "2",
        "--out",
        a.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    curec::io::copy_dir(&a, &b).unwrap();
    let batch1 = tmp.path().join("batch1.csv");
    std::fs::write(
        &batch1,
        "user,item,timestamp,rating,title,text\n1,5,30000,5,,\nnewcomer,7,30001,5,,\n\
         2,new-item,30002,5,New Item (2026),A new item\n3,8,100,5,,\n",
    )
    .unwrap();
    let batch2 = tmp.path().join("batch2.csv");
    std::fs::write(
        &batch2,
        "user,item,timestamp,rating,op\n1,5,30000,5,add\nnewcomer,9,30010,5,add\n4,11,30011,2,add\n\
         2,new-item,30012,5,delete\nlate,12,50,5,add\n",
    )
    .unwrap();
    let one_shot = [ingest_ok(&a, &batch1, &["-w", "2"]), ingest_ok(&a, &batch2, &["-w", "2"])];

    let mut s = Session::open_resident(&b, Some(2)).unwrap();
    let rows = |f: &Path| {
        let (rows, info) = read_file(f).unwrap();
        Rows { rows, info }
    };
    let resident = [s.ingest(rows(&batch1), false).unwrap(), s.ingest(rows(&batch2), true).unwrap()];
    s.close().unwrap();
    for (o, r) in one_shot.iter().zip(&resident) {
        for k in ["interactions", "new_users", "new_items", "duplicates", "late", "retracted", "filtered", "slices"] {
            assert_eq!(o[k], r[k], "{k}: one-shot {o}, resident {r}");
        }
    }
    assert_eq!(
        (&resident[1]["duplicates"], &resident[1]["retracted"], &resident[1]["filtered"], &resident[1]["new_users"]),
        (&json!(1), &json!(1), &json!(1), &json!(1)),
        "{}",
        resident[1]
    );
    assert!(resident[0]["snapshot"].is_null(), "no snapshot without a checkpoint: {}", resident[0]);
    let (ea, da) = snapshot::newest(&a.join("snapshots")).unwrap();
    let (eb, db) = snapshot::newest(&b.join("snapshots")).unwrap();
    assert_eq!(ea, eb, "the same epochs");
    assert_eq!(resident[1]["snapshot"], json!(db.display().to_string()));
    let (fa, fb) = (files_under(&da), files_under(&db));
    assert_eq!(fa, fb);
    for f in &fa {
        assert!(read(&da.join(f)) == read(&db.join(f)), "{}", f.display());
    }
    let (ia, ib) = (files_under(&a.join("ingested")), files_under(&b.join("ingested")));
    assert_eq!(ia, ib);
    assert_eq!(ia.len(), 2, "{ia:?}");
    for f in &ia {
        assert!(read(&a.join("ingested").join(f)) == read(&b.join("ingested").join(f)), "{}", f.display());
    }
    // The new item kept the file's title.
    let m = snapshot::manifest(&db).unwrap();
    assert_eq!(m["grown"]["info"]["new-item"][0], "New Item (2026)", "{m}");
}

/// A corrector that panics (a bug, not an error it returns) fails the resident dataflow's batch
/// with an error instead of leaving the caller, or the other worker, waiting for it forever.
#[test]
fn a_resident_dataflow_reports_a_panicking_worker_instead_of_hanging() {
    use curec::replay::policy::EpochOutput;
    use curec::replay::resident::Resident;
    use curec::replay::{Annotated, EpochMetrics, Event};
    struct PanicsAtEpoch1;
    impl Corrector for PanicsAtEpoch1 {
        fn epoch(&mut self, epoch: u64, _: Vec<Annotated>) -> anyhow::Result<EpochOutput> {
            assert!(epoch != 1, "a corrector bug (this panic is expected by the test)");
            Ok(EpochOutput { updates: Vec::new(), metrics: EpochMetrics { epoch, ..Default::default() } })
        }
        fn save(&mut self, _: &Path) -> anyhow::Result<()> {
            Ok(())
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let board = Arc::new(Board::new(
        tmp.path().to_path_buf(),
        2,
        BTreeSet::new(),
        json!({"test": 1}),
        (0..4).map(|u| format!("u{u}")).collect(),
        (0..4).map(|i| format!("i{i}")).collect(),
        json!({}),
        Vec::new(),
        Box::new(|_, _| {}),
    ));
    let initial = Arc::new(Initial {
        state: State::default(),
        history_kept: 5,
        reasons_kept: 3,
        freeze: false,
        attach_reasons: false,
        single_policy: false,
    });
    let factory: CorrectorFactory =
        Arc::new(|_, _| -> anyhow::Result<Option<Box<dyn Corrector>>> { Ok(Some(Box::new(PanicsAtEpoch1))) });
    let ev = |k: u64| Event { key: k, user: (k % 4) as u32, item: 1, timestamp: k as i64, retract: false };
    let mut r = Resident::start(initial, factory, board, 2, 0).unwrap();
    let ok = r.apply(vec![(0, vec![ev(1), ev(2), ev(3), ev(4)])], false).unwrap();
    assert_eq!(ok.metrics.len(), 1);
    // Only worker 1 (user 1's) panics; worker 0 would wait for its progress forever. The batch
    // and the join run on a thread, so that a hang fails the test instead of stalling it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let err = r.apply(vec![(1, vec![ev(5)])], false).map(|_| ()).map_err(|e| format!("{e:#}"));
        drop(r); // joins the workers
        let _ = tx.send(err);
    });
    let err = rx.recv_timeout(Duration::from_secs(60)).expect("the resident dataflow hung after a worker panicked");
    assert!(err.as_ref().is_err_and(|e| e.contains("panicked")), "{err:?}");
}
