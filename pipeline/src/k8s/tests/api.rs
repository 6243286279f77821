//! Tests of `api.rs`: a Job's outcome and index sets (pure), and `Orchestrator::run`
//! applying the Jobs in order and waiting for each, against the mock API server.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};

use super::fixtures::{
    Handler, assert_has, job_json, job_name_of, params, pod_list, run, status_json,
};
use crate::k8s::api::{Outcome, count_indexes, outcome};
use crate::k8s::jobs::{self, Overlay};

#[test]
fn failed_and_failure_target_conditions_are_failures() {
    let j: k8s_openapi::api::batch::v1::Job =
        serde_json::from_value(job_json("x", 1, 0, 0, 1, None)).unwrap();
    assert_eq!(outcome(&j), None);
    for t in ["Failed", "FailureTarget"] {
        let j =
            serde_json::from_value(job_json("x", 1, 0, 0, 1, Some((t, "BackoffLimitExceeded"))))
                .unwrap();
        assert!(
            matches!(outcome(&j), Some(Outcome::Failed { reason, .. }) if reason == "BackoffLimitExceeded")
        );
    }
    let j = serde_json::from_value(job_json(
        "x",
        1,
        1,
        0,
        0,
        Some(("Complete", "CompletionsReached")),
    ))
    .unwrap();
    assert_eq!(outcome(&j), Some(Outcome::Complete));
}

#[test]
fn index_sets_are_counted() {
    assert_eq!(count_indexes(""), 0);
    assert_eq!(count_indexes("3"), 1);
    assert_eq!(count_indexes("0,2-4"), 4);
    assert_eq!(count_indexes("0-9,11"), 11);
}

/// Each Job runs for two reads (progress 0/N then N/2) and completes on the third.
#[tokio::test]
async fn applies_every_step_in_order_and_waits_for_each() {
    let p = params(2, 1, Overlay::Local);
    let steps = jobs::steps(&p);
    let completions: HashMap<String, i32> = steps
        .iter()
        .map(|s| (s.name().to_string(), s.completions()))
        .collect();
    let mut reads: HashMap<String, i32> = HashMap::new();
    let handler: Handler = Box::new(move |r| {
        if r.uri.starts_with("/api/v1/namespaces/fedimdb/pods?") {
            return (200, pod_list(&[]));
        }
        let name = job_name_of(&r.uri);
        let n = completions[&name];
        match r.method.as_str() {
            "PATCH" => (200, job_json(&name, n, 0, 0, 0, None).to_string()),
            "GET" => {
                let k = reads.entry(name.clone()).or_default();
                *k += 1;
                let j = match *k {
                    1 => job_json(&name, n, 0, 0, n, None),
                    2 => {
                        let mut j = job_json(&name, n, n / 2, 0, n - n / 2, None);
                        if name.contains("trainer") {
                            j["status"]["completedIndexes"] = json!("1");
                        }
                        j
                    }
                    _ => job_json(&name, n, n, 0, 0, Some(("Complete", "CompletionsReached"))),
                };
                (200, j.to_string())
            }
            m => panic!("unexpected {m} {}", r.uri),
        }
    });
    let ran = run(&steps, handler, 10_000).await;
    ran.result.as_ref().unwrap();

    let applied: Vec<String> = ran.patches().map(|s| job_name_of(&s.uri)).collect();
    let expected: Vec<String> = steps.iter().map(|s| s.name().to_string()).collect();
    assert_eq!(applied, expected);
    for s in ran.patches() {
        assert!(
            s.uri.starts_with("/apis/batch/v1/namespaces/fedimdb/jobs/"),
            "{}",
            s.uri
        );
        assert!(s.uri.contains("fieldManager=fedimdb-pipeline"), "{}", s.uri);
        assert!(!s.uri.contains("force=true"), "{}", s.uri);
        assert_eq!(s.content_type, "application/apply-patch+yaml");
        let sent: Value = serde_json::from_str(&s.body).unwrap();
        assert_eq!(sent["kind"], "Job");
    }
    // A step is applied only after the previous one completed.
    let order: Vec<(String, String)> = ran
        .seen
        .iter()
        .map(|s| (s.method.clone(), job_name_of(&s.uri)))
        .collect();
    for w in expected.windows(2) {
        let done = order
            .iter()
            .rposition(|(m, n)| m == "GET" && n == &w[0])
            .unwrap();
        let next = order
            .iter()
            .position(|(m, n)| m == "PATCH" && n == &w[1])
            .unwrap();
        assert!(done < next, "{} applied before {} finished", w[1], w[0]);
    }
    let lines = &ran.lines;
    for progress in [
        "trainers of round 1: 0/2 done, 2 running",
        "trainers of round 1: 1/2 done (indices 1), 1 running",
        "trainers of round 1: 2/2 done",
    ] {
        assert!(
            lines.iter().any(|l| l.contains(progress)),
            "{progress}: {lines:#?}"
        );
    }
    assert!(lines.last().unwrap().contains("hot-reloads"), "{lines:#?}");
}

/// A failing Job stops the run, and the failed pods' last log lines are shown.
#[tokio::test]
async fn a_failed_job_shows_pod_logs_and_stops_the_run() {
    let steps = jobs::steps(&params(3, 1, Overlay::Local));
    let handler: Handler = Box::new(move |r| {
        let name = job_name_of(&r.uri);
        match r.method.as_str() {
            "PATCH" => (200, job_json(&name, 1, 0, 0, 0, None).to_string()),
            "GET" if r.uri.contains("/jobs/") && name.ends_with("copier") => (
                200,
                job_json(&name, 1, 1, 0, 0, Some(("Complete", "CompletionsReached"))).to_string(),
            ),
            "GET" if r.uri.contains("/jobs/") => (
                200,
                job_json(&name, 3, 2, 1, 0, Some(("Failed", "FailedIndexes"))).to_string(),
            ),
            "GET" if r.uri.contains("/log") => (
                200,
                "reading shard 1\nerror: shard ROOT/data/shard-00001.parquet is missing\n".into(),
            ),
            "GET" if r.uri.contains("job-name%3Dfedimdb-t1-copier") => (200, pod_list(&[])),
            "GET" if r.uri.starts_with("/api/v1/namespaces/fedimdb/pods?") => {
                assert!(
                    r.uri.contains(
                        "labelSelector=batch.kubernetes.io%2Fjob-name%3Dfedimdb-t1-trainer-r0"
                    ),
                    "{}",
                    r.uri
                );
                let pods = pod_list(&[
                    ("fedimdb-t1-trainer-r0-0-abcde", "Succeeded"),
                    ("fedimdb-t1-trainer-r0-1-fghij", "Failed"),
                ]);
                (200, pods)
            }
            m => panic!("unexpected {m} {}", r.uri),
        }
    });
    let ran = run(&steps, handler, 10_000).await;
    let err = ran.err();
    assert!(
        err.contains("fedimdb-t1-trainer-r0")
            && err.contains("failed")
            && err.contains("FailedIndexes"),
        "{err}"
    );
    let lines = ran.text();
    assert_has(&lines, "pod fedimdb-t1-trainer-r0-1-fghij");
    assert_has(
        &lines,
        "| error: shard ROOT/data/shard-00001.parquet is missing",
    );
    assert!(
        !lines.contains("r0-0-abcde"),
        "logs of pods that succeeded are not shown:\n{lines}"
    );
    let logs: Vec<_> = ran.seen.iter().filter(|s| s.uri.contains("/log")).collect();
    assert_eq!(logs.len(), 1);
    assert!(
        logs[0]
            .uri
            .starts_with("/api/v1/namespaces/fedimdb/pods/fedimdb-t1-trainer-r0-1-fghij/log?"),
        "{}",
        logs[0].uri
    );
    assert!(logs[0].uri.contains("tailLines=20"), "{}", logs[0].uri);
    assert!(
        !ran.patches().any(|s| s.uri.contains("aggregator")),
        "nothing runs after a failure"
    );
}

/// A Job that never finishes ends the run after the (configurable) step timeout.
#[tokio::test]
async fn a_job_that_never_finishes_times_out() {
    let steps = jobs::steps(&params(2, 1, Overlay::Local));
    let handler: Handler = Box::new(move |r| {
        let name = job_name_of(&r.uri);
        match r.method.as_str() {
            "PATCH" => (200, job_json(&name, 1, 0, 0, 0, None).to_string()),
            "GET" if r.uri.contains("/jobs/") => {
                (200, job_json(&name, 1, 0, 0, 1, None).to_string())
            }
            "GET" => (200, pod_list(&[])),
            m => panic!("unexpected {m} {}", r.uri),
        }
    });
    let t = std::time::Instant::now();
    let ran = run(&steps, handler, 60).await;
    let err = ran.err();
    assert!(
        err.contains("fedimdb-t1-copier") && err.contains("did not finish within"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    let lines = &ran.lines;
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("0/1 done, 1 running"))
            .count(),
        1,
        "progress is printed when it changes: {lines:#?}"
    );
}

/// A 409 from server-side apply (a field owned by another manager) is a clear error.
#[tokio::test]
async fn an_apply_conflict_is_reported() {
    let steps = jobs::steps(&params(2, 1, Overlay::Local));
    let handler: Handler = Box::new(move |r| match r.method.as_str() {
        "PATCH" => (
            409,
            status_json(
                409,
                "Conflict",
                "Apply failed with 1 conflict: conflict with \"kubectl-edit\": .spec.parallelism",
            )
            .to_string(),
        ),
        m => panic!("unexpected {m} {}", r.uri),
    });
    let ran = run(&steps, handler, 10_000).await;
    let err = ran.err();
    assert_has(&err, "conflict applying job fedimdb-t1-copier");
    assert!(
        err.contains(".spec.parallelism") && err.contains("kubectl -n fedimdb delete job"),
        "{err}"
    );
    assert_eq!(ran.seen.len(), 1);
}

/// Other API errors (here: the namespace does not exist) name the job and the cause.
#[tokio::test]
async fn other_api_errors_are_reported() {
    let steps = jobs::steps(&params(1, 1, Overlay::Local));
    let handler: Handler = Box::new(move |_| {
        (
            404,
            status_json(404, "NotFound", "namespaces \"fedimdb\" not found").to_string(),
        )
    });
    let err = run(&steps, handler, 10_000).await.err();
    assert!(
        err.contains("cannot apply job fedimdb-t1-copier") && err.contains("not found"),
        "{err}"
    );
}
