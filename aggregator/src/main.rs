//! `aggregator`: combines the workers' updates of a round into the next global model
//! (FedAvg, weighted by sample count, or a robust rule: coordinate-wise median or trimmed
//! mean), evaluates it on the test set, and publishes it.

mod average;
mod combine;
mod evaluate;
#[cfg(test)]
mod fixtures;
mod run;

use std::path::PathBuf;

use anyhow::bail;
use clap::{CommandFactory, Parser};
use fedimdb::strategy::{Strategy, StrategyArgs};

/// Aggregate one round of worker updates.
///
/// Volume form: `aggregator --root ROOT --round R`. Original form:
/// `aggregator --dir WORKERS_DIR --savefile OUT`.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Args {
    #[command(flatten)]
    pub volume: fedimdb::layout::VolumeArgs,
    #[command(flatten)]
    pub combine: StrategyArgs,
    #[command(flatten)]
    pub retention: fedimdb::retention::RetentionArgs,
    /// Quorum: aggregate when at least M of the shards' updates are present, naming the
    /// missing ones (default: the number of shards in the data manifest, i.e. all).
    #[arg(long, value_name = "M", value_parser = parse_min_workers)]
    pub min_workers: Option<usize>,
    /// Old name of --min-workers.
    #[arg(long, hide = true, value_name = "M", conflicts_with = "min_workers")]
    pub expect: Option<usize>,
    /// Original form: folder of worker model files (`*.safetensors`) to average.
    #[arg(long, conflicts_with = "root")]
    pub dir: Option<PathBuf>,
    /// Original form: where to write the averaged model.
    #[arg(long, requires = "dir")]
    pub savefile: Option<PathBuf>,
    /// Original form: a test set (Parquet) to evaluate the averaged model on.
    #[arg(long, requires = "dir")]
    pub test: Option<PathBuf>,
}

impl Args {
    /// The combination rule the flags ask for; `--trim` goes with trimmed-mean only.
    pub fn strategy(&self) -> Result<Strategy, String> {
        self.combine.strategy()
    }

    /// The quorum asked for, with the flag that asked for it (`--min-workers`, or its old
    /// name `--expect`), so that messages name what the user typed.
    pub fn min_workers(&self) -> Option<(usize, &'static str)> {
        self.min_workers
            .map(|m| (m, "--min-workers"))
            .or(self.expect.map(|m| (m, "--expect")))
    }
}

/// Parses `--min-workers`: a whole number, at least 1.
fn parse_min_workers(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("the quorum must be at least 1 update".into()),
        Ok(m) => Ok(m),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

fedimdb::global_allocator!();

fn main() -> std::process::ExitCode {
    fedimdb::logging::run_main(|| {
        let args = Args::parse();
        if let Err(e) = args.strategy().and(args.combine.check_server_optimizer()) {
            Args::command()
                .error(clap::error::ErrorKind::ArgumentConflict, e)
                .exit();
        }
        if let Some((root, round)) = args.volume.target().map_err(anyhow::Error::msg)? {
            if args.expect == Some(0) {
                bail!("--expect must be at least 1");
            }
            run::volume(root, round, &args)?.record();
            Ok(())
        } else if let (Some(dir), Some(out)) = (&args.dir, &args.savefile) {
            run::original(
                dir,
                out,
                args.test.as_deref(),
                args.strategy().map_err(anyhow::Error::msg)?,
            )
        } else {
            bail!(
                "say what to aggregate: --root ROOT --round R, or --dir WORKERS_DIR --savefile OUT"
            )
        }
    })
}
