//! `curec serve`: a trained run behind HTTP (axum on tokio).
//!
//! - `GET /v1/users/{id}/recommendations?k=10&reasons=3`: the top-k unseen items with scores and
//!   their matched reasons with attention weights (the same [`Recommender`] as `curec recommend`,
//!   loaded once);
//! - `POST /v1/interactions`: a JSON array of `{user, item, timestamp, rating[, title, text, op]}`
//!   (ids as JSON numbers or strings). The reply comes once the rows are in the fsynced
//!   write-ahead log ([`wal`]); an ingest worker then puts them through the same operators as
//!   `curec ingest` (the replay's dataflow from its newest snapshot, which writes a new
//!   snapshot) and swaps in a recommender that serves the new users and items;
//! - `GET /healthz`, `GET /metrics` (Prometheus text), and the run's report at `/`.
//!
//! Bad requests get a 4xx JSON body naming the field and what was expected; bodies over
//! [`MAX_BODY`] get 413. SIGTERM or Ctrl-C stops accepting, finishes the requests in flight,
//! ingests what the log still holds (a new snapshot), and exits. A restart, also after
//! `kill -9`, ingests every acknowledged entry the last run had not applied.

pub mod metrics;
pub mod wal;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use crate::pipeline::session::{Rows, Session};
use crate::recommend::{Query as RecQuery, Recommendation, Recommender};
use metrics::Metrics;
use wal::{Entry, Row, Wal};

/// Largest request body, bytes.
pub const MAX_BODY: usize = 1 << 20;
/// Largest `k` a recommendation request may ask for.
pub const MAX_K: usize = 1000;
/// Most recommendation requests ranked in one pass.
pub const MAX_RANK_BATCH: usize = 64;

/// A recommendation request waiting for the ranker, and where its answer goes.
/// The answer is `None` for a user the recommender does not know.
type RankJob = (RecQuery, tokio::sync::oneshot::Sender<Result<Option<Vec<Recommendation>>, ApiError>>);

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub run: PathBuf,
    pub addr: SocketAddr,
    /// How long the ingest worker waits for more rows after the first pending one.
    pub ingest_delay: Duration,
    /// How long ingested batches may stay in memory only (zero: a checkpoint after each).
    pub checkpoint_every: Duration,
}

/// What the handlers share.
pub struct App {
    run: PathBuf,
    recommender: RwLock<Arc<Mutex<Recommender>>>,
    wal: Mutex<Option<Wal>>,
    /// Acknowledged entries not yet ingested, and whether the service is stopping.
    queue: Mutex<(Vec<Entry>, bool)>,
    /// Stop without ingesting what is queued (the benchmark's throwaway copy).
    halted: std::sync::atomic::AtomicBool,
    wake: Condvar,
    pub(crate) metrics: Metrics,
    report: Mutex<Option<String>>,
    /// Why this run cannot ingest (no replay snapshot), if it cannot.
    no_ingest: Option<String>,
    /// Requests to the ranker thread; `None` once stopping.
    rank_tx: Mutex<Option<std::sync::mpsc::Sender<RankJob>>>,
}

/// An error reply: status and a JSON body `{"error", "field"?, "expected"?}`.
struct ApiError(StatusCode, Value);

impl ApiError {
    fn field(status: StatusCode, field: &str, expected: &str, error: impl Into<String>) -> Self {
        Self(status, json!({"error": error.into(), "field": field, "expected": expected}))
    }
    fn plain(status: StatusCode, error: impl Into<String>) -> Self {
        Self(status, json!({"error": error.into()}))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(self.1)).into_response()
    }
}

impl App {
    /// Load the run, open its log and queue what the log holds beyond the last ingest.
    pub fn open(run: &Path) -> Result<Arc<Self>> {
        let recommender = Recommender::open(run)?;
        let t0 = Instant::now();
        let (computed, _) = recommender.warm(None)?;
        if computed > 0 {
            tracing::info!("user states ready: {computed} users in {:.1} s", t0.elapsed().as_secs_f64());
        }
        let no_ingest = match crate::replay::snapshot::newest(&run.join("snapshots")) {
            Some(_) => None,
            None => Some(format!(
                "{}: not a replay run (no snapshot), so it cannot ingest; serve a `curec replay` run to ingest",
                run.display()
            )),
        };
        let (wal, pending) = match no_ingest {
            None => {
                let (w, p) = Wal::open(run)?;
                (Some(w), p)
            }
            Some(_) => (None, Vec::new()),
        };
        let metrics = Metrics::default();
        let (u, i) = recommender.sizes();
        metrics.sizes(u, i);
        let rows: u64 = pending.iter().map(|e| e.rows.len() as u64).sum();
        metrics.restore_pending(rows);
        if rows > 0 {
            tracing::info!("{} acknowledged rows in the log are not ingested yet: ingesting them", rows);
        }
        let (rank_tx, rank_rx) = std::sync::mpsc::channel::<RankJob>();
        let app = Arc::new(Self {
            run: run.to_path_buf(),
            recommender: RwLock::new(Arc::new(Mutex::new(recommender))),
            wal: Mutex::new(wal),
            queue: Mutex::new((pending, false)),
            halted: std::sync::atomic::AtomicBool::new(false),
            wake: Condvar::new(),
            metrics,
            report: Mutex::new(None),
            no_ingest,
            rank_tx: Mutex::new(Some(rank_tx)),
        });
        let weak = Arc::downgrade(&app);
        std::thread::Builder::new()
            .name("curec-rank".into())
            .spawn(move || ranker(weak, rank_rx))
            .context("cannot start the ranking thread")?;
        Ok(app)
    }

    /// Rank for one request: queued with the others that arrive meanwhile, answered by one pass.
    async fn rank(&self, query: RecQuery) -> Result<Option<Vec<Recommendation>>, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let unavailable = || ApiError::plain(StatusCode::SERVICE_UNAVAILABLE, "the service is stopping");
        {
            let guard = self.rank_tx.lock().unwrap_or_else(|p| p.into_inner());
            guard.as_ref().ok_or_else(unavailable)?.send((query, tx)).map_err(|_| unavailable())?;
        }
        rx.await.map_err(|_| unavailable())?
    }

    pub(crate) fn recommender(&self) -> Arc<Mutex<Recommender>> {
        self.recommender.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The ingest worker: waits for acknowledged entries and puts them, batch by batch, through
    /// a resident session (the replay's dataflow kept up from the run's newest snapshot). A
    /// checkpoint (a snapshot, the log's `applied` mark moved, and a fresh recommender that
    /// serves the new users, items and histories) follows every batch when `checkpoint_every` is
    /// zero, else once that long has passed since the first batch after the last one (waiting for
    /// no new batch), and always before the service stops. Returns when the service stops and the
    /// queue is empty.
    pub fn ingest_worker(self: &Arc<Self>, delay: Duration, checkpoint_every: Duration) {
        let mut w =
            IngestWorker { session: None, uncheckpointed: Vec::new(), dirty_since: None, snapshot_seconds: 0.0 };
        loop {
            let batch: Vec<Entry> = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                while q.0.is_empty() && !q.1 {
                    match w.dirty_since {
                        // Batches in memory only: wake for their checkpoint.
                        Some(t0) => {
                            let left = checkpoint_every.saturating_sub(t0.elapsed());
                            if left.is_zero() {
                                break;
                            }
                            q = self.wake.wait_timeout(q, left).unwrap_or_else(|p| p.into_inner()).0;
                        }
                        None => q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner()),
                    }
                }
                if self.halted.load(std::sync::atomic::Ordering::Relaxed) {
                    return; // the benchmark's copy: nothing more is ingested or checkpointed
                }
                if q.0.is_empty() {
                    let stopping = q.1;
                    drop(q);
                    if w.dirty_since.is_some() {
                        self.checkpoint(&mut w);
                    }
                    if stopping {
                        if let Some(s) = w.session.take() {
                            if let Err(e) = s.close() {
                                tracing::error!("closing the ingest dataflow: {e:#}");
                            }
                        }
                        return;
                    }
                    continue;
                }
                if !q.1 {
                    // Let a burst of requests gather into one ingest.
                    let (g, _) = self.wake.wait_timeout(q, delay).unwrap_or_else(|p| p.into_inner());
                    q = g;
                }
                std::mem::take(&mut q.0)
            };
            let rows: u64 = batch.iter().map(|e| e.rows.len() as u64).sum();
            let t0 = Instant::now();
            let checkpoint = checkpoint_every.is_zero();
            match self.ingest(&mut w, &batch, checkpoint) {
                Ok(v) => {
                    let n = v["interactions"].as_u64().unwrap_or(0);
                    w.uncheckpointed.extend(batch);
                    // With a checkpoint after every batch, the batch counts as ingested once it
                    // is served (the recommender swapped in), as before the resident session.
                    if checkpoint {
                        self.checkpointed(&mut w);
                    }
                    self.metrics.ingest(rows, n, t0.elapsed().as_secs_f64(), true);
                    tracing::info!(
                        "ingested {rows} rows ({n} new interactions) in {:.3} s",
                        t0.elapsed().as_secs_f64()
                    );
                    if !checkpoint && w.dirty_since.get_or_insert_with(Instant::now).elapsed() >= checkpoint_every {
                        // Batches that keep coming (the queue never empty) still get checkpoints.
                        self.checkpoint(&mut w);
                    }
                }
                Err(e) => {
                    // The entries stay in the log (not applied): a restart retries them. The
                    // dataflow may be half-way through the batch: it is dropped, and the next
                    // batch starts one from the newest snapshot, after the batches since it.
                    self.metrics.ingest(rows, 0, t0.elapsed().as_secs_f64(), false);
                    tracing::error!("ingest failed, the rows stay in the log for the next start: {e:#}");
                    w.session = None;
                }
            }
        }
    }

    /// Put one batch through the session (opened, and caught up with the batches it lost after
    /// a failure, when there is none), with a snapshot after it when `checkpoint`.
    fn ingest(&self, w: &mut IngestWorker, batch: &[Entry], checkpoint: bool) -> Result<Value> {
        if w.session.is_none() {
            let mut s = Session::open_resident(&self.run, None)?;
            for e in &w.uncheckpointed {
                s.ingest(rows_of(&self.run, std::slice::from_ref(e))?, false)?;
            }
            w.session = Some(s);
        }
        let s = w.session.as_mut().expect("opened above");
        s.ingest(rows_of(&self.run, batch)?, checkpoint)
    }

    /// A snapshot of the session's state now, then what follows one.
    fn checkpoint(&self, w: &mut IngestWorker) {
        let t0 = Instant::now();
        let r = match w.session.as_mut() {
            Some(s) => s.checkpoint().map(|_| ()),
            None => Err(anyhow::anyhow!("no ingest dataflow (an earlier batch failed)")),
        };
        match r {
            Ok(()) => {
                tracing::info!("checkpoint in {:.3} s", t0.elapsed().as_secs_f64());
                w.snapshot_seconds = t0.elapsed().as_secs_f64();
                self.checkpointed(w);
            }
            Err(e) => {
                tracing::error!("checkpoint failed, the rows stay in the log for the next start: {e:#}");
                w.session = None;
                w.dirty_since = None;
            }
        }
    }

    /// After a snapshot covering every batch so far: the log's `applied` mark, and a fresh
    /// recommender that reads the new snapshot.
    fn checkpointed(&self, w: &mut IngestWorker) {
        let last = w.uncheckpointed.last().map(|e| e.seq);
        w.uncheckpointed.clear();
        w.dirty_since = None;
        let r = (|| -> Result<()> {
            if let Some(last) = last {
                wal::set_applied(&self.run, last)?;
            }
            self.metrics.checkpoint(w.snapshot_seconds);
            let fresh = Recommender::open(&self.run)?;
            let old = self.recommender().lock().unwrap_or_else(|p| p.into_inner()).states();
            let (computed, carried) = fresh.warm(Some(&old))?;
            tracing::debug!("user states: {computed} computed, {carried} carried over");
            let (u, i) = fresh.sizes();
            self.metrics.sizes(u, i);
            *self.recommender.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Mutex::new(fresh));
            *self.report.lock().unwrap_or_else(|p| p.into_inner()) = None;
            Ok(())
        })();
        if let Err(e) = r {
            tracing::error!("after the checkpoint: {e:#}");
        }
        w.snapshot_seconds = 0.0;
    }

    /// Stop the worker after its current ingest, leaving the queue in the log (for a restart).
    pub fn halt(&self) {
        self.halted.store(true, std::sync::atomic::Ordering::Relaxed);
        self.stop();
    }

    /// Stop: the ranker answers what is queued, the worker ingests what is queued, then both
    /// return.
    pub fn stop(&self) {
        self.rank_tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.wake.notify_all();
    }
}

/// The ingest worker's own state: the resident session (none before the first batch and after
/// a failure), the entries put through it since the last checkpoint, and since when.
struct IngestWorker {
    session: Option<Session>,
    uncheckpointed: Vec<Entry>,
    dirty_since: Option<Instant>,
    /// The last checkpoint's snapshot time (for the metrics).
    snapshot_seconds: f64,
}

/// A batch's rows as `curec ingest` reads them (the same rules for ids, ops, titles and texts):
/// written as the CSV a client could have sent, and read back.
fn rows_of(run: &Path, batch: &[Entry]) -> Result<Rows> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(["user", "item", "timestamp", "rating", "title", "text", "op"])?;
    for r in batch.iter().flat_map(|e| &e.rows) {
        w.write_record([
            r.user.as_str(),
            r.item.as_str(),
            &r.timestamp.to_string(),
            &r.rating.to_string(),
            r.title.as_deref().unwrap_or(""),
            r.text.as_deref().unwrap_or(""),
            if r.delete { "delete" } else { "add" },
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    let file = wal::dir(run).join(format!("ingest-{}.csv", batch.last().map_or(0, |e| e.seq)));
    std::fs::write(&file, bytes).with_context(|| format!("{}: cannot write", file.display()))?;
    let read = crate::replay::ingest_log::read_file(&file);
    let _ = std::fs::remove_file(&file);
    let (rows, info) = read?;
    Ok(Rows { rows, info })
}

/// The ranking thread: takes the first waiting request, then every request queued behind it (up
/// to [`MAX_RANK_BATCH`]), and answers them all with one pass of the current recommender. Under
/// load, the requests that arrive during a pass make up the next one. Returns once the
/// service stops and the queue is empty.
fn ranker(app: std::sync::Weak<App>, rx: std::sync::mpsc::Receiver<RankJob>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_RANK_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let Some(app) = app.upgrade() else { return };
        let rec = app.recommender();
        let (queries, replies): (Vec<RecQuery>, Vec<_>) = jobs.into_iter().unzip();
        let t0 = Instant::now();
        // A panic in a pass fails that pass's requests (500), not the service.
        let pass = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let r = rec.lock().unwrap_or_else(|p| p.into_inner());
            let answers = r.recommend_many(&queries);
            queries
                .iter()
                .zip(answers)
                .map(|(q, a)| match a {
                    _ if !r.knows(&q.user) => Ok(None),
                    Ok(items) => Ok(Some(items)),
                    Err(e) => Err(ApiError::plain(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}"))),
                })
                .collect::<Vec<_>>()
        }));
        let answers = pass.unwrap_or_else(|_| {
            tracing::error!("a ranking pass panicked; its {} requests get 500", queries.len());
            let failed = || ApiError::plain(StatusCode::INTERNAL_SERVER_ERROR, "the ranking pass failed (logged)");
            queries.iter().map(|_| Err(failed())).collect()
        });
        app.metrics.ranked(queries.len());
        tracing::debug!("ranked {} requests in one pass ({:.1} ms)", queries.len(), t0.elapsed().as_secs_f64() * 1e3);
        for (reply, answer) in replies.into_iter().zip(answers) {
            let _ = reply.send(answer); // a client that left does not wait for its answer
        }
    }
}

/// The router over a loaded app (also used by the benchmark).
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(report))
        .route("/healthz", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .route("/v1/users/{id}/recommendations", get(recommendations))
        .route("/v1/interactions", post(interactions))
        .fallback(|| async { ApiError::plain(StatusCode::NOT_FOUND, "no such route") })
        .layer(axum::middleware::from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

/// Count every request and time it, by route.
async fn observe(State(app): State<Arc<App>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path();
    let route: &'static str = match path {
        "/" => "/",
        "/healthz" => "/healthz",
        "/metrics" => "/metrics",
        "/v1/interactions" => "/v1/interactions",
        p if p.starts_with("/v1/users/") && p.ends_with("/recommendations") => "/v1/users/{id}/recommendations",
        _ => "other",
    };
    let t0 = Instant::now();
    let resp = next.run(req).await;
    app.metrics.request(route, resp.status().as_u16(), t0.elapsed().as_secs_f64());
    resp
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

async fn report(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let cached = app.report.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let page = match cached {
        Some(p) => p,
        None => {
            let run = app.run.clone();
            let page = tokio::task::spawn_blocking(move || crate::report::render(&[run], 3))
                .await
                .map_err(|e| ApiError::plain(StatusCode::INTERNAL_SERVER_ERROR, format!("report: {e}")))?
                .map_err(|e| ApiError::plain(StatusCode::INTERNAL_SERVER_ERROR, format!("report: {e:#}")))?;
            *app.report.lock().unwrap_or_else(|p| p.into_inner()) = Some(page.clone());
            page
        }
    };
    Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response())
}

fn int_param(q: &HashMap<String, String>, name: &str, default: usize, lo: usize, hi: usize) -> Result<usize, ApiError> {
    match q.get(name) {
        None => Ok(default),
        Some(s) => match s.parse::<usize>() {
            Ok(v) if (lo..=hi).contains(&v) => Ok(v),
            _ => Err(ApiError::field(
                StatusCode::BAD_REQUEST,
                name,
                &format!("an integer from {lo} to {hi}"),
                format!("bad {name}: {s:?}"),
            )),
        },
    }
}

async fn recommendations(
    State(app): State<Arc<App>>,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let k = int_param(&q, "k", 10, 1, MAX_K)?;
    let n_reasons = int_param(&q, "reasons", 3, 0, 50)?;
    match app.rank(RecQuery { user: id.clone(), k, n_reasons }).await? {
        Some(items) => Ok(axum::Json(json!({"user": id, "items": items})).into_response()),
        None => Err(ApiError::field(
            StatusCode::NOT_FOUND,
            "id",
            "a user id of the run's log or of an ingested interaction",
            format!("no such user: {id:?}"),
        )),
    }
}

/// A raw-log id: a JSON string or an integer.
fn id_of(v: &Value, at: &str) -> Result<String, ApiError> {
    let bad = || ApiError::field(StatusCode::BAD_REQUEST, at, "a non-empty string or an integer", format!("bad {at}"));
    match v {
        Value::String(s) if !s.trim().is_empty() && !s.contains(['\n', '\r']) => Ok(s.trim().to_string()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        _ => Err(bad()),
    }
}

/// Parse and check a request body into rows.
pub fn parse_rows(body: &[u8]) -> Result<Vec<Row>, (String, String, String)> {
    let err = |f: &str, e: &str, m: String| (f.to_string(), e.to_string(), m);
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| err("body", "a JSON array of interactions", format!("not JSON: {e}")))?;
    let arr = v.as_array().ok_or_else(|| err("body", "a JSON array of interactions", "not an array".into()))?;
    if arr.is_empty() {
        return Err(err("body", "at least one interaction", "empty array".into()));
    }
    let mut rows = Vec::with_capacity(arr.len());
    for (n, x) in arr.iter().enumerate() {
        let o = x.as_object().ok_or_else(|| {
            err(
                &format!("[{n}]"),
                "an object {user, item, timestamp, rating[, title, text, op]}",
                "not an object".into(),
            )
        })?;
        for k in o.keys() {
            if !["user", "item", "timestamp", "rating", "title", "text", "op"].contains(&k.as_str()) {
                return Err(err(
                    &format!("[{n}].{k}"),
                    "only user, item, timestamp, rating, title, text, op",
                    format!("unknown field {k:?}"),
                ));
            }
        }
        let get =
            |k: &str| o.get(k).ok_or_else(|| err(&format!("[{n}].{k}"), "present", format!("[{n}]: missing {k}")));
        let id = |k: &str| -> Result<String, (String, String, String)> {
            id_of(get(k)?, &format!("[{n}].{k}")).map_err(|e| {
                let f = e.1["field"].as_str().unwrap_or_default().to_string();
                (f, "a non-empty string or an integer".into(), format!("[{n}]: bad {k}"))
            })
        };
        let (user, item) = (id("user")?, id("item")?);
        let timestamp = get("timestamp")?.as_i64().ok_or_else(|| {
            err(&format!("[{n}].timestamp"), "an integer (seconds since the epoch)", format!("[{n}]: bad timestamp"))
        })?;
        let rating = get("rating")?
            .as_f64()
            .filter(|r| r.is_finite())
            .ok_or_else(|| err(&format!("[{n}].rating"), "a finite number", format!("[{n}]: bad rating")))?;
        let text_of = |k: &str| -> Result<Option<String>, (String, String, String)> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(err(&format!("[{n}].{k}"), "a string", format!("[{n}]: bad {k}"))),
            }
        };
        let delete = match o.get("op") {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) if s == "add" => false,
            Some(Value::String(s)) if s == "delete" => true,
            Some(_) => return Err(err(&format!("[{n}].op"), "\"add\" or \"delete\"", format!("[{n}]: bad op"))),
        };
        rows.push(Row {
            user,
            item,
            timestamp,
            rating: rating as f32,
            title: text_of("title")?,
            text: text_of("text")?,
            delete,
        });
    }
    Ok(rows)
}

async fn interactions(
    State(app): State<Arc<App>>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let too_large = || {
        ApiError::field(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body",
            &format!("at most {MAX_BODY} bytes"),
            "request body too large",
        )
    };
    // A body announced too large is refused before it is read (a client that waits for the
    // reply before sending, as with `Expect: 100-continue`, sends none of it).
    let announced = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| too_large())?;
    if let Some(why) = &app.no_ingest {
        return Err(ApiError::plain(StatusCode::CONFLICT, why.clone()));
    }
    let rows = parse_rows(&bytes).map_err(|(f, e, m)| ApiError::field(StatusCode::BAD_REQUEST, &f, &e, m))?;
    let n = rows.len();
    let app2 = app.clone();
    // The fsync blocks: off the async threads.
    let entry = tokio::task::spawn_blocking(move || -> Result<Entry> {
        let mut w = app2.wal.lock().unwrap_or_else(|p| p.into_inner());
        let w = w.as_mut().context("no write-ahead log")?;
        let e = w.append(rows)?;
        // Queued under the log's lock, so entries reach the worker in sequence order.
        app2.queue.lock().unwrap_or_else(|p| p.into_inner()).0.push(e.clone());
        Ok(e)
    })
    .await
    .map_err(|e| ApiError::plain(StatusCode::INTERNAL_SERVER_ERROR, format!("log task failed: {e}")))?
    .map_err(|e| ApiError::plain(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")))?;
    app.metrics.accepted(n as u64);
    app.wake.notify_all();
    Ok((StatusCode::ACCEPTED, axum::Json(json!({"accepted": n, "seq": entry.seq, "durable": true}))).into_response())
}

/// SIGTERM and SIGINT (Ctrl-C), registered before the service says it is listening: a signal
/// that arrives right after start-up stops the service cleanly instead of killing it with the
/// default disposition (a race a quick SIGTERM used to hit).
#[cfg(unix)]
struct Signals(tokio::signal::unix::Signal, tokio::signal::unix::Signal);

#[cfg(unix)]
impl Signals {
    fn register() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self(
            signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        ))
    }

    async fn stopped(mut self) {
        tokio::select! {
            _ = self.0.recv() => {},
            _ = self.1.recv() => {},
        }
        tracing::info!("stopping: no new connections; finishing requests in flight");
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn register() -> Result<Self> {
        Ok(Self)
    }

    async fn stopped(self) {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("stopping: no new connections; finishing requests in flight");
    }
}

/// Run the service until SIGTERM or Ctrl-C.
pub fn serve(opts: &ServeOptions) -> Result<()> {
    let app = App::open(&opts.run)?;
    let worker = {
        let app = app.clone();
        let (delay, every) = (opts.ingest_delay, opts.checkpoint_every);
        std::thread::Builder::new().name("curec-ingest".into()).spawn(move || app.ingest_worker(delay, every))?
    };
    app.wake.notify_all();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let served = rt.block_on(async {
        let signals = Signals::register()?;
        let listener = tokio::net::TcpListener::bind(opts.addr)
            .await
            .with_context(|| format!("--addr {}: cannot listen", opts.addr))?;
        let addr = listener.local_addr()?;
        // One line a script can wait for.
        println!("{}", json!({"listening": format!("http://{addr}"), "run": opts.run.display().to_string()}));
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        axum::serve(listener, router(app.clone())).with_graceful_shutdown(signals.stopped()).await?;
        anyhow::Ok(())
    });
    app.stop();
    tracing::info!("ingesting what the log still holds ({} rows), then exiting", app.metrics.pending());
    worker.join().map_err(|_| anyhow::anyhow!("the ingest worker panicked"))?;
    served
}
