//! Tests of the Job builders (pure) and of the orchestrator against recorded API responses
//! served through kube's client on a mock service (`tower-test`); no cluster involved.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::api::{Orchestrator, Outcome, outcome};
use super::jobs::{self, Overlay, Params, StepKind};
use super::lock::{self, LockConfig};

fn params(workers: u32, rounds: u32, overlay: Overlay) -> Params {
    Params {
        namespace: "fedimdb".into(),
        run_id: "t1".into(),
        workers,
        rounds,
        train: fedimdb::train::TrainArgs {
            epochs: Some(3),
            batch: 64,
            seed: 7,
            ..Default::default()
        },
        force: false,
        registry: "example.io/fedimdb".into(),
        image_tag: "0.1.0".into(),
        overlay,
        claim: "fedimdb-data".into(),
        deadline_s: 600,
        from_round: None,
        min_workers: None,
    }
}

fn args_of(job: &k8s_openapi::api::batch::v1::Job) -> Vec<String> {
    job.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .args
        .clone()
        .unwrap()
}

#[test]
fn plan_is_copier_then_trainer_and_aggregator_per_round() {
    let steps = jobs::plan(&params(3, 2, Overlay::Local));
    let kinds: Vec<_> = steps.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        vec![
            StepKind::Copier,
            StepKind::Trainer(0),
            StepKind::Aggregator(0),
            StepKind::Trainer(1),
            StepKind::Aggregator(1),
            StepKind::Trainer(2),
            StepKind::Aggregator(2),
        ]
    );
    let names: std::collections::HashSet<_> = steps.iter().map(|s| s.name().to_string()).collect();
    assert_eq!(names.len(), steps.len(), "job names are unique");
    assert_eq!(steps[1].name(), "fedimdb-t1-trainer-r0");
}

#[test]
fn trainer_is_an_indexed_job_of_workers_pods() {
    let p = params(4, 1, Overlay::Local);
    let j = jobs::trainer_job(&p, 1);
    let spec = j.spec.as_ref().unwrap();
    assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
    assert_eq!(spec.completions, Some(4));
    assert_eq!(spec.parallelism, Some(4));
    assert!(spec.backoff_limit_per_index.is_some());
    assert_eq!(
        spec.max_failed_indexes,
        Some(0),
        "every trainer is needed by default"
    );
    assert!(spec.pod_failure_policy.is_some());
    assert_eq!(spec.active_deadline_seconds, Some(600));
    assert!(spec.ttl_seconds_after_finished.is_some());
    let args = args_of(&j);
    assert_eq!(
        args,
        [
            "--root",
            "/data",
            "--round",
            "1",
            "--algorithm",
            "scaffold",
            "--epochs",
            "3",
            "--batch",
            "64",
            "--lr",
            "16",
            "--schedule",
            "linear",
            "--seed",
            "7",
            "--resume"
        ]
    );
    assert!(
        !args.iter().any(|a| a == "--shard"),
        "the shard comes from JOB_COMPLETION_INDEX"
    );
    let c = &spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(c.image.as_deref(), Some("example.io/fedimdb/trainer:0.1.0"));
    assert!(
        !c.resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()
            .contains_key("nvidia.com/gpu")
    );
}

#[test]
fn gpu_overlay_requests_a_gpu_and_uses_the_cuda_image() {
    let j = jobs::trainer_job(&params(2, 1, Overlay::Gpu), 0);
    let pod = j.spec.as_ref().unwrap().template.spec.clone().unwrap();
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("example.io/fedimdb/trainer-cuda:0.1.0")
    );
    let res = c.resources.as_ref().unwrap();
    assert_eq!(res.limits.as_ref().unwrap()["nvidia.com/gpu"].0, "1");
    assert_eq!(res.requests.as_ref().unwrap()["nvidia.com/gpu"].0, "1");
    assert!(
        c.args
            .as_ref()
            .unwrap()
            .ends_with(&["--device".to_string(), "cuda".to_string()])
    );
    assert_eq!(
        pod.tolerations.unwrap()[0].key.as_deref(),
        Some("nvidia.com/gpu")
    );
    // Only the trainer changes.
    let a = jobs::aggregator_job(&params(2, 1, Overlay::Gpu), 0);
    assert_eq!(a, jobs::aggregator_job(&params(2, 1, Overlay::Local), 0));
}

#[test]
fn every_container_is_locked_down() {
    for step in jobs::plan(&params(2, 1, Overlay::Gpu)) {
        let spec = step.job.spec.as_ref().unwrap();
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(
            pod.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert!(
            spec.active_deadline_seconds.is_some() && spec.ttl_seconds_after_finished.is_some()
        );
        assert!(spec.backoff_limit.is_some() || spec.backoff_limit_per_index.is_some());
        for c in pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
        {
            assert_eq!(
                c.security_context.as_ref(),
                Some(&jobs::container_security()),
                "{}",
                c.name
            );
            let r = c.resources.as_ref().unwrap();
            for k in ["cpu", "memory"] {
                assert!(
                    r.requests.as_ref().unwrap().contains_key(k)
                        && r.limits.as_ref().unwrap().contains_key(k)
                );
            }
            assert!(!c.image.as_ref().unwrap().ends_with(":latest"));
        }
    }
}

#[test]
fn copier_downloads_then_shards_into_workers() {
    let j = jobs::copier_job(&params(5, 1, Overlay::Local));
    let pod = j.spec.as_ref().unwrap().template.spec.clone().unwrap();
    assert_eq!(
        pod.init_containers.unwrap()[0].args.clone().unwrap(),
        ["download", "--to", "/data/download"]
    );
    let args = pod.containers[0].args.clone().unwrap();
    let w = args.iter().position(|a| a == "--workers").unwrap();
    assert_eq!(args[w + 1], "5");
    assert!(!args.contains(&"--force".to_string()));
    let forced = jobs::copier_job(&Params {
        force: true,
        ..params(5, 1, Overlay::Local)
    });
    assert!(args_of(&forced).ends_with(&["--force".to_string()]));
    let a = jobs::aggregator_job(&params(5, 1, Overlay::Local), 3);
    assert_eq!(args_of(&a), ["--root", "/data", "--round", "3", "--resume"]);
}

#[test]
fn dry_run_yaml_round_trips() {
    let steps = jobs::plan(&params(2, 1, Overlay::Local));
    let yaml = jobs::to_yaml(&steps).unwrap();
    let docs: Vec<k8s_openapi::api::batch::v1::Job> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), steps.len());
    assert_eq!(docs[0], steps[0].job);
    assert!(yaml.contains("apiVersion: batch/v1") && yaml.contains("kind: Job"));
}

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

// ---- the mock API server ----

/// A Job as the API server returns it.
fn job_json(
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
fn pod_list(pods: &[(&str, &str)]) -> String {
    let items: Vec<Value> = pods
        .iter()
        .map(|(n, phase)| json!({ "metadata": { "name": n }, "status": { "phase": phase } }))
        .collect();
    json!({ "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items }).to_string()
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code })
}

/// One request the mock saw: method, path and query, body.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    content_type: String,
    body: String,
}

type Handler = Box<dyn FnMut(&Seen) -> (u16, String) + Send>;

/// A kube client whose every request is answered by `handler`, and the requests it saw.
fn mock(mut handler: Handler) -> (Client, Arc<Mutex<Vec<Seen>>>) {
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

fn job_name_of(uri: &str) -> String {
    uri.split("/jobs/")
        .nth(1)
        .unwrap_or("")
        .split('?')
        .next()
        .unwrap()
        .to_string()
}

fn orchestrator(client: Client, timeout_ms: u64) -> Orchestrator {
    Orchestrator::new(
        client,
        "fedimdb",
        Duration::from_millis(2),
        Duration::from_millis(timeout_ms),
    )
}

/// Each Job runs for two reads (progress 0/N then N/2) and completes on the third.
#[tokio::test]
async fn applies_every_step_in_order_and_waits_for_each() {
    let p = params(2, 1, Overlay::Local);
    let steps = jobs::plan(&p);
    let completions: HashMap<String, i32> = steps
        .iter()
        .map(|s| (s.name().to_string(), s.completions()))
        .collect();
    let mut reads: HashMap<String, i32> = HashMap::new();
    let (client, seen) = mock(Box::new(move |r| {
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
    }));
    let orch = orchestrator(client, 10_000);
    orch.run(&steps).await.unwrap();

    let seen = seen.lock().unwrap().clone();
    let applied: Vec<String> = seen
        .iter()
        .filter(|s| s.method == "PATCH")
        .map(|s| job_name_of(&s.uri))
        .collect();
    let expected: Vec<String> = steps.iter().map(|s| s.name().to_string()).collect();
    assert_eq!(applied, expected);
    for s in seen.iter().filter(|s| s.method == "PATCH") {
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
    let order: Vec<(String, String)> = seen
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
    let lines = orch.lines.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("trainers of round 1: 0/2 done, 2 running")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("trainers of round 1: 1/2 done (indices 1), 1 running")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("trainers of round 1: 2/2 done")),
        "{lines:#?}"
    );
    assert!(lines.last().unwrap().contains("hot-reloads"), "{lines:#?}");
}

/// A failing Job stops the run, and the failed pods' last log lines are shown.
#[tokio::test]
async fn a_failed_job_shows_pod_logs_and_stops_the_run() {
    let steps = jobs::plan(&params(3, 1, Overlay::Local));
    let (client, seen) = mock(Box::new(move |r| {
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
                let pods = json!({ "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [
                    { "metadata": { "name": "fedimdb-t1-trainer-r0-0-abcde" }, "status": { "phase": "Succeeded" } },
                    { "metadata": { "name": "fedimdb-t1-trainer-r0-1-fghij" }, "status": { "phase": "Failed" } },
                ]});
                (200, pods.to_string())
            }
            m => panic!("unexpected {m} {}", r.uri),
        }
    }));
    let orch = orchestrator(client, 10_000);
    let err = format!("{:#}", orch.run(&steps).await.unwrap_err());
    assert!(
        err.contains("fedimdb-t1-trainer-r0")
            && err.contains("failed")
            && err.contains("FailedIndexes"),
        "{err}"
    );
    let lines = orch.lines.lock().unwrap().join("\n");
    assert!(
        lines.contains("pod fedimdb-t1-trainer-r0-1-fghij"),
        "{lines}"
    );
    assert!(
        lines.contains("| error: shard ROOT/data/shard-00001.parquet is missing"),
        "{lines}"
    );
    assert!(
        !lines.contains("r0-0-abcde"),
        "logs of pods that succeeded are not shown:\n{lines}"
    );
    let seen = seen.lock().unwrap();
    let logs: Vec<_> = seen.iter().filter(|s| s.uri.contains("/log")).collect();
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
        !seen
            .iter()
            .any(|s| s.method == "PATCH" && s.uri.contains("aggregator")),
        "nothing runs after a failure"
    );
}

/// A Job that never finishes ends the run after the (configurable) step timeout.
#[tokio::test]
async fn a_job_that_never_finishes_times_out() {
    let steps = jobs::plan(&params(2, 1, Overlay::Local));
    let (client, _seen) = mock(Box::new(move |r| {
        let name = job_name_of(&r.uri);
        match r.method.as_str() {
            "PATCH" => (200, job_json(&name, 1, 0, 0, 0, None).to_string()),
            "GET" if r.uri.contains("/jobs/") => {
                (200, job_json(&name, 1, 0, 0, 1, None).to_string())
            }
            "GET" => (
                200,
                json!({ "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [] })
                    .to_string(),
            ),
            m => panic!("unexpected {m} {}", r.uri),
        }
    }));
    let orch = orchestrator(client, 60);
    let t = std::time::Instant::now();
    let err = format!("{:#}", orch.run(&steps).await.unwrap_err());
    assert!(
        err.contains("fedimdb-t1-copier") && err.contains("did not finish within"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    let lines = orch.lines.lock().unwrap().clone();
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
    let steps = jobs::plan(&params(2, 1, Overlay::Local));
    let (client, seen) = mock(Box::new(move |r| match r.method.as_str() {
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
    }));
    let orch = orchestrator(client, 10_000);
    let err = format!("{:#}", orch.run(&steps).await.unwrap_err());
    assert!(
        err.contains("conflict applying job fedimdb-t1-copier"),
        "{err}"
    );
    assert!(
        err.contains(".spec.parallelism") && err.contains("kubectl -n fedimdb delete job"),
        "{err}"
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// Other API errors (here: the namespace does not exist) name the job and the cause.
#[tokio::test]
async fn other_api_errors_are_reported() {
    let steps = jobs::plan(&params(1, 1, Overlay::Local));
    let (client, _seen) = mock(Box::new(move |_| {
        (
            404,
            status_json(404, "NotFound", "namespaces \"fedimdb\" not found").to_string(),
        )
    }));
    let err = format!(
        "{:#}",
        orchestrator(client, 10_000).run(&steps).await.unwrap_err()
    );
    assert!(
        err.contains("cannot apply job fedimdb-t1-copier") && err.contains("not found"),
        "{err}"
    );
}

// ---- resume and quorum (pure) ----

fn has_resume(job: &k8s_openapi::api::batch::v1::Job) -> bool {
    args_of(job).iter().any(|a| a == "--resume")
}

#[test]
fn rounds_below_from_round_resume_and_the_rest_recompute() {
    let by_round = |from_round: Option<u32>| -> Vec<(StepKind, bool)> {
        let p = Params {
            from_round,
            ..params(2, 3, Overlay::Local)
        };
        jobs::plan(&p)
            .iter()
            .filter(|s| s.kind != StepKind::Copier)
            .map(|s| (s.kind, has_resume(&s.job)))
            .collect()
    };
    // Default: every trainer and aggregator resumes.
    assert!(
        by_round(None).iter().all(|(_, r)| *r),
        "{:?}",
        by_round(None)
    );
    // --from-round 2: rounds 0 and 1 resume, 2 and 3 recompute.
    for (kind, resumes) in by_round(Some(2)) {
        let round = match kind {
            StepKind::Trainer(r) | StepKind::Aggregator(r) => r,
            StepKind::Copier => unreachable!(),
        };
        assert_eq!(resumes, round < 2, "{kind}");
    }
    // --from-round 0: everything after the copier recomputes.
    assert!(by_round(Some(0)).iter().all(|(_, r)| !*r));
    // The copier never gets the flag (it is idempotent by itself).
    let p = Params {
        from_round: Some(1),
        ..params(2, 3, Overlay::Local)
    };
    assert!(!has_resume(&jobs::copier_job(&p)));
    // --device cuda stays last on the GPU trainer.
    let g = jobs::trainer_job(&params(2, 1, Overlay::Gpu), 0);
    assert!(args_of(&g).ends_with(&["--resume".into(), "--device".into(), "cuda".into()]));
}

#[test]
fn min_workers_lets_indexes_fail_and_reaches_the_aggregator() {
    let p = Params {
        min_workers: Some(3),
        ..params(5, 1, Overlay::Local)
    };
    let steps = jobs::plan(&p);
    let t = &steps[1];
    let spec = t.job.spec.as_ref().unwrap();
    assert_eq!(spec.backoff_limit_per_index, Some(2));
    assert_eq!(
        spec.max_failed_indexes,
        Some(2),
        "the other indexes keep running when up to workers - M fail"
    );
    assert_eq!(t.quorum(), 3);
    assert_eq!(steps[2].quorum(), 1);
    assert_eq!(
        args_of(&steps[2].job),
        [
            "--root",
            "/data",
            "--round",
            "0",
            "--min-workers",
            "3",
            "--resume"
        ]
    );
    // The usage-error rule still fails the whole Job; the others retry per index.
    let rules = &spec.pod_failure_policy.as_ref().unwrap().rules;
    assert_eq!(rules[0].action, "FailJob");
    assert_eq!(rules[0].on_exit_codes.as_ref().unwrap().values, vec![2]);
    assert_eq!(jobs::plan(&params(5, 1, Overlay::Local))[1].quorum(), 5);
}

#[test]
fn index_sets_are_counted() {
    use super::api::count_indexes;
    assert_eq!(count_indexes(""), 0);
    assert_eq!(count_indexes("3"), 1);
    assert_eq!(count_indexes("0,2-4"), 4);
    assert_eq!(count_indexes("0-9,11"), 11);
}

// ---- a fake cluster: Jobs, pods and the lock Lease ----

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/fedimdb/leases";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/fedimdb/leases/fedimdb-pipeline-fedimdb-data";
const ME: &str = "test-host pid 1 run t1";

fn lock_config(renew_ms: u64) -> LockConfig {
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
fn lease_json(holder: &str, ago: i64, rv: &str, transitions: i32) -> Value {
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
struct Fake {
    /// The Lease as stored (None: no lock).
    lease: Option<Value>,
    /// Every Job completes on this read (`usize::MAX`: never).
    complete_on_read: usize,
    /// Status of the trainer Jobs when they finish (default: complete).
    trainer_status: Option<Value>,
    /// Log of every pod.
    log: String,
    /// Jobs listed by `managed-by` (other runs).
    other_jobs: Vec<Value>,
    /// At this PUT of the Lease (1-based), another holder ("thief") takes it first.
    stolen_at_put: Option<usize>,
    /// Every PUT of the Lease fails with 500 (an API server in trouble).
    renewals_fail: bool,
}

impl Default for Fake {
    fn default() -> Self {
        Fake {
            lease: None,
            complete_on_read: 1,
            trainer_status: None,
            log: "working\n".into(),
            other_jobs: Vec::new(),
            stolen_at_put: None,
            renewals_fail: false,
        }
    }
}

fn rv_of(v: &Value) -> String {
    v["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn fake(mut f: Fake, workers: i32) -> Handler {
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
                    f.lease = Some(lease_json("thief pid 9 run 77", 0, "999", 9));
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
                let pods: Vec<(String, &str)> = (0..n)
                    .map(|i| (format!("{job}-{i}-x"), "Succeeded"))
                    .collect();
                let pods: Vec<(&str, &str)> = pods.iter().map(|(a, b)| (a.as_str(), *b)).collect();
                (200, pod_list(&pods))
            }
            ("GET", p) if p.ends_with("/log") => (200, f.log.clone()),
            (m, _) => panic!("unexpected {m} {}", r.uri),
        }
    })
}

fn methods_on(seen: &[Seen], path: &str) -> Vec<String> {
    seen.iter()
        .filter(|s| s.uri.split('?').next().unwrap() == path)
        .map(|s| s.method.clone())
        .collect()
}

/// No lock held: the Lease is created before the first Job and deleted after the last.
#[tokio::test]
async fn a_free_lock_is_taken_and_released() {
    let steps = jobs::plan(&params(2, 1, Overlay::Local));
    let (client, seen) = mock(fake(Fake::default(), 2));
    let orch = orchestrator(client, 10_000);
    orch.run_locked(&steps, lock_config(60_000), std::future::pending())
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
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
    let applied = seen.iter().filter(|s| s.method == "PATCH").count();
    assert_eq!(applied, steps.len());
    let lines = orch.lines.lock().unwrap().join("\n");
    assert!(
        lines.contains("locked the volume of claim fedimdb-data"),
        "{lines}"
    );
    assert!(
        lines.contains("released the lock fedimdb/fedimdb-pipeline-fedimdb-data"),
        "{lines}"
    );
}

/// A lock renewed 5 s ago by another driver: a clear error, and nothing is applied.
#[tokio::test]
async fn a_fresh_lock_of_another_driver_stops_the_run() {
    let steps = jobs::plan(&params(2, 1, Overlay::Local));
    let f = Fake {
        lease: Some(lease_json("laptop pid 4242 run 1700000000", 5, "7", 0)),
        ..Default::default()
    };
    let (client, seen) = mock(fake(f, 2));
    let orch = orchestrator(client, 10_000);
    let err = format!(
        "{:#}",
        orch.run_locked(&steps, lock_config(60_000), std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(err.contains("locked by another pipeline"), "{err}");
    assert!(err.contains("\"laptop pid 4242 run 1700000000\""), "{err}");
    assert!(
        err.contains("s ago") && err.contains("last renewed 20"),
        "{err}"
    );
    assert!(
        err.contains("kubectl -n fedimdb delete lease fedimdb-pipeline-fedimdb-data"),
        "{err}"
    );
    let seen = seen.lock().unwrap().clone();
    let methods: Vec<_> = seen.iter().map(|s| s.method.as_str()).collect();
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
    let steps = jobs::plan(&params(2, 1, Overlay::Local));
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
    let (client, seen) = mock(fake(f, 2));
    let orch = orchestrator(client, 10_000);
    orch.run_locked(&steps, lock_config(60_000), std::future::pending())
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
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
    assert_eq!(
        seen.iter().filter(|s| s.method == "PATCH").count(),
        steps.len()
    );
    assert_eq!(methods_on(&seen, LEASE).last().unwrap(), "DELETE");
    let lines = orch.lines.lock().unwrap().join("\n");
    assert!(
        lines.contains(
            "found an interrupted run: lock fedimdb/fedimdb-pipeline-fedimdb-data held by \"fedimdb-driver-abc pid 1 run 99\", last renewed 20"
        ),
        "{lines}"
    );
    assert!(
        lines.contains("(600 s ago)") && lines.contains("resuming"),
        "{lines}"
    );
    assert!(
        lines.contains(
            "Jobs of run 99 are still active on claim fedimdb-data: fedimdb-99-trainer-r1;"
        ),
        "{lines}"
    );
    assert!(
        !lines.contains("fedimdb-99-aggregator-r0"),
        "finished: {lines}"
    );
    assert!(!lines.contains("run 55"), "another claim: {lines}");
    assert!(lines.contains("released the lock"), "{lines}");
}

/// Two drivers resume at once: the one whose takeover gets 409 stops, naming the winner.
#[tokio::test]
async fn a_conflict_on_takeover_is_an_error() {
    let steps = jobs::plan(&params(2, 1, Overlay::Local));
    let f = Fake {
        lease: Some(lease_json("dead pid 1 run 98", 600, "7", 0)),
        stolen_at_put: Some(1),
        ..Default::default()
    };
    let (client, seen) = mock(fake(f, 2));
    let orch = orchestrator(client, 10_000);
    let err = format!(
        "{:#}",
        orch.run_locked(&steps, lock_config(60_000), std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(
        err.contains("another pipeline is resuming the same volume"),
        "{err}"
    );
    assert!(err.contains("\"thief pid 9 run 77\""), "{err}");
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.iter().any(|s| s.method == "PATCH"), "no Job applied");
    assert!(
        !seen.iter().any(|s| s.method == "DELETE"),
        "the winner's lock is left alone"
    );
}

/// The lock is renewed while the run goes on; when another holder takes it, the run stops
/// and leaves the new holder's lock alone.
#[tokio::test]
async fn the_lock_is_renewed_and_a_lost_lock_stops_the_run() {
    let steps = jobs::plan(&params(2, 1, Overlay::Local));
    let f = Fake {
        complete_on_read: usize::MAX,
        stolen_at_put: Some(3),
        ..Default::default()
    };
    let (client, seen) = mock(fake(f, 2));
    let orch = orchestrator(client, 10_000);
    let err = format!(
        "{:#}",
        orch.run_locked(&steps, lock_config(5), std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(
        err.contains("lost the lock fedimdb/fedimdb-pipeline-fedimdb-data: it is now held by \"thief pid 9 run 77\""),
        "{err}"
    );
    assert!(err.contains("stopping without applying more Jobs"), "{err}");
    let seen = seen.lock().unwrap().clone();
    let puts: Vec<Value> = seen
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
    let lines = orch.lines.lock().unwrap().join("\n");
    assert!(
        lines.contains("is now held by \"thief pid 9 run 77\"; left alone"),
        "{lines}"
    );
}

/// A driver that cannot renew its lock stops before the lock could expire (others would
/// then take it over), and still tries to release it.
#[tokio::test]
async fn a_lock_that_cannot_be_renewed_stops_the_run() {
    let steps = jobs::plan(&params(2, 1, Overlay::Local));
    let f = Fake {
        complete_on_read: usize::MAX,
        renewals_fail: true,
        ..Default::default()
    };
    let (client, seen) = mock(fake(f, 2));
    let orch = orchestrator(client, 60_000);
    let cfg = LockConfig {
        duration_s: 2,
        renew_every: Duration::from_millis(400),
        ..lock_config(0)
    };
    let t = std::time::Instant::now();
    let err = format!(
        "{:#}",
        orch.run_locked(&steps, cfg, std::future::pending())
            .await
            .unwrap_err()
    );
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
    let seen = seen.lock().unwrap().clone();
    let methods = methods_on(&seen, LEASE);
    assert_eq!(methods.last().unwrap(), "DELETE", "{methods:?}");
    assert!(
        methods.len() >= 3 && methods[..methods.len() - 1].iter().all(|m| m == "PUT"),
        "{methods:?}"
    );
}

/// Ctrl-C (or SIGTERM) ends the run and releases the lock.
#[tokio::test]
async fn an_interrupt_releases_the_lock() {
    let steps = jobs::plan(&params(2, 1, Overlay::Local));
    let f = Fake {
        complete_on_read: usize::MAX,
        ..Default::default()
    };
    let (client, seen) = mock(fake(f, 2));
    let orch = orchestrator(client, 10_000);
    let signal = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        "SIGINT".to_string()
    };
    let err = format!(
        "{:#}",
        orch.run_locked(&steps, lock_config(60_000), signal)
            .await
            .unwrap_err()
    );
    assert!(err.contains("interrupted by SIGINT"), "{err}");
    assert!(
        err.contains("kubectl -n fedimdb delete jobs -l fedimdb/run=t1"),
        "{err}"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(methods_on(&seen, LEASE), ["DELETE"]);
    assert_eq!(seen.last().unwrap().method, "DELETE");
}

/// Steps whose pods log "up to date" are reported as such.
#[tokio::test]
async fn steps_that_were_up_to_date_are_reported() {
    let steps = jobs::plan(&params(2, 1, Overlay::Local));
    let f = Fake {
        log: "INFO trainer: rounds/round-0/updates/shard-00001: up to date\n".into(),
        ..Default::default()
    };
    let (client, seen) = mock(fake(f, 2));
    let orch = orchestrator(client, 10_000);
    orch.run_locked(&steps, lock_config(60_000), std::future::pending())
        .await
        .unwrap();
    let lines = orch.lines.lock().unwrap().join("\n");
    for k in ["trainers of round 0", "aggregator of round 1", "copier"] {
        assert!(
            lines.contains(&format!("  {k}: up to date, nothing recomputed")),
            "{lines}"
        );
    }
    let log = seen
        .lock()
        .unwrap()
        .iter()
        .find(|s| s.uri.contains("/log"))
        .unwrap()
        .uri
        .clone();
    assert!(log.contains("container="), "{log}");
    // Without --resume nothing is looked up for the trainers and aggregators.
    let p = Params {
        from_round: Some(0),
        ..params(2, 1, Overlay::Local)
    };
    let (client, seen) = mock(fake(Fake::default(), 2));
    let orch = orchestrator(client, 10_000);
    orch.run_locked(&jobs::plan(&p), lock_config(60_000), std::future::pending())
        .await
        .unwrap();
    let logs = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.uri.contains("/log"))
        .count();
    assert_eq!(logs, 1, "only the copier's log is read");
    let lines = orch.lines.lock().unwrap().join("\n");
    assert!(lines.contains("  copier: computed"), "{lines}");
}

fn failed_trainers(completed: &str, failed: &str, succeeded: i32) -> Value {
    json!({
        "succeeded": succeeded, "failed": 3, "active": 0,
        "completedIndexes": completed, "failedIndexes": failed,
        "conditions": [{ "type": "Failed", "status": "True", "reason": "FailedIndexes",
                         "message": "Job has failed indexes" }],
    })
}

/// With --min-workers 3 of 4, trainers of which 3 succeeded are enough: a warning naming
/// the failed index, then the aggregator runs.
#[tokio::test]
async fn a_partly_failed_round_with_a_quorum_goes_on() {
    let p = Params {
        min_workers: Some(3),
        ..params(4, 1, Overlay::Local)
    };
    let steps = jobs::plan(&p);
    let f = Fake {
        trainer_status: Some(failed_trainers("0,2-3", "1", 3)),
        ..Default::default()
    };
    let (client, seen) = mock(fake(f, 4));
    let orch = orchestrator(client, 10_000);
    orch.run_locked(&steps, lock_config(60_000), std::future::pending())
        .await
        .unwrap();
    let lines = orch.lines.lock().unwrap().join("\n");
    assert!(
        lines.contains(
            "warning: job fedimdb-t1-trainer-r0 failed (FailedIndexes, failed indices 1), but 3 of 4 succeeded, at least --min-workers 3"
        ),
        "{lines}"
    );
    let applied: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.method == "PATCH")
        .map(|s| job_name_of(&s.uri))
        .collect();
    assert_eq!(applied.len(), steps.len(), "{applied:?}");
}

/// Below the quorum the run stops after the trainers, saying how many succeeded.
#[tokio::test]
async fn a_round_below_the_quorum_fails() {
    let p = Params {
        min_workers: Some(3),
        ..params(4, 1, Overlay::Local)
    };
    let steps = jobs::plan(&p);
    let f = Fake {
        trainer_status: Some(failed_trainers("0,2", "1,3", 2)),
        ..Default::default()
    };
    let (client, seen) = mock(fake(f, 4));
    let orch = orchestrator(client, 10_000);
    let err = format!(
        "{:#}",
        orch.run_locked(&steps, lock_config(60_000), std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(
        err.contains("job fedimdb-t1-trainer-r0 (trainers of round 0) failed: FailedIndexes"),
        "{err}"
    );
    assert!(
        err.contains("Job has failed indexes, failed indices 1,3: 2 of 4 succeeded, fewer than --min-workers 3"),
        "{err}"
    );
    let seen = seen.lock().unwrap().clone();
    assert!(
        !seen
            .iter()
            .any(|s| s.method == "PATCH" && s.uri.contains("aggregator")),
        "no aggregator below the quorum"
    );
    assert_eq!(
        methods_on(&seen, LEASE).last().unwrap(),
        "DELETE",
        "lock released on failure"
    );
    // Without --min-workers the same Job fails the run as before.
    let steps = jobs::plan(&params(4, 1, Overlay::Local));
    let f = Fake {
        trainer_status: Some(failed_trainers("0,2-3", "1", 3)),
        ..Default::default()
    };
    let (client, _seen) = mock(fake(f, 4));
    let err = format!(
        "{:#}",
        orchestrator(client, 10_000)
            .run_locked(&steps, lock_config(60_000), std::future::pending())
            .await
            .unwrap_err()
    );
    assert!(
        err.ends_with("failed: FailedIndexes: Job has failed indexes"),
        "{err}"
    );
}
