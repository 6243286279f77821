//! The server's configuration: its flags, each default written once (in the `#[arg]`
//! attributes), checked once ([`Config::validate`], when the server starts). The binary
//! parses it from the command line; the tests start from [`Config::new`], the same defaults.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, ensure};
use clap::{CommandFactory, FromArgMatches, Parser};
use fedimdb::layout::Layout;

use crate::state::ModelSource;

/// Serves the latest fedimdb model: a web page at `/`, a JSON API under `/api`, the Open
/// Inference Protocol (KServe v2) under `/v2`, Prometheus metrics at `/metrics`.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["root", "model"])))]
pub struct Config {
    /// Root of the shared volume: serve ROOT/model/latest.safetensors and switch to each new
    /// model the aggregator publishes (ROOT/model/latest.json is polled).
    #[arg(long, env = "FEDIMDB_ROOT")]
    root: Option<PathBuf>,
    /// Serve this model file instead (reloaded when the file changes).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080", env = "FEDIMDB_LISTEN")]
    pub listen: SocketAddr,
    /// Most reviews in one batch handed to an inference worker.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Longest wait, in microseconds, for more reviews after the first of a batch (0: take
    /// what is queued and go).
    #[arg(long, default_value_t = 0)]
    pub max_delay_us: u64,
    /// Inference worker threads [default: CPU cores].
    #[arg(long, default_value_t = cpu_cores(), hide_default_value = true)]
    pub workers: usize,
    /// Largest review accepted, in bytes (413 above).
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_text_bytes: usize,
    /// Most reviews in one request (413 above).
    #[arg(long, default_value_t = 256)]
    pub max_texts: usize,
    /// Most requests waiting for a worker; more get 503 with Retry-After.
    #[arg(long, default_value_t = 4096)]
    pub max_queue: usize,
    /// Milliseconds a client has to send its request body (408 after).
    #[arg(long, default_value_t = 10_000)]
    pub read_timeout_ms: u64,
    /// Milliseconds between checks for a newly published model.
    #[arg(long, default_value_t = 500)]
    pub poll_ms: u64,
    /// Reviews for the page's "sample review" button [default: ROOT/data/test.parquet].
    #[arg(long)]
    test_set: Option<PathBuf>,
}

fn cpu_cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

impl Config {
    /// The flags' defaults, serving `source` (environment variables are not read).
    pub fn new(source: ModelSource) -> Self {
        let (flag, path) = match &source {
            ModelSource::Root(root) => ("--root", root),
            ModelSource::File(file) => ("--model", file),
        };
        let matches = Self::command()
            .mut_args(|a| a.env(None::<&'static str>))
            .try_get_matches_from([OsStr::new("server"), OsStr::new(flag), path.as_os_str()])
            .expect("the flags' defaults parse");
        Self::from_arg_matches(&matches).expect("the flags' defaults parse")
    }

    /// Where models come from: `--root` or `--model` (clap requires exactly one).
    pub fn source(&self) -> ModelSource {
        match (&self.root, &self.model) {
            (Some(root), _) => ModelSource::Root(root.clone()),
            (None, Some(file)) => ModelSource::File(file.clone()),
            (None, None) => unreachable!("clap requires one of --root and --model"),
        }
    }

    /// Checks the values clap cannot: counts of at least 1, a root that is a folder whose
    /// data, once there, has at most two labels (the model serves two classes).
    pub fn validate(&self) -> Result<()> {
        ensure!(self.max_batch >= 1, "--max-batch must be at least 1");
        ensure!(self.workers >= 1, "--workers must be at least 1");
        ensure!(self.max_texts >= 1, "--max-texts must be at least 1");
        ensure!(
            self.max_text_bytes >= 1,
            "--max-text-bytes must be at least 1"
        );
        ensure!(self.max_queue >= 1, "--max-queue must be at least 1");
        if let Some(root) = &self.root {
            ensure!(root.is_dir(), "--root {} is not a folder", root.display());
        }
        Ok(())
    }

    /// How long the batcher waits for more reviews after the first one of a batch.
    pub fn max_delay(&self) -> Duration {
        Duration::from_micros(self.max_delay_us)
    }

    /// Time a client has to send its whole request body.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }

    /// How often the model files are checked for a new model.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_ms)
    }

    /// Parquet file of reviews for `/api/sample`: `--test-set`, else in root mode
    /// `ROOT/data/test.parquet`.
    pub fn test_set(&self) -> Option<PathBuf> {
        self.test_set
            .clone()
            .or_else(|| Some(Layout::new(self.root.clone()?).test_set()))
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
