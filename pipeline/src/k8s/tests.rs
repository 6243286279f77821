//! Tests of the Job builders (pure) and of the orchestrator against recorded API responses
//! served through kube's client on a mock service (`tower-test`); no cluster involved.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

use super::api::{Orchestrator, Outcome, outcome};
use super::jobs::{self, Overlay, Params, StepKind};

fn params(workers: u32, rounds: u32, overlay: Overlay) -> Params {
    Params {
        namespace: "fedimdb".into(),
        run_id: "t1".into(),
        workers,
        rounds,
        epochs: 3,
        batch: 64,
        seed: 7,
        force: false,
        registry: "example.io/fedimdb".into(),
        image_tag: "0.1.0".into(),
        overlay,
        claim: "fedimdb-data".into(),
        deadline_s: 600,
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
    assert!(spec.pod_failure_policy.is_some());
    assert_eq!(spec.active_deadline_seconds, Some(600));
    assert!(spec.ttl_seconds_after_finished.is_some());
    let args = args_of(&j);
    assert_eq!(
        args,
        [
            "--root", "/data", "--round", "1", "--epochs", "3", "--batch", "64", "--seed", "7"
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
    assert_eq!(
        args_of(&a),
        ["--root", "/data", "--round", "3", "--expect", "5"]
    );
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
