//! Tests of whole runs (`Orchestrator::run_locked`) on the fake cluster: steps that were up
//! to date, and rounds whose trainers partly failed, with and without `--min-workers`.

use serde_json::json;

use super::fixtures::{
    DRIVER_JOB, Fake, LEASE, Ran, assert_has, job_name_of, methods_on, params, params_with,
    run_as_driver, run_on_fake,
};
use fedimdb::outcome::{Outcome, Status};

use crate::k8s::jobs::{self, Overlay, Params};
use crate::rounds::{RoundRow, round_table, summarize};

/// What each step did comes from its pods' outcome records (termination messages), never
/// from their logs: up to date or computed, with the aggregator's test accuracy.
#[tokio::test]
async fn each_steps_outcome_is_read_from_its_termination_messages() {
    let steps = jobs::steps(&params(2, 1, Overlay::Local));
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
    assert_eq!(summarize(&[], "pods"), None);
    assert_eq!(
        summarize(&[fresh.clone(), done.clone(), fresh.clone()], "pods").unwrap(),
        "2 of 3 pods up to date, 1 computed"
    );
    assert_eq!(
        summarize(&[done.clone(), None], "pods").unwrap(),
        "computed (1 pods left no outcome record)"
    );
    assert_eq!(summarize(&[None, None], "pods").unwrap(), "outcome unknown");
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
    let steps = jobs::steps(&three_of_four());
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
    let steps = jobs::steps(&three_of_four());
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
    let steps = jobs::steps(&params(4, 1, Overlay::Local));
    let f = failed_trainers("0,2-3", "1", 3);
    let err = run_on_fake(&steps, f, 4).await.err();
    assert!(
        err.ends_with("failed: FailedIndexes: Job has failed indexes"),
        "{err}"
    );
}

/// The merge patches a driver sent to its own Job, as JSON.
fn driver_patches(ran: &Ran) -> Vec<serde_json::Value> {
    ran.patches()
        .filter(|s| job_name_of(&s.uri) == DRIVER_JOB)
        .map(|s| {
            assert_eq!(s.content_type, "application/merge-patch+json", "{}", s.uri);
            serde_json::from_str(&s.body).unwrap()
        })
        .collect()
}

/// A driver running as a Job writes the run's phase, round and latest test accuracy as
/// labels on that Job (and the step it is at as an annotation): running from the first
/// step, the round of each step, the accuracy once a round is aggregated, done at the end.
#[tokio::test]
async fn the_driver_writes_its_phase_round_and_accuracy_on_its_job() {
    let steps = jobs::steps(&params(2, 1, Overlay::Local));
    let ran = run_as_driver(&steps, Fake::default(), 2).await;
    ran.result.as_ref().unwrap();
    let patches = driver_patches(&ran);
    let labels = |i: usize| patches[i]["metadata"]["labels"].clone();
    assert_eq!(
        labels(0),
        json!({ "fedimdb.io/phase": "running" }),
        "the copier has no round"
    );
    assert_eq!(
        patches[0]["metadata"]["annotations"]["fedimdb.io/step"],
        "[1/5] copier"
    );
    assert_eq!(
        labels(1),
        json!({ "fedimdb.io/phase": "running", "fedimdb.io/round": "0" })
    );
    assert!(
        patches.iter().any(|p| p["metadata"]["labels"]
            == json!({ "fedimdb.io/phase": "running", "fedimdb.io/round": "0",
                       "fedimdb.io/accuracy": "0.9000" })),
        "the accuracy of round 0 once aggregated: {patches:#?}"
    );
    assert_eq!(
        labels(patches.len() - 1),
        json!({ "fedimdb.io/phase": "done", "fedimdb.io/round": "1",
                "fedimdb.io/accuracy": "0.9000" })
    );
    // Only labels and annotations are sent: the Job's spec is the controller's.
    for p in &patches {
        let keys: Vec<&String> = p.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["metadata"], "{p}");
    }
    // Without --driver-job nothing is written.
    let ran = run_on_fake(&steps, Fake::default(), 2).await;
    assert!(driver_patches(&ran).is_empty());
}

/// A run whose step fails leaves `failed` on the driver's Job, then suspends that Job with
/// the error as an annotation (so that applying the Job again resumes the run); a run
/// that goes on removes the annotation.
#[tokio::test]
async fn a_failed_run_is_marked_failed_and_its_driver_job_suspended() {
    let steps = jobs::steps(&params(4, 1, Overlay::Local));
    let ran = run_as_driver(&steps, failed_trainers("0,2-3", "1", 3), 4).await;
    let err = ran.err();
    let patches = driver_patches(&ran);
    let [.., marked, suspended] = &patches[..] else {
        panic!("{patches:#?}")
    };
    assert_eq!(
        marked["metadata"]["labels"],
        json!({ "fedimdb.io/phase": "failed", "fedimdb.io/round": "0" })
    );
    assert!(marked["metadata"]["annotations"].is_null(), "{marked}");
    assert_eq!(suspended["spec"], json!({ "suspend": true }));
    assert_eq!(
        suspended["metadata"]["annotations"]["fedimdb.io/error"],
        err
    );
    assert_has(&ran.text(), "suspended job fedimdb-driver");
    assert_has(&ran.text(), "apply the run overlay again");
    // The lock was released before the suspension (a new driver takes it at once).
    let released = ran.seen.iter().rposition(|s| s.method == "DELETE").unwrap();
    let suspending = ran.seen.iter().rposition(|s| s.method == "PATCH").unwrap();
    assert!(released < suspending, "{:#?}", ran.seen);
    for p in &patches[..patches.len() - 2] {
        assert!(
            p["metadata"]["annotations"]
                .as_object()
                .unwrap()
                .get("fedimdb.io/error")
                .is_some_and(|v| v.is_null()),
            "a running driver clears the error: {p}"
        );
    }
    // Without a driver Job there is nothing to suspend.
    let ran = run_on_fake(&steps, failed_trainers("0,2-3", "1", 3), 4).await;
    assert!(!ran.text().contains("suspended"), "{}", ran.text());
}

/// Without the right to patch its Job, the driver says so once and the run goes on.
#[tokio::test]
async fn a_driver_that_cannot_patch_its_job_says_so_once_and_goes_on() {
    let steps = jobs::steps(&params(2, 1, Overlay::Local));
    let f = Fake {
        driver_patch_forbidden: true,
        ..Default::default()
    };
    let ran = run_as_driver(&steps, f, 2).await;
    ran.result.as_ref().unwrap();
    let text = ran.text();
    assert_eq!(
        text.matches("cannot write the run's progress on job fedimdb-driver")
            .count(),
        1,
        "{text}"
    );
    assert_has(&text, "cannot patch resource");
    assert_has(&text, "the Role needs `patch` on jobs");
    assert!(driver_patches(&ran).len() > 2, "it kept trying");
}

/// The driver's log shows a row per round as it ends (with the header before the first)
/// and the whole table at the end: what the trainers and the aggregator did, the test
/// accuracy, the seconds.
#[tokio::test]
async fn the_log_shows_the_round_table() {
    let steps = jobs::steps(&params(2, 1, Overlay::Local));
    let ran = run_on_fake(&steps, Fake::default(), 2).await;
    ran.result.as_ref().unwrap();
    let lines = &ran.lines;
    let header = format!("  {}", round_table(&[])[0]);
    assert_eq!(
        lines.iter().filter(|l| **l == header).count(),
        2,
        "{lines:#?}"
    );
    let row = |round: u32| {
        lines
            .iter()
            .filter(|l| {
                l.trim_start()
                    .starts_with(&format!("{round}  2/2 computed"))
            })
            .count()
    };
    assert_eq!(
        (row(0), row(1)),
        (2, 2),
        "a row per round, twice: {lines:#?}"
    );
    let first_row = lines
        .iter()
        .position(|l| l.contains("0  2/2 computed"))
        .unwrap();
    let aggregated = lines
        .iter()
        .position(|l| l.contains("aggregator of round 0: computed"))
        .unwrap();
    let trainers_of_1 = lines
        .iter()
        .position(|l| l.contains("[4/5] trainers of round 1"))
        .unwrap();
    assert!(
        aggregated < first_row && first_row < trainers_of_1,
        "{lines:#?}"
    );
    assert_has(&lines[first_row], "90.00%");
    // The whole table, before the last line of the run and the lock's release.
    assert_eq!(lines[lines.len() - 6], "rounds:", "{lines:#?}");
    assert_has(&lines[lines.len() - 2], "all 5 steps done");
}

#[test]
fn the_round_table_lines_up() {
    let rows = [
        RoundRow {
            round: 0,
            trainers: "5/5 computed".into(),
            aggregator: "computed".into(),
            accuracy: Some(0.5),
            seconds: 12.4,
        },
        RoundRow {
            round: 11,
            trainers: "3/5 2 of 3 pods up to date, 1 computed".into(),
            aggregator: "up to date, nothing recomputed".into(),
            accuracy: None,
            seconds: 3.0,
        },
    ];
    let t = round_table(&rows);
    assert_eq!(
        t[0],
        "round  trainers                              aggregator                      test acc  seconds"
    );
    assert_eq!(
        t[1],
        "    0  5/5 computed                          computed                          50.00%       12"
    );
    // The longest aggregator cell fits its column: the figures stay under their headers.
    let up_to_date = RoundRow {
        aggregator: "up to date, nothing recomputed".into(),
        ..rows[0].clone()
    };
    assert_eq!(round_table(&[up_to_date])[1].len(), t[0].len());
    assert!(
        t[2].starts_with(
            "   11  3/5 2 of 3 pods up to date, 1 computed  up to date, nothing recomputed"
        ),
        "{}",
        t[2]
    );
    assert!(t[2].ends_with("         -        3"), "{}", t[2]);
}
