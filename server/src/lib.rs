//! The fedimdb server: a web page, a JSON API and the Open Inference Protocol (KServe v2)
//! over the latest federated model, with dynamic batching and hot reload.
//!
//! The binary (`main.rs`) only parses the flags ([`Config`]) and waits for a signal;
//! everything else is in this library so the tests can start real servers in-process on
//! `127.0.0.1:0`.
//!
//! Request path: a handler reads and validates the whole body ([`error::JsonBody`], with a
//! read timeout), submits the texts to the [`batcher`] queue and awaits the answer; the
//! batcher thread groups queued texts into batches for the inference worker threads, which
//! featurise and score them with the model that is current when the batch starts
//! ([`state::ModelSlot`]); a watcher task swaps in new models as the aggregator publishes them.

pub mod api;
pub mod batcher;
pub mod config;
pub mod error;
pub mod explain;
pub mod metrics;
pub mod page;
pub mod state;
pub mod v2;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::routing::{get, post};

pub use config::Config;
pub use state::{AppState, ModelSource};

/// Every route of the server. `/openapi.json` documents the same list (a test checks).
pub fn router(state: Arc<AppState>) -> Router {
    let mut router = Router::new()
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
        .route("/v2/repository/index", post(v2::repository_index));
    // The model routes, each for the served model and for one version of it.
    for model in v2::MODEL_ROUTES {
        router = router
            .route(model, get(v2::model_metadata))
            .route(&format!("{model}/ready"), get(v2::model_ready))
            .route(&format!("{model}/infer"), post(v2::infer));
    }
    router
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
