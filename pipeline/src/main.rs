//! `pipeline`: runs the whole batch workflow — copier, then rounds of trainers and the
//! aggregator — as local processes on a local folder.

mod k8s;
mod local;
mod lock;
mod procs;

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use fedimdb::train::defaults;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PartitionArg {
    Iid,
    Dirichlet,
}

/// Flags of `pipeline local`.
#[derive(Debug, ClapArgs)]
pub struct LocalArgs {
    /// The IMDB archive or unpacked folder. Default: ../shared/data/aclImdb-labeled.tar.gz
    /// when present, else ROOT/download/aclImdb_v1.tar.gz, downloaded if missing.
    #[arg(long, env = "FEDIMDB_SOURCE")]
    pub source: Option<PathBuf>,
    /// Root folder of the run (created if missing).
    #[arg(long)]
    pub root: PathBuf,
    /// Number of workers (shards); 1 is centralized training.
    #[arg(long, default_value_t = defaults::WORKERS)]
    pub workers: usize,
    /// Training rounds after the statistics round.
    #[arg(long, default_value_t = defaults::ROUNDS)]
    pub rounds: u32,
    #[command(flatten)]
    pub train: fedimdb::train::TrainArgs,
    /// How reviews are spread over shards.
    #[arg(long, value_enum, default_value = "iid")]
    pub partition: PartitionArg,
    /// Dirichlet concentration (with --partition dirichlet): smaller is more skewed.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// With --partition dirichlet: the fewest reviews a shard gets (shards drawn smaller
    /// are topped up from the largest; see copier --help).
    #[arg(long, value_name = "N", default_value_t = fedimdb::partition::DEFAULT_MIN_SHARD)]
    pub min_shard: usize,
    /// Trainers run at once (default: the number of CPU cores).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Write a JSON report of the run here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub model: fedimdb::model::ModelArgs,
    /// Replace existing data under ROOT if it was sharded with other arguments.
    #[arg(long)]
    pub force: bool,
    /// Recompute from this round on, even where outputs on disk verify (0: everything after
    /// the data). Without it, a re-run keeps every verified step and continues from the
    /// first missing or invalid one.
    #[arg(long, value_name = "R")]
    pub from_round: Option<u32>,
    /// Quorum: a round goes on when at least M trainers succeeded (default: all).
    #[arg(long, value_name = "M")]
    pub min_workers: Option<usize>,
    // How the aggregator combines updates (--strategy, --trim).
    #[command(flatten)]
    pub combine: fedimdb::strategy::StrategyArgs,
}

fn main() -> std::process::ExitCode {
    fedimdb::logging::run_main(|| match Cli::parse().command {
        Command::Local(args) => local::run(&args),
        Command::K8s(args) => k8s::run(&args),
    })
}
