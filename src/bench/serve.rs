//! `curec bench serve`: a bounded loopback load against the service. The run directory is
//! copied to a temporary folder (ingestion writes to it), served on an ephemeral port in this
//! process, and `clients` threads send requests for `seconds` each in three phases:
//! recommendations only, ingestion only (`rows_per_post` interactions per POST), and a mix (one
//! POST in ten). Prints one JSON line: `recommend_rps`, `recommend_p99_ms`, `ingest_per_s`
//! (interactions acknowledged per second), and requests/s and p50/p99 latency per phase. The ingest worker runs
//! during the load as it would in service, so the ingestion and mix phases include its work on
//! the same cores. What is still queued at the end is not ingested (the copy is removed).

use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

use crate::serve::App;

#[derive(Debug, Clone)]
pub struct ServeBench {
    pub run: PathBuf,
    pub clients: usize,
    pub seconds: f64,
    pub k: usize,
    /// Interactions per POST in the ingestion and mix phases.
    pub rows_per_post: usize,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// One phase: `clients` threads for `seconds`; `post_every` = 0 never posts, 1 always, n one in n.
fn phase(base: &str, users: &[String], items: &[String], b: &ServeBench, post_every: usize, ts0: i64) -> Value {
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..b.clients)
        .map(|c| {
            let (base, users, items, stop) = (base.to_string(), users.to_vec(), items.to_vec(), stop.clone());
            let (k, per_post) = (b.k, b.rows_per_post.max(1));
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
                let mut lat: Vec<(bool, f64)> = Vec::new();
                let mut errors = 0u64;
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let u = &users[(c * 7919 + n * 104729) % users.len()];
                    let post = post_every > 0 && n.is_multiple_of(post_every);
                    let t = Instant::now();
                    let ok = if post {
                        let rows: Vec<Value> = (0..per_post)
                            .map(|r| {
                                let i = &items[(c * 31 + n * 17 + r * 13) % items.len()];
                                let ts = ts0 + ((c * 1_000_000 + n) * per_post + r) as i64;
                                json!({"user": u, "item": i, "timestamp": ts, "rating": 5})
                            })
                            .collect();
                        let body = Value::Array(rows).to_string();
                        agent
                            .post(format!("{base}/v1/interactions"))
                            .header("content-type", "application/json")
                            .send(body.as_bytes())
                            .map(|r| r.status().as_u16() == 202)
                            .unwrap_or(false)
                    } else {
                        agent
                            .get(format!("{base}/v1/users/{u}/recommendations?k={k}"))
                            .call()
                            .and_then(|mut r| {
                                let ok = r.status().as_u16() == 200;
                                r.body_mut().read_to_string().map(|_| ok)
                            })
                            .unwrap_or(false)
                    };
                    if ok {
                        lat.push((post, t.elapsed().as_secs_f64()));
                    } else {
                        errors += 1;
                    }
                    n += 1;
                }
                (lat, errors)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(b.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<(bool, f64)> = Vec::new();
    let mut errors = 0;
    for h in handles {
        if let Ok((l, e)) = h.join() {
            all.extend(l);
            errors += e;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let summary = |sel: &dyn Fn(bool) -> bool| -> Value {
        let mut v: Vec<f64> = all.iter().filter(|(p, _)| sel(*p)).map(|(_, s)| s * 1e3).collect();
        v.sort_by(f64::total_cmp);
        json!({"requests": v.len(), "requests_per_s": v.len() as f64 / secs,
               "p50_ms": quantile(&v, 0.5), "p99_ms": quantile(&v, 0.99)})
    };
    let mut out = summary(&|_| true);
    out["errors"] = json!(errors);
    let posts = all.iter().filter(|(p, _)| *p).count();
    out["interactions_per_s"] = json!((posts * b.rows_per_post.max(1)) as f64 / secs);
    if post_every > 1 {
        out["recommendations"] = summary(&|p| !p);
        out["ingestion"] = summary(&|p| p);
    }
    out
}

pub fn run(b: &ServeBench) -> Result<Value> {
    anyhow::ensure!(b.clients >= 1, "--clients: expected at least 1");
    anyhow::ensure!(b.seconds > 0.0 && b.seconds <= 600.0, "--seconds: expected more than 0 and at most 600");
    let tmp = std::env::temp_dir().join(format!("curec-bench-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    crate::io::copy_dir(&b.run, &tmp)?;
    let result = (|| -> Result<Value> {
        let app = App::open(&tmp)?;
        let (users, items) = {
            let r = app.recommender();
            let r = r.lock().unwrap_or_else(|p| p.into_inner());
            (r.user_ids(), r.item_ids())
        };
        let worker = {
            let app = app.clone();
            std::thread::spawn(move || app.ingest_worker(Duration::from_millis(200), Duration::ZERO))
        };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(
            axum::serve(listener, crate::serve::router(app.clone()))
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .into_future(),
        );
        let base = format!("http://{addr}");
        let ts0 = 4_000_000_000i64;
        let rec = phase(&base, &users, &items, b, 0, ts0);
        let ing = phase(&base, &users, &items, b, 1, ts0 + 100_000_000);
        let mix = phase(&base, &users, &items, b, 10, ts0 + 200_000_000);
        let _ = tx.send(());
        let _ = rt.block_on(server);
        // The copy is thrown away: no need to ingest what is still queued. An ingest already
        // running (the LLM writing reasons for a large batch) is not waited for: it ends with
        // the process.
        app.halt();
        drop(worker);
        Ok(json!({
            "bench": "serve", "clients": b.clients, "seconds_per_phase": b.seconds, "k": b.k,
            "users": users.len(), "items": items.len(),
            "recommend_rps": rec["requests_per_s"], "recommend_p99_ms": rec["p99_ms"],
            "ingest_per_s": ing["interactions_per_s"], "rows_per_post": b.rows_per_post,
            "recommendations": rec, "ingestion": ing, "mix": mix,
            "ingested_during_bench": app.metrics.ingested(),
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        }))
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}
