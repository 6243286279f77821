//! `pipeline local`: the run's plan (`plan.rs`: copier, then rounds of N trainers and the
//! aggregator) as local processes on a local folder, the trainers of a round in parallel,
//! printing a table per round and optionally writing a JSON report.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use fedimdb::atomic::{is_temp_name, read_json, write_json_atomic};
use fedimdb::layout::Layout;
use fedimdb::manifest::DataManifest;
use fedimdb::metrics::Metrics;
use fedimdb::outcome::{Outcome, Status};
use fedimdb::report::{RoundReport, UpdateReport};
use fedimdb::train::TrainArgs;
use fedimdb::verify::{
    Files, UpdateWant, check_latest, check_round_files, check_update, left_out_of_done_round,
};
use serde::Serialize;
use tracing::info;

use crate::LocalArgs;
use crate::lock::{Previous, RootLock};
use crate::plan::{ARCHIVE_NAME, DOWNLOAD_DIR, Plan, PlannedStep, StepKind, download_args};
use crate::procs::{Step, command, run_one, run_recorded, run_tolerating};
use crate::rounds::{RoundRow, round_table, summarize};

/// The shared archive, looked up relative to the working folder.
const SHARED_ARCHIVE: &str = "../shared/data/aclImdb-labeled.tar.gz";

/// One round in the JSON report.
#[derive(Debug, Serialize)]
struct RoundSummary {
    round: u32,
    test_accuracy: f64,
    seconds: f64,
    test: Metrics,
    /// False when the round's outputs on disk verified and were kept (a resumed run).
    recomputed: bool,
}

/// The JSON report of a run (`--report FILE`).
#[derive(Debug, Serialize)]
struct RunReport {
    workers: usize,
    partition: String,
    alpha: Option<f64>,
    rounds_trained: u32,
    /// The training flags (algorithm, steps or epochs, batch, lr, schedule, seed).
    #[serde(flatten)]
    train: TrainArgs,
    /// Final test accuracy (fraction).
    test_accuracy: f64,
    test: Metrics,
    seconds_total: f64,
    seconds_copier: f64,
    /// Round 0 is the statistics round (its model is untrained: zero weights).
    rounds: Vec<RoundSummary>,
    model: PathBuf,
    /// True when the run continued a partial or interrupted one.
    resumed: bool,
}

fn check(args: &LocalArgs) -> Result<Plan> {
    let plan = Plan::new(args.run.clone(), args.source.as_deref())?;
    ensure!(args.jobs != Some(0), "--jobs must be at least 1");
    Ok(plan)
}

/// Where the planned steps run here: the run's folder and the source the copier shards (how
/// to read it is in the copier step's arguments).
struct Local<'a> {
    root: &'a Path,
    source: &'a Path,
}

impl Local<'_> {
    /// A planned step's command line here: the plan's arguments after `--root ROOT` (the
    /// copier's after `--source SOURCE --out ROOT`), and a trainer's shards after them.
    fn argv(&self, step: &PlannedStep, shards: &[usize]) -> Vec<OsString> {
        let mut argv: Vec<OsString> = match step.kind {
            StepKind::Copier => vec![
                "--source".into(),
                self.source.into(),
                "--out".into(),
                self.root.into(),
            ],
            StepKind::Trainer(_) | StepKind::Aggregator(_) => {
                vec!["--root".into(), self.root.into()]
            }
        };
        argv.extend(step.args.iter().map(OsString::from));
        if !shards.is_empty() {
            let list: Vec<String> = shards.iter().map(usize::to_string).collect();
            argv.extend(["--shard".into(), list.join(",").into()]);
        }
        argv
    }

    /// The process of a planned step (of one shard, for the trainers), logging to `log`.
    fn process(&self, step: &PlannedStep, shards: &[usize], log: PathBuf) -> Result<Step> {
        let mut cmd = command(step.kind.binary())?;
        cmd.args(self.argv(step, shards));
        for (name, value) in &step.env {
            if std::env::var_os(name).is_none() {
                cmd.env(name, value);
            }
        }
        let name = match (step.kind, shards) {
            (StepKind::Trainer(round), [shard]) => {
                // The shard is the flag: an index this process inherited must not compete.
                cmd.env_remove("JOB_COMPLETION_INDEX");
                format!("trainer round {round} shard {shard}")
            }
            (StepKind::Trainer(round), shards) => {
                cmd.env_remove("JOB_COMPLETION_INDEX");
                format!("trainer round {round} shards {shards:?}")
            }
            (StepKind::Aggregator(round), _) => format!("aggregator round {round}"),
            (kind, _) => kind.to_string(),
        };
        Ok(Step {
            name,
            command: cmd,
            log,
        })
    }
}

/// The trainer processes of a round: the shards to compute, in at most `jobs` groups of
/// neighbours, each group one process (`trainer --shard I,J,…`).
///
/// A worker hashes the 50 MB global model and control variate it starts from; a process of
/// several workers hashes them once. With 64 workers on 2 cores that was a fifth of the
/// round. But a process ends at its first failed shard, so when the round tolerates
/// failures (a quorum below the workers, `tolerate` > 0) each shard keeps its own process
/// and a failure costs one worker only.
fn trainer_groups(todo: &[usize], jobs: usize, tolerate: usize) -> Vec<&[usize]> {
    if tolerate > 0 || todo.is_empty() {
        return todo.chunks(1).collect();
    }
    todo.chunks(todo.len().div_ceil(jobs.max(1))).collect()
}

/// The source to shard: `--source`, else the shared archive, else the official archive
/// under ROOT/download (fetched by `copier download` when missing).
fn resolve_source(args: &LocalArgs, logs: &Path) -> Result<PathBuf> {
    if let Some(s) = &args.source {
        return Ok(s.clone());
    }
    let shared = PathBuf::from(SHARED_ARCHIVE);
    if shared.is_file() {
        return Ok(shared);
    }
    let dir = args.root.join(DOWNLOAD_DIR);
    let official = dir.join(ARCHIVE_NAME);
    if !official.is_file() {
        info!(to = %dir.display(), "no --source and no shared archive: downloading the official archive");
        let mut cmd = command("copier")?;
        cmd.args(download_args(dir.into_os_string()));
        run_one(Step {
            name: "copier download".into(),
            command: cmd,
            log: logs.join("download.log"),
        })?;
    }
    Ok(official)
}

/// The trainers of the round in progress, until its aggregator has run.
struct Trained {
    started: Instant,
    /// Shards whose update on disk verified and was kept.
    kept: Vec<usize>,
    /// Trainer processes run, and how many of them failed (tolerated under the quorum).
    ran: usize,
    failed: usize,
}

pub fn run(args: &LocalArgs) -> Result<()> {
    let plan = check(args)?;
    let run = &plan.run;
    let t0 = Instant::now();
    let layout = Layout::new(&args.root);
    std::fs::create_dir_all(&args.root)
        .with_context(|| format!("cannot create {}", args.root.display()))?;
    let (_lock, previous) = RootLock::acquire(&args.root)?;
    if let Previous::Interrupted(holder) = &previous {
        let who = holder.as_ref().map_or_else(
            || "a pipeline".to_owned(),
            |h| format!("the pipeline with {h}"),
        );
        println!(
            "found an interrupted run: {who} did not finish (killed, or its machine stopped); resuming it"
        );
    }
    sweep_temp_files(&args.root)?;
    let logs = args.root.join("logs");
    let source = resolve_source(args, &logs)?;
    let here = Local {
        root: &args.root,
        source: &source,
    };
    let jobs = args.jobs.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        run.workers.min(4 * cores)
    });

    let mut manifest: Option<DataManifest> = None;
    let mut seconds_copier = 0.0;
    let mut rounds = Vec::new();
    let mut base_sha256: Option<String> = None;
    let mut control_sha256: Option<String> = None;
    let mut computed_any = false;
    let mut table = Vec::new();
    let mut trained: Option<Trained> = None;
    let last_round = (plan.steps.iter())
        .filter_map(|s| match s.kind {
            StepKind::Aggregator(round) => Some(round),
            _ => None,
        })
        .max();
    for step in &plan.steps {
        match step.kind {
            StepKind::Copier => {
                // The copier checks data already on disk against its manifest and rewrites
                // it only if it is missing, damaged or was made with other arguments.
                let copied = run_recorded(
                    here.process(step, &[], logs.join("copier.log"))?,
                    logs.join("copier.outcome.json"),
                )?;
                seconds_copier = t0.elapsed().as_secs_f64();
                let read = DataManifest::read(&layout.data_manifest())?;
                manifest = Some(read);
                let how = match copied.status {
                    Status::Done => "written",
                    Status::UpToDate => "verified on disk, kept",
                };
                println!(
                    "data: {} shards from {} ({how}, {seconds_copier:.1} s)",
                    run.workers,
                    source.display()
                );
            }
            StepKind::Trainer(round) => {
                let started = Instant::now();
                let manifest = manifest
                    .as_ref()
                    .expect("the plan runs the copier before any trainer");
                let config = run.model.config(manifest.labels.len());
                remove_foreign_updates(&layout, round, step.shards)?;
                // Each worker's update is kept if it verifies and was computed from exactly
                // what this run would compute it from; the others are (re)computed.
                let mut kept = Vec::new();
                let mut todo = Vec::new();
                for shard in 0..step.shards {
                    let want = UpdateWant::new(
                        &manifest.shards[shard],
                        config,
                        round,
                        shard,
                        &run.train,
                        base_sha256.as_deref(),
                        control_sha256.as_deref(),
                    );
                    match (step.resume, check_update(&layout, round, shard, &want)) {
                        (true, Ok(_)) => kept.push(shard),
                        (false, _) => todo.push(shard),
                        (true, Err(_)) if left_out_of_done_round(&layout, round, shard) => {}
                        (true, Err(why)) => {
                            if layout.update(round, shard).exists() {
                                info!("round {round} shard {shard}: {why:#}");
                            }
                            todo.push(shard);
                        }
                    }
                }
                let ran = todo.len();
                let tolerate = (kept.len() + ran).saturating_sub(step.quorum).min(ran);
                let procs = (trainer_groups(&todo, jobs, tolerate).into_iter())
                    .map(|group| {
                        let log = match group {
                            [shard] => format!("round-{round:04}-trainer-{shard:05}.log"),
                            [first, .., last] => {
                                format!("round-{round:04}-trainer-{first:05}-{last:05}.log")
                            }
                            [] => unreachable!("a group holds at least one shard"),
                        };
                        here.process(step, group, logs.join(log))
                    })
                    .collect::<Result<Vec<_>>>()?;
                if !kept.is_empty() && ran > 0 {
                    println!(
                        "\nround {round}: kept the verified updates of shards {kept:?}, computing the other {ran}"
                    );
                }
                let failed = run_tolerating(procs, jobs, tolerate)?;
                for f in &failed {
                    eprintln!(
                        "warning: going on with a quorum of {} workers: {f}",
                        step.quorum
                    );
                }
                trained = Some(Trained {
                    started,
                    kept,
                    ran,
                    failed: failed.len(),
                });
            }
            StepKind::Aggregator(round) => {
                let t = trained
                    .take()
                    .expect("the plan runs a round's trainers before its aggregator");
                // The aggregator keeps a verified global model made from these very updates,
                // unless this round is to be recomputed; its outcome record says which it did.
                let aggregated = run_recorded(
                    here.process(
                        step,
                        &[],
                        logs.join(format!("round-{round:04}-aggregator.log")),
                    )?,
                    logs.join(format!("round-{round:04}-aggregator.outcome.json")),
                )?;
                // The next round's trainers and aggregator hash every file of this round they
                // read; the last round's files nobody else reads in this run, so they are
                // hashed here.
                let files = if Some(round) == last_round {
                    Files::Hashed
                } else {
                    Files::Present
                };
                let report = check_round_files(&layout, round, base_sha256.as_deref(), files)
                    .with_context(|| {
                        format!(
                            "the aggregator of round {round} ended but its output does not verify"
                        )
                    })?;
                let recomputed = t.ran > 0 || aggregated.status == Status::Done;
                computed_any |= recomputed;
                base_sha256 = Some(report.model_sha256.clone());
                control_sha256 = report.control_sha256.clone();
                let seconds = t.started.elapsed().as_secs_f64();
                print_round(&layout, round, run.workers, &report, seconds, recomputed)?;
                // The row `pipeline k8s` prints for the same round, from the same records: a
                // kept update is a trainer found up to date.
                let trainer = |status| Some(Outcome::new("trainer", status));
                let trainers: Vec<Option<Outcome>> =
                    std::iter::repeat_n(trainer(Status::UpToDate), t.kept.len())
                        .chain(std::iter::repeat_n(trainer(Status::Done), t.ran - t.failed))
                        .collect();
                let aggregator = summarize(&[Some(aggregated)], "workers").unwrap_or_default();
                table.push(RoundRow {
                    round,
                    trainers: RoundRow::trainers_cell(&trainers, run.workers, "workers"),
                    aggregator: RoundRow::aggregator_cell(&aggregator),
                    accuracy: Some(report.test.accuracy),
                    seconds,
                });
                rounds.push(RoundSummary {
                    round,
                    test_accuracy: report.test.accuracy,
                    seconds,
                    test: report.test,
                    recomputed,
                });
            }
        }
    }

    // The published model must be this run's last global model (a longer earlier run in
    // the same root may have published a later round).
    let last = base_sha256.expect("at least one round");
    if check_latest(&layout).ok().map(|p| p.sha256).as_deref() != Some(last.as_str()) {
        run_one(here.process(&plan.republish(), &[], logs.join("publish.log"))?)?;
    }

    let last = rounds.last().expect("at least one round");
    let report = RunReport {
        workers: run.workers,
        partition: run.partition.partition.to_string(),
        alpha: run.partition.dirichlet_alpha(),
        rounds_trained: run.rounds,
        // The learning rate the trainers used (its default depends on the classes).
        train: TrainArgs {
            lr: Some(run.train.lr.unwrap_or_else(|| {
                fedimdb::train::defaults::lr(manifest.as_ref().map_or(2, |m| m.labels.len()))
            })),
            ..run.train.clone()
        },
        test_accuracy: last.test_accuracy,
        test: last.test,
        seconds_total: t0.elapsed().as_secs_f64(),
        seconds_copier,
        model: layout.latest_model(),
        resumed: previous != Previous::Clean
            || !computed_any
            || rounds.iter().any(|r| !r.recomputed),
        rounds,
    };
    println!("\nrounds:");
    for line in round_table(&table) {
        println!("  {line}");
    }
    println!(
        "done: test accuracy {:.2}% after {} rounds, {:.1} s in all; model at {}",
        report.test_accuracy * 100.0,
        run.rounds,
        report.seconds_total,
        report.model.display()
    );
    if let Some(path) = &args.report {
        write_json_atomic(path, &report)?;
    }
    Ok(())
}

/// Removes temporary files (`.NAME.tmp-*`) under the root: they are what writers killed
/// mid-write left, and no writer is at work while this pipeline holds the lock.
fn sweep_temp_files(root: &Path) -> Result<()> {
    fn walk(dir: &Path, removed: &mut Vec<PathBuf>) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(());
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type()?.is_dir() {
                if name != "logs" && name != "download" {
                    walk(&path, removed)?;
                }
            } else if is_temp_name(&name) {
                std::fs::remove_file(&path).with_context(|| {
                    format!("cannot remove the stale temporary file {}", path.display())
                })?;
                removed.push(path);
            }
        }
        Ok(())
    }
    let mut removed = Vec::new();
    walk(root, &mut removed)?;
    for p in &removed {
        info!(
            "removed {}, left by a writer that was killed mid-write",
            p.display()
        );
    }
    if !removed.is_empty() {
        println!(
            "removed {} half-written temporary file(s) left by killed writers",
            removed.len()
        );
    }
    Ok(())
}

/// Removes updates of shards the data no longer has (it was re-sharded into fewer shards
/// with --force): they were computed from data that is gone, and the aggregator refuses them.
fn remove_foreign_updates(layout: &Layout, round: u32, workers: usize) -> Result<()> {
    let dir = layout.updates_dir(round);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if Layout::parse_shard_name(&name).is_some_and(|s| s >= workers) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            println!(
                "removed {}: the data now has {workers} shards",
                entry.path().display()
            );
        }
    }
    Ok(())
}

fn print_round(
    layout: &Layout,
    round: u32,
    workers: usize,
    report: &RoundReport,
    seconds: f64,
    recomputed: bool,
) -> Result<()> {
    let updates: Vec<Option<UpdateReport>> = (0..workers)
        .map(|shard| {
            report
                .shards
                .contains(&shard)
                .then(|| read_json(&layout.update_report(round, shard)))
                .transpose()
        })
        .collect::<Result<_>>()?;
    let gradient = updates
        .iter()
        .flatten()
        .any(|u| u.train.is_some_and(|tc| tc.takes_no_steps()));
    let what = if round == 0 {
        "statistics (the starting model)"
    } else if gradient {
        "gradients at the starting model (no steps)"
    } else {
        "training"
    };
    let how = if recomputed {
        format!("{seconds:.1} s")
    } else {
        "verified on disk, kept".to_owned()
    };
    println!("\nround {round}: {what}, {how}");
    println!(
        "  {:>5}  {:>7}  {:>8}  {:>9}  {:>7}",
        "shard", "reviews", "loss", "local acc", "seconds"
    );
    for (shard, u) in updates.iter().enumerate() {
        let Some(u) = u else {
            println!(
                "  {shard:>5}  {:>7}  (no update: left out under the quorum)",
                "-"
            );
            continue;
        };
        match u.epochs.last() {
            Some(e) => println!(
                "  {shard:>5}  {:>7}  {:>8.4}  {:>9.4}  {:>7.2}",
                u.samples, e.loss, e.accuracy, u.seconds
            ),
            None => println!(
                "  {shard:>5}  {:>7}  {:>8}  {:>9}  {:>7.2}",
                u.samples, "-", "-", u.seconds
            ),
        }
    }
    let t = &report.test;
    println!(
        "  global model ({}): test accuracy {:.4}  F1 {:.4}  ROC-AUC {:.4}  log loss {:.4}",
        report.strategy, t.accuracy, t.f1, t.roc_auc, t.log_loss
    );
    if t.accuracy.is_nan() {
        bail!("round {round} produced no test accuracy");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::jobs::{self, Overlay, Params};
    use crate::plan::RunArgs;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn trainers_share_processes_unless_the_round_tolerates_a_failure() {
        let all: Vec<usize> = (0..64).collect();
        let groups = trainer_groups(&all, 8, 0);
        assert_eq!(groups.len(), 8);
        assert!(groups.iter().all(|g| g.len() == 8));
        assert_eq!(groups.concat(), all, "every shard once, in order");
        // Resumed: only the shards left to compute, as evenly as `jobs` allows.
        assert_eq!(trainer_groups(&[1, 4, 5], 2, 0), [&[1, 4][..], &[5]]);
        assert_eq!(trainer_groups(&all[..20], 8, 0).len(), 7);
        // Fewer shards than jobs, or a quorum below the workers: a process per shard.
        assert_eq!(trainer_groups(&all[..5], 8, 0).len(), 5);
        assert_eq!(trainer_groups(&all, 8, 1).len(), 64);
        assert!(trainer_groups(&[], 8, 0).is_empty());
    }

    /// Both executors run the plan's arguments, each adding only what belongs to where the
    /// step runs: here the run's folder (and the archive, for the copier) and a trainer's
    /// `--shard`; on Kubernetes the volume at `/data`, the trainers' shard coming from the
    /// Indexed Job's completion index, as many as the plan's shards, of which the plan's
    /// quorum must succeed.
    #[test]
    fn both_executors_run_the_arguments_of_the_plan() {
        let flags = "--workers 3 --rounds 2 --from-round 1 --min-workers 2 --partition \
                     dirichlet --alpha 0.1 --strategy median --lr 4 --keep-rounds all --force";
        let run = RunArgs::from_flags(&flags.split_whitespace().collect::<Vec<_>>()).unwrap();
        let plan = Plan::new(run, None).unwrap();
        let here = Local {
            root: Path::new("/runs/r"),
            source: Path::new("/archive.tar.gz"),
        };
        let p = Params {
            namespace: "fedimdb".into(),
            run_id: "t".into(),
            plan: plan.clone(),
            source: None,
            registry: "r.io".into(),
            image_tag: "1".into(),
            images: Default::default(),
            overlay: Overlay::Gke,
            claim: "fedimdb-data".into(),
            deadline_s: 60,
        };
        let built = jobs::steps(&p);
        assert_eq!(built.len(), plan.steps.len());
        for (step, job) in plan.steps.iter().zip(&built) {
            assert_eq!(job.kind, step.kind);
            let (here_before, there_before, here_after) = match step.kind {
                StepKind::Copier => (
                    strings(&["--source", "/archive.tar.gz", "--out", "/runs/r"]),
                    strings(&[
                        "--source",
                        "/data/download/aclImdb_v1.tar.gz",
                        "--out",
                        "/data",
                    ]),
                    vec![],
                ),
                StepKind::Trainer(_) => (
                    strings(&["--root", "/runs/r"]),
                    strings(&["--root", "/data"]),
                    strings(&["--shard", "2,3"]),
                ),
                StepKind::Aggregator(_) => (
                    strings(&["--root", "/runs/r"]),
                    strings(&["--root", "/data"]),
                    vec![],
                ),
            };
            let shards: &[usize] = match step.kind {
                StepKind::Trainer(_) => &[2, 3],
                _ => &[],
            };
            let local: Vec<String> = here
                .argv(step, shards)
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect();
            assert_eq!(
                local,
                [here_before, step.args.clone(), here_after].concat(),
                "{}",
                step.kind
            );
            let spec = job.job.spec.as_ref().unwrap();
            let c = &spec.template.spec.as_ref().unwrap().containers[0];
            assert_eq!(
                c.args.clone().unwrap(),
                [there_before, step.args.clone()].concat(),
                "{}",
                step.kind
            );
            let env: Vec<(String, String)> = c
                .env
                .iter()
                .flatten()
                .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
                .collect();
            assert!(env.starts_with(&step.env), "{}: {env:?}", step.kind);
            assert_eq!(job.completions() as usize, step.shards, "{}", step.kind);
            assert_eq!(job.quorum() as usize, step.quorum, "{}", step.kind);
        }
        // --from-round 1: round 0 resumes in both, rounds 1 and 2 recompute in both.
        let resuming: Vec<String> = plan
            .steps
            .iter()
            .filter(|s| s.resume)
            .map(|s| s.kind.to_string())
            .collect();
        assert_eq!(resuming, ["trainers of round 0", "aggregator of round 0"]);
    }
}
