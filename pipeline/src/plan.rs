//! The run configuration both executors share, and the plan made of it.
//!
//! [`RunArgs`] holds every flag that decides *what* is computed (how the source is read,
//! workers, rounds, training, partition, model size, combination, quorum, what to
//! recompute), defined once and validated once. [`Plan::new`] turns it into the workflow: a list of [`PlannedStep`]s,
//! each a binary with its arguments (resume decisions included) and environment, in the
//! order they run. `pipeline local` runs each step as processes and `pipeline k8s` as a
//! Job; an executor adds only what belongs to where the step runs (the volume's path, the
//! shard of a process or the Job's completion index, a GPU), so the two modes cannot drift
//! apart.

use std::path::Path;

use anyhow::{Result, bail, ensure};
use clap::Args as ClapArgs;
use fedimdb::labels::{Format, Shape, SourceArgs, TaskArgs};
use fedimdb::model::ModelArgs;
use fedimdb::partition::PartitionArgs;
use fedimdb::retention::RetentionArgs;
use fedimdb::strategy::StrategyArgs;
use fedimdb::train::{GRADIENT_ROUND, TrainArgs, defaults};

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
    // How the source is read (--format, --text-column, --label-column, --test,
    // --test-fraction): the copier's flags, in the copier step's arguments. Where the
    // source is (--source) belongs to each executor, as the run's folder does.
    #[command(flatten)]
    pub reading: SourceArgs,
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
        if self.train.is_gradient_round(self.rounds) {
            tracing::warn!(
                "--rounds {}: with SCAFFOLD round {GRADIENT_ROUND} is the gradient round, which \
                 takes no steps, so this run trains nothing past the naive-Bayes start; \
                 use --rounds {} or more to train",
                self.rounds,
                GRADIENT_ROUND + 1
            );
        }
        self.train.validate().map_err(anyhow::Error::msg)?;
        self.model.validate().map_err(anyhow::Error::msg)?;
        self.partition.validate()?;
        self.reading.validate()?;
        self.combine.strategy().map_err(anyhow::Error::msg)?;
        self.combine
            .check_server_optimizer()
            .map_err(anyhow::Error::msg)?;
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

    /// Checks the source flags against the source the copier will shard, as far as its
    /// name tells without reading it (the copier checks the rest once it has opened it):
    /// `source` as the copier gets it, None for the IMDB archive a run shards without
    /// `--source`. Both executors call it (through [`Plan::new`]) before any step runs, so
    /// a flag that cannot apply fails at once, with the same words in both modes.
    pub fn check_source(&self, source: Option<&Path>) -> Result<()> {
        let Some(path) = source else {
            if !matches!(self.reading.format, Format::Auto | Format::Imdb) {
                bail!(
                    "--format {} says what --source is, and no --source is given (without it, the \
                     copier shards the IMDB archive): pass --source PATH",
                    self.reading.format.name()
                );
            }
            return self.reading.check_shape(
                Shape::IMDB,
                self.task.task,
                &"without --source, the source (the IMDB archive)",
            );
        };
        if let Some(test) = &self.reading.test {
            ensure!(
                test != path,
                "--test {} is --source itself: the test set must be other reviews (or use \
                 --test-fraction F)",
                test.display()
            );
        }
        match self.reading.shape_of_name(path) {
            Some(shape) => self
                .reading
                .check_shape(shape, self.task.task, &path.display()),
            None => Ok(()),
        }
    }

    /// Trainers of a round that must succeed for the aggregator to run.
    fn quorum(&self) -> usize {
        self.min_workers.unwrap_or(self.workers)
    }

    /// Whether the steps of `round` may keep outputs that exist and verify (`--resume`);
    /// rounds from `--from-round` on are recomputed.
    fn resumes(&self, round: u32) -> bool {
        self.from_round.is_none_or(|r| round < r)
    }

    /// The copier's arguments, but for `--source` and `--out`: the source flags among them,
    /// so both executors shard a source the same way.
    fn copier_args(&self) -> Vec<String> {
        let mut args = vec![
            "--workers".to_owned(),
            self.workers.to_string(),
            "--seed".to_owned(),
            self.train.seed.to_string(),
        ];
        args.extend(self.partition.to_args());
        args.extend(self.task.to_args());
        args.extend(self.reading.to_args());
        if self.force {
            args.push("--force".to_owned());
        }
        args
    }

    /// A trainer's arguments for `round`, but for `--root` and the shard (a flag locally,
    /// the Job's completion index on Kubernetes); with `resume` it keeps a verified update
    /// made from the same inputs.
    fn trainer_args(&self, round: u32, resume: bool) -> Vec<String> {
        let mut args = vec!["--round".to_owned(), round.to_string()];
        args.extend(self.train.to_args());
        args.extend(self.model.to_args());
        if resume {
            args.push("--resume".to_owned());
        }
        args
    }

    /// The aggregator's arguments for `round`, but for `--root`; with `resume` it keeps a
    /// verified global model made from the same updates.
    fn aggregator_args(&self, round: u32, resume: bool) -> Vec<String> {
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

/// What a step computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Shards the archive into the data (once per run).
    Copier,
    /// The trainers of a round: one per shard.
    Trainer(u32),
    /// The aggregator of a round.
    Aggregator(u32),
}

impl StepKind {
    /// The binary that runs the step (its image on Kubernetes is named after it).
    pub fn binary(self) -> &'static str {
        match self {
            StepKind::Copier => "copier",
            StepKind::Trainer(_) => "trainer",
            StepKind::Aggregator(_) => "aggregator",
        }
    }

    /// The round of a trainer or aggregator step.
    pub fn round(self) -> Option<u32> {
        match self {
            StepKind::Copier => None,
            StepKind::Trainer(r) | StepKind::Aggregator(r) => Some(r),
        }
    }
}

impl std::fmt::Display for StepKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StepKind::Copier => write!(f, "copier"),
            StepKind::Trainer(r) => write!(f, "trainers of round {r}"),
            StepKind::Aggregator(r) => write!(f, "aggregator of round {r}"),
        }
    }
}

/// Where the copier's `download` subcommand puts the official archive, under the run's
/// root (`copier download --to ROOT/download`), and the archive's name there: the source
/// of a run that is given no `--source` (on Kubernetes too).
pub const DOWNLOAD_DIR: &str = "download";
pub const ARCHIVE_NAME: &str = "aclImdb_v1.tar.gz";

/// `copier download`'s arguments (as `String`s for a Job, `OsString`s for a process): fetch
/// the official archive into `dir` unless a copy with the right sha256 is already there.
pub fn download_args<S: From<&'static str>>(dir: S) -> Vec<S> {
    vec!["download".into(), "--to".into(), dir]
}

/// One step of the workflow: a binary, its arguments and environment. The arguments lack
/// only what depends on where the step runs, which the executor puts around them: the
/// root of the volume (`--root ROOT` first; `--source SOURCE --out ROOT` for the copier)
/// and, for the trainers, the shard (`--shard I` after them locally, the Job's completion
/// index on Kubernetes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    pub kind: StepKind,
    /// Processes (pods) the step runs: one per shard for the trainers, else one. Shard I
    /// is the I-th.
    pub shards: usize,
    /// How many of them must succeed for the run to go on: `--min-workers` for the
    /// trainers, else all.
    pub quorum: usize,
    pub args: Vec<String>,
    /// Whether the step keeps outputs that exist, verify and were made from the same
    /// inputs (`--resume` is then among `args`; the copier does so by itself).
    pub resume: bool,
    /// Environment variables the step runs with (a local process also inherits the
    /// caller's, which win where they set the same variable).
    pub env: Vec<(String, String)>,
}

impl PlannedStep {
    fn new(kind: StepKind, shards: usize, quorum: usize, args: Vec<String>, resume: bool) -> Self {
        PlannedStep {
            kind,
            shards,
            quorum,
            args,
            resume,
            // Progress and outcome lines in the steps' logs (the driver shows the last lines
            // of a failed step's log).
            env: vec![("RUST_LOG".to_owned(), "info".to_owned())],
        }
    }
}

/// A validated run, as the steps that carry it out, in order: the copier; then, for round
/// 0 to `--rounds`, the trainers and the aggregator.
#[derive(Debug, Clone)]
pub struct Plan {
    /// What the plan was made from (the executors' own checks read it: which update
    /// would verify, the report's fields).
    pub run: RunArgs,
    pub steps: Vec<PlannedStep>,
}

impl Plan {
    /// Validates `run` (the same words in both modes), and its source flags against
    /// `source` (the copier's `--source` where the executor has one, None for the IMDB
    /// archive), and plans its steps. Rounds below `--from-round` (all, by default) resume;
    /// the copier is idempotent by itself and redone only with `--force`.
    pub fn new(run: RunArgs, source: Option<&Path>) -> Result<Self> {
        run.validate()?;
        run.check_source(source)?;
        let mut steps = vec![PlannedStep::new(
            StepKind::Copier,
            1,
            1,
            run.copier_args(),
            false,
        )];
        for round in 0..=run.rounds {
            let resume = run.resumes(round);
            steps.push(PlannedStep::new(
                StepKind::Trainer(round),
                run.workers,
                run.quorum(),
                run.trainer_args(round, resume),
                resume,
            ));
            steps.push(PlannedStep::new(
                StepKind::Aggregator(round),
                1,
                1,
                run.aggregator_args(round, resume),
                resume,
            ));
        }
        Ok(Plan { run, steps })
    }

    /// The step of `kind`; panics if the plan has none (a round past `--rounds`).
    #[cfg(test)]
    pub fn step(&self, kind: StepKind) -> &PlannedStep {
        self.steps
            .iter()
            .find(|s| s.kind == kind)
            .unwrap_or_else(|| panic!("the plan has no step {kind} (--rounds {})", self.run.rounds))
    }

    /// Not a step of the plan: the aggregator of the last round, recomputing (no
    /// `--resume`), which publishes this run's last model again. `pipeline local` runs it
    /// when the published model is not the last global model of the run (a longer earlier
    /// run in the same root published a later round).
    pub fn republish(&self) -> PlannedStep {
        let round = self.run.rounds;
        PlannedStep::new(
            StepKind::Aggregator(round),
            1,
            1,
            self.run.aggregator_args(round, false),
            false,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> RunArgs {
        RunArgs::from_flags(args).expect("flags clap accepts")
    }

    fn plan(args: &[&str]) -> Plan {
        Plan::new(parse(args), None).expect("a valid run")
    }

    fn args_of(plan: &Plan, kind: StepKind) -> String {
        plan.step(kind).args.join(" ")
    }

    #[test]
    fn every_training_flag_reaches_the_binary_that_uses_it() {
        let flags = "--workers 4 --partition dirichlet --alpha 0.1 --hash-bits 18 \
                     --strategy trimmed-mean --trim 0.1 --min-workers 3 --lr 4 --force";
        let plan = plan(&flags.split_whitespace().collect::<Vec<_>>());
        let copier = args_of(&plan, StepKind::Copier);
        assert!(
            copier.contains("--workers 4")
                && copier.contains("--partition dirichlet --alpha 0.1 --min-shard 32")
                && copier.ends_with("--force"),
            "{copier}"
        );
        let trainer = args_of(&plan, StepKind::Trainer(2));
        assert!(
            trainer.starts_with("--round 2")
                && trainer.contains("--lr 4")
                && trainer.contains("--hash-bits 18"),
            "{trainer}"
        );
        assert_eq!(
            args_of(&plan, StepKind::Aggregator(2)),
            "--round 2 --min-workers 3 --strategy trimmed-mean --trim 0.1 --keep-rounds 1 --resume"
        );
        let trainers = plan.step(StepKind::Trainer(2));
        assert_eq!((trainers.shards, trainers.quorum), (4, 3));
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

    /// The source flags are run flags: they reach the copier's arguments the plan gives
    /// both executors, and nothing else.
    #[test]
    fn the_source_flags_reach_the_copier_only() {
        let flags = "--format csv --text-column body --label-column tag --test-fraction 0.25";
        let run = parse(&flags.split_whitespace().collect::<Vec<_>>());
        let plan = Plan::new(run, Some(Path::new("mail.txt"))).unwrap();
        let copier = args_of(&plan, StepKind::Copier);
        assert!(
            copier.ends_with(
                "--partition iid --format csv --text-column body --label-column tag \
                 --test-fraction 0.25"
            ),
            "{copier}"
        );
        for s in &plan.steps[1..] {
            assert!(
                !s.args
                    .iter()
                    .any(|a| a.contains("column") || a.contains("test")),
                "{}: {:?}",
                s.kind,
                s.args
            );
        }
        let test = parse(&["--test", "mail-test.jsonl"]);
        let plan = Plan::new(test, Some(Path::new("mail.jsonl"))).unwrap();
        assert!(args_of(&plan, StepKind::Copier).ends_with("--test mail-test.jsonl"));
    }

    /// What a source's name (and --format) tells is checked before any step runs, in the
    /// copier's words; what only reading it tells is left to the copier.
    #[test]
    fn source_flags_that_cannot_apply_are_refused_by_name() {
        for (flags, source, want) in [
            (
                &["--test-fraction", "0.2"][..],
                None,
                "without --source, the source (the IMDB archive) is the IMDB dataset, which has \
                 its own test split: drop --test and --test-fraction",
            ),
            (
                &["--text-column", "body"],
                None,
                "--text-column applies to CSV, TSV, JSON Lines and Parquet sources",
            ),
            (
                &["--format", "csv", "--test-fraction", "0.2"],
                None,
                "--format csv says what --source is, and no --source is given",
            ),
            (
                &[],
                Some("mail.csv"),
                "mail.csv has no test split: pass --test SOURCE",
            ),
            (
                &["--test-fraction", "0.2", "--task", "rating"],
                Some("mail.jsonl"),
                "--task rating needs the IMDB archive or folder",
            ),
            (
                &[
                    "--format",
                    "folders",
                    "--test-fraction",
                    "0.2",
                    "--label-column",
                    "l",
                ],
                Some("mail"),
                "--label-column applies to CSV, TSV, JSON Lines and Parquet sources; mail is a \
                 folders source",
            ),
            (
                &["--format", "imdb", "--test", "t.csv"],
                Some("imdb.tar.gz"),
                "imdb.tar.gz is the IMDB dataset, which has its own test split",
            ),
            (
                &["--test", "mail.csv"],
                Some("mail.csv"),
                "--test mail.csv is --source itself",
            ),
            (
                &["--test-fraction", "1.5"],
                Some("mail.csv"),
                "--test-fraction must be between 0 and 1 (exclusive), not 1.5",
            ),
            (
                &["--text-column", " ", "--test-fraction", "0.2"],
                Some("mail.csv"),
                "--text-column must name a column, not an empty string",
            ),
        ] {
            let (run, source) = (parse(flags), source.map(Path::new));
            let err = Plan::new(run, source)
                .err()
                .unwrap_or_else(|| panic!("{flags:?} {source:?} was accepted"))
                .to_string();
            assert!(err.contains(want), "{flags:?} {source:?}: {err}");
        }
        // Nothing to say without reading: a folder or a file of another extension.
        for source in ["mail", "mail.tar.gz"] {
            Plan::new(parse(&["--test-fraction", "0.2"]), Some(Path::new(source))).unwrap();
        }
        Plan::new(parse(&["--format", "imdb"]), None).unwrap();
    }

    #[test]
    fn an_iid_copier_command_names_no_dirichlet_flags() {
        let copier = args_of(&plan(&[]), StepKind::Copier);
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
        ] {
            let err = Plan::new(parse(args), None).unwrap_err().to_string();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    /// The default run: the copier, then the 5 trainers and the aggregator of each round
    /// 0..=5, every one of them resuming, in the environment they log at.
    #[test]
    fn the_plan_of_a_default_run_is_the_copier_then_trainers_and_aggregator_per_round() {
        let plan = plan(&[]);
        let kinds: Vec<StepKind> = plan.steps.iter().map(|s| s.kind).collect();
        let mut want = vec![StepKind::Copier];
        for r in 0..=defaults::ROUNDS {
            want.extend([StepKind::Trainer(r), StepKind::Aggregator(r)]);
        }
        assert_eq!(kinds, want);
        let binaries: Vec<&str> = plan.steps[..3].iter().map(|s| s.kind.binary()).collect();
        assert_eq!(binaries, ["copier", "trainer", "aggregator"]);
        for s in &plan.steps {
            let trainers = matches!(s.kind, StepKind::Trainer(_));
            let n = if trainers { defaults::WORKERS } else { 1 };
            assert_eq!((s.shards, s.quorum), (n, n), "{}", s.kind);
            assert_eq!(s.env, [("RUST_LOG".to_owned(), "info".to_owned())]);
            let flagged = s.args.iter().any(|a| a == "--resume");
            assert_eq!(flagged, s.resume, "{}: {:?}", s.kind, s.args);
            assert_eq!(s.resume, s.kind != StepKind::Copier, "{}", s.kind);
        }
        assert_eq!(
            args_of(&plan, StepKind::Trainer(1)),
            "--round 1 --algorithm scaffold --steps 20000 --batch 1 --schedule linear \
             --seed 42 --hash-bits 22 --max-ngram 3 --resume"
        );
        assert_eq!(
            args_of(&plan, StepKind::Copier),
            "--workers 5 --seed 42 --partition iid"
        );
    }

    /// `--from-round R`: the trainers and aggregators of rounds below R resume, those of R
    /// and later recompute; 0 recomputes everything after the copier, which never takes
    /// the flag (`--force` redoes it).
    #[test]
    fn from_round_recomputes_its_round_and_later_ones() {
        let resumes = |flags: &[&str]| -> Vec<(StepKind, bool)> {
            plan(flags)
                .steps
                .iter()
                .map(|s| (s.kind, s.resume))
                .collect()
        };
        for (kind, resume) in resumes(&["--rounds", "3", "--from-round", "2"]) {
            let want = kind.round().is_some_and(|r| r < 2);
            assert_eq!(resume, want, "{kind}");
            let flagged = plan(&["--rounds", "3", "--from-round", "2"])
                .step(kind)
                .args
                .contains(&"--resume".to_owned());
            assert_eq!(flagged, want, "{kind}");
        }
        assert!(resumes(&["--from-round", "0"]).iter().all(|(_, r)| !r));
        // The republishing aggregator never keeps what is on disk.
        let again = plan(&[]).republish();
        assert_eq!(again.kind, StepKind::Aggregator(defaults::ROUNDS));
        assert!(!again.resume && !again.args.contains(&"--resume".to_owned()));
    }
}
