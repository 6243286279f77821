//! `trainer`: one federated worker. Trains the model on its shard, starting from the
//! current global model, and writes its update to the shared volume. A process may be
//! given several shards (`--shard 0,8,16`): it is then that many workers, one after the
//! other, and reads and verifies the round's global model and control variate once.
//!
//! Round 0 is the statistics round: the worker counts, per hash bucket, the positive and
//! negative reviews of its shard; the aggregator sums these counts into the naive-Bayes
//! ratio of the first global model. Later rounds train that model's weights locally, with
//! SCAFFOLD's correction (`fedimdb::control`), and write the buckets the shard touches.

mod candle_engine;
mod device;
mod run;

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Parser;

/// Train the fedimdb model on one shard.
///
/// Volume form: `trainer --root ROOT --round R --shard I[,J…]`. Original form:
/// `trainer --data SHARD --epoch E --batch B --savemodel OUT [--init GLOBAL]`.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Args {
    #[command(flatten)]
    pub volume: fedimdb::layout::VolumeArgs,
    /// Shard index (0-based), or several separated by commas, trained one after the other
    /// by this process. Defaults to $JOB_COMPLETION_INDEX, as set by a Kubernetes Indexed
    /// Job.
    ///
    /// Several shards in one process is how `pipeline local` runs many workers on few
    /// cores: every worker hashes the 50 MB global model and control variate it starts
    /// from, and a process hashes them once for all its shards.
    #[arg(long, env = "JOB_COMPLETION_INDEX", value_delimiter = ',')]
    pub shard: Vec<usize>,
    #[command(flatten)]
    pub train: fedimdb::train::TrainArgs,
    /// Where to train: `cpu`, or `cuda` (needs a build with `--features cuda` and a GPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub model: fedimdb::model::ModelArgs,
    /// Original form: the shard file to train on.
    #[arg(long, conflicts_with = "root")]
    pub data: Option<PathBuf>,
    /// Original form: where to write the trained model.
    #[arg(long, requires = "data")]
    pub savemodel: Option<PathBuf>,
    /// Original form: the global model to start from (default: a naive-Bayes model of the
    /// shard itself).
    #[arg(long, requires = "data")]
    pub init: Option<PathBuf>,
}

fedimdb::global_allocator!();

fn main() -> std::process::ExitCode {
    fedimdb::logging::run_main(|| {
        let args = Args::parse();
        check(&args)?;
        let device = device::select(&args.device)?;
        if let Some((root, round)) = args.volume.target().map_err(anyhow::Error::msg)? {
            run::volume(root, round, &args.shard, &args, &device)
        } else if let (Some(data), Some(out)) = (&args.data, &args.savemodel) {
            run::original(data, out, args.init.as_deref(), &args, &device)
        } else {
            bail!(
                "say what to train: --root ROOT --round R --shard I, or --data SHARD --savemodel OUT"
            )
        }
    })
}

fn check(args: &Args) -> Result<()> {
    args.train.validate().map_err(anyhow::Error::msg)?;
    args.model.validate().map_err(anyhow::Error::msg)?;
    if let Some(twice) = (args.shard.iter().enumerate()).find(|(i, s)| args.shard[..*i].contains(s))
    {
        bail!("--shard lists shard {} twice", twice.1);
    }
    Ok(())
}
