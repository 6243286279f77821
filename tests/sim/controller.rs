//! The simulated Job controller: makes each Job's pods, counts how they end, and writes the
//! Job's status the way the real controller (Kubernetes 1.31 and later) does:
//!
//! - `active`, `ready`, `succeeded`, `failed`, `startTime`, `completionTime`;
//! - Indexed Jobs: one pod per index (`batch.kubernetes.io/job-completion-index` label and
//!   annotation, `JOB_COMPLETION_INDEX` in the env), `completedIndexes`; with
//!   `backoffLimitPerIndex`, per-index retries (the pods' annotation
//!   `batch.kubernetes.io/job-index-failure-count`), `failedIndexes`, and
//!   `maxFailedIndexes`;
//! - `podFailurePolicy`: rules on exit codes (`In`/`NotIn`, optional `containerName`; init
//!   containers included) and on pod conditions, with the actions `FailJob`, `Ignore`
//!   (the failure is not counted), `Count` and `FailIndex`; the first matching rule wins;
//! - the end: `SuccessCriteriaMet` then `Complete`; or `FailureTarget` at once and `Failed`
//!   once the Job's remaining pods have been stopped (and deleted, as the real controller
//!   deletes them), with the real reasons and messages
//!   (`PodFailurePolicy`, `BackoffLimitExceeded`, `MaxFailedIndexesExceeded`,
//!   `FailedIndexes`, `DeadlineExceeded`);
//! - `suspend`: a suspended Job gets no pods, its running pods are stopped and deleted
//!   without being counted (the real controller removes their tracking finalizer first),
//!   its `activeDeadlineSeconds` does not run, and it has the condition `Suspended`
//!   (`JobSuspended`); resumed, the condition turns False (`JobResumed`), `startTime` and
//!   the deadline start again from then, and the pods still needed are made.
//!
//! Not simulated: the exponential backoff before a replacement pod (replacements start at
//! once, which keeps the tests fast; the driver's own wait does not depend on it),
//! `ttlSecondsAfterFinished`, `successPolicy`, `podReplacementPolicy`, failures counted
//! against the limits while a Job is suspended, and work-queue Jobs (NonIndexed without
//! `completions`, here treated as `completions` = `parallelism`).
//!
//! It runs as a loop every few milliseconds ([`reconcile`]), not on watch events: a step of
//! the run takes seconds, so polling costs nothing and keeps the order of events simple.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde_json::{Value, json};

use super::Shared;
use super::kubelet;
use super::store::{Kind, Selector, Store, rfc3339, text};

pub const INDEX_KEY: &str = "batch.kubernetes.io/job-completion-index";
pub const FAILURE_COUNT_KEY: &str = "batch.kubernetes.io/job-index-failure-count";
pub const JOB_NAME_KEY: &str = "batch.kubernetes.io/job-name";
pub const CONTROLLER_UID_KEY: &str = "batch.kubernetes.io/controller-uid";

/// What the controller remembers of a Job between passes (the real one keeps it in the
/// Job's status and its pods' finalizers).
#[derive(Default)]
pub struct Track {
    /// Ended pods already counted.
    counted: HashSet<String>,
    /// The Job's pods in the order they were made.
    order: Vec<String>,
    succeeded: i64,
    failed: i64,
    completed: BTreeSet<i64>,
    failed_indexes: BTreeSet<i64>,
    index_failures: BTreeMap<i64, i64>,
    /// Why the Job fails (reason, message), once known: `FailureTarget` is set, the pods
    /// are stopped, then `Failed`.
    failing: Option<(String, String)>,
    /// When the deadline started counting (none while suspended), and `status.startTime`.
    started: Option<Instant>,
    start_time: Option<String>,
    finished: bool,
}

/// What the API server and the Job controller fill into a new Job: the defaults of the
/// fields the controller reads, the selector, and the labels it puts on the pod template.
pub fn default_job(store: &mut Store, ns: &str, job: &Value) -> Value {
    let name = text(&job["metadata"]["name"]);
    let uid = text(&job["metadata"]["uid"]);
    store
        .modify(Kind::Job, ns, &name, |j| {
            let spec = &mut j["spec"];
            let per_index = spec["backoffLimitPerIndex"].is_i64();
            for (field, value) in [
                ("completionMode", json!("NonIndexed")),
                ("parallelism", json!(1)),
                ("suspend", json!(false)),
                ("manualSelector", json!(false)),
                // With backoffLimitPerIndex the global limit defaults to "none".
                (
                    "backoffLimit",
                    json!(if per_index { i64::from(i32::MAX) } else { 6 }),
                ),
            ] {
                if spec[field].is_null() {
                    spec[field] = value;
                }
            }
            if spec["completions"].is_null() {
                spec["completions"] = spec["parallelism"].clone();
            }
            spec["selector"] = json!({ "matchLabels": { CONTROLLER_UID_KEY: uid } });
            let labels = &mut spec["template"]["metadata"]["labels"];
            for (k, v) in [
                (CONTROLLER_UID_KEY, uid.as_str()),
                ("controller-uid", uid.as_str()),
                (JOB_NAME_KEY, name.as_str()),
                ("job-name", name.as_str()),
            ] {
                labels[k] = json!(v);
            }
            j["status"] = json!({});
        })
        .expect("just created")
}

/// A Job was deleted: its pods are orphaned (kept, without an owner) or stopped and
/// removed, per the propagation policy.
pub fn job_deleted(sh: &Arc<Shared>, ns: &str, uid: &str, policy: &str) {
    let selector = Selector::parse(&format!("{CONTROLLER_UID_KEY}={uid}")).expect("plain term");
    let pods: Vec<String> = {
        let mut store = sh.store.lock().unwrap();
        let pods = store.list(Kind::Pod, ns, &selector);
        let names: Vec<String> = pods
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
            .collect();
        if policy == "Orphan" {
            for n in &names {
                store.modify(Kind::Pod, ns, n, |p| {
                    if let Some(m) = p["metadata"].as_object_mut() {
                        m.remove("ownerReferences");
                    }
                });
            }
        }
        names
    };
    sh.tracks.lock().unwrap().remove(uid);
    if policy != "Orphan" {
        for p in pods {
            kubelet::terminate(sh, ns, &p, false);
        }
    }
}

fn phase(pod: &Value) -> &str {
    pod["status"]["phase"].as_str().unwrap_or("Pending")
}

fn index_of(pod: &Value) -> Option<i64> {
    pod["metadata"]["labels"][INDEX_KEY].as_str()?.parse().ok()
}

/// `0,2-4`: an index set as the API writes it.
pub fn format_indexes(set: &BTreeSet<i64>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = set.iter().copied().peekable();
    while let Some(a) = it.next() {
        let mut b = a;
        while it.peek() == Some(&(b + 1)) {
            b = it.next().expect("peeked");
        }
        out.push(if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        });
    }
    out.join(",")
}

/// The first rule of the Job's `podFailurePolicy` that matches a failed pod: its index,
/// action, and the words the real controller uses for what matched.
fn policy_match(policy: &Value, pod: &Value) -> Option<(usize, String, String)> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let statuses: Vec<&Value> = ["initContainerStatuses", "containerStatuses"]
        .iter()
        .filter_map(|f| pod["status"][*f].as_array())
        .flatten()
        .collect();
    for (i, rule) in policy["rules"].as_array()?.iter().enumerate() {
        let action = text(&rule["action"]);
        let req = &rule["onExitCodes"];
        if req.is_object() {
            let values: Vec<i64> = req["values"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default();
            for cs in &statuses {
                let cname = cs["name"].as_str().unwrap_or_default();
                if req["containerName"].as_str().is_some_and(|c| c != cname) {
                    continue;
                }
                let Some(code) = cs["state"]["terminated"]["exitCode"].as_i64() else {
                    continue;
                };
                // Containers that succeeded never match (as in the real controller).
                if code == 0 {
                    continue;
                }
                let hit = match req["operator"].as_str() {
                    Some("In") => values.contains(&code),
                    Some("NotIn") => !values.contains(&code),
                    _ => false,
                };
                if hit {
                    let what = format!(
                        "Container {cname} for pod {ns}/{name} failed with exit code {code}"
                    );
                    return Some((i, action, what));
                }
            }
        }
        if let Some(patterns) = rule["onPodConditions"].as_array() {
            let conds = pod["status"]["conditions"].as_array();
            for pat in patterns {
                let ty = pat["type"].as_str().unwrap_or_default();
                let st = pat["status"].as_str().unwrap_or("True");
                let hit = conds.is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"].as_str() == Some(ty) && c["status"].as_str() == Some(st))
                });
                if hit {
                    return Some((i, action, format!("Pod {ns}/{name} has condition {ty}")));
                }
            }
        }
    }
    None
}

/// One pass over every Job: count the pods that ended, decide whether the Job ended, make
/// the pods it still needs, write its status; then remove pods whose deletion is done.
pub fn reconcile(sh: &Arc<Shared>) {
    let mut start = Vec::new();
    let mut stop = Vec::new();
    {
        let mut store = sh.store.lock().unwrap();
        let mut tracks = sh.tracks.lock().unwrap();
        for job in store.all(Kind::Job) {
            let uid = text(&job["metadata"]["uid"]);
            let t = tracks.entry(uid).or_default();
            reconcile_job(&mut store, t, &job, &mut start, &mut stop);
        }
        // Pods being deleted are removed once they have ended and, if a Job owns them,
        // once it has counted them (its tracking finalizer).
        for pod in store.all(Kind::Pod) {
            let ended = matches!(phase(&pod), "Succeeded" | "Failed");
            if pod["metadata"]["deletionTimestamp"].is_null() || !ended {
                continue;
            }
            let name = pod["metadata"]["name"].as_str().unwrap_or_default();
            let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
            let owner = pod["metadata"]["ownerReferences"][0]["uid"].as_str();
            let counted =
                owner.is_none_or(|o| tracks.get(o).is_none_or(|t| t.counted.contains(name)));
            if counted {
                let _ = store.delete(Kind::Pod, ns, name, &Value::Null);
            }
        }
    }
    for (ns, name) in stop {
        kubelet::terminate(sh, &ns, &name, false);
    }
    for (ns, name) in start {
        kubelet::start(sh, ns, name);
    }
}

fn reconcile_job(
    store: &mut Store,
    t: &mut Track,
    job: &Value,
    start: &mut Vec<(String, String)>,
    stop: &mut Vec<(String, String)>,
) {
    let spec = &job["spec"];
    if t.finished {
        return;
    }
    let ns = text(&job["metadata"]["namespace"]);
    let name = text(&job["metadata"]["name"]);
    let uid = text(&job["metadata"]["uid"]);
    let now = rfc3339(SystemTime::now());
    let mut conditions: Vec<Value> = job["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let suspended = spec["suspend"].as_bool() == Some(true);
    let was_suspended = conditions
        .iter()
        .any(|c| c["type"] == "Suspended" && c["status"] == "True");
    if suspended {
        set_condition(
            &mut conditions,
            "Suspended",
            "True",
            "JobSuspended",
            "Job suspended",
            &now,
        );
        t.started = None;
    } else {
        if was_suspended {
            set_condition(
                &mut conditions,
                "Suspended",
                "False",
                "JobResumed",
                "Job resumed",
                &now,
            );
            t.start_time = None;
        }
        t.started.get_or_insert_with(Instant::now);
        let created = text(&job["metadata"]["creationTimestamp"]);
        t.start_time
            .get_or_insert_with(|| if was_suspended { now.clone() } else { created });
    }
    let indexed = spec["completionMode"].as_str() == Some("Indexed");
    let completions = spec["completions"].as_i64().unwrap_or(1);
    let parallelism = spec["parallelism"].as_i64().unwrap_or(1);
    let per_index = spec["backoffLimitPerIndex"].as_i64().filter(|_| indexed);
    let backoff = spec["backoffLimit"].as_i64().unwrap_or(6);
    let max_failed = spec["maxFailedIndexes"].as_i64();

    // Count the pods that ended since the last pass, in the order they were made.
    let selector = Selector::parse(&format!("{CONTROLLER_UID_KEY}={uid}")).expect("plain term");
    let mut pods = store.list(Kind::Pod, &ns, &selector);
    pods.sort_by_key(|p| {
        let n = p["metadata"]["name"].as_str().unwrap_or_default();
        t.order.iter().position(|o| o == n).unwrap_or(usize::MAX)
    });
    let mut active: Vec<&Value> = Vec::new();
    for pod in &pods {
        let pname = text(&pod["metadata"]["name"]);
        let idx = index_of(pod);
        match phase(pod) {
            "Succeeded" if !t.counted.contains(&pname) => {
                t.counted.insert(pname);
                t.succeeded += 1;
                if let Some(i) = idx
                    && !t.failed_indexes.contains(&i)
                {
                    t.completed.insert(i);
                }
            }
            "Failed" if !t.counted.contains(&pname) => {
                t.counted.insert(pname);
                let rule = policy_match(&spec["podFailurePolicy"], pod);
                match rule.as_ref().map(|(i, a, w)| (*i, a.as_str(), w)) {
                    Some((_, "Ignore", _)) => {}
                    Some((i, "FailJob", what)) => {
                        t.failed += 1;
                        if t.failing.is_none() {
                            t.failing = Some((
                                "PodFailurePolicy".into(),
                                format!("{what} matching FailJob rule at index {i}"),
                            ));
                        }
                    }
                    Some((_, "FailIndex", _)) if per_index.is_some() => {
                        t.failed += 1;
                        if let Some(i) = idx {
                            t.failed_indexes.insert(i);
                        }
                    }
                    _ => {
                        t.failed += 1;
                        if let (Some(limit), Some(i)) = (per_index, idx) {
                            let n = t.index_failures.entry(i).or_default();
                            *n += 1;
                            if *n > limit {
                                t.failed_indexes.insert(i);
                            }
                        }
                    }
                }
            }
            "Pending" | "Running" if pod["metadata"]["deletionTimestamp"].is_null() => {
                active.push(pod);
            }
            _ => {}
        }
    }
    let terminating = pods
        .iter()
        .filter(|p| {
            !p["metadata"]["deletionTimestamp"].is_null()
                && matches!(phase(p), "Pending" | "Running")
        })
        .count();

    // Has the Job failed?
    if t.failing.is_none() && !suspended {
        let deadline = spec["activeDeadlineSeconds"].as_i64();
        let active_for = t.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        if deadline.is_some_and(|d| active_for > d as f64) {
            t.failing = Some((
                "DeadlineExceeded".into(),
                "Job was active longer than specified deadline".into(),
            ));
        } else if per_index.is_some() {
            if max_failed.is_some_and(|m| t.failed_indexes.len() as i64 > m) {
                t.failing = Some((
                    "MaxFailedIndexesExceeded".into(),
                    "Job has exceeded the specified maximal number of failed indexes".into(),
                ));
            } else if !t.failed_indexes.is_empty()
                && (t.completed.len() + t.failed_indexes.len()) as i64 >= completions
            {
                t.failing = Some(("FailedIndexes".into(), "Job has failed indexes".into()));
            }
        } else if t.failed > backoff {
            t.failing = Some((
                "BackoffLimitExceeded".into(),
                "Job has reached the specified backoff limit".into(),
            ));
        }
    }

    let mut add = |ty: &str, reason: &str, message: &str| {
        set_condition(&mut conditions, ty, "True", reason, message, &now);
    };
    let done = if indexed {
        t.completed.len() as i64
    } else {
        t.succeeded
    };
    let mut completion_time = None;
    let mut made: Vec<Value> = Vec::new();
    if let Some((reason, message)) = t.failing.clone() {
        add("FailureTarget", &reason, &message);
        for p in &active {
            stop.push((
                ns.clone(),
                p["metadata"]["name"].as_str().unwrap_or_default().into(),
            ));
        }
        if active.is_empty() && terminating == 0 {
            add("Failed", &reason, &message);
            t.finished = true;
        }
    } else if done >= completions {
        if active.is_empty() && terminating == 0 {
            add(
                "SuccessCriteriaMet",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            );
            add(
                "Complete",
                "CompletionsReached",
                "Reached expected number of succeeded pods",
            );
            completion_time = Some(now.clone());
            t.finished = true;
        }
    } else if suspended {
        for p in &active {
            let pname = text(&p["metadata"]["name"]);
            t.counted.insert(pname.clone());
            stop.push((ns.clone(), pname));
        }
    } else {
        // Make the pods still needed.
        let mut running = active.len() as i64;
        if indexed {
            let busy: BTreeSet<i64> = active.iter().filter_map(|p| index_of(p)).collect();
            for i in 0..completions {
                if running >= parallelism {
                    break;
                }
                if t.completed.contains(&i) || t.failed_indexes.contains(&i) || busy.contains(&i) {
                    continue;
                }
                made.push(new_pod(job, t, Some(i)));
                running += 1;
            }
        } else {
            let want = parallelism.min(completions - t.succeeded);
            while running < want {
                made.push(new_pod(job, t, None));
                running += 1;
            }
        }
    }
    for pod in made {
        let pname = text(&pod["metadata"]["name"]);
        if store.create(Kind::Pod, &ns, pod).is_ok() {
            start.push((ns.clone(), pname));
        }
    }

    let ready = active
        .iter()
        .filter(|p| phase(p) == "Running" && p["status"]["containerStatuses"][0]["ready"] == true)
        .count();
    let fresh = store
        .list(Kind::Pod, &ns, &selector)
        .iter()
        .filter(|p| {
            p["metadata"]["deletionTimestamp"].is_null()
                && matches!(phase(p), "Pending" | "Running")
        })
        .count();
    store.modify(Kind::Job, &ns, &name, |j| {
        let s = &mut j["status"];
        match &t.start_time {
            Some(st) => s["startTime"] = json!(st),
            None => {
                if let Some(o) = s.as_object_mut() {
                    o.remove("startTime");
                }
            }
        }
        s["active"] = json!(fresh);
        s["ready"] = json!(ready);
        s["terminating"] = json!(terminating);
        s["succeeded"] = json!(t.succeeded);
        s["failed"] = json!(t.failed);
        s["uncountedTerminatedPods"] = json!({});
        if indexed {
            s["completedIndexes"] = json!(format_indexes(&t.completed));
        }
        if per_index.is_some() {
            s["failedIndexes"] = json!(format_indexes(&t.failed_indexes));
        }
        if !conditions.is_empty() {
            s["conditions"] = json!(conditions);
        }
        if let Some(c) = &completion_time {
            s["completionTime"] = json!(c);
        }
    });
}

/// Sets the condition of type `ty` to `status` (added if the Job has none, changed if its
/// status differs, else left as it is), as the real controller's `ensureJobConditionStatus`.
fn set_condition(
    conditions: &mut Vec<Value>,
    ty: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: &str,
) {
    let fresh = json!({
        "type": ty, "status": status, "reason": reason, "message": message,
        "lastProbeTime": now, "lastTransitionTime": now,
    });
    match conditions.iter_mut().find(|c| c["type"] == ty) {
        Some(c) if c["status"] == status => {}
        Some(c) => *c = fresh,
        None => conditions.push(fresh),
    }
}

/// A pod of the Job (for index `index` of an Indexed Job), named as the controller names
/// them but with a counter instead of a random suffix, so that runs are reproducible.
fn new_pod(job: &Value, t: &mut Track, index: Option<i64>) -> Value {
    let name = job["metadata"]["name"].as_str().unwrap_or_default();
    let uid = job["metadata"]["uid"].as_str().unwrap_or_default();
    let suffix = format!("{:05}", t.order.len());
    let pname = match index {
        Some(i) => format!("{name}-{i}-{suffix}"),
        None => format!("{name}-{suffix}"),
    };
    t.order.push(pname.clone());
    let tmpl = &job["spec"]["template"];
    let mut labels = tmpl["metadata"]["labels"].clone();
    let mut annotations = tmpl["metadata"]["annotations"].clone();
    if !annotations.is_object() {
        annotations = json!({});
    }
    if let Some(i) = index {
        labels[INDEX_KEY] = json!(i.to_string());
        annotations[INDEX_KEY] = json!(i.to_string());
        if job["spec"]["backoffLimitPerIndex"].is_i64() {
            let n = t.index_failures.get(&i).copied().unwrap_or(0);
            annotations[FAILURE_COUNT_KEY] = json!(n.to_string());
        }
    }
    let mut spec = tmpl["spec"].clone();
    spec["nodeName"] = json!("fedimdb-sim-node");
    json!({
        "metadata": {
            "name": pname,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid,
                "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": spec,
        "status": {
            "phase": "Pending",
            "conditions": [{ "type": "PodScheduled", "status": "True" }],
        },
    })
}
