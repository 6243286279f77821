//! The simulated kubelet: runs each pod as local processes of the real binaries.
//!
//! - **Image**: `REGISTRY/BINARY:TAG` or `REGISTRY/BINARY@sha256:…` runs
//!   `BIN_DIR/BINARY` (the release build); an image without a built binary (such as
//!   `trainer-cuda`) leaves the pod `Pending` with `ErrImagePull`, and is recorded in
//!   [`super::Shared::unserved`]. A `command` is allowed only if it names the image's
//!   binary (the images' entrypoint).
//! - **Env**: only what the container declares (the host's environment is cleared, but
//!   `PATH`), plus `HOSTNAME` (the pod's name), `JOB_COMPLETION_INDEX` for Indexed Jobs,
//!   and the downward API's `fieldRef`s (`metadata.name`, `.namespace`, `.uid`,
//!   `.labels['…']`, `.annotations['…']`, `spec.nodeName`, `spec.serviceAccountName`).
//!   `$(VAR)` in env values, args and command is expanded as Kubernetes does it (earlier
//!   variables only for env values, `$$(VAR)` escapes, unknown references stay as they are).
//! - **Volumes**: a `persistentVolumeClaim` is a folder given to the simulator per claim
//!   (the shared volume), an `emptyDir` a fresh folder per pod; other volume kinds leave
//!   the pod `Pending`. A process cannot see a mount at `/data`, so the simulator
//!   *rewrites paths*: every arg, command word and env value that is a mount path, or a
//!   path under one (also after `--flag=`), is rewritten onto the mount's folder, and so is
//!   the container's `terminationMessagePath` (a file per container). A mount at `/tmp`
//!   also becomes `TMPDIR`. Paths the binaries build from those (`/data/round-0001/...`)
//!   then lie in the same folder. `readOnly` mounts are not enforced.
//! - **Service account**: a pod that mounts its token (`automountServiceAccountToken` not
//!   false) gets `KUBECONFIG` pointing at the simulated API server, standing in for the
//!   in-cluster configuration (`KUBERNETES_SERVICE_HOST` and the token file), which kube's
//!   client would look for at fixed paths.
//! - **Lifecycle**: init containers one after the other, then the one main container; its
//!   stdout and stderr are the pod's log; on exit the termination message is read from the
//!   container's file (at most 4096 bytes; `FallbackToLogsOnError` takes the log's last 80
//!   lines, at most 2048 bytes, when the file is empty and the container failed) into
//!   `status.containerStatuses[].state.terminated`, with the exit code (128 + the signal
//!   for a killed process, as container runtimes report it).
//! - **Stopping**: a deleted pod gets SIGTERM, then SIGKILL after
//!   `terminationGracePeriodSeconds` (at most [`MAX_GRACE`] here).
//!
//! Not simulated: scheduling, resources and limits, security contexts (the processes run
//! as the test's user), probes, image pulls, restart policies other than `Never`, more
//! than one main container.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use super::controller::INDEX_KEY;
use super::store::{ApiError, Kind, rfc3339, text};
use super::{Launch, Shared};

/// The longest grace period the simulator waits between SIGTERM and SIGKILL.
pub const MAX_GRACE: Duration = Duration::from_secs(5);

/// The processes running now, by (namespace, pod), and the pods being stopped.
#[derive(Default)]
pub struct Procs {
    running: HashMap<(String, String), u32>,
    stopping: HashSet<(String, String)>,
}

impl Procs {
    pub fn running_pids(&self) -> Vec<u32> {
        self.running.values().copied().collect()
    }
}

fn pod_dir(sh: &Shared, ns: &str, pod: &str) -> PathBuf {
    sh.work.join("pods").join(ns).join(pod)
}

fn log_path(sh: &Shared, ns: &str, pod: &str, container: &str) -> PathBuf {
    pod_dir(sh, ns, pod).join(format!("{container}.log"))
}

/// Starts the pod's containers in the background.
pub fn start(sh: &Arc<Shared>, ns: String, pod: String) {
    let sh = sh.clone();
    tokio::spawn(async move { run_pod(sh, ns, pod).await });
}

/// Deletes a pod: marks it, then stops its process (SIGTERM, SIGKILL after the grace
/// period). `disrupted` adds the `DisruptionTarget` condition first, as an eviction or a
/// node drain does. A pod whose containers have not started ends without running them.
pub fn terminate(sh: &Arc<Shared>, ns: &str, pod: &str, disrupted: bool) {
    let now = rfc3339(SystemTime::now());
    let grace = {
        let mut store = sh.store.lock().unwrap();
        let Some(p) = store.modify(Kind::Pod, ns, pod, |p| {
            if p["metadata"]["deletionTimestamp"].is_null() {
                p["metadata"]["deletionTimestamp"] = json!(now);
            }
            if disrupted {
                push_condition(p, "DisruptionTarget", "True", "EvictionByEvictionAPI");
            }
        }) else {
            return;
        };
        // A pod that never started, or that already ended, is removed as it is.
        if !matches!(
            p["status"]["phase"].as_str(),
            Some("Running") | Some("Pending")
        ) {
            return;
        }
        p["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .map(Duration::from_secs)
            .unwrap_or(MAX_GRACE)
            .min(MAX_GRACE)
    };
    let key = (ns.to_string(), pod.to_string());
    let pid = {
        let mut procs = sh.procs.lock().unwrap();
        procs.stopping.insert(key.clone());
        procs.running.get(&key).copied()
    };
    if let Some(pid) = pid {
        signal(pid, libc::SIGTERM);
        let sh = sh.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let still = sh.procs.lock().unwrap().running.get(&key).copied();
            if still == Some(pid) {
                signal(pid, libc::SIGKILL);
            }
        });
    }
}

/// Kills the pod's running container with SIGKILL now (the OOM killer, a crashed node);
/// false if none runs.
pub fn kill(sh: &Shared, ns: &str, pod: &str) -> bool {
    let pid = sh
        .procs
        .lock()
        .unwrap()
        .running
        .get(&(ns.to_string(), pod.to_string()))
        .copied();
    pid.is_some_and(|p| signal(p, libc::SIGKILL))
}

fn signal(pid: u32, sig: i32) -> bool {
    // SAFETY: kill(2) with a pid this simulator spawned and is still waiting for (so it
    // cannot have been reused) and a valid signal number.
    unsafe { libc::kill(pid as i32, sig) == 0 }
}

fn push_condition(pod: &mut Value, ty: &str, status: &str, reason: &str) {
    let now = rfc3339(SystemTime::now());
    let conds = &mut pod["status"]["conditions"];
    if !conds.is_array() {
        *conds = json!([]);
    }
    let list = conds.as_array_mut().expect("just made");
    list.retain(|c| c["type"] != ty);
    list.push(json!({ "type": ty, "status": status, "reason": reason, "lastTransitionTime": now }));
}

/// What became of one container.
struct Ended {
    status: Value,
    exit_code: i64,
}

fn set_pod(sh: &Shared, ns: &str, pod: &str, f: impl FnOnce(&mut Value)) {
    sh.store.lock().unwrap().modify(Kind::Pod, ns, pod, f);
}

/// The pod cannot start a container: it stays `Pending`, waiting, as in a cluster, and
/// the simulator records why (the tests want none of these).
fn stuck(sh: &Shared, ns: &str, pod: &str, field: &str, name: &str, reason: &str, message: String) {
    sh.unserved.lock().unwrap().push(format!(
        "pod {ns}/{pod}, container {name}: {reason}: {message}"
    ));
    set_pod(sh, ns, pod, |p| {
        p["status"][field] = json!([{
            "name": name, "image": "", "imageID": "", "ready": false, "restartCount": 0,
            "state": { "waiting": { "reason": reason, "message": message } },
        }]);
    });
}

async fn run_pod(sh: Arc<Shared>, ns: String, name: String) {
    let Some(pod) = sh.store.lock().unwrap().get(Kind::Pod, &ns, &name).cloned() else {
        return;
    };
    // Every way this pod can fail to start leaves it Pending with the reason.
    let pending = |container: &str, reason: &str, message: String| {
        stuck(
            &sh,
            &ns,
            &name,
            "containerStatuses",
            container,
            reason,
            message,
        )
    };
    let dir = pod_dir(&sh, &ns, &name);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return pending("-", "CreatePodSandboxError", e.to_string());
    }
    // Volumes: the claims' folders, an emptyDir folder per pod.
    let mut volumes: HashMap<String, PathBuf> = HashMap::new();
    for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let vname = text(&v["name"]);
        let host = if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
            sh.claims
                .get(claim)
                .cloned()
                .ok_or_else(|| format!("persistentvolumeclaim \"{claim}\" not found"))
        } else if v["emptyDir"].is_object() {
            let p = dir.join("volumes").join(&vname);
            std::fs::create_dir_all(&p)
                .map(|()| p)
                .map_err(|e| e.to_string())
        } else {
            Err(format!("volume {v} is not simulated"))
        };
        match host {
            Ok(host) => volumes.insert(vname, host),
            Err(msg) => return pending(&vname, "FailedMount", msg),
        };
    }
    let inits: Vec<Value> = pod["spec"]["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mains: Vec<Value> = pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if mains.len() != 1 {
        let msg = format!(
            "{} main containers; the simulator runs exactly one",
            mains.len()
        );
        return pending("-", "RunContainerError", msg);
    }
    let started = rfc3339(SystemTime::now());
    set_pod(&sh, &ns, &name, |p| {
        p["status"]["startTime"] = json!(started);
        p["status"]["hostIP"] = json!("127.0.0.1");
        p["status"]["podIP"] = json!("127.0.0.1");
        push_condition(
            p,
            "Initialized",
            if inits.is_empty() { "True" } else { "False" },
            "",
        );
    });
    let mut init_statuses = Vec::new();
    for c in &inits {
        let Some(ended) = run_container(&sh, &pod, c, &volumes, "initContainerStatuses").await
        else {
            return;
        };
        init_statuses.push(ended.status);
        let failed = ended.exit_code != 0;
        set_pod(&sh, &ns, &name, |p| {
            p["status"]["initContainerStatuses"] = json!(init_statuses);
            if failed {
                p["status"]["phase"] = json!("Failed");
            }
        });
        if failed {
            return;
        }
    }
    set_pod(&sh, &ns, &name, |p| {
        push_condition(p, "Initialized", "True", "");
    });
    let Some(ended) = run_container(&sh, &pod, &mains[0], &volumes, "containerStatuses").await
    else {
        return;
    };
    set_pod(&sh, &ns, &name, |p| {
        p["status"]["containerStatuses"] = json!([ended.status]);
        p["status"]["phase"] = json!(if ended.exit_code == 0 {
            "Succeeded"
        } else {
            "Failed"
        });
        let reason = if ended.exit_code == 0 {
            "PodCompleted"
        } else {
            "PodFailed"
        };
        push_condition(p, "ContainersReady", "False", reason);
        push_condition(p, "Ready", "False", reason);
    });
}

/// The binary an image names: its last path component without tag or digest.
pub fn binary_of(image: &str) -> &str {
    let last = image.rsplit('/').next().unwrap_or(image);
    let last = last.split('@').next().unwrap_or(last);
    last.split(':').next().unwrap_or(last)
}

/// Runs one container to its end. `None` when it could not start (the pod is then
/// stuck, or was deleted before it started and has been marked failed).
async fn run_container(
    sh: &Arc<Shared>,
    pod: &Value,
    c: &Value,
    volumes: &HashMap<String, PathBuf>,
    field: &str,
) -> Option<Ended> {
    let ns = text(&pod["metadata"]["namespace"]);
    let pname = text(&pod["metadata"]["name"]);
    let cname = text(&c["name"]);
    let image = text(&c["image"]);
    let fail = |reason: &str, message: String| {
        stuck(sh, &ns, &pname, field, &cname, reason, message);
        None
    };
    let binary = binary_of(&image).to_string();
    let program = sh.bin_dir.join(&binary);
    if binary.is_empty() || !program.is_file() {
        return fail(
            "ErrImagePull",
            format!(
                "image {image:?}: no binary {} (build it first)",
                program.display()
            ),
        );
    }

    // Where the container's paths lie on this machine (longest first).
    let dir = pod_dir(sh, &ns, &pname);
    let termination = dir.join(format!("{cname}.termination-log"));
    let tpath = c["terminationMessagePath"]
        .as_str()
        .unwrap_or("/dev/termination-log");
    let mut mounts: Vec<(String, PathBuf)> = vec![(tpath.to_string(), termination.clone())];
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let vname = m["name"].as_str().unwrap_or_default();
        let Some(host) = volumes.get(vname) else {
            return fail("CreateContainerConfigError", format!("no volume {vname:?}"));
        };
        let host = match m["subPath"].as_str() {
            Some(s) if !s.is_empty() => host.join(s),
            _ => host.clone(),
        };
        let mpath = m["mountPath"]
            .as_str()
            .unwrap_or_default()
            .trim_end_matches('/');
        mounts.push((mpath.to_string(), host));
    }
    mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
    let map = |s: &str| map_path(s, &mounts);

    // The environment, in order, each value expanded with the ones before it.
    let mut env: Vec<(String, String)> = Vec::new();
    if let Some(i) = pod["metadata"]["labels"][INDEX_KEY].as_str() {
        env.push(("JOB_COMPLETION_INDEX".into(), i.into()));
    }
    for e in c["env"].as_array().into_iter().flatten() {
        let key = text(&e["name"]);
        let value = if let Some(v) = e["value"].as_str() {
            let known: HashMap<String, String> = env.iter().cloned().collect();
            expand(v, &known)
        } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            match field_ref(pod, path) {
                Some(v) => v,
                None => {
                    return fail(
                        "CreateContainerConfigError",
                        format!("env {key}: fieldRef {path:?} is not simulated"),
                    );
                }
            }
        } else if e["valueFrom"].is_object() {
            return fail(
                "CreateContainerConfigError",
                format!("env {key}: {} is not simulated", e["valueFrom"]),
            );
        } else {
            String::new()
        };
        env.retain(|(k, _)| *k != key);
        env.push((key, value));
    }
    let known: HashMap<String, String> = env.iter().cloned().collect();
    let mut args: Vec<String> = Vec::new();
    if let Some(cmd) = c["command"].as_array() {
        let first = cmd.first().and_then(Value::as_str).unwrap_or_default();
        if Path::new(first).file_name().and_then(|f| f.to_str()) != Some(binary.as_str()) {
            return fail(
                "RunContainerError",
                format!("command {first:?} is not the image's binary {binary:?}"),
            );
        }
        args.extend(
            cmd.iter()
                .skip(1)
                .filter_map(Value::as_str)
                .map(|a| expand(a, &known)),
        );
    }
    args.extend(
        c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|a| expand(a, &known)),
    );
    let mut args: Vec<String> = args.iter().map(|a| map(a)).collect();
    let mut env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k, map(&v))).collect();
    let mut base: Vec<(String, String)> = vec![
        ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
        ("HOSTNAME".into(), pname.clone()),
    ];
    if let Some((_, tmp)) = mounts.iter().find(|(m, _)| m == "/tmp") {
        base.push(("TMPDIR".into(), tmp.display().to_string()));
    }
    if pod["spec"]["automountServiceAccountToken"].as_bool() != Some(false) {
        base.push(("KUBECONFIG".into(), sh.kubeconfig.display().to_string()));
    }
    if let Some(hook) = &sh.hook {
        hook(&mut Launch {
            job: pod["metadata"]["labels"][super::controller::JOB_NAME_KEY]
                .as_str()
                .unwrap_or_default(),
            pod: &pname,
            index: pod["metadata"]["labels"][INDEX_KEY]
                .as_str()
                .and_then(|i| i.parse().ok()),
            container: &cname,
            image: &image,
            args: &mut args,
            env: &mut env,
        });
    }

    let log = log_path(sh, &ns, &pname, &cname);
    let out = match std::fs::File::create(&log) {
        Ok(f) => f,
        Err(e) => return fail("RunContainerError", format!("{}: {e}", log.display())),
    };
    let err = out.try_clone().expect("a log file handle clones");
    if let Err(e) = std::fs::write(&termination, b"") {
        return fail(
            "RunContainerError",
            format!("{}: {e}", termination.display()),
        );
    }
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&args)
        .env_clear()
        .envs(base)
        .envs(env)
        .current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    let key = (ns.clone(), pname.clone());
    let started = rfc3339(SystemTime::now());
    let mut child = {
        // Under the lock, so that a deletion either sees this process or stops it from
        // starting.
        let mut procs = sh.procs.lock().unwrap();
        if procs.stopping.contains(&key) {
            drop(procs);
            set_pod(sh, &ns, &pname, |p| p["status"]["phase"] = json!("Failed"));
            return None;
        }
        match cmd.spawn() {
            Ok(ch) => {
                procs.running.insert(key.clone(), ch.id().unwrap_or(0));
                ch
            }
            Err(e) => {
                drop(procs);
                return fail("RunContainerError", format!("{}: {e}", program.display()));
            }
        }
    };
    let running = json!({
        "name": cname, "image": image, "imageID": "", "ready": true, "restartCount": 0,
        "started": true, "containerID": format!("sim://{ns}/{pname}/{cname}"),
        "state": { "running": { "startedAt": started } },
    });
    set_pod(sh, &ns, &pname, |p| {
        p["status"][field] = json!([running]);
        if field == "containerStatuses" {
            p["status"]["phase"] = json!("Running");
            push_condition(p, "ContainersReady", "True", "");
            push_condition(p, "Ready", "True", "");
        }
    });
    let status = child.wait().await;
    sh.procs.lock().unwrap().running.remove(&key);
    let exit_code: i64 = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            s.code()
                .map(i64::from)
                .or(s.signal().map(|sig| 128 + i64::from(sig)))
                .unwrap_or(-1)
        }
        Err(_) => -1,
    };
    let mut message = read_capped(&termination, 4096);
    if message.is_empty()
        && exit_code != 0
        && c["terminationMessagePolicy"].as_str() == Some("FallbackToLogsOnError")
    {
        message = tail_capped(&std::fs::read_to_string(&log).unwrap_or_default(), 80, 2048);
    }
    let mut terminated = json!({
        "exitCode": exit_code,
        "reason": if exit_code == 0 { "Completed" } else { "Error" },
        "startedAt": started,
        "finishedAt": rfc3339(SystemTime::now()),
        "containerID": format!("sim://{ns}/{pname}/{cname}"),
    });
    if !message.is_empty() {
        terminated["message"] = json!(message);
    }
    Some(Ended {
        status: json!({
            "name": cname, "image": image, "imageID": "", "ready": false, "restartCount": 0,
            "started": false, "containerID": format!("sim://{ns}/{pname}/{cname}"),
            "state": { "terminated": terminated },
        }),
        exit_code,
    })
}

/// `s` with a leading mount path (alone, followed by `/`, or after `--flag=`) replaced by
/// its folder on this machine.
pub fn map_path(s: &str, mounts: &[(String, PathBuf)]) -> String {
    let (prefix, path) = match s.split_once('=') {
        Some((flag, p)) if flag.starts_with('-') => (format!("{flag}="), p),
        _ => (String::new(), s),
    };
    for (m, host) in mounts {
        if path == m {
            return format!("{prefix}{}", host.display());
        }
        if let Some(rest) = path.strip_prefix(m.as_str())
            && rest.starts_with('/')
        {
            return format!("{prefix}{}{rest}", host.display());
        }
    }
    s.to_string()
}

/// `$(VAR)` expansion as Kubernetes does it: a known variable is replaced, `$$` is a `$`
/// (so `$$(VAR)` stays literal), anything else is kept as written.
pub fn expand(s: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The downward API's value of a `fieldRef`.
fn field_ref(pod: &Value, path: &str) -> Option<String> {
    let meta = &pod["metadata"];
    if let Some(key) = path
        .strip_prefix("metadata.labels['")
        .and_then(|k| k.strip_suffix("']"))
    {
        return Some(text(&meta["labels"][key]));
    }
    if let Some(key) = path
        .strip_prefix("metadata.annotations['")
        .and_then(|k| k.strip_suffix("']"))
    {
        return Some(text(&meta["annotations"][key]));
    }
    Some(match path {
        "metadata.name" => text(&meta["name"]),
        "metadata.namespace" => text(&meta["namespace"]),
        "metadata.uid" => text(&meta["uid"]),
        "spec.nodeName" => text(&pod["spec"]["nodeName"]),
        "spec.serviceAccountName" => text(&pod["spec"]["serviceAccountName"]),
        "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
        _ => return None,
    })
}

fn read_capped(path: &Path, cap: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(cap).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn tail_capped(text: &str, lines: usize, cap: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    let start = tail.len().saturating_sub(cap);
    let start = (start..=tail.len())
        .find(|i| tail.is_char_boundary(*i))
        .unwrap_or(0);
    tail[start..].to_string()
}

/// `GET pods/NAME/log`: the container's output so far (`tailLines`, `container`).
pub fn read_log(
    sh: &Arc<Shared>,
    ns: &str,
    name: &str,
    query: &HashMap<String, String>,
) -> Result<String, ApiError> {
    let pod = sh
        .store
        .lock()
        .unwrap()
        .get(Kind::Pod, ns, name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(Kind::Pod, name))?;
    let mains: Vec<&str> = pod["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let container = match query.get("container") {
        Some(c) => c.clone(),
        None if mains.len() == 1 => mains[0].to_string(),
        None => {
            return Err(ApiError::new(
                400,
                "BadRequest",
                format!(
                    "a container name must be specified for pod {name}, choose one of: {mains:?}"
                ),
            ));
        }
    };
    let path = log_path(sh, ns, name, &container);
    let text = std::fs::read_to_string(&path).map_err(|_| {
        ApiError::new(
            400,
            "BadRequest",
            format!("container \"{container}\" in pod \"{name}\" is waiting to start"),
        )
    })?;
    Ok(
        match query.get("tailLines").and_then(|t| t.parse::<usize>().ok()) {
            Some(n) => {
                let lines: Vec<&str> = text.lines().collect();
                let mut t = lines[lines.len().saturating_sub(n)..].join("\n");
                t.push('\n');
                t
            }
            None => text,
        },
    )
}
