//! Tests of whole runs (`Orchestrator::run_locked`) on the fake cluster: steps that were up
//! to date, and rounds whose trainers partly failed, with and without `--min-workers`.

use serde_json::json;

use super::fixtures::{
    Fake, LEASE, assert_has, job_name_of, methods_on, params, params_with, run_on_fake,
};
use crate::k8s::jobs::{self, Overlay, Params};

/// Steps whose pods log "up to date" are reported as such.
#[tokio::test]
async fn steps_that_were_up_to_date_are_reported() {
    let steps = jobs::plan(&params(2, 1, Overlay::Local));
    let f = Fake {
        log: "INFO trainer: rounds/round-0/updates/shard-00001: up to date\n".into(),
        ..Default::default()
    };
    let ran = run_on_fake(&steps, f, 2).await;
    ran.result.as_ref().unwrap();
    let lines = ran.text();
    for k in ["trainers of round 0", "aggregator of round 1", "copier"] {
        assert_has(&lines, &format!("  {k}: up to date, nothing recomputed"));
    }
    let log = &ran
        .seen
        .iter()
        .find(|s| s.uri.contains("/log"))
        .unwrap()
        .uri;
    assert_has(log, "container=");
    // Without --resume nothing is looked up for the trainers and aggregators.
    let p = params_with(2, 1, Overlay::Local, &["--from-round", "0"]);
    let ran = run_on_fake(&jobs::plan(&p), Fake::default(), 2).await;
    ran.result.as_ref().unwrap();
    let logs = ran.seen.iter().filter(|s| s.uri.contains("/log")).count();
    assert_eq!(logs, 1, "only the copier's log is read");
    let lines = ran.text();
    assert_has(&lines, "  copier: computed");
}

/// A fake cluster whose trainer Jobs fail with indexes `completed` succeeded (`succeeded`
/// of them) and `failed` failed.
fn failed_trainers(completed: &str, failed: &str, succeeded: i32) -> Fake {
    Fake {
        trainer_status: Some(json!({
            "succeeded": succeeded, "failed": 3, "active": 0,
            "completedIndexes": completed, "failedIndexes": failed,
            "conditions": [{ "type": "Failed", "status": "True", "reason": "FailedIndexes",
                             "message": "Job has failed indexes" }],
        })),
        ..Default::default()
    }
}

/// `params(4, 1)` with `--min-workers 3`.
fn three_of_four() -> Params {
    params_with(4, 1, Overlay::Local, &["--min-workers", "3"])
}

/// With --min-workers 3 of 4, trainers of which 3 succeeded are enough: a warning naming
/// the failed index, then the aggregator runs.
#[tokio::test]
async fn a_partly_failed_round_with_a_quorum_goes_on() {
    let steps = jobs::plan(&three_of_four());
    let f = failed_trainers("0,2-3", "1", 3);
    let ran = run_on_fake(&steps, f, 4).await;
    ran.result.as_ref().unwrap();
    let lines = ran.text();
    assert_has(
        &lines,
        "warning: job fedimdb-t1-trainer-r0 failed (FailedIndexes, failed indices 1), but 3 of 4 succeeded, at least --min-workers 3",
    );
    let applied: Vec<String> = ran.patches().map(|s| job_name_of(&s.uri)).collect();
    assert_eq!(applied.len(), steps.len(), "{applied:?}");
}

/// Below the quorum the run stops after the trainers, saying how many succeeded.
#[tokio::test]
async fn a_round_below_the_quorum_fails() {
    let steps = jobs::plan(&three_of_four());
    let f = failed_trainers("0,2", "1,3", 2);
    let ran = run_on_fake(&steps, f, 4).await;
    let err = ran.err();
    assert_has(
        &err,
        "job fedimdb-t1-trainer-r0 (trainers of round 0) failed: FailedIndexes",
    );
    assert_has(
        &err,
        "Job has failed indexes, failed indices 1,3: 2 of 4 succeeded, fewer than --min-workers 3",
    );
    assert!(
        !ran.patches().any(|s| s.uri.contains("aggregator")),
        "no aggregator below the quorum"
    );
    assert_eq!(
        methods_on(&ran.seen, LEASE).last().unwrap(),
        "DELETE",
        "lock released on failure"
    );
    // Without --min-workers the same Job fails the run as before.
    let steps = jobs::plan(&params(4, 1, Overlay::Local));
    let f = failed_trainers("0,2-3", "1", 3);
    let err = run_on_fake(&steps, f, 4).await.err();
    assert!(
        err.ends_with("failed: FailedIndexes: Job has failed indexes"),
        "{err}"
    );
}
