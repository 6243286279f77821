//! Fixtures of the `pipeline k8s` tests: the plan's parameters, the objects the API server
//! returns, a kube client on a mock service (`tower-test`) that records every request, a
//! fake cluster (Jobs, pods and the lock Lease) answering through it, and runs of the
//! orchestrator on either.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

use crate::k8s::api::Orchestrator;
use crate::k8s::jobs::{Overlay, Params, Step};
use crate::k8s::lock::{self, LockConfig};
use crate::plan::{Plan, RunArgs};

/// Fails, showing `text`, unless it contains `needle`.
#[track_caller]
pub fn assert_has(text: &str, needle: &str) {
    assert!(text.contains(needle), "expected {needle:?} in:\n{text}");
}

/// The parameters of a run `t1` in namespace `fedimdb` on claim `fedimdb-data`.
pub fn params(workers: u32, rounds: u32, overlay: Overlay) -> Params {
    params_with(workers, rounds, overlay, &[])
}

/// [`params`] with more `pipeline k8s` flags (`--min-workers 3`, ...).
pub fn params_with(workers: u32, rounds: u32, overlay: Overlay, more: &[&str]) -> Params {
    let (workers, rounds) = (workers.to_string(), rounds.to_string());
    let mut flags = vec![
        "--workers",
        &workers,
        "--rounds",
        &rounds,
        "--epochs",
        "3",
        "--batch",
        "64",
        "--seed",
        "7",
    ];
    flags.extend(more);
    Params {
        namespace: "fedimdb".into(),
        run_id: "t1".into(),
        plan: Plan::new(RunArgs::from_flags(&flags).unwrap(), None).unwrap(),
        source: None,
        registry: "example.io/fedimdb".into(),
        image_tag: "0.1.0".into(),
        images: Default::default(),
        overlay,
        claim: "fedimdb-data".into(),
        deadline_s: 600,
    }
}

// ---- what the API server returns ----

/// A Job as the API server returns it.
pub fn job_json(
    name: &str,
    completions: i32,
    succeeded: i32,
    failed: i32,
    active: i32,
    cond: Option<(&str, &str)>,
) -> Value {
    let mut status = json!({ "succeeded": succeeded, "failed": failed, "active": active });
    if let Some((t, reason)) = cond {
        status["conditions"] = json!([{ "type": t, "status": "True", "reason": reason, "message": format!("{t} for test") }]);
    }
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": { "name": name, "namespace": "fedimdb", "uid": "u-1" },
        "spec": { "completions": completions, "template": { "spec": { "containers": [] } } },
        "status": status,
    })
}

/// A PodList of pods `(name, phase)`.
pub fn pod_list(pods: &[(&str, &str)]) -> String {
    let items: Vec<Value> = pods
        .iter()
        .map(|(n, phase)| json!({ "metadata": { "name": n }, "status": { "phase": phase } }))
        .collect();
    json!({ "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items }).to_string()
}

/// `n` succeeded pods of Job `job`, each whose main container (named after the step) left
/// the outcome record `record` as its termination message, as the kubelet reports it; an
/// aggregator's record carries a test accuracy of 90%.
pub fn succeeded_pods(job: &str, n: i32, record: Option<fedimdb::outcome::Status>) -> String {
    let step = ["copier", "trainer", "aggregator"]
        .into_iter()
        .find(|s| job.contains(s))
        .unwrap();
    let items: Vec<Value> = (0..n)
        .map(|i| {
            let mut state = json!({ "terminated": { "exitCode": 0, "reason": "Completed" } });
            if let Some(status) = record {
                let mut o = fedimdb::outcome::Outcome::new(step, status);
                o.test_accuracy = (step == "aggregator").then_some(0.9);
                state["terminated"]["message"] = json!(serde_json::to_string(&o).unwrap());
            }
            json!({ "metadata": { "name": format!("{job}-{i}-x") },
                    "status": { "phase": "Succeeded",
                                "containerStatuses": [{ "name": step, "state": state, "ready": false,
                                                        "restartCount": 0, "image": "x", "imageID": "" }] } })
        })
        .collect();
    json!({ "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items }).to_string()
}

/// A failure `Status` with its HTTP code.
pub fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code })
}

// ---- the mock API server ----

/// One request the mock saw: method, path and query, body.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub content_type: String,
    pub body: String,
}

/// Answers a request with an HTTP status and a body.
pub type Handler = Box<dyn FnMut(&Seen) -> (u16, String) + Send>;

/// A kube client whose every request is answered by `handler`, and the requests it saw.
pub fn mock(mut handler: Handler) -> (Client, Arc<Mutex<Vec<Seen>>>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let content_type = req
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let s = Seen {
                method,
                uri,
                content_type,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            };
            let (code, body) = handler(&s);
            log.lock().unwrap().push(s);
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(body.into_bytes()))
                    .unwrap(),
            );
        }
    });
    (Client::new(svc, "fedimdb"), seen)
}

/// The Job named by a request's path (empty when it names none).
pub fn job_name_of(uri: &str) -> String {
    uri.split("/jobs/")
        .nth(1)
        .unwrap_or("")
        .split('?')
        .next()
        .unwrap()
        .to_string()
}

/// The methods of the requests on `path` (query left out), in order.
pub fn methods_on(seen: &[Seen], path: &str) -> Vec<String> {
    seen.iter()
        .filter(|s| s.uri.split('?').next().unwrap() == path)
        .map(|s| s.method.clone())
        .collect()
}

/// An orchestrator in namespace `fedimdb` reading a Job's status every 2 ms, giving a step
/// `timeout_ms`.
pub fn orchestrator(client: Client, timeout_ms: u64) -> Orchestrator {
    let mut orch = Orchestrator::new(
        client,
        "fedimdb",
        Duration::from_millis(2),
        Duration::from_millis(timeout_ms),
    );
    // No Job controller stops a suspended driver here.
    orch.suspend_wait = Duration::from_millis(10);
    orch
}

/// What a run of the orchestrator left: its result, the requests the API server saw and
/// the lines the orchestrator printed.
pub struct Ran {
    pub result: anyhow::Result<()>,
    pub seen: Vec<Seen>,
    pub lines: Vec<String>,
}

impl Ran {
    /// The error of a run that had to fail, with its causes.
    pub fn err(&self) -> String {
        format!("{:#}", self.result.as_ref().unwrap_err())
    }

    /// The printed lines as one text.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The requests applying Jobs (server-side apply).
    pub fn patches(&self) -> impl Iterator<Item = &Seen> {
        self.seen.iter().filter(|s| s.method == "PATCH")
    }
}

/// Runs `steps` without the lock (`Orchestrator::run`), every request answered by
/// `handler`, with a step timeout of `timeout_ms`.
pub async fn run(steps: &[Step], handler: Handler, timeout_ms: u64) -> Ran {
    let (client, seen) = mock(handler);
    let orch = orchestrator(client, timeout_ms);
    let result = orch.run(steps).await;
    finish(orch, result, &seen)
}

/// Runs `steps` under `lock` (`Orchestrator::run_locked`) on the fake cluster `f` with
/// trainer Jobs of `workers` pods, until done, failed or `shutdown`; a step may take 10 s.
pub async fn run_locked(
    steps: &[Step],
    f: Fake,
    workers: i32,
    lock: LockConfig,
    shutdown: impl Future<Output = String>,
) -> Ran {
    let (client, seen) = mock(fake(f, workers));
    let orch = orchestrator(client, 10_000);
    let result = orch.run_locked(steps, lock, shutdown).await;
    finish(orch, result, &seen)
}

/// `run_locked` with a lock renewed every minute, until the run is done or failed.
pub async fn run_on_fake(steps: &[Step], f: Fake, workers: i32) -> Ran {
    run_locked(
        steps,
        f,
        workers,
        lock_config(60_000),
        std::future::pending(),
    )
    .await
}

/// `run_on_fake` by a driver running as the Job `DRIVER_JOB` (`--driver-job`).
pub async fn run_as_driver(steps: &[Step], f: Fake, workers: i32) -> Ran {
    let (client, seen) = mock(fake(f, workers));
    let mut orch = orchestrator(client, 10_000);
    orch.driver_job = Some(DRIVER_JOB.into());
    let result = orch
        .run_locked(steps, lock_config(60_000), std::future::pending())
        .await;
    finish(orch, result, &seen)
}

fn finish(orch: Orchestrator, result: anyhow::Result<()>, seen: &Mutex<Vec<Seen>>) -> Ran {
    Ran {
        result,
        seen: seen.lock().unwrap().clone(),
        lines: orch.lines.into_inner().unwrap(),
    }
}

// ---- a fake cluster: Jobs, pods and the lock Lease ----

pub const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/fedimdb/leases";
pub const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/fedimdb/leases/fedimdb-pipeline-fedimdb-data";
/// The holder identity of the run under test.
pub const ME: &str = "test-host pid 1 run t1";
/// The holder that takes the Lease at `Fake::stolen_at_put`.
pub const THIEF: &str = "thief pid 9 run 77";

/// The lock of run `t1` on claim `fedimdb-data`, held for 60 s and renewed every
/// `renew_ms`.
pub fn lock_config(renew_ms: u64) -> LockConfig {
    LockConfig {
        name: lock::lease_name("fedimdb-data"),
        holder: ME.into(),
        run_id: "t1".into(),
        claim: "fedimdb-data".into(),
        duration_s: 60,
        renew_every: Duration::from_millis(renew_ms),
    }
}

/// A Lease held by `holder`, last renewed `ago` seconds ago.
pub fn lease_json(holder: &str, ago: i64, rv: &str, transitions: i32) -> Value {
    let renewed = Timestamp::now() - SignedDuration::from_secs(ago);
    let renewed = MicroTime(renewed);
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": "fedimdb-pipeline-fedimdb-data", "namespace": "fedimdb",
                      "resourceVersion": rv, "uid": "lease-uid-1" },
        "spec": { "holderIdentity": holder, "leaseDurationSeconds": 60,
                  "acquireTime": renewed, "renewTime": renewed, "leaseTransitions": transitions },
    })
}

/// How the fake cluster behaves.
pub struct Fake {
    /// The Lease as stored (None: no lock).
    pub lease: Option<Value>,
    /// Every Job completes on this read (`usize::MAX`: never).
    pub complete_on_read: usize,
    /// Status of the trainer Jobs when they finish (default: complete).
    pub trainer_status: Option<Value>,
    /// Log of every pod (read only for failed pods).
    pub log: String,
    /// What every succeeded pod's outcome record (its termination message) says; `None`:
    /// the pods leave none.
    pub record: Option<fedimdb::outcome::Status>,
    /// Jobs listed by `managed-by` (other runs).
    pub other_jobs: Vec<Value>,
    /// At this PUT of the Lease (1-based), another holder (`THIEF`) takes it first.
    pub stolen_at_put: Option<usize>,
    /// Every PUT of the Lease fails with 500 (an API server in trouble).
    pub renewals_fail: bool,
    /// Patches of the driver's own Job (`DRIVER_JOB`) are refused with 403 (a Role
    /// without `patch` on jobs).
    pub driver_patch_forbidden: bool,
}

/// The driver Job of the runs of [`run_as_driver`].
pub const DRIVER_JOB: &str = "fedimdb-driver";

impl Default for Fake {
    fn default() -> Self {
        Fake {
            lease: None,
            complete_on_read: 1,
            trainer_status: None,
            log: "working\n".into(),
            record: Some(fedimdb::outcome::Status::Done),
            other_jobs: Vec::new(),
            stolen_at_put: None,
            renewals_fail: false,
            driver_patch_forbidden: false,
        }
    }
}

fn rv_of(v: &Value) -> String {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The fake cluster `f` as a mock handler; trainer Jobs have `workers` pods.
pub fn fake(mut f: Fake, workers: i32) -> Handler {
    let mut reads: HashMap<String, usize> = HashMap::new();
    let mut puts = 0;
    let mut next_rv = 100;
    Box::new(move |r| {
        let path = r.uri.split('?').next().unwrap().to_string();
        let mut bump = |v: &mut Value| {
            next_rv += 1;
            v["metadata"]["resourceVersion"] = json!(next_rv.to_string());
            v["metadata"]["uid"] = json!("lease-uid-1");
        };
        match (r.method.as_str(), path.as_str()) {
            ("POST", LEASES) => match &f.lease {
                Some(_) => (
                    409,
                    status_json(409, "AlreadyExists", "leases \"x\" already exists").to_string(),
                ),
                None => {
                    let mut l: Value = serde_json::from_str(&r.body).unwrap();
                    bump(&mut l);
                    f.lease = Some(l.clone());
                    (201, l.to_string())
                }
            },
            ("GET", LEASE) => match &f.lease {
                Some(l) => (200, l.to_string()),
                None => (404, status_json(404, "NotFound", "not found").to_string()),
            },
            ("PUT", LEASE) if f.renewals_fail => (
                500,
                status_json(500, "InternalError", "etcdserver: request timed out").to_string(),
            ),
            ("PUT", LEASE) => {
                puts += 1;
                if f.stolen_at_put == Some(puts) {
                    f.lease = Some(lease_json(THIEF, 0, "999", 9));
                }
                let mut l: Value = serde_json::from_str(&r.body).unwrap();
                match &f.lease {
                    Some(old) if rv_of(old) == rv_of(&l) => {
                        bump(&mut l);
                        f.lease = Some(l.clone());
                        (200, l.to_string())
                    }
                    Some(_) => (
                        409,
                        status_json(409, "Conflict", "the object has been modified").to_string(),
                    ),
                    None => (404, status_json(404, "NotFound", "not found").to_string()),
                }
            }
            ("DELETE", LEASE) => {
                let dp: Value = serde_json::from_str(&r.body).unwrap();
                let want = dp["preconditions"]["resourceVersion"].as_str().unwrap();
                match &f.lease {
                    Some(l) if rv_of(l) == want => {
                        f.lease = None;
                        (
                            200,
                            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"})
                                .to_string(),
                        )
                    }
                    Some(_) => (
                        409,
                        status_json(409, "Conflict", "Precondition failed").to_string(),
                    ),
                    None => (404, status_json(404, "NotFound", "not found").to_string()),
                }
            }
            ("GET", "/apis/batch/v1/namespaces/fedimdb/jobs") => {
                assert!(
                    r.uri.contains(
                        "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dfedimdb-pipeline"
                    ),
                    "{}",
                    r.uri
                );
                let list = json!({ "apiVersion": "batch/v1", "kind": "JobList", "metadata": {},
                                   "items": f.other_jobs });
                (200, list.to_string())
            }
            ("PATCH", _) if f.driver_patch_forbidden && job_name_of(&r.uri) == DRIVER_JOB => (
                403,
                status_json(403, "Forbidden", "jobs.batch \"fedimdb-driver\" is forbidden: User \"system:serviceaccount:fedimdb:default\" cannot patch resource \"jobs\"").to_string(),
            ),
            ("PATCH", _) => {
                let name = job_name_of(&r.uri);
                (200, job_json(&name, 1, 0, 0, 0, None).to_string())
            }
            ("GET", p) if p.starts_with("/apis/batch/v1/namespaces/fedimdb/jobs/") => {
                let name = job_name_of(&r.uri);
                let n = if name.contains("trainer") { workers } else { 1 };
                let k = reads.entry(name.clone()).or_default();
                *k += 1;
                if *k < f.complete_on_read {
                    return (200, job_json(&name, n, 0, 0, n, None).to_string());
                }
                let mut j = job_json(&name, n, n, 0, 0, Some(("Complete", "CompletionsReached")));
                if name.contains("trainer") {
                    j["spec"]["completionMode"] = json!("Indexed");
                    j["status"]["completedIndexes"] = json!(format!("0-{}", n - 1));
                    if let Some(s) = &f.trainer_status {
                        j["status"] = s.clone();
                    }
                }
                (200, j.to_string())
            }
            ("GET", "/api/v1/namespaces/fedimdb/pods") => {
                let job = r.uri.split("job-name%3D").nth(1).unwrap().to_string();
                let n = if job.contains("trainer") { workers } else { 1 };
                (200, succeeded_pods(&job, n, f.record))
            }
            ("GET", p) if p.ends_with("/log") => (200, f.log.clone()),
            (m, _) => panic!("unexpected {m} {}", r.uri),
        }
    })
}
