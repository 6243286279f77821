//! Crash tests: the trainer, the aggregator and the pipeline itself are killed with SIGKILL
//! at chosen points (half-way through writing a file included), the pipeline is run again,
//! and the result must be byte for byte the result of a run that was never interrupted.
//!
//! Exact points come from `FEDIMDB_FAULT` (see `fedimdb::fault`): the binary kills itself
//! there, exactly as `kill -9` would. The pipeline itself is killed from outside.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    KEEP_ALL, QUICK, ROUNDS, WORKERS, kept_rounds, run, run_ok, small_archive, temp_files,
};
use fedimdb::digest::sha256_file;
use fedimdb::layout::Layout;

/// The run every test here interrupts: [`common::pipeline`] with [`QUICK`] training.
/// Every round keeps its files (`--keep-rounds all`), so that all of them can be compared.
fn pipeline(archive: &Path, root: &Path) -> Command {
    common::pipeline(archive, root, &[QUICK, KEEP_ALL].concat())
}

/// The sha256 of every output a run leaves: shards, updates, global models and the
/// published model (reports hold timings, so they are not compared).
fn outputs(root: &Path) -> BTreeMap<String, String> {
    let l = Layout::new(root);
    let mut files = vec![l.test_set(), l.latest_model()];
    for s in 0..WORKERS {
        files.push(l.shard(s));
    }
    for r in 0..=ROUNDS {
        files.push(l.global_model(r));
        for s in 0..WORKERS {
            files.push(l.update(r, s));
        }
    }
    files
        .into_iter()
        .map(|f| {
            let sha = sha256_file(&f).unwrap_or_else(|e| panic!("{e:#}"));
            (f.strip_prefix(root).unwrap().display().to_string(), sha)
        })
        .collect()
}

/// A folder with the small archive, and the outputs of an uninterrupted run on it.
fn uninterrupted_run() -> (tempfile::TempDir, PathBuf, BTreeMap<String, String>) {
    let dir = tempfile::tempdir().unwrap();
    let (archive, _) = small_archive(dir.path(), 300, 150);
    let clean = dir.path().join("clean");
    let (out, log) = run(&mut pipeline(&archive, &clean));
    assert!(out.status.success(), "uninterrupted run failed:\n{log}");
    let want = outputs(&clean);
    (dir, archive, want)
}

#[test]
fn killed_trainers_and_aggregators_resume_to_the_uninterrupted_result() {
    let (dir, archive, want) = uninterrupted_run();

    // Points in the order a run reaches them: each resumed run keeps what verifies and
    // dies at the next point. `write:` points die with half the file in its temporary.
    // A round's 3 workers run as 2 trainer processes, of shards 0 and 1, and of shard 2
    // (`--jobs 2`); a process that dies takes the shards after it along, and the other one
    // may or may not finish first. So each point is in a shard sure to be computed again.
    let points = [
        "write:round-0000/updates/shard-00001.safetensors",
        "trainer:0:1:update-written",
        "aggregator:0:global-written",
        "write:model/latest.json",
        "trainer:1:1:update-written",
        "write:round-0001/global.safetensors",
        "aggregator:1:report-written",
        "write:round-0002/updates/shard-00000.json",
        "write:round-0002/updates/shard-00001.safetensors",
        "aggregator:2:latest-model-written",
    ];
    let root = dir.path().join("crashed");
    let layout = Layout::new(&root);
    for point in points {
        let (out, log) = run(pipeline(&archive, &root).env("FEDIMDB_FAULT", point));
        assert!(
            !out.status.success(),
            "the run with FEDIMDB_FAULT={point} did not fail:\n{log}"
        );
        assert!(
            log.contains("failed (signal: 9 (SIGKILL))"),
            "FEDIMDB_FAULT={point}: no step was killed:\n{log}"
        );
        if point.starts_with("write:") {
            assert!(
                !temp_files(&root).is_empty(),
                "{point}: no half-written file was left to test with"
            );
        }
        // Nothing after the killed step ran: the last round's global model only appears
        // when the run gets there.
        assert!(
            !layout.global_model(ROUNDS).exists() || point == "aggregator:2:latest-model-written",
            "{point}: the run went on"
        );
    }
    let (out, log) = run(&mut pipeline(&archive, &root));
    assert!(out.status.success(), "the final resumed run failed:\n{log}");
    assert!(
        temp_files(&root).is_empty(),
        "temporary files left: {:?}",
        temp_files(&root)
    );
    assert_eq!(
        outputs(&root),
        want,
        "the resumed run's outputs differ from the uninterrupted run's"
    );
    let card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.latest_card()).unwrap()).unwrap();
    assert_eq!(card["round"], ROUNDS);
    assert_eq!(
        card["sha256"].as_str(),
        Some(want["model/latest.safetensors"].as_str())
    );

    // A run over a complete root verifies everything and recomputes nothing.
    let (out, _) = run_ok(&mut pipeline(&archive, &root));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all: Vec<u32> = (0..=ROUNDS).collect();
    assert_eq!(
        kept_rounds(&stdout),
        all,
        "a round was recomputed:\n{stdout}"
    );
    assert_eq!(outputs(&root), want);

    // --from-round 2 recomputes the last round, to the same bytes.
    let (out, _) = run_ok(pipeline(&archive, &root).args(["--from-round", "2"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(kept_rounds(&stdout), [0, 1], "{stdout}");
    assert_eq!(outputs(&root), want);
}

/// Waits until `cond` holds, polling; false on timeout.
fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn a_killed_pipeline_is_reported_and_resumed_and_a_live_one_is_not_disturbed() {
    let (dir, archive, want) = uninterrupted_run();

    let root = dir.path().join("killed");
    let layout = Layout::new(&root);
    let mut child = pipeline(&archive, &root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once round 1 is under way: the data and round 0 are done, round 1 is not.
    let started = wait_for(Duration::from_secs(120), || {
        layout.update_report(1, 0).exists() || layout.update_report(1, 1).exists()
    });
    assert!(started, "the pipeline never reached round 1");

    // While it runs, a second pipeline on the same root is refused, naming the holder.
    let (out, log) = run(&mut pipeline(&archive, &root));
    if !layout.global_model(ROUNDS).exists() {
        assert!(
            !out.status.success(),
            "a second pipeline ran on a locked root:\n{log}"
        );
        assert!(
            log.contains("is in use by another pipeline")
                && log.contains(&format!("pid {}", child.id())),
            "{log}"
        );
    }

    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Its trainers may still be finishing; they write complete files or nothing.
    std::thread::sleep(Duration::from_millis(500));

    let (out, log) = run(&mut pipeline(&archive, &root));
    assert!(out.status.success(), "the resumed run failed:\n{log}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("found an interrupted run")
            && stdout.contains(&format!("pid {}", child.id())),
        "{stdout}"
    );
    assert!(kept_rounds(&stdout).contains(&0), "{stdout}");
    assert_eq!(
        outputs(&root),
        want,
        "the resumed run's outputs differ from the uninterrupted run's"
    );

    // A run that ended normally leaves no interruption behind.
    let (out, _) = run(&mut pipeline(&archive, &root));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("interrupted"));
}
