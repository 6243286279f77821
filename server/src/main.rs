//! `server`: serves the latest fedimdb model (web page, JSON API, Open Inference Protocol).
//! The flags are parsed here; everything else is in the library (`lib.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use server::{Config, ModelSource};

/// Serves the latest fedimdb model: a web page at `/`, a JSON API under `/api`, the Open
/// Inference Protocol (KServe v2) under `/v2`, Prometheus metrics at `/metrics`.
#[derive(Debug, Parser)]
#[command(version, about)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["root", "model"])))]
struct Args {
    /// Root of the shared volume: serve ROOT/model/latest.safetensors and switch to each new
    /// model the aggregator publishes (ROOT/model/latest.json is polled).
    #[arg(long, env = "FEDIMDB_ROOT")]
    root: Option<PathBuf>,
    /// Serve this model file instead (reloaded when the file changes).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080", env = "FEDIMDB_LISTEN")]
    listen: SocketAddr,
    /// Most reviews in one batch handed to an inference worker.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// Longest wait, in microseconds, for more reviews after the first of a batch (0: take
    /// what is queued and go).
    #[arg(long, default_value_t = 0)]
    max_delay_us: u64,
    /// Inference worker threads [default: CPU cores].
    #[arg(long)]
    workers: Option<usize>,
    /// Largest review accepted, in bytes (413 above).
    #[arg(long, default_value_t = 64 * 1024)]
    max_text_bytes: usize,
    /// Most reviews in one request (413 above).
    #[arg(long, default_value_t = 256)]
    max_texts: usize,
    /// Most requests waiting for a worker; more get 503 with Retry-After.
    #[arg(long, default_value_t = 4096)]
    max_queue: usize,
    /// Milliseconds a client has to send its request body (408 after).
    #[arg(long, default_value_t = 10_000)]
    read_timeout_ms: u64,
    /// Milliseconds between checks for a newly published model.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
    /// Reviews for the page's "sample review" button [default: ROOT/data/test.parquet].
    #[arg(long)]
    test_set: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    fedimdb::logging::run_main(|| {
        let source = match (args.root, args.model) {
            (Some(root), None) => ModelSource::Root(root),
            (None, Some(model)) => ModelSource::File(model),
            _ => unreachable!("clap requires exactly one of --root and --model"),
        };
        let mut config = Config::new(source);
        config.listen = args.listen;
        config.max_batch = args.max_batch;
        config.max_delay = Duration::from_micros(args.max_delay_us);
        if let Some(w) = args.workers {
            config.workers = w;
        }
        config.max_text_bytes = args.max_text_bytes;
        config.max_texts = args.max_texts;
        config.max_queue = args.max_queue;
        config.read_timeout = Duration::from_millis(args.read_timeout_ms);
        config.poll_interval = Duration::from_millis(args.poll_ms);
        if args.test_set.is_some() {
            config.test_set = args.test_set;
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        rt.block_on(async move {
            let server = server::start(config).await?;
            shutdown_signal().await;
            tracing::info!("shutting down: finishing requests in flight");
            server.stop().await
        })
    })
}

/// Ctrl-C or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}
