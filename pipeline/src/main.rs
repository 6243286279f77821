//! `pipeline`: runs the whole batch workflow — copier, then rounds of trainers and the
//! aggregator — as local processes on a local folder.

mod k8s;
mod local;
mod lock;
mod plan;
mod procs;
mod rounds;

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand};

/// Run the fedimdb workflow.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every step as a local process on a local folder.
    Local(LocalArgs),
    /// Run every step as a Kubernetes Job (see manifests/ and the README's Kubernetes section).
    K8s(k8s::K8sArgs),
}

/// Flags of `pipeline local`.
#[derive(Debug, ClapArgs)]
pub struct LocalArgs {
    /// The labeled text to shard: the IMDB archive or unpacked folder, or your own CSV, TSV,
    /// JSON Lines, Parquet or label folders (README, "Your own data"; --format and the
    /// other source flags, among the run's flags, say how to read it). Default:
    /// ../shared/data/aclImdb-labeled.tar.gz when present, else
    /// ROOT/download/aclImdb_v1.tar.gz, downloaded if missing.
    #[arg(long, env = "FEDIMDB_SOURCE")]
    pub source: Option<PathBuf>,
    /// Root folder of the run (created if missing).
    #[arg(long)]
    pub root: PathBuf,
    #[command(flatten)]
    pub run: plan::RunArgs,
    /// Trainers run at once (default: all of a round's, up to 4 per CPU core). A trainer
    /// waits on its files for part of its time, and the last of a round would otherwise run
    /// alone on an idle machine: on 2 cores, 5 trainers at once finish a default run about
    /// 10% sooner than 2 at a time (docs/BENCHMARKS.md).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Write a JSON report of the run here.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

fedimdb::global_allocator!();

fn main() -> std::process::ExitCode {
    fedimdb::logging::run_main(|| match Cli::parse().command {
        Command::Local(args) => local::run(&args),
        Command::K8s(args) => k8s::run(&args),
    })
}
