//! The simulated API server: plain HTTP on 127.0.0.1 (axum), serving exactly the calls
//! `pipeline k8s` makes through kube's client (pipeline/src/k8s/api.rs and lock.rs):
//!
//! - `GET /version` (the driver's reachability check);
//! - Jobs (`batch/v1`): list by label, get, create, server-side apply (`PATCH` with
//!   `application/apply-patch+yaml`), JSON merge patch (the driver Job's progress labels
//!   and its suspension), strategic merge patch (what `kubectl apply` sends to change an
//!   existing object; simulated as a JSON merge patch, which it equals for maps and
//!   scalars: lists are replaced, not merged by key), delete with `propagationPolicy`;
//! - Pods (`v1`): list by label, get, delete, and `pods/{name}/log` (`tailLines`,
//!   `container`); pods are only made by the Job controller, as in a cluster;
//! - Leases (`coordination.k8s.io/v1`): get, list, create, replace (PUT, with the
//!   resourceVersion precondition that makes a lock takeover safe), delete with
//!   preconditions, merge patch.
//!
//! The driver polls Job status with GET, so `watch=true` is not simulated. Anything else is
//! answered 404 and recorded in [`super::Shared::unserved`], which the tests check is
//! empty: a driver change that starts calling something new fails them by name instead
//! of being served something made up.
//!
//! Server-side apply is simulated as a JSON merge of the applied object into the stored
//! one (creating it when absent), without managedFields or field ownership: re-applying an
//! unchanged Job changes nothing, and a changed pod template is refused (422, immutable)
//! as the real API server refuses it. Conflicts between field managers are not simulated.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Shared;
use super::controller;
use super::kubelet;
use super::store::{ApiError, Kind, Selector, merge};

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

enum Reply {
    Json(u16, Value),
    Text(String),
}

async fn handle(
    State(sh): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = parse_query(uri.query().unwrap_or(""));
    sh.requests.lock().unwrap().push(format!(
        "{method} {path}{}",
        uri.query().map(|q| format!("?{q}")).unwrap_or_default()
    ));
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    match serve(&sh, &method, &path, &query, &ctype, &body) {
        Ok(Reply::Json(code, v)) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
            [(header::CONTENT_TYPE, "application/json")],
            v.to_string(),
        )
            .into_response(),
        Ok(Reply::Text(t)) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], t).into_response()
        }
        Err(e) => {
            if e.reason == "NotServed" {
                sh.unserved
                    .lock()
                    .unwrap()
                    .push(format!("{method} {uri}: {}", e.message));
            }
            (
                StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                [(header::CONTENT_TYPE, "application/json")],
                e.status().to_string(),
            )
                .into_response()
        }
    }
}

fn not_served(what: &str) -> ApiError {
    ApiError::new(
        404,
        "NotServed",
        format!("the simulated API server does not serve {what}"),
    )
}

fn serve(
    sh: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    ctype: &str,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (kind, ns, name, sub) = match segs.as_slice() {
        ["version"] if method == Method::GET => return Ok(Reply::Json(200, version())),
        ["api", "v1", "namespaces", ns, "pods", rest @ ..] => (Kind::Pod, *ns, rest),
        ["apis", "batch", "v1", "namespaces", ns, "jobs", rest @ ..] => (Kind::Job, *ns, rest),
        [
            "apis",
            "coordination.k8s.io",
            "v1",
            "namespaces",
            ns,
            "leases",
            rest @ ..,
        ] => (Kind::Lease, *ns, rest),
        _ => return Err(not_served(&format!("{method} {path}"))),
    }
    .pipe(|(k, ns, rest)| match rest {
        [] => Ok((k, ns, None, None)),
        [name] => Ok((k, ns, Some(*name), None)),
        [name, sub] => Ok((k, ns, Some(*name), Some(*sub))),
        _ => Err(not_served(&format!("{method} {path}"))),
    })?;
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return Err(not_served("watch requests (the driver polls with GET)"));
    }
    if query.contains_key("dryRun") {
        return Err(not_served("dryRun requests"));
    }
    match (name, sub, method.clone()) {
        (None, None, Method::GET) => list(sh, kind, ns, query),
        (None, None, Method::POST) if kind != Kind::Pod => {
            let obj = parse_json(body)?;
            check_body(kind, &obj, None)?;
            let mut store = sh.store.lock().unwrap();
            let made = store.create(kind, ns, obj)?;
            let made = if kind == Kind::Job {
                controller::default_job(&mut store, ns, &made)
            } else {
                made
            };
            Ok(Reply::Json(201, made))
        }
        (Some(name), None, Method::GET) => {
            let store = sh.store.lock().unwrap();
            let obj = store
                .get(kind, ns, name)
                .ok_or_else(|| ApiError::not_found(kind, name))?;
            Ok(Reply::Json(200, obj.clone()))
        }
        (Some(name), None, Method::PUT) if kind != Kind::Pod => {
            let obj = parse_json(body)?;
            check_body(kind, &obj, Some(name))?;
            let mut store = sh.store.lock().unwrap();
            if kind == Kind::Job {
                let old = store
                    .get(kind, ns, name)
                    .ok_or_else(|| ApiError::not_found(kind, name))?;
                immutable_template(name, old, &obj)?;
            }
            Ok(Reply::Json(200, store.replace(kind, ns, name, obj)?))
        }
        (Some(name), None, Method::PATCH) if kind != Kind::Pod => {
            patch(sh, kind, ns, name, ctype, query, body)
        }
        (Some(name), None, Method::DELETE) => delete(sh, kind, ns, name, query, body),
        (Some(name), Some("log"), Method::GET) if kind == Kind::Pod => {
            kubelet::read_log(sh, ns, name, query).map(Reply::Text)
        }
        _ => Err(not_served(&format!("{method} {path}"))),
    }
}

/// `x.pipe(f)`: keeps the routing above one expression.
trait Pipe: Sized {
    fn pipe<T>(self, f: impl FnOnce(Self) -> T) -> T {
        f(self)
    }
}
impl<T> Pipe for T {}

fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0-fedimdb-sim",
        "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z", "goVersion": "none (simulated in Rust)",
        "compiler": "rustc", "platform": "linux/amd64",
    })
}

fn list(
    sh: &Arc<Shared>,
    kind: Kind,
    ns: &str,
    query: &HashMap<String, String>,
) -> Result<Reply, ApiError> {
    if query.contains_key("fieldSelector") {
        return Err(not_served("field selectors"));
    }
    let selector = Selector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| ApiError::new(400, "BadRequest", e))?;
    let store = sh.store.lock().unwrap();
    Ok(Reply::Json(
        200,
        json!({
            "apiVersion": kind.api_version(),
            "kind": format!("{}List", kind.name()),
            "metadata": { "resourceVersion": store.resource_version() },
            "items": store.list(kind, ns, &selector),
        }),
    ))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, "BadRequest", format!("the body is not JSON: {e}")))
}

/// The body names the kind of the URL (and the name, for writes to one object).
fn check_body(kind: Kind, obj: &Value, name: Option<&str>) -> Result<(), ApiError> {
    let k = obj["kind"].as_str().unwrap_or(kind.name());
    let v = obj["apiVersion"].as_str().unwrap_or(kind.api_version());
    if k != kind.name() || v != kind.api_version() {
        return Err(ApiError::new(
            400,
            "BadRequest",
            format!(
                "the body is a {v} {k}, not a {} {}",
                kind.api_version(),
                kind.name()
            ),
        ));
    }
    if let Some(name) = name
        && obj["metadata"]["name"].as_str() != Some(name)
    {
        return Err(ApiError::new(
            400,
            "BadRequest",
            format!(
                "the name of the object ({:?}) does not match the name on the URL ({name:?})",
                obj["metadata"]["name"]
            ),
        ));
    }
    Ok(())
}

/// A Job's pod template cannot change once created (the API server's validation).
fn immutable_template(name: &str, old: &Value, new: &Value) -> Result<(), ApiError> {
    if old["spec"]["template"] != new["spec"]["template"] {
        return Err(ApiError::new(
            422,
            "Invalid",
            format!(
                "Job.batch \"{name}\" is invalid: spec.template: Invalid value: field is immutable"
            ),
        ));
    }
    Ok(())
}

fn patch(
    sh: &Arc<Shared>,
    kind: Kind,
    ns: &str,
    name: &str,
    ctype: &str,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let mut patch: Value = match ctype {
        "application/apply-patch+yaml" => {
            if query.get("fieldManager").is_none_or(|m| m.is_empty()) {
                return Err(ApiError::new(
                    400,
                    "BadRequest",
                    "PATCH: fieldManager is required for apply requests",
                ));
            }
            let v: Value = serde_yaml::from_slice(body).map_err(|e| {
                ApiError::new(
                    400,
                    "BadRequest",
                    format!("the applied object is not YAML: {e}"),
                )
            })?;
            check_body(kind, &v, Some(name))?;
            v
        }
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            parse_json(body)?
        }
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the simulated API server takes apply, merge and strategic merge patches, \
                     not {other:?}"
                ),
            ));
        }
    };
    // What a client writes to the main resource never reaches the status (its own
    // subresource), and server-side apply's bookkeeping is not simulated.
    if let Some(o) = patch.as_object_mut() {
        o.remove("status");
    }
    // (`get_mut`: indexing would add a null `metadata`, which the merge would take as
    // "remove the object's metadata" for a patch that names none.)
    if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
        m.remove("resourceVersion");
    }
    let mut store = sh.store.lock().unwrap();
    let Some(old) = store.get(kind, ns, name).cloned() else {
        if ctype != "application/apply-patch+yaml" {
            return Err(ApiError::not_found(kind, name));
        }
        let made = store.create(kind, ns, patch)?;
        let made = if kind == Kind::Job {
            controller::default_job(&mut store, ns, &made)
        } else {
            made
        };
        return Ok(Reply::Json(201, made));
    };
    let mut merged = old.clone();
    merge(&mut merged, &patch);
    if kind == Kind::Job {
        immutable_template(name, &old, &merged)?;
    }
    let new = store
        .modify(kind, ns, name, |v| *v = merged)
        .expect("read above under the same lock");
    Ok(Reply::Json(200, new))
}

fn delete(
    sh: &Arc<Shared>,
    kind: Kind,
    ns: &str,
    name: &str,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Result<Reply, ApiError> {
    let opts: Value = if body.is_empty() {
        json!({})
    } else {
        parse_json(body)?
    };
    // Jobs deleted through the API orphan their pods unless told otherwise (batch/v1's
    // default garbage collection policy; kubectl asks for Background).
    let policy = query
        .get("propagationPolicy")
        .map(String::as_str)
        .or(opts["propagationPolicy"].as_str())
        .unwrap_or(if kind == Kind::Job {
            "Orphan"
        } else {
            "Background"
        })
        .to_string();
    if !matches!(policy.as_str(), "Orphan" | "Background" | "Foreground") {
        return Err(ApiError::new(
            400,
            "BadRequest",
            format!("unknown propagationPolicy {policy:?}"),
        ));
    }
    let preconditions = opts["preconditions"].clone();
    let details = |uid: &Value| {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": { "name": name, "kind": kind.resource().split('.').next(), "uid": uid },
        })
    };
    match kind {
        Kind::Pod => {
            // A pod is stopped first (SIGTERM, then SIGKILL after the grace period) and
            // removed once its end has been recorded, as the kubelet and the Job
            // controller's tracking finalizer do.
            let uid = {
                let store = sh.store.lock().unwrap();
                let pod = store
                    .get(kind, ns, name)
                    .ok_or_else(|| ApiError::not_found(kind, name))?;
                pod["metadata"]["uid"].clone()
            };
            kubelet::terminate(sh, ns, name, false);
            Ok(Reply::Json(200, details(&uid)))
        }
        Kind::Job | Kind::Lease => {
            let removed = sh
                .store
                .lock()
                .unwrap()
                .delete(kind, ns, name, &preconditions)?;
            let uid = removed["metadata"]["uid"].clone();
            // A Job's pods go the way its propagation policy says.
            if kind == Kind::Job {
                controller::job_deleted(sh, ns, uid.as_str().unwrap_or_default(), &policy);
            }
            Ok(Reply::Json(200, details(&uid)))
        }
    }
}

/// The query string, percent-decoded (`+` is a space, as in forms).
fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(x) => {
                        out.push(x);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
