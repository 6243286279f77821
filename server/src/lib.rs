//! The fedimdb server: a web page, a JSON API and the Open Inference Protocol (KServe v2)
//! over the latest federated model, with dynamic batching and hot reload.
//!
//! The binary (`main.rs`) only parses flags; everything else is in this library so the
//! tests can start real servers in-process on `127.0.0.1:0`.
//!
//! Request path: a handler reads and validates the whole body ([`error::JsonBody`], with a
//! read timeout), submits the texts to the [`batcher`] queue and awaits the answer; the
//! batcher thread groups queued texts into batches for the inference worker threads, which
//! featurise and score them with the model that is current when the batch starts
//! ([`state::ModelSlot`]); a watcher task swaps in new models as the aggregator publishes them.

pub mod api;
pub mod batcher;
pub mod error;
pub mod explain;
pub mod metrics;
pub mod page;
pub mod state;
pub mod v2;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::routing::{get, post};

pub use state::{AppState, ModelSource};

/// Everything the server is started with (the binary's flags, resolved).
#[derive(Debug, Clone)]
pub struct Config {
    pub source: ModelSource,
    pub listen: SocketAddr,
    /// Most reviews in one batch handed to a worker.
    pub max_batch: usize,
    /// How long the batcher waits for more reviews after the first one of a batch.
    pub max_delay: Duration,
    /// Inference worker threads.
    pub workers: usize,
    /// Largest accepted review, in bytes of UTF-8.
    pub max_text_bytes: usize,
    /// Most reviews in one request.
    pub max_texts: usize,
    /// Most requests waiting in the queue before new ones get 503.
    pub max_queue: usize,
    /// Time a client has to send its whole request body.
    pub read_timeout: Duration,
    /// How often the model files are checked for a new model.
    pub poll_interval: Duration,
    /// Parquet file of reviews for `/api/sample` (root mode: `ROOT/data/test.parquet`).
    pub test_set: Option<PathBuf>,
}

impl Config {
    /// Defaults for everything but the model source (the binary's flag defaults).
    pub fn new(source: ModelSource) -> Self {
        let test_set = match &source {
            ModelSource::Root(root) => Some(fedimdb::layout::Layout::new(root.clone()).test_set()),
            ModelSource::File(_) => None,
        };
        Self {
            source,
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            max_batch: 32,
            max_delay: Duration::ZERO,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_text_bytes: 64 * 1024,
            max_texts: 256,
            max_queue: 4096,
            read_timeout: Duration::from_secs(10),
            poll_interval: Duration::from_millis(500),
            test_set,
        }
    }

    /// The largest request body accepted: `max_texts` texts of `max_text_bytes` each, plus
    /// room for JSON syntax and escapes. Bigger bodies are refused (413) while being read,
    /// before they are buffered whole.
    pub fn max_body_bytes(&self) -> usize {
        self.max_texts
            .saturating_mul(self.max_text_bytes)
            .saturating_add(64 * 1024)
            .min(256 << 20)
    }
}

/// Every route of the server. `/openapi.json` documents the same list (a test checks).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/openapi.json", get(api::openapi))
        .route("/metrics", get(metrics::handler))
        .route("/api/predict", post(api::predict))
        .route("/api/preprocess", post(api::preprocess))
        .route("/api/model", get(api::model))
        .route("/api/sample", get(api::sample))
        .route("/v2", get(v2::server_metadata))
        .route("/v2/health/live", get(v2::live))
        .route("/v2/health/ready", get(v2::ready))
        .route("/v2/models/{name}", get(v2::model_metadata))
        .route("/v2/models/{name}/ready", get(v2::model_ready))
        .route("/v2/models/{name}/infer", post(v2::infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(v2::model_metadata_version),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(v2::model_ready_version),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(v2::infer_version),
        )
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .with_state(state)
}

/// A running server.
pub struct Server {
    /// The address it listens on (the real port when started on port 0).
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Stops accepting connections, lets requests in flight finish and waits for that.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task
            .await
            .context("server task panicked")?
            .context("server failed")
    }

    /// Waits until the server stops (it stops on [`Server::stop`] or on an I/O error).
    pub async fn wait(self) -> Result<()> {
        let Server { task, shutdown, .. } = self;
        let _keep_open = shutdown;
        task.await
            .context("server task panicked")?
            .context("server failed")
    }
}

/// Loads the model, starts the batcher, the workers and the reload watcher, binds the
/// listener and serves in a background task. Must run inside a multi-threaded tokio runtime.
pub async fn start(config: Config) -> Result<Server> {
    let state = AppState::new(config).await?;
    let listener = tokio::net::TcpListener::bind(state.config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", state.config.listen))?;
    let addr = listener.local_addr()?;
    state::spawn_watcher(state.clone());
    let app = router(state.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await
    });
    tracing::info!(%addr, "listening on http://{addr}");
    Ok(Server {
        addr,
        state,
        shutdown: Some(tx),
        task,
    })
}
