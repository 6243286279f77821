//! `copier`: turns the IMDB archive, or any labeled text, into one training shard per
//! federated worker, the test set and a manifest on the shared volume (see `README.md`).
//! This file is only the command line; the work is in [`shard`] (the workflow, step by
//! step), which reads with [`source`] (IMDB) or [`table`] and [`labeled`] (other data),
//! deals the reviews with `fedimdb::partition` and writes with [`write`] (files,
//! idempotence, `--force`), and in [`download`].

mod download;
mod labeled;
mod shard;
mod source;
mod table;
mod write;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use fedimdb::labels::{SourceArgs, TaskArgs};
use fedimdb::partition::PartitionArgs;

#[derive(Parser, Debug)]
#[command(
    name = "copier",
    version = fedimdb::VERSION,
    about = "Shard the IMDB reviews, or your own labeled text, into one Parquet file per worker, plus the test set and a manifest",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    shard: ShardArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Download the official aclImdb_v1.tar.gz and check its sha256 before keeping it.
    Download(DownloadArgs),
}

#[derive(Args, Debug)]
struct ShardArgs {
    /// The labeled text: the IMDB aclImdb_v1.tar.gz, the repacked aclImdb-labeled.tar.gz or
    /// an unpacked aclImdb/ folder; or your own data: a CSV, TSV, JSON Lines or Parquet file,
    /// or a folder with one folder per label (README, "Your own data").
    #[arg(long, env = "FEDIMDB_SOURCE", required = true)]
    source: Option<PathBuf>,
    #[command(flatten)]
    reading: SourceArgs,
    #[command(flatten)]
    task: TaskArgs,
    /// Root folder of the run; files go to ROOT/data/.
    #[arg(long, visible_alias = "savedir", value_name = "ROOT", required = true)]
    out: Option<PathBuf>,
    /// Number of workers, i.e. training shards.
    #[arg(long, visible_alias = "n_container", value_name = "N", required = true)]
    workers: Option<usize>,
    #[command(flatten)]
    partition: PartitionArgs,
    /// Seed of every random choice; the same seed and arguments give byte-identical files.
    #[arg(long, default_value_t = fedimdb::train::defaults::SEED, value_name = "S")]
    seed: u64,
    /// Replace data made with other arguments (or rewrite data that is up to date).
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct DownloadArgs {
    /// Folder to keep aclImdb_v1.tar.gz in.
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Where to fetch the archive (a mirror).
    #[arg(long, default_value = download::OFFICIAL_URL)]
    url: String,
    /// Expected sha256 of the archive, hex.
    #[arg(long, default_value = download::OFFICIAL_SHA256, value_name = "HEX")]
    sha256: String,
}

fedimdb::global_allocator!();

fn main() -> std::process::ExitCode {
    fedimdb::logging::run_main(|| {
        let cli = Cli::parse();
        match cli.command {
            Some(Command::Download(args)) => run_download(args),
            None => run_shard(cli.shard),
        }
    })
}

fn run_download(args: DownloadArgs) -> Result<()> {
    match download::download(&args.to, &args.url, &args.sha256)? {
        download::Outcome::AlreadyPresent(p) => {
            println!(
                "{} is already present with the expected sha256; nothing to download",
                p.display()
            )
        }
        download::Outcome::Downloaded(p) => {
            println!("downloaded {} (sha256 verified)", p.display())
        }
    }
    Ok(())
}

fn run_shard(args: ShardArgs) -> Result<()> {
    // clap requires these three unless a subcommand is given.
    let outcome = shard::run(&shard::Request {
        source: args.source.context("--source is required")?,
        reading: args.reading,
        task: args.task.task,
        out: args.out.context("--out is required")?,
        workers: args.workers.context("--workers is required")?,
        partition: args.partition,
        seed: args.seed,
        force: args.force,
    })?;
    outcome.record();
    Ok(())
}
