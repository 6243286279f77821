//! `server`: serves the latest fedimdb model (web page, JSON API, Open Inference Protocol).
//! The flags ([`server::Config`], in the library) are parsed here; everything else is in the
//! library (`lib.rs`).

use anyhow::Context;
use clap::Parser;
use server::Config;

fedimdb::global_allocator!();

fn main() -> std::process::ExitCode {
    let config = Config::parse();
    fedimdb::logging::run_main(|| {
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
