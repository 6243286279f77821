//! Tests of whole runs (`Orchestrator::run_locked`) on the fake cluster: steps that were up
//! to date, and rounds whose trainers partly failed, with and without `--min-workers`.

use serde_json::json;

use super::fixtures::{
    Fake, LEASE, assert_has, job_name_of, methods_on, params, params_with, run_on_fake,
};
use fedimdb::outcome::{Outcome, Status};

use crate::k8s::api::summarize;
use crate::k8s::jobs::{self, Overlay, Params};

/// What each step did comes from its pods' outcome records (termination messages), never
/// from their logs: up to date or computed, with the aggregator's test accuracy.
#[tokio::test]
async fn each_steps_outcome_is_read_from_its_termination_messages() {
    let steps = jobs::plan(&params(2, 1, Overlay::Local));
    let f = Fake {
        record: Some(Status::UpToDate),
        ..Default::default()
    };
    let ran = run_on_fake(&steps, f, 2).await;
    ran.result.as_ref().unwrap();
    let lines = ran.text();
    for k in ["trainers of round 0", "copier"] {
        assert_has(&lines, &format!("  {k}: up to date, nothing recomputed\n"));
    }
    assert_has(
        &lines,
        "  aggregator of round 1: up to date, nothing recomputed, test accuracy 90.00%",
    );
    assert!(
        !ran.seen.iter().any(|s| s.uri.contains("/log")),
        "a log was read"
    );
    let ran = run_on_fake(&steps, Fake::default(), 2).await;
    ran.result.as_ref().unwrap();
    let lines = ran.text();
    assert_has(&lines, "  copier: computed\n");
    assert_has(
        &lines,
        "  aggregator of round 0: computed, test accuracy 90.00%",
    );
    // Pods that leave no record (an older image) are said to be of unknown outcome.
    let f = Fake {
        record: None,
        ..Default::default()
    };
    let ran = run_on_fake(&steps, f, 2).await;
    ran.result.as_ref().unwrap();
    assert_has(&ran.text(), "  trainers of round 1: outcome unknown");
}

/// One line per step from its pods' records, mixed and partly missing ones included.
#[test]
fn outcomes_are_summarized_in_one_line() {
    let record = |status| Some(Outcome::new("trainer", status));
    let (done, fresh) = (record(Status::Done), record(Status::UpToDate));
    assert_eq!(summarize(&[]), None);
    assert_eq!(
        summarize(&[fresh.clone(), done.clone(), fresh.clone()]).unwrap(),
        "2 of 3 pods up to date, 1 computed"
    );
    assert_eq!(
        summarize(&[done.clone(), None]).unwrap(),
        "computed (1 pods left no outcome record)"
    );
    assert_eq!(summarize(&[None, None]).unwrap(), "outcome unknown");
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
