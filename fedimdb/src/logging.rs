//! Logging and progress output shared by the binaries.
//!
//! Logs go to stderr through `tracing` (level from `RUST_LOG`, default `info`). Progress
//! bars appear only when stderr is a terminal; in a pipe or a Kubernetes pod the same
//! progress is logged as plain lines instead.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use tracing_subscriber::EnvFilter;

/// Installs the stderr log subscriber. Safe to call more than once.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// A progress bar of `len` steps when stderr is a terminal, a hidden one otherwise.
pub fn progress(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

/// Runs a binary's fallible main: logs are set up first, and an error is printed with its
/// whole cause chain and turned into exit code 1 (2 is clap's, for bad flags).
pub fn run_main(main: impl FnOnce() -> anyhow::Result<()>) -> std::process::ExitCode {
    init();
    match main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
