//! `aggregator`: combines the workers' updates of a round into the next global model
//! (FedAvg, weighted by sample count), evaluates it on the test set, and publishes it.

mod average;
mod evaluate;
mod run;

use std::path::PathBuf;

use anyhow::bail;
use clap::{Parser, ValueEnum};

/// How updates are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Strategy {
    /// Federated averaging: the mean of the workers' weights, weighted by sample count.
    Fedavg,
}

/// Aggregate one round of worker updates.
///
/// Volume form: `aggregator --root ROOT --round R`. Original form:
/// `aggregator --dir WORKERS_DIR --savefile OUT`.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Args {
    /// Root folder of the shared volume.
    #[arg(long, conflicts_with_all = ["dir", "savefile"])]
    pub root: Option<PathBuf>,
    /// Round to aggregate; round 0 sums feature statistics into the first model.
    #[arg(long, requires = "root")]
    pub round: Option<u32>,
    /// How to combine updates.
    #[arg(long, value_enum, default_value = "fedavg")]
    pub strategy: Strategy,
    /// Number of updates to expect (default: the number of shards in the data manifest).
    #[arg(long)]
    pub expect: Option<usize>,
    /// Original form: folder of worker model files (`*.safetensors`) to average.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Original form: where to write the averaged model.
    #[arg(long, requires = "dir")]
    pub savefile: Option<PathBuf>,
    /// Original form: a test set (Parquet) to evaluate the averaged model on.
    #[arg(long, requires = "dir")]
    pub test: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    fedimdb::logging::run_main(|| {
        let args = Args::parse();
        if let Some(root) = &args.root {
            let Some(round) = args.round else { bail!("--root needs --round R") };
            if args.expect == Some(0) {
                bail!("--expect must be at least 1");
            }
            run::volume(root, round, &args)
        } else if let (Some(dir), Some(out)) = (&args.dir, &args.savefile) {
            run::original(dir, out, args.test.as_deref())
        } else {
            bail!("say what to aggregate: --root ROOT --round R, or --dir WORKERS_DIR --savefile OUT")
        }
    })
}
