//! The run configuration both executors share: every flag that decides *what* is computed
//! (workers, rounds, training, partition, model size, combination, quorum, what to
//! recompute), defined once, validated once, and turned into each binary's arguments here.
//! `pipeline local` runs those arguments as processes, `pipeline k8s` puts them into Jobs;
//! neither builds a training argument of its own, so the two modes cannot drift apart.

use anyhow::{Result, ensure};
use clap::Args as ClapArgs;
use fedimdb::labels::TaskArgs;
use fedimdb::model::ModelArgs;
use fedimdb::partition::PartitionArgs;
use fedimdb::retention::RetentionArgs;
use fedimdb::strategy::StrategyArgs;
use fedimdb::train::{TrainArgs, defaults};

/// The flags of a run, flattened into `pipeline local` and `pipeline k8s`.
#[derive(Debug, Clone, ClapArgs)]
pub struct RunArgs {
    /// Number of workers (shards, trainers per round); 1 is centralized training.
    #[arg(long, default_value_t = defaults::WORKERS)]
    pub workers: usize,
    /// Training rounds after the statistics round.
    #[arg(long, default_value_t = defaults::ROUNDS)]
    pub rounds: u32,
    #[command(flatten)]
    pub train: TrainArgs,
    // How reviews are spread over shards (--partition, --alpha, --min-shard).
    #[command(flatten)]
    pub partition: PartitionArgs,
    // Size of the model (--hash-bits, --max-ngram).
    #[command(flatten)]
    pub model: ModelArgs,
    // How the aggregator combines updates (--strategy, --trim).
    #[command(flatten)]
    pub combine: StrategyArgs,
    // Which rounds keep their model files (--keep-rounds).
    #[command(flatten)]
    pub retention: RetentionArgs,
    // What IMDB's labels are (--task sentiment|rating): what is learned, so part of the run.
    #[command(flatten)]
    pub task: TaskArgs,
    /// Replace data sharded with other arguments (the copier's --force).
    #[arg(long)]
    pub force: bool,
    /// Recompute from this round on, even where outputs verify (0: everything after the
    /// data, which is checked anyway). Without it, a re-run keeps every verified step and
    /// continues from the first missing or invalid one.
    #[arg(long, value_name = "R")]
    pub from_round: Option<u32>,
    /// Quorum: a round goes on when at least M of its trainers succeeded, and the
    /// aggregator combines the updates present. Default: all workers.
    #[arg(long, value_name = "M")]
    pub min_workers: Option<usize>,
}

impl RunArgs {
    /// The configuration that `flags` give (tests build theirs as a user would).
    #[cfg(test)]
    pub fn from_flags(flags: &[&str]) -> Result<Self, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let argv = std::iter::once("pipeline").chain(flags.iter().copied());
        Ok(<Cli as clap::Parser>::try_parse_from(argv)?.run)
    }

    /// Checks every flag against the others, with the same words in both modes.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.workers >= 1, "--workers must be at least 1");
        ensure!(self.rounds >= 1, "--rounds must be at least 1");
        self.train.validate().map_err(anyhow::Error::msg)?;
        self.model.validate().map_err(anyhow::Error::msg)?;
        self.partition.validate()?;
        let labels = self.task.task.labels();
        fedimdb::labels::ensure_two_classes(
            labels.len(),
            &labels,
            &format!("--task {}", self.task.task),
        )?;
        self.combine.strategy().map_err(anyhow::Error::msg)?;
        if let Some(m) = self.min_workers {
            ensure!(
                (1..=self.workers).contains(&m),
                "--min-workers must be between 1 and --workers ({}), not {m}",
                self.workers
            );
        }
        if let Some(r) = self.from_round {
            ensure!(
                r <= self.rounds,
                "--from-round {r} is past the last round ({}, see --rounds)",
                self.rounds
            );
        }
        Ok(())
    }

    /// Trainers of a round that must succeed for the aggregator to run.
    pub fn quorum(&self) -> usize {
        self.min_workers.unwrap_or(self.workers)
    }

    /// Whether the steps of `round` may keep outputs that exist and verify (`--resume`);
    /// rounds from `--from-round` on are recomputed.
    pub fn resumes(&self, round: u32) -> bool {
        self.from_round.is_none_or(|r| round < r)
    }

    /// The copier's arguments, but for `--source` and `--out`.
    pub fn copier_args(&self) -> Vec<String> {
        let mut args = vec![
            "--workers".to_owned(),
            self.workers.to_string(),
            "--seed".to_owned(),
            self.train.seed.to_string(),
        ];
        args.extend(self.partition.to_args());
        args.extend(self.task.to_args());
        if self.force {
            args.push("--force".to_owned());
        }
        args
    }

    /// A trainer's arguments for `round`, but for `--root` and the shard (a flag locally,
    /// the Job's completion index on Kubernetes).
    pub fn trainer_args(&self, round: u32) -> Vec<String> {
        let mut args = vec!["--round".to_owned(), round.to_string()];
        args.extend(self.train.to_args());
        args.extend(self.model.to_args());
        args
    }

    /// The aggregator's arguments for `round`, but for `--root`; with `resume` it keeps a
    /// verified global model made from the same updates.
    pub fn aggregator_args(&self, round: u32, resume: bool) -> Vec<String> {
        let mut args = vec![
            "--round".to_owned(),
            round.to_string(),
            "--min-workers".to_owned(),
            self.quorum().to_string(),
        ];
        args.extend(self.combine.to_args());
        args.extend(self.retention.to_args());
        if resume {
            args.push("--resume".to_owned());
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> RunArgs {
        RunArgs::from_flags(args).expect("flags clap accepts")
    }

    #[test]
    fn every_training_flag_reaches_the_binary_that_uses_it() {
        let flags = "--workers 4 --partition dirichlet --alpha 0.1 --hash-bits 18 \
                     --strategy trimmed-mean --trim 0.1 --min-workers 3 --lr 4 --force";
        let run = parse(&flags.split_whitespace().collect::<Vec<_>>());
        run.validate().unwrap();
        let copier = run.copier_args().join(" ");
        assert!(
            copier.contains("--workers 4")
                && copier.contains("--partition dirichlet --alpha 0.1 --min-shard 32")
                && copier.ends_with("--force"),
            "{copier}"
        );
        let trainer = run.trainer_args(2).join(" ");
        assert!(
            trainer.starts_with("--round 2")
                && trainer.contains("--lr 4")
                && trainer.contains("--hash-bits 18"),
            "{trainer}"
        );
        let aggregator = run.aggregator_args(2, true).join(" ");
        assert_eq!(
            aggregator,
            "--round 2 --min-workers 3 --strategy trimmed-mean --trim 0.1 --keep-rounds 1 --resume"
        );
    }

    #[test]
    fn the_task_reaches_the_copier_only_when_not_the_default() {
        let copier = parse(&["--task", "rating"]).copier_args().join(" ");
        assert!(
            copier.ends_with("--partition iid --task rating"),
            "{copier}"
        );
        assert!(!parse(&[]).copier_args().contains(&"--task".to_owned()));
    }

    #[test]
    fn an_iid_copier_command_names_no_dirichlet_flags() {
        let copier = parse(&[]).copier_args().join(" ");
        assert!(copier.ends_with("--partition iid"), "{copier}");
    }

    #[test]
    fn flags_that_contradict_each_other_are_refused_by_name() {
        for (args, want) in [
            (
                &["--min-workers", "6"][..],
                "--min-workers must be between 1 and --workers (5), not 6",
            ),
            (
                &["--rounds", "2", "--from-round", "3"],
                "--from-round 3 is past the last round (2",
            ),
            (
                &["--alpha", "0"],
                "--alpha must be a positive finite number (got 0)",
            ),
            (
                &["--trim", "0.1"],
                "--trim only applies to --strategy trimmed-mean",
            ),
            (&["--workers", "0"], "--workers must be at least 1"),
            (
                &["--task", "rating"],
                "--task rating has 8 labels (1, 2, 3, 4, 7, 8, 9, 10)",
            ),
        ] {
            let err = parse(args).validate().unwrap_err().to_string();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn rounds_from_from_round_on_are_recomputed() {
        let run = parse(&["--from-round", "2"]);
        let resumes: Vec<bool> = (0..=3).map(|r| run.resumes(r)).collect();
        assert_eq!(resumes, [true, true, false, false]);
        assert!(parse(&[]).resumes(5));
    }
}
