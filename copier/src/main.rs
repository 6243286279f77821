//! `copier`: turns the IMDB archive into one training shard per federated worker, the test
//! set and a manifest on the shared volume (see `README.md`). This file is only the command
//! line; the work is in [`source`] (reading), [`partition`] (who gets which review),
//! [`write`] (files, idempotence, `--force`) and [`download`].

mod download;
use fedimdb::partition;
mod source;
mod write;

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use fedimdb::layout::Layout;
use fedimdb::manifest::Partition;
use fedimdb::reviews::Review;

use crate::write::{Existing, Settings};

#[derive(Parser, Debug)]
#[command(
    name = "copier",
    version = fedimdb::VERSION,
    about = "Shard the IMDB reviews into one Parquet file per worker, plus the test set and a manifest",
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
    /// The IMDB data: aclImdb_v1.tar.gz, the repacked aclImdb-labeled.tar.gz, or an
    /// unpacked aclImdb/ folder (or a folder holding one).
    #[arg(long, env = "FEDIMDB_SOURCE", required = true)]
    source: Option<PathBuf>,
    /// Root folder of the run; files go to ROOT/data/.
    #[arg(long, visible_alias = "savedir", value_name = "ROOT", required = true)]
    out: Option<PathBuf>,
    /// Number of workers, i.e. training shards.
    #[arg(long, visible_alias = "n_container", value_name = "N", required = true)]
    workers: Option<usize>,
    /// How training reviews are spread: iid (stratified) or dirichlet (label skew).
    #[arg(long, default_value = "iid", value_parser = parse_partition)]
    partition: Partition,
    /// Dirichlet concentration (dirichlet only): small = strong label skew.
    #[arg(long, default_value_t = 0.5, value_name = "A")]
    alpha: f64,
    /// Dirichlet only: the fewest reviews a shard gets. Shards drawn smaller are topped up
    /// with reviews from the end of the largest shard, which makes the smallest shards a
    /// little less skewed than drawn (docs: README "Partitions").
    #[arg(long, default_value_t = fedimdb::partition::DEFAULT_MIN_SHARD, value_name = "N")]
    min_shard: usize,
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

fn parse_partition(s: &str) -> Result<Partition, String> {
    match s.to_ascii_lowercase().as_str() {
        "iid" => Ok(Partition::Iid),
        "dirichlet" => Ok(Partition::Dirichlet),
        _ => Err(format!("unknown partition {s:?}; use iid or dirichlet")),
    }
}

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
    let source_path = args.source.context("--source is required")?;
    let out = args.out.context("--out is required")?;
    let workers = args.workers.context("--workers is required")?;

    // Cheap checks first, before touching the source or the output.
    if workers == 0 {
        bail!(partition::PartitionError::NoWorkers);
    }
    partition::check_alpha(args.alpha)?;
    source::kind_of(&source_path)?;
    let settings = Settings {
        workers,
        partition: args.partition,
        alpha: (args.partition == Partition::Dirichlet).then_some(args.alpha),
        min_shard: (args.partition == Partition::Dirichlet).then_some(args.min_shard),
        seed: args.seed,
    };
    let layout = Layout::new(&out);

    let mut dataset = None;
    match write::inspect(&layout, &settings, args.force)? {
        Existing::Nothing | Existing::Replace => {}
        Existing::SameSettings(old) => {
            let (sha256, data) = source::identify(&source_path)?;
            if sha256 != old.source.sha256 {
                bail!(
                    "{} already holds data made from another source (sha256 {} from {}, now {} from {}); \
                     pass --force to replace it, or choose another --out",
                    layout.data_dir().display(),
                    old.source.sha256,
                    old.source.path,
                    sha256,
                    source_path.display()
                );
            }
            let problems = write::verify(&layout, &old);
            if problems.is_empty() {
                println!(
                    "{} is already done: {} {} shards (seed {}) from source sha256 {}; nothing to do (pass --force to rewrite)",
                    layout.data_dir().display(),
                    settings.workers,
                    settings.partition,
                    settings.seed,
                    sha256
                );
                return Ok(());
            }
            for p in &problems {
                tracing::warn!("{p}");
            }
            tracing::warn!("the data does not match its manifest; rewriting it");
            dataset = data;
        }
    }

    // The test set's encoding starts as soon as the archive moves on to training reviews,
    // so that it overlaps with reading them (see `source::TestReadEarly`).
    let mut early_test: Option<(usize, std::thread::JoinHandle<Result<write::Encoded>>)> = None;
    let data = match dataset {
        Some(d) => d,
        None => source::read(&source_path, &mut |test| {
            let rows = test.len();
            tracing::debug!("the test set looks complete ({rows} reviews); encoding it early");
            let encoding = std::thread::Builder::new()
                .name("encode-test".into())
                .spawn(move || write::encode(&test));
            // Without a thread the test set is simply encoded later with the shards.
            early_test = encoding.ok().map(|h| (rows, h));
        })?,
    };
    let labels: Vec<u8> = data.train.iter().map(|r| r.label).collect();
    let shard_indices = match settings.partition {
        Partition::Iid => partition::iid(&labels, workers, settings.seed)?,
        Partition::Dirichlet => {
            partition::dirichlet(&labels, workers, args.alpha, args.min_shard, settings.seed)?
        }
    };
    let shards = take_shards(data.train, &shard_indices);
    let n_train: usize = shards.iter().map(Vec::len).sum();
    let n_test = data.test.len();
    let test = match early_test {
        Some((rows, encoding)) if rows == n_test => write::Content::Encoding(encoding),
        // More test reviews came later: the early encoding is stale (its thread is left to
        // finish on its own) and the full test set is encoded with the shards.
        early => {
            if let Some((rows, _)) = early {
                tracing::debug!(
                    "{} test reviews came after the first {rows}; encoding again",
                    n_test - rows
                );
            }
            write::Content::Reviews(data.test)
        }
    };
    let manifest = write::write_all(&layout, data.source, &settings, shards, test)?;
    for s in &manifest.shards {
        tracing::info!(
            "{}: {} reviews ({} positive, {} negative)",
            s.file,
            s.rows,
            s.positive,
            s.negative
        );
    }
    println!(
        "wrote {} {} shards ({n_train} training reviews) and test.parquet ({n_test} reviews) to {}",
        settings.workers,
        settings.partition,
        layout.data_dir().display()
    );
    Ok(())
}

/// Moves the training reviews into their shards (no copies of the texts).
fn take_shards(train: Vec<Review>, indices: &[Vec<usize>]) -> Vec<Vec<Review>> {
    let mut slots: Vec<Option<Review>> = train.into_iter().map(Some).collect();
    indices
        .iter()
        .map(|idx| {
            idx.iter()
                .map(|&i| slots[i].take().expect("partition places each review once"))
                .collect()
        })
        .collect()
}
