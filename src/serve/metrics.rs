//! The service's counters in Prometheus' text format (`GET /metrics`): requests and latency
//! histograms per route and status, interactions accepted and ingested, ingest runs, and the
//! sizes of the served state.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Latency bucket bounds, seconds.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    n: u64,
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(&'static str, u16), u64>,
    latency: BTreeMap<&'static str, Histogram>,
    accepted: u64,
    ingested: u64,
    ingest_runs: u64,
    ingest_errors: u64,
    ingest_seconds: f64,
    pending: u64,
    checkpoints: u64,
    checkpoint_seconds: f64,
    /// Interactions ingested since the last checkpoint (in the dataflow's memory only).
    uncheckpointed: u64,
    users: u64,
    items: u64,
    rank_passes: u64,
    ranked_queries: u64,
}

#[derive(Default)]
pub struct Metrics(Mutex<Inner>);

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn request(&self, route: &'static str, status: u16, seconds: f64) {
        self.with(|m| {
            *m.requests.entry((route, status)).or_default() += 1;
            let h = m.latency.entry(route).or_default();
            for (c, &b) in h.counts.iter_mut().zip(&BUCKETS) {
                if seconds <= b {
                    *c += 1;
                }
            }
            h.sum += seconds;
            h.n += 1;
        })
    }

    pub fn accepted(&self, rows: u64) {
        self.with(|m| {
            m.accepted += rows;
            m.pending += rows;
        })
    }

    pub fn ingest(&self, rows: u64, ingested: u64, seconds: f64, ok: bool) {
        self.with(|m| {
            m.ingest_runs += 1;
            m.ingest_seconds += seconds;
            if ok {
                m.ingested += ingested;
                m.uncheckpointed += ingested;
                m.pending = m.pending.saturating_sub(rows);
            } else {
                m.ingest_errors += 1;
            }
        })
    }

    /// A checkpoint: every interaction ingested so far is in a snapshot.
    pub fn checkpoint(&self, seconds: f64) {
        self.with(|m| {
            m.checkpoints += 1;
            m.checkpoint_seconds += seconds;
            m.uncheckpointed = 0;
        })
    }

    /// Rows a previous run acknowledged and did not ingest.
    pub fn restore_pending(&self, rows: u64) {
        self.with(|m| m.pending += rows)
    }

    pub fn pending(&self) -> u64 {
        self.with(|m| m.pending)
    }

    /// One ranking pass that answered `queries` recommendation requests together.
    pub fn ranked(&self, queries: usize) {
        self.with(|m| {
            m.rank_passes += 1;
            m.ranked_queries += queries as u64;
        })
    }

    /// Interactions the ingest operators added so far.
    pub fn ingested(&self) -> u64 {
        self.with(|m| m.ingested)
    }

    pub fn sizes(&self, users: usize, items: usize) {
        self.with(|m| {
            m.users = users as u64;
            m.items = items as u64;
        })
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.with(|m| {
            let mut s = String::new();
            let _ = writeln!(s, "# HELP curec_http_requests_total HTTP requests by route and status.");
            let _ = writeln!(s, "# TYPE curec_http_requests_total counter");
            for ((route, status), n) in &m.requests {
                let _ = writeln!(s, "curec_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
            }
            let _ = writeln!(s, "# HELP curec_http_request_seconds Request latency by route.");
            let _ = writeln!(s, "# TYPE curec_http_request_seconds histogram");
            for (route, h) in &m.latency {
                for (c, b) in h.counts.iter().zip(&BUCKETS) {
                    let _ = writeln!(s, "curec_http_request_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {c}");
                }
                let _ = writeln!(s, "curec_http_request_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}", h.n);
                let _ = writeln!(s, "curec_http_request_seconds_sum{{route=\"{route}\"}} {}", h.sum);
                let _ = writeln!(s, "curec_http_request_seconds_count{{route=\"{route}\"}} {}", h.n);
            }
            let scalar = |s: &mut String, name: &str, kind: &str, help: &str, v: String| {
                let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
            };
            scalar(
                &mut s,
                "curec_interactions_accepted_total",
                "counter",
                "Interactions acknowledged (durable in the write-ahead log).",
                m.accepted.to_string(),
            );
            scalar(
                &mut s,
                "curec_interactions_ingested_total",
                "counter",
                "Interactions the ingest operators added to the state (duplicates, late and filtered rows excluded).",
                m.ingested.to_string(),
            );
            scalar(
                &mut s,
                "curec_interactions_pending",
                "gauge",
                "Acknowledged rows not yet ingested.",
                m.pending.to_string(),
            );
            scalar(&mut s, "curec_ingest_runs_total", "counter", "Ingest runs.", m.ingest_runs.to_string());
            scalar(
                &mut s,
                "curec_ingest_errors_total",
                "counter",
                "Ingest runs that failed.",
                m.ingest_errors.to_string(),
            );
            scalar(
                &mut s,
                "curec_ingest_seconds_total",
                "counter",
                "Time spent ingesting.",
                m.ingest_seconds.to_string(),
            );
            scalar(
                &mut s,
                "curec_checkpoints_total",
                "counter",
                "Checkpoints (snapshots of the ingested state, which recommendations then read).",
                m.checkpoints.to_string(),
            );
            scalar(
                &mut s,
                "curec_checkpoint_seconds_total",
                "counter",
                "Time spent writing checkpoint snapshots (a checkpoint after a batch: in the ingest time instead).",
                m.checkpoint_seconds.to_string(),
            );
            scalar(
                &mut s,
                "curec_interactions_uncheckpointed",
                "gauge",
                "Interactions ingested since the last checkpoint (not yet served; re-ingested from the log after a crash).",
                m.uncheckpointed.to_string(),
            );
            scalar(
                &mut s,
                "curec_rank_passes_total",
                "counter",
                "Ranking passes (requests that arrive together share one).",
                m.rank_passes.to_string(),
            );
            scalar(
                &mut s,
                "curec_ranked_requests_total",
                "counter",
                "Recommendation requests answered by ranking passes.",
                m.ranked_queries.to_string(),
            );
            scalar(&mut s, "curec_users", "gauge", "Users served (ingested ones included).", m.users.to_string());
            scalar(&mut s, "curec_items", "gauge", "Items served (ingested ones included).", m.items.to_string());
            s
        })
    }
}
