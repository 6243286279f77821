//! Tests of `lock.rs` through `Orchestrator::run_locked` on the fake cluster: the Lease is
//! taken before the first Job and released after the run however it ends, another driver's
//! fresh lock stops the run, a stale one is taken over, and a lost or unrenewable lock stops
//! the run.

use std::time::Duration;

use serde_json::{Value, json};

use super::fixtures::{
    Fake, LEASE, LEASES, ME, THIEF, assert_has, job_json, lease_json, lock_config, methods_on,
    params, run_locked, run_on_fake,
};
use crate::k8s::jobs::{self, Overlay, Step};
use crate::k8s::lock::LockConfig;

/// The plan of 2 workers and 1 round.
fn plan() -> Vec<Step> {
    jobs::steps(&params(2, 1, Overlay::Local))
}

/// No lock held: the Lease is created before the first Job and deleted after the last.
#[tokio::test]
async fn a_free_lock_is_taken_and_released() {
    let steps = plan();
    let ran = run_on_fake(&steps, Fake::default(), 2).await;
    ran.result.as_ref().unwrap();
    let seen = &ran.seen;
    assert_eq!(seen[0].method, "POST");
    assert!(seen[0].uri.starts_with(LEASES), "{}", seen[0].uri);
    let sent: Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!(sent["spec"]["holderIdentity"], ME);
    assert_eq!(sent["spec"]["leaseDurationSeconds"], 60);
    assert!(sent["spec"]["renewTime"].is_string());
    assert_eq!(sent["metadata"]["labels"]["fedimdb/run"], "t1");
    assert_eq!(
        sent["metadata"]["annotations"]["fedimdb/claim"],
        "fedimdb-data"
    );
    let last = seen.last().unwrap();
    assert_eq!(
        (last.method.as_str(), last.uri.split('?').next().unwrap()),
        ("DELETE", LEASE)
    );
    let dp: Value = serde_json::from_str(&last.body).unwrap();
    assert_eq!(
        dp["preconditions"]["resourceVersion"], "101",
        "deletes only our version"
    );
    assert_eq!(ran.patches().count(), steps.len());
    let lines = ran.text();
    assert_has(&lines, "locked the volume of claim fedimdb-data");
    assert_has(
        &lines,
        "released the lock fedimdb/fedimdb-pipeline-fedimdb-data",
    );
}

/// A lock renewed 5 s ago by another driver: a clear error, and nothing is applied.
#[tokio::test]
async fn a_fresh_lock_of_another_driver_stops_the_run() {
    let f = Fake {
        lease: Some(lease_json("laptop pid 4242 run 1700000000", 5, "7", 0)),
        ..Default::default()
    };
    let ran = run_on_fake(&plan(), f, 2).await;
    let err = ran.err();
    assert_has(&err, "locked by another pipeline");
    assert_has(&err, "\"laptop pid 4242 run 1700000000\"");
    assert!(
        err.contains("s ago") && err.contains("last renewed 20"),
        "{err}"
    );
    assert_has(
        &err,
        "kubectl -n fedimdb delete lease fedimdb-pipeline-fedimdb-data",
    );
    let methods: Vec<_> = ran.seen.iter().map(|s| s.method.as_str()).collect();
    assert_eq!(
        methods,
        ["POST", "GET"],
        "no Job applied, the lock left alone"
    );
}

/// A lock not renewed for 10 minutes: its holder died. The run takes it over (conditioned
/// on the resourceVersion it read), says it found an interrupted run, and proceeds.
#[tokio::test]
async fn a_stale_lock_is_taken_over_and_the_run_resumes() {
    let steps = plan();
    let mut orphan = job_json("fedimdb-99-trainer-r1", 2, 1, 0, 1, None);
    orphan["metadata"]["labels"] = json!({ "fedimdb/run": "99" });
    orphan["spec"]["template"]["spec"]["volumes"] =
        json!([{ "name": "data", "persistentVolumeClaim": { "claimName": "fedimdb-data" } }]);
    let mut finished = orphan.clone();
    finished["metadata"]["name"] = json!("fedimdb-99-aggregator-r0");
    finished["status"]["conditions"] =
        json!([{ "type": "Complete", "status": "True", "reason": "CompletionsReached" }]);
    let mut elsewhere = orphan.clone();
    elsewhere["metadata"]["name"] = json!("fedimdb-55-trainer-r0");
    elsewhere["metadata"]["labels"] = json!({ "fedimdb/run": "55" });
    elsewhere["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] =
        json!("other-claim");
    let f = Fake {
        lease: Some(lease_json("fedimdb-driver-abc pid 1 run 99", 600, "7", 2)),
        other_jobs: vec![orphan, finished, elsewhere],
        ..Default::default()
    };
    let ran = run_on_fake(&steps, f, 2).await;
    ran.result.as_ref().unwrap();
    let seen = &ran.seen;
    let put = seen.iter().find(|s| s.method == "PUT").unwrap();
    assert_eq!(put.uri.split('?').next().unwrap(), LEASE);
    let sent: Value = serde_json::from_str(&put.body).unwrap();
    assert_eq!(
        sent["metadata"]["resourceVersion"], "7",
        "conditioned on what was read"
    );
    assert_eq!(sent["spec"]["holderIdentity"], ME);
    assert_eq!(sent["spec"]["leaseTransitions"], 3);
    let first_patch = seen.iter().position(|s| s.method == "PATCH").unwrap();
    let put_at = seen.iter().position(|s| s.method == "PUT").unwrap();
    assert!(put_at < first_patch);
    assert_eq!(ran.patches().count(), steps.len());
    assert_eq!(methods_on(seen, LEASE).last().unwrap(), "DELETE");
    let lines = ran.text();
    assert_has(
        &lines,
        "found an interrupted run: lock fedimdb/fedimdb-pipeline-fedimdb-data held by \"fedimdb-driver-abc pid 1 run 99\", last renewed 20",
    );
    assert!(
        lines.contains("(600 s ago)") && lines.contains("resuming"),
        "{lines}"
    );
    assert_has(
        &lines,
        "Jobs of run 99 are still active on claim fedimdb-data: fedimdb-99-trainer-r1;",
    );
    assert!(
        !lines.contains("fedimdb-99-aggregator-r0"),
        "finished: {lines}"
    );
    assert!(!lines.contains("run 55"), "another claim: {lines}");
    assert_has(&lines, "released the lock");
}

/// Two drivers resume at once: the one whose takeover gets 409 stops, naming the winner.
#[tokio::test]
async fn a_conflict_on_takeover_is_an_error() {
    let f = Fake {
        lease: Some(lease_json("dead pid 1 run 98", 600, "7", 0)),
        stolen_at_put: Some(1),
        ..Default::default()
    };
    let ran = run_on_fake(&plan(), f, 2).await;
    let err = ran.err();
    assert_has(&err, "another pipeline is resuming the same volume");
    assert_has(&err, &format!("\"{THIEF}\""));
    assert!(ran.patches().next().is_none(), "no Job applied");
    assert!(
        !ran.seen.iter().any(|s| s.method == "DELETE"),
        "the winner's lock is left alone"
    );
}

/// The lock is renewed while the run goes on; when another holder takes it, the run stops
/// and leaves the new holder's lock alone.
#[tokio::test]
async fn the_lock_is_renewed_and_a_lost_lock_stops_the_run() {
    let f = Fake {
        complete_on_read: usize::MAX,
        stolen_at_put: Some(3),
        ..Default::default()
    };
    let ran = run_locked(&plan(), f, 2, lock_config(5), std::future::pending()).await;
    let err = ran.err();
    assert_has(
        &err,
        &format!(
            "lost the lock fedimdb/fedimdb-pipeline-fedimdb-data: it is now held by \"{THIEF}\""
        ),
    );
    assert_has(&err, "stopping without applying more Jobs");
    let puts: Vec<Value> = ran
        .seen
        .iter()
        .filter(|s| s.method == "PUT")
        .map(|s| serde_json::from_str(&s.body).unwrap())
        .collect();
    assert_eq!(puts.len(), 3);
    assert_eq!(puts[0]["metadata"]["resourceVersion"], "101");
    assert_eq!(
        puts[1]["metadata"]["resourceVersion"], "102",
        "each renewal builds on the last"
    );
    assert_ne!(puts[0]["spec"]["renewTime"], puts[1]["spec"]["renewTime"]);
    let lines = ran.text();
    assert_has(&lines, &format!("is now held by \"{THIEF}\"; left alone"));
}

/// A driver that cannot renew its lock stops before the lock could expire (others would
/// then take it over), and still tries to release it.
#[tokio::test]
async fn a_lock_that_cannot_be_renewed_stops_the_run() {
    let f = Fake {
        complete_on_read: usize::MAX,
        renewals_fail: true,
        ..Default::default()
    };
    let cfg = LockConfig {
        duration_s: 2,
        renew_every: Duration::from_millis(400),
        ..lock_config(0)
    };
    let t = std::time::Instant::now();
    let ran = run_locked(&plan(), f, 2, cfg, std::future::pending()).await;
    let err = ran.err();
    assert!(
        err.contains("lost the lock fedimdb/fedimdb-pipeline-fedimdb-data: not renewed for 1 s")
            && err.contains("etcdserver: request timed out"),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "stopped before the lock expired: {:?}",
        t.elapsed()
    );
    let methods = methods_on(&ran.seen, LEASE);
    assert_eq!(methods.last().unwrap(), "DELETE", "{methods:?}");
    assert!(
        methods.len() >= 3 && methods[..methods.len() - 1].iter().all(|m| m == "PUT"),
        "{methods:?}"
    );
}

/// Ctrl-C (or SIGTERM) ends the run and releases the lock.
#[tokio::test]
async fn an_interrupt_releases_the_lock() {
    let f = Fake {
        complete_on_read: usize::MAX,
        ..Default::default()
    };
    let signal = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        "SIGINT".to_string()
    };
    let ran = run_locked(&plan(), f, 2, lock_config(60_000), signal).await;
    let err = ran.err();
    assert_has(&err, "interrupted by SIGINT");
    assert_has(&err, "kubectl -n fedimdb delete jobs -l fedimdb/run=t1");
    assert_eq!(methods_on(&ran.seen, LEASE), ["DELETE"]);
    assert_eq!(ran.seen.last().unwrap().method, "DELETE");
}
