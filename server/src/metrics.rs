//! Prometheus metrics in the text exposition format, written by hand over atomics and one
//! small mutex-guarded map: a few dozen series do not justify a metrics crate, and the
//! format is simple and stable.
//!
//! Series: requests by route, method and status; request latency by route; reviews per
//! batch; time a request's reviews waited in the queue; reviews scored; model reloads; the
//! served model's version.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;

const LATENCY_BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const QUEUE_BOUNDS: [f64; 13] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
const BATCH_BOUNDS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// A histogram with fixed upper bounds, updated lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    counts: Vec<AtomicU64>,
    /// Sum of observations, in millionths of the unit (µs for seconds), to stay integer.
    sum_micro: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micro: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micro
            .fetch_add((v * 1e6).round() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or("+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cum}");
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {cum}");
    }
}

#[derive(Debug)]
struct RouteStats {
    by_status: BTreeMap<(String, u16), u64>,
    latency: Arc<Histogram>,
}

/// Every counter the server keeps.
#[derive(Debug)]
pub struct Metrics {
    routes: Mutex<BTreeMap<String, RouteStats>>,
    pub batch_size: Histogram,
    pub queue_seconds: Histogram,
    pub reviews_scored: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub queue_full: AtomicU64,
    started: Instant,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            routes: Mutex::default(),
            batch_size: Histogram::new(&BATCH_BOUNDS),
            queue_seconds: Histogram::new(&QUEUE_BOUNDS),
            reviews_scored: AtomicU64::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            queue_full: AtomicU64::new(0),
            started: Instant::now(),
        }
    }
}

impl Metrics {
    /// Counts one finished request.
    pub fn record_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        let latency = {
            let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            let stats = routes
                .entry(route.to_owned())
                .or_insert_with(|| RouteStats {
                    by_status: BTreeMap::new(),
                    latency: Arc::new(Histogram::new(&LATENCY_BOUNDS)),
                });
            *stats
                .by_status
                .entry((method.to_owned(), status))
                .or_insert(0) += 1;
            stats.latency.clone()
        };
        latency.observe(elapsed.as_secs_f64());
    }

    /// The exposition text.
    pub fn render(&self, state: &AppState) -> String {
        let mut out = String::with_capacity(8192);
        out.push_str("# HELP fedimdb_http_requests_total HTTP requests by route template, method and status.\n");
        out.push_str("# TYPE fedimdb_http_requests_total counter\n");
        type Snapshot = Vec<(String, Vec<((String, u16), u64)>, Arc<Histogram>)>;
        let routes: Snapshot = {
            let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            routes
                .iter()
                .map(|(r, s)| {
                    (
                        r.clone(),
                        s.by_status.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                        s.latency.clone(),
                    )
                })
                .collect()
        };
        for (route, statuses, _) in &routes {
            for ((method, status), n) in statuses {
                let _ = writeln!(
                    out,
                    "fedimdb_http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {n}",
                    escape(route)
                );
            }
        }
        out.push_str("# HELP fedimdb_http_request_duration_seconds Time from request to response, by route template.\n");
        out.push_str("# TYPE fedimdb_http_request_duration_seconds histogram\n");
        for (route, _, h) in &routes {
            h.write(
                &mut out,
                "fedimdb_http_request_duration_seconds",
                &format!("route=\"{}\"", escape(route)),
            );
        }
        out.push_str(
            "# HELP fedimdb_batch_size Reviews per batch handed to an inference worker.\n",
        );
        out.push_str("# TYPE fedimdb_batch_size histogram\n");
        self.batch_size.write(&mut out, "fedimdb_batch_size", "");
        out.push_str("# HELP fedimdb_queue_seconds Time a request's reviews waited between being queued and a worker starting on them.\n");
        out.push_str("# TYPE fedimdb_queue_seconds histogram\n");
        self.queue_seconds
            .write(&mut out, "fedimdb_queue_seconds", "");
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "fedimdb_reviews_scored_total",
            "Reviews featurised and scored.",
            self.reviews_scored.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "fedimdb_queue_full_total",
            "Requests refused with 503 because the queue was full.",
            self.queue_full.load(Ordering::Relaxed),
        );
        out.push_str("# HELP fedimdb_model_reloads_total Attempts to load a newly published model, by result.\n");
        out.push_str("# TYPE fedimdb_model_reloads_total counter\n");
        let _ = writeln!(
            out,
            "fedimdb_model_reloads_total{{result=\"ok\"}} {}",
            self.reloads_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "fedimdb_model_reloads_total{{result=\"error\"}} {}",
            self.reloads_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP fedimdb_queue_depth Requests waiting in the queue.\n# TYPE fedimdb_queue_depth gauge\nfedimdb_queue_depth {}",
            state.batcher.depth()
        );
        out.push_str("# HELP fedimdb_model_info The served model (value 1); absent while no model is loaded.\n# TYPE fedimdb_model_info gauge\n");
        let current = state.models.current();
        if let Some(m) = &current {
            let _ = writeln!(
                out,
                "fedimdb_model_info{{version=\"{}\",sha256=\"{}\"}} 1",
                escape(&m.served.version),
                escape(&m.served.sha256)
            );
        }
        out.push_str("# HELP fedimdb_model_round Training round of the served model.\n# TYPE fedimdb_model_round gauge\n");
        if let Some(m) = &current {
            let _ = writeln!(out, "fedimdb_model_round {}", m.served.round);
        }
        let ready = u8::from(state.models.current().is_some());
        let _ = writeln!(
            out,
            "# HELP fedimdb_ready 1 while a model is loaded.\n# TYPE fedimdb_ready gauge\nfedimdb_ready {ready}"
        );
        let _ = writeln!(
            out,
            "# HELP fedimdb_uptime_seconds Seconds since the server started.\n# TYPE fedimdb_uptime_seconds gauge\nfedimdb_uptime_seconds {:.3}",
            self.started.elapsed().as_secs_f64()
        );
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Middleware: counts every request under its route *template* (`/v2/models/{name}/infer`,
/// never the raw path, so clients cannot grow the series without bound) and logs it.
pub async fn track(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let method = req.method().clone();
    let resp = next.run(req).await;
    let elapsed = start.elapsed();
    let status = resp.status().as_u16();
    state
        .metrics
        .record_request(&route, method.as_str(), status, elapsed);
    tracing::debug!(%method, route, status, micros = elapsed.as_micros() as u64, "request");
    resp
}

/// `GET /metrics`.
pub async fn handler(State(state): State<Arc<AppState>>) -> Response {
    let body = state.metrics.render(&state);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
