//! The retention rule (`--keep-rounds`, default 1): after each round the aggregator removes
//! the model files of older rounds and keeps every report; a re-run, `trainer --resume`
//! and `aggregator --resume` recognise the removed rounds by their reports, and the model
//! is the same as when every file is kept.

mod common;

use std::path::Path;

use common::{QUICK, ROUNDS, WORKERS, bin, kept_rounds, pipeline, run, run_ok, small_archive};
use fedimdb::layout::Layout;

/// Whether each model file of `round` is on the volume: global model, control, the server
/// optimizer's moments (rounds ≥ 1), every update.
fn model_files(l: &Layout, round: u32) -> Vec<bool> {
    let mut present = vec![l.global_model(round).exists(), l.control(round).exists()];
    if round > 0 {
        present.push(l.moments(round).exists());
    }
    present.extend((0..WORKERS).map(|s| l.update(round, s).exists()));
    present
}

/// How many model files round `round` writes.
fn files_of(round: u32) -> usize {
    2 + usize::from(round > 0) + WORKERS
}

fn reports(l: &Layout, round: u32) -> bool {
    l.round_report(round).exists() && (0..WORKERS).all(|s| l.update_report(round, s).exists())
}

fn latest(root: &Path) -> Vec<u8> {
    std::fs::read(Layout::new(root).latest_model()).unwrap()
}

/// `NAME --root ROOT --round R --resume` with the run's flags.
fn resumed(name: &str, root: &Path, round: u32, extra: &[&str]) -> (std::process::Output, String) {
    let mut c = bin(name);
    c.arg("--root")
        .arg(root)
        .args(["--round", &round.to_string(), "--resume"])
        .args(extra);
    run(&mut c)
}

#[test]
fn old_rounds_lose_their_model_files_and_everything_still_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (archive, _) = small_archive(dir.path(), 200, 100);
    let (pruned, kept) = (dir.path().join("pruned"), dir.path().join("kept"));
    run_ok(&mut pipeline(&archive, &pruned, QUICK));
    run_ok(&mut pipeline(
        &archive,
        &kept,
        &[QUICK, &["--keep-rounds", "all"]].concat(),
    ));

    // The newest round keeps its model files, and so does the round before (what the
    // newest was made from: its global model, control, and the workers' control variates
    // in their updates); older rounds keep none; every report stays.
    let l = Layout::new(&pruned);
    for round in 0..=ROUNDS {
        let want = vec![round + 1 >= ROUNDS; files_of(round)];
        assert_eq!(model_files(&l, round), want, "round {round}");
        assert!(reports(&l, round), "round {round} lost a report");
        assert_eq!(
            model_files(&Layout::new(&kept), round),
            vec![true; files_of(round)],
            "--keep-rounds all, round {round}"
        );
    }
    assert_eq!(
        latest(&pruned),
        latest(&kept),
        "retention changed the model"
    );

    // A re-run recomputes nothing: the removed rounds verify through the newest model.
    let (out, _) = run_ok(&mut pipeline(&archive, &pruned, QUICK));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all: Vec<u32> = (0..=ROUNDS).collect();
    assert_eq!(kept_rounds(&stdout), all, "{stdout}");
    assert_eq!(latest(&pruned), latest(&kept));

    // So do the steps themselves on a removed round, as Kubernetes Jobs run them.
    let (out, log) = resumed(
        "trainer",
        &pruned,
        0,
        &["--shard", "1", "--hash-bits", "16"],
    );
    assert!(out.status.success() && log.contains("up to date"), "{log}");
    let (out, log) = resumed("aggregator", &pruned, 0, &[]);
    assert!(out.status.success() && log.contains("up to date"), "{log}");
    assert_eq!(model_files(&l, 0), vec![false; files_of(0)]);

    // The newest round can be recomputed (its inputs are kept), to the same bytes: a
    // worker trained again, then the round aggregated again.
    let update = std::fs::read(l.update(ROUNDS, 0)).unwrap();
    let newest = ROUNDS.to_string();
    let mut trainer = bin("trainer");
    trainer.arg("--root").arg(&pruned);
    run_ok(trainer.args(["--round", &newest, "--shard", "0", "--epochs", "2"]));
    assert_eq!(std::fs::read(l.update(ROUNDS, 0)).unwrap(), update);
    run_ok(
        bin("aggregator")
            .arg("--root")
            .arg(&pruned)
            .args(["--round", &newest]),
    );
    assert_eq!(latest(&pruned), latest(&kept));

    // Training flags changed (the algorithm: FedAvg has no gradient round): round 1 must be
    // recomputed, but its input (round 0's model) is gone; the error says so and what to do.
    let (out, log) = run(&mut pipeline(
        &archive,
        &pruned,
        &[QUICK, &["--algorithm", "fedavg"]].concat(),
    ));
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("removed by the retention rule") && log.contains("--from-round 0"),
        "{log}"
    );
    // ... and recomputing from round 0 works, to the bytes of a run that kept everything.
    run_ok(&mut pipeline(
        &archive,
        &pruned,
        &[QUICK, &["--from-round", "0"]].concat(),
    ));
    assert_eq!(latest(&pruned), latest(&kept));

    // A damaged model breaks the chain: a removed round made before it no longer counts
    // as done, and its worker computes its update again.
    let oldest_kept = l.global_model(ROUNDS - 1);
    let mut bytes = std::fs::read(&oldest_kept).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 1;
    std::fs::write(&oldest_kept, bytes).unwrap();
    let (out, log) = resumed(
        "trainer",
        &pruned,
        0,
        &["--shard", "1", "--hash-bits", "16"],
    );
    assert!(out.status.success() && !log.contains("up to date"), "{log}");
    assert!(
        log.contains("round-0000/updates/shard-00001.safetensors is missing"),
        "{log}"
    );
    assert!(l.update(0, 1).exists());
}

/// A round that went on without a worker (`--min-workers`) and that later rounds were made
/// from is final: a re-run keeps it as it is, with or without the retention rule, instead
/// of filling the worker in (which would need removed inputs and change later models).
#[test]
fn a_round_left_short_under_a_quorum_stays_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (archive, _) = small_archive(dir.path(), 200, 100);
    let root = dir.path().join("vol");
    let flags = [QUICK, &["--min-workers", "2"]].concat();
    // The trainer of round 1, shard 2, dies after writing its update, before its report.
    let (out, log) =
        run(pipeline(&archive, &root, &flags)
            .env(fedimdb::fault::ENV, "trainer:1:2:update-written"));
    assert!(out.status.success(), "{log}");
    let l = Layout::new(&root);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(l.round_report(1)).unwrap()).unwrap();
    assert_eq!(report["missing"], serde_json::json!([2]), "{log}");
    let model = latest(&root);

    let (out, _) = run_ok(&mut pipeline(&archive, &root, &flags));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all: Vec<u32> = (0..=ROUNDS).collect();
    assert_eq!(kept_rounds(&stdout), all, "{stdout}");
    assert!(
        stdout.contains("(no update: left out under the quorum)"),
        "{stdout}"
    );
    assert_eq!(latest(&root), model);
    let (out, log) = resumed("trainer", &root, 1, &["--shard", "2", "--epochs", "2"]);
    assert!(
        out.status.success() && log.contains("went on without this shard"),
        "{log}"
    );
}
