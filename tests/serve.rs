//! `curec serve` as a client sees it: recommendations with reasons, durable ingestion that new
//! users are served from, 4xx JSON errors naming the field, Prometheus metrics, the report, a
//! clean SIGTERM that ingests what is queued, and nothing acknowledged lost after `kill -9`.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::chain;
use serde_json::{json, Value};

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    /// A failing test leaves no server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(run: &Path, delay_ms: u64) -> Server {
    start_with(run, delay_ms, &[])
}

fn start_with(run: &Path, delay_ms: u64, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_curec"))
        .args(["serve", "--run", run.to_str().unwrap(), "--addr", "127.0.0.1:0"])
        .args(["--ingest-delay-ms", &delay_ms.to_string()])
        .args(extra)
        .env("CUREC_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("first line {line:?}: {e}"));
    Server { child, base: v["listening"].as_str().unwrap().to_string() }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().new_agent()
}

fn get(s: &Server, path: &str) -> (u16, String) {
    let mut r = agent().get(format!("{}{path}", s.base)).call().unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

fn post(s: &Server, body: &str) -> (u16, Value) {
    let mut r = agent()
        .post(format!("{}/v1/interactions", s.base))
        .header("content-type", "application/json")
        .send(body.as_bytes())
        .unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status} {text:?}: {e}")))
}

/// POST headers announcing a body of `len` bytes, and read the reply before sending any of it
/// (a server that refuses by Content-Length answers at once and closes; a client racing to
/// write the body would meet a broken pipe).
fn post_oversized(s: &Server, len: usize) -> (u16, Value) {
    use std::io::{Read, Write};
    let addr = s.base.trim_start_matches("http://");
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        c,
        "POST /v1/interactions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {len}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    let _ = c.read_to_string(&mut reply); // the server may reset after replying
    let status = reply.split(' ').nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{reply:?}: {e}")))
}

fn metric(s: &Server, name: &str) -> f64 {
    let (_, text) = get(s, "/metrics");
    text.lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.split(' ').nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

/// Wait until `n` interactions are ingested (the worker runs the ingest dataflow with the LLM).
fn wait_ingested(s: &Server, n: f64) {
    let t0 = Instant::now();
    while metric(s, "curec_interactions_ingested_total") < n {
        assert!(t0.elapsed() < Duration::from_secs(300), "not ingested after 300 s");
        assert!(metric(s, "curec_ingest_errors_total") == 0.0, "an ingest failed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn recs(s: &Server, user: &str) -> Vec<Value> {
    let (status, body) = get(s, &format!("/v1/users/{user}/recommendations?k=3"));
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["user"], json!(user));
    v["items"].as_array().unwrap().clone()
}

/// `curec recommend --json` for a user of the run (it must succeed).
fn cli_recs(run: &Path, user: &str, k: usize) -> Vec<Value> {
    let o = Command::new(env!("CARGO_BIN_EXE_curec"))
        .args(["recommend", "--model-dir", run.to_str().unwrap(), "--user", user, "-k", &k.to_string(), "--json"])
        .env("CUREC_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn terminate(mut s: Server) {
    // SIGTERM, then wait for a clean exit.
    let pid = s.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let t0 = Instant::now();
    loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            assert!(st.success(), "serve exited with {st} after SIGTERM");
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "serve did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_recommends_ingests_durably_and_stops_cleanly() {
    let c = chain();
    let run = c.base.join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_curec"))
        .args(["replay", c.job.to_str().unwrap(), "--out", run.to_str().unwrap()])
        .env("CUREC_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ds = curec::data::prepared::read_dataset(&c.base.join("data")).unwrap();
    let (u0, i0) = (ds.users[0].clone(), ds.items[0].raw_id.clone());

    let s = start(&run, 100);
    assert_eq!(get(&s, "/healthz").0, 200);
    // Recommendations: k items the user has not seen, each with its reasons and weights.
    let items = recs(&s, &u0);
    assert_eq!(items.len(), 3);
    assert!(items.iter().all(|i| i["reasons"].is_array() && i["score"].is_number() && i["title"].is_string()));
    // The tiny chain writes reasons for a few items only: among many items some carry theirs.
    let (_, body) = get(&s, &format!("/v1/users/{u0}/recommendations?k=1000&reasons=2"));
    let many: Value = serde_json::from_str(&body).unwrap();
    let with: Vec<&Value> =
        many["items"].as_array().unwrap().iter().filter(|i| !i["reasons"].as_array().unwrap().is_empty()).collect();
    assert!(!with.is_empty(), "no item with reasons");
    for i in with {
        let r = i["reasons"].as_array().unwrap();
        assert!(
            r.len() <= 2
                && r.iter()
                    .all(|x| x["text"].is_string() && x["weight"].as_f64().is_some_and(|w| (0.0..=1.0).contains(&w))),
            "{i}"
        );
    }
    // The same answer as the CLI.
    let cli = cli_recs(&run, &u0, 3);
    assert_eq!(
        cli.iter().map(|r| &r["item"]).collect::<Vec<_>>(),
        items.iter().map(|r| &r["item"]).collect::<Vec<_>>()
    );

    // Requests that arrive together share a ranking pass; each gets the answer it gets alone.
    let users: Vec<String> = ds.users.iter().take(12).cloned().collect();
    let alone: Vec<Vec<Value>> = users.iter().map(|u| recs(&s, u)).collect();
    for _ in 0..3 {
        let together: Vec<Vec<Value>> = std::thread::scope(|sc| {
            let hs: Vec<_> = users.iter().rev().map(|u| sc.spawn(|| recs(&s, u))).collect();
            hs.into_iter().rev().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(alone, together, "an answer depends on the requests ranked with it");
    }
    assert!(metric(&s, "curec_rank_passes_total") <= metric(&s, "curec_ranked_requests_total"));
    {
        // The library call behind it: a batch with an unknown user in it answers the others.
        let r = curec::recommend::Recommender::open(&run).unwrap();
        let mut queries: Vec<curec::recommend::Query> =
            users.iter().map(|u| curec::recommend::Query { user: u.clone(), k: 3, n_reasons: 3 }).collect();
        queries.insert(5, curec::recommend::Query { user: "nobody-at-all".into(), k: 3, n_reasons: 3 });
        let answers = r.recommend_many(&queries);
        assert!(answers[5].as_ref().is_err_and(|e| e.to_string().contains("nobody-at-all")));
        let ok: Vec<Value> = answers
            .into_iter()
            .enumerate()
            .filter(|(i, _)| *i != 5)
            .map(|(_, a)| {
                // Through text, as the service sends it and the client parses it.
                serde_json::from_str(&json!({ "items": a.unwrap() })["items"].to_string()).unwrap()
            })
            .collect();
        assert_eq!(ok, alone.iter().map(|a| json!(a)).collect::<Vec<_>>());
    }
    let first_pick = items[0]["item"].clone();
    // u0's oldest item, retracted by the POST below.
    let retracted = ds.items[ds.train[0][0] as usize].raw_id.clone();
    let late_pick = items[1]["item"].clone();

    // Bad requests: 4xx with a JSON body naming the field.
    let field = |status: u16, body: &str| -> Value {
        let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{status} {body:?}: {e}"));
        v["field"].clone()
    };
    let (st, b) = get(&s, &format!("/v1/users/{u0}/recommendations?k=0"));
    assert_eq!((st, field(st, &b)), (400, json!("k")), "{b}");
    let (st, b) = get(&s, &format!("/v1/users/{u0}/recommendations?k=abc"));
    assert_eq!((st, field(st, &b)), (400, json!("k")), "{b}");
    let (st, b) = get(&s, "/v1/users/nobody-at-all/recommendations");
    assert_eq!((st, field(st, &b)), (404, json!("id")), "{b}");
    let (st, v) = post(&s, "{not json");
    assert_eq!((st, v["field"].clone()), (400, json!("body")), "{v}");
    let (st, v) = post(&s, &json!([{"user": "x", "item": "y", "timestamp": 5}]).to_string());
    assert_eq!((st, v["field"].clone()), (400, json!("[0].rating")), "{v}");
    let (st, v) = post(&s, &json!([{"user": "x", "item": 3.5, "timestamp": 5, "rating": 4}]).to_string());
    assert_eq!((st, v["field"].clone()), (400, json!("[0].item")), "{v}");
    let (st, v) = post(&s, &json!([{"user": "x", "item": "y", "timestamp": "soon", "rating": 4}]).to_string());
    assert_eq!((st, v["field"].clone()), (400, json!("[0].timestamp")), "{v}");
    let (st, v) = post(&s, &json!([{"user": "x", "item": "y", "timestamp": 5, "rating": 4, "colour": 1}]).to_string());
    assert_eq!((st, v["field"].clone()), (400, json!("[0].colour")), "{v}");
    let (st, v) =
        post(&s, &json!([{"user": "x", "item": "y", "timestamp": 5, "rating": 4, "op": "remove"}]).to_string());
    assert_eq!((st, v["field"].clone()), (400, json!("[0].op")), "{v}");
    let (st, v) = post_oversized(&s, 2 << 20);
    assert_eq!((st, v["field"].clone()), (413, json!("body")), "{v}");
    let (st, b) = get(&s, "/no/such/route");
    assert_eq!(st, 404, "{b}");
    assert!(serde_json::from_str::<Value>(&b).is_ok(), "{b}");
    assert_eq!(metric(&s, "curec_interactions_accepted_total"), 0.0, "a bad request was accepted");

    // Ingestion: acknowledged once durable; the new user is served afterwards.
    let body = json!([
        {"user": "newbie", "item": i0, "timestamp": 2_000_000_001i64, "rating": 5},
        {"user": u0.parse::<u64>().map(|n| json!(n)).unwrap_or(json!(u0)), "item": first_pick, "timestamp": 2_000_000_002i64, "rating": 4.5},
        {"user": u0.clone(), "item": late_pick, "timestamp": 1, "rating": 5},
        {"user": u0.clone(), "item": retracted.clone(), "timestamp": 2_000_000_003i64, "rating": 5, "op": "delete"}
    ]);
    let (st, v) = post(&s, &body.to_string());
    assert_eq!((st, v["accepted"].clone(), v["seq"].clone()), (202, json!(4), json!(1)), "{v}");
    wait_ingested(&s, 3.0);
    // Event time: the late interaction (1970) opens u0's history, the new one closes it; the
    // retracted item is gone.
    let h = curec::recommend::Recommender::open(&run).unwrap().history(&u0).unwrap();
    assert_eq!(h.len(), ds.history(0, curec::data::Split::Test).len() + 3 - 1, "{h:?}");
    assert!(!h.contains(&retracted), "{h:?}");
    assert_eq!((json!(h[0]), json!(h[h.len() - 1])), (late_pick.clone(), first_pick.clone()), "{h:?}");
    let newbie = recs(&s, "newbie");
    assert_eq!(newbie.len(), 3);
    assert!(newbie.iter().all(|r| r["item"] != json!(i0)), "an item the user has seen is recommended");
    // u0's history changed: the service ranks from the new one (as the CLI, which loads afresh).
    let after = recs(&s, &u0);
    assert!(after.iter().all(|r| r["item"] != first_pick && r["item"] != late_pick), "u0's new items are recommended");
    let cli = cli_recs(&run, &u0, 3);
    // The CLI prints f32 scores shortest, the service as f64: equal as f32.
    let key = |r: &Value| (r["item"].clone(), r["score"].as_f64().unwrap() as f32, r["reasons"].clone());
    assert_eq!(cli.iter().map(key).collect::<Vec<_>>(), after.iter().map(key).collect::<Vec<_>>());
    let (_, text) = get(&s, "/metrics");
    assert!(text.contains("curec_http_requests_total{route=\"/v1/users/{id}/recommendations\",status=\"200\"}"));
    assert!(text.contains("curec_http_request_seconds_bucket{route=\"/v1/interactions\",le=\"+Inf\"}"));
    assert!(metric(&s, "curec_users") > ds.n_users as f64);
    let (st, page) = get(&s, "/");
    assert_eq!(st, 200);
    assert!(page.contains("<html") && page.contains("<svg"), "the report");
    terminate(s);

    // kill -9 right after an acknowledgement (the worker waits a minute for more rows, so the
    // row is only in the log): the next start ingests it.
    let s = start(&run, 60_000);
    let (st, v) =
        post(&s, &json!([{"user": "late-bird", "item": i0, "timestamp": 2_000_000_100i64, "rating": 5}]).to_string());
    assert_eq!((st, v["seq"].clone()), (202, json!(2)), "{v}");
    let mut s = s;
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    drop(s);
    assert_eq!(std::fs::read_to_string(run.join("serve/applied")).unwrap().trim(), "1");
    let s = start(&run, 100);
    wait_ingested(&s, 1.0);
    assert_eq!(recs(&s, "late-bird").len(), 3);
    assert_eq!(get(&s, "/v1/users/newbie/recommendations").0, 200, "earlier ingests are kept");

    // SIGTERM with a row still queued: it is ingested (a new snapshot) before the exit.
    let snapshots = |run: &Path| curec::replay::snapshot::complete(&run.join("snapshots")).last().unwrap().0;
    terminate(s);
    let before = snapshots(&run);
    let s = start(&run, 60_000);
    let (st, v) =
        post(&s, &json!([{"user": "term-user", "item": i0, "timestamp": 2_000_000_200i64, "rating": 5}]).to_string());
    assert_eq!((st, v["seq"].clone()), (202, json!(3)), "{v}");
    terminate(s);
    assert_eq!(std::fs::read_to_string(run.join("serve/applied")).unwrap().trim(), "3");
    assert!(snapshots(&run) > before, "no snapshot written at SIGTERM");
    assert_eq!(cli_recs(&run, "term-user", 2).len(), 2);

    // The load benchmark: one JSON line with the contract's keys; the run itself is untouched.
    let applied = std::fs::read_to_string(run.join("serve/applied")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_curec"))
        .args(["bench", "serve", "--run", run.to_str().unwrap(), "--clients", "2", "--seconds", "0.5"])
        .env("CUREC_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in ["recommend_rps", "recommend_p99_ms", "ingest_per_s"] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k}: {v}");
    }
    assert_eq!(v["recommendations"]["errors"], 0, "{v}");
    assert_eq!(v["ingestion"]["errors"], 0, "{v}");
    assert_eq!(std::fs::read_to_string(run.join("serve/applied")).unwrap(), applied, "the bench wrote to the run");

    // Checkpoints a minute apart: an ingested batch lives in the resident dataflow only (no
    // snapshot, `applied` unmoved); kill -9 then loses nothing (the next start ingests it again
    // from the log), a checkpoint interval that passes writes the snapshot the recommendations
    // read, and SIGTERM checkpoints what is in memory before the exit.
    let applied = |run: &Path| std::fs::read_to_string(run.join("serve/applied")).unwrap().trim().to_string();
    let before = snapshots(&run);
    let s = start_with(&run, 100, &["--checkpoint-every-ms", "60000"]);
    let row = |user: &str, ts: i64| json!([{"user": user, "item": i0, "timestamp": ts, "rating": 5}]).to_string();
    assert_eq!(post(&s, &row("mem-user", 2_000_000_300)).1["seq"], json!(4));
    wait_ingested(&s, 1.0);
    assert_eq!((applied(&run).as_str(), snapshots(&run)), ("3", before), "a checkpoint before its time");
    assert_eq!((metric(&s, "curec_interactions_uncheckpointed"), metric(&s, "curec_checkpoints_total")), (1.0, 0.0));
    assert_eq!(get(&s, "/v1/users/mem-user/recommendations").0, 404, "served before its checkpoint");
    let mut s = s;
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    drop(s);
    let s = start_with(&run, 100, &["--checkpoint-every-ms", "300"]);
    let t0 = Instant::now();
    while get(&s, "/v1/users/mem-user/recommendations").0 != 200 {
        assert!(t0.elapsed() < Duration::from_secs(120), "mem-user not served after its checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(applied(&run), "4");
    assert!(snapshots(&run) > before, "no snapshot at the checkpoint");
    assert_eq!(metric(&s, "curec_interactions_uncheckpointed"), 0.0);
    assert!(metric(&s, "curec_checkpoints_total") >= 1.0);
    terminate(s);
    let s = start_with(&run, 100, &["--checkpoint-every-ms", "60000"]);
    assert_eq!(post(&s, &row("term-mem", 2_000_000_400)).1["seq"], json!(5));
    wait_ingested(&s, 1.0);
    terminate(s);
    assert_eq!(applied(&run), "5", "SIGTERM did not checkpoint");
    assert_eq!(cli_recs(&run, "term-mem", 2).len(), 2);
}

#[test]
fn a_train_run_serves_recommendations_and_refuses_ingestion_with_409() {
    let s = common::setup();
    let run = s.base.join("sasrec");
    let mut cfg = curec::config::JobConfig::default();
    cfg.sasrec.max_len = 20;
    cfg.sasrec.max_epochs = 1;
    cfg.train.bootstrap = 20;
    curec::pipeline::stages::train(curec::rec::ModelKind::Sasrec, &s.data, &run, &cfg).unwrap();
    let ds = curec::data::prepared::read_dataset(&s.data).unwrap();
    let srv = start(&run, 100);
    assert_eq!(recs(&srv, &ds.users[3]).len(), 3);
    let (st, v) = post(&srv, &json!([{"user": "x", "item": "y", "timestamp": 5, "rating": 4}]).to_string());
    assert_eq!(st, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("not a replay run"), "{v}");
    terminate(srv);
}
