//! `pipeline local`: copier, then rounds of (N trainers in parallel → aggregator), as
//! local processes, printing a table per round and optionally writing a JSON report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use fedimdb::atomic::{read_json, write_json_atomic};
use fedimdb::layout::Layout;
use fedimdb::metrics::Metrics;
use fedimdb::report::{RoundReport, UpdateReport};
use serde::Serialize;
use tracing::info;

use crate::procs::{Step, command, run_all, run_one};
use crate::{LocalArgs, PartitionArg};

/// The shared archive, looked up relative to the working folder.
const SHARED_ARCHIVE: &str = "../shared/data/aclImdb-labeled.tar.gz";

/// One round in the JSON report.
#[derive(Debug, Serialize)]
struct RoundSummary {
    round: u32,
    test_accuracy: f64,
    seconds: f64,
    test: Metrics,
}

/// The JSON report of a run (`--report FILE`).
#[derive(Debug, Serialize)]
struct RunReport {
    workers: usize,
    partition: String,
    alpha: Option<f64>,
    rounds_trained: u32,
    epochs: u32,
    batch: usize,
    lr: f32,
    seed: u64,
    /// Final test accuracy (fraction).
    test_accuracy: f64,
    test: Metrics,
    seconds_total: f64,
    seconds_copier: f64,
    /// Round 0 is the statistics round (its model is untrained: zero weights).
    rounds: Vec<RoundSummary>,
    model: PathBuf,
}

fn check(args: &LocalArgs) -> Result<()> {
    ensure!(args.workers >= 1, "--workers must be at least 1");
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(args.epochs >= 1, "--epochs must be at least 1");
    ensure!(args.batch >= 1, "--batch must be at least 1");
    ensure!(args.lr > 0.0 && args.lr.is_finite(), "--lr must be a positive number, got {}", args.lr);
    ensure!(args.alpha > 0.0 && args.alpha.is_finite(), "--alpha must be a positive number, got {}", args.alpha);
    ensure!(args.jobs != Some(0), "--jobs must be at least 1");
    Ok(())
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
    let dir = args.root.join("download");
    let official = dir.join("aclImdb_v1.tar.gz");
    if !official.is_file() {
        info!(to = %dir.display(), "no --source and no shared archive: downloading the official archive");
        let mut cmd = command("copier")?;
        cmd.arg("download").arg("--to").arg(&dir);
        run_one(Step { name: "copier download".into(), command: cmd, log: logs.join("download.log") })?;
    }
    Ok(official)
}

pub fn run(args: &LocalArgs) -> Result<()> {
    check(args)?;
    let t0 = Instant::now();
    let layout = Layout::new(&args.root);
    std::fs::create_dir_all(&args.root).with_context(|| format!("cannot create {}", args.root.display()))?;
    let logs = args.root.join("logs");
    let source = resolve_source(args, &logs)?;
    let jobs = args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));

    let mut copier = command("copier")?;
    copier
        .arg("--source")
        .arg(&source)
        .arg("--out")
        .arg(&args.root)
        .arg("--workers")
        .arg(args.workers.to_string())
        .arg("--seed")
        .arg(args.seed.to_string());
    match args.partition {
        PartitionArg::Iid => copier.args(["--partition", "iid"]),
        PartitionArg::Dirichlet => copier.args(["--partition", "dirichlet", "--alpha", &args.alpha.to_string()]),
    };
    if args.force {
        copier.arg("--force");
    }
    run_one(Step { name: "copier".into(), command: copier, log: logs.join("copier.log") })?;
    let seconds_copier = t0.elapsed().as_secs_f64();
    println!("data: {} shards from {} ({seconds_copier:.1} s)", args.workers, source.display());

    let mut rounds = Vec::new();
    for round in 0..=args.rounds {
        let r0 = Instant::now();
        // A re-run recomputes the round from scratch: stale updates (say, of more workers)
        // must not be mixed in.
        let dir = layout.round_dir(round);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        }
        let steps = (0..args.workers)
            .map(|shard| trainer_step(args, round, shard, &logs))
            .collect::<Result<Vec<_>>>()?;
        run_all(steps, jobs)?;
        let mut agg = command("aggregator")?;
        agg.arg("--root").arg(&args.root).arg("--round").arg(round.to_string());
        run_one(Step { name: format!("aggregator round {round}"), command: agg, log: logs.join(format!("round-{round:04}-aggregator.log")) })?;
        let seconds = r0.elapsed().as_secs_f64();
        let report: RoundReport = read_json(&layout.round_report(round))?;
        print_round(&layout, round, args.workers, &report, seconds)?;
        rounds.push(RoundSummary { round, test_accuracy: report.test.accuracy, seconds, test: report.test });
    }

    let last = rounds.last().expect("at least one round");
    let report = RunReport {
        workers: args.workers,
        partition: format!("{:?}", args.partition).to_lowercase(),
        alpha: (args.partition == PartitionArg::Dirichlet).then_some(args.alpha),
        rounds_trained: args.rounds,
        epochs: args.epochs,
        batch: args.batch,
        lr: args.lr,
        seed: args.seed,
        test_accuracy: last.test_accuracy,
        test: last.test,
        seconds_total: t0.elapsed().as_secs_f64(),
        seconds_copier,
        model: layout.latest_model(),
        rounds,
    };
    println!(
        "done: test accuracy {:.2}% after {} rounds, {:.1} s in all; model at {}",
        report.test_accuracy * 100.0,
        args.rounds,
        report.seconds_total,
        report.model.display()
    );
    if let Some(path) = &args.report {
        write_json_atomic(path, &report)?;
    }
    Ok(())
}

fn trainer_step(args: &LocalArgs, round: u32, shard: usize, logs: &Path) -> Result<Step> {
    let mut cmd = command("trainer")?;
    cmd.arg("--root")
        .arg(&args.root)
        .args(["--round", &round.to_string(), "--shard", &shard.to_string()])
        .args(["--epochs", &args.epochs.to_string(), "--batch", &args.batch.to_string()])
        .args(["--lr", &args.lr.to_string(), "--seed", &args.seed.to_string()])
        .args(["--hash-bits", &args.hash_bits.to_string(), "--max-ngram", &args.max_ngram.to_string()])
        .env_remove("JOB_COMPLETION_INDEX");
    Ok(Step {
        name: format!("trainer round {round} shard {shard}"),
        command: cmd,
        log: logs.join(format!("round-{round:04}-trainer-{shard:05}.log")),
    })
}

fn print_round(layout: &Layout, round: u32, workers: usize, report: &RoundReport, seconds: f64) -> Result<()> {
    let what = if round == 0 { "statistics (untrained model)" } else { "training" };
    println!("\nround {round}: {what}, {seconds:.1} s");
    println!("  {:>5}  {:>7}  {:>8}  {:>9}  {:>7}", "shard", "reviews", "loss", "local acc", "seconds");
    for shard in 0..workers {
        let u: UpdateReport = read_json(&layout.update_report(round, shard))?;
        match u.epochs.last() {
            Some(e) => println!("  {shard:>5}  {:>7}  {:>8.4}  {:>9.4}  {:>7.2}", u.samples, e.loss, e.accuracy, u.seconds),
            None => println!("  {shard:>5}  {:>7}  {:>8}  {:>9}  {:>7.2}", u.samples, "-", "-", u.seconds),
        }
    }
    let t = &report.test;
    println!(
        "  global model: test accuracy {:.4}  F1 {:.4}  ROC-AUC {:.4}  log loss {:.4}",
        t.accuracy, t.f1, t.roc_auc, t.log_loss
    );
    if t.accuracy.is_nan() {
        bail!("round {round} produced no test accuracy");
    }
    Ok(())
}
