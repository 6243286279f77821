//! The simulated API server's object store: Jobs, Pods and Leases as JSON values, keyed by
//! kind, namespace and name, with the bookkeeping the real API server does on every write
//! (uid, a global resourceVersion, creationTimestamp, generation) and the answers it gives
//! when a write cannot be done (404 NotFound, 409 AlreadyExists/Conflict, 422 Invalid).
//!
//! Objects are kept as `serde_json::Value`, not typed: the simulator must serve whatever
//! the driver sends back to it unchanged, and merging an applied object is a walk over
//! JSON maps either way.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// The kinds the simulator serves.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Hash)]
pub enum Kind {
    Job,
    Pod,
    Lease,
}

impl Kind {
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Job => "batch/v1",
            Kind::Pod => "v1",
            Kind::Lease => "coordination.k8s.io/v1",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Kind::Job => "Job",
            Kind::Pod => "Pod",
            Kind::Lease => "Lease",
        }
    }
    /// `jobs.batch`, as the API server names a resource in its messages.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Job => "jobs.batch",
            Kind::Pod => "pods",
            Kind::Lease => "leases.coordination.k8s.io",
        }
    }
}

/// An API error, answered as a `Status` object (what kube's client turns into
/// `kube::Error::Api` with this code).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }
    pub fn not_found(kind: Kind, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", kind.resource()),
        )
    }
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason,
            "code": self.code,
        })
    }
}

type Key = (Kind, String, String);

#[derive(Default)]
pub struct Store {
    objects: BTreeMap<Key, Value>,
    next_rv: u64,
    next_uid: u64,
}

fn key(kind: Kind, ns: &str, name: &str) -> Key {
    (kind, ns.to_string(), name.to_string())
}

impl Store {
    fn bump(&mut self) -> String {
        self.next_rv += 1;
        self.next_rv.to_string()
    }

    /// The current resourceVersion of the whole store (a list's).
    pub fn resource_version(&self) -> String {
        self.next_rv.to_string()
    }

    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&key(kind, ns, name))
    }

    /// The objects of a kind in a namespace that match a label selector, by name.
    pub fn list(&self, kind: Kind, ns: &str, selector: &Selector) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((k, n, _), _)| *k == kind && n == ns)
            .map(|(_, v)| v)
            .filter(|v| selector.matches(v))
            .cloned()
            .collect()
    }

    /// Every object of a kind (all namespaces).
    pub fn all(&self, kind: Kind) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((k, _, _), _)| *k == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Creates an object, filling in what the API server fills in.
    pub fn create(&mut self, kind: Kind, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        let name = text(&obj["metadata"]["name"]);
        if name.is_empty() {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!("{} is invalid: metadata.name: Required value", kind.name()),
            ));
        }
        if self.objects.contains_key(&key(kind, ns, &name)) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", kind.resource()),
            ));
        }
        self.next_uid += 1;
        let uid = format!("00000000-0000-4000-8000-{:012x}", self.next_uid);
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.name());
        let rv = self.bump();
        let meta = &mut obj["metadata"];
        meta["namespace"] = json!(ns);
        meta["uid"] = json!(uid);
        meta["resourceVersion"] = json!(rv);
        meta["creationTimestamp"] = json!(rfc3339(SystemTime::now()));
        meta["generation"] = json!(1);
        if let Some(m) = meta.as_object_mut() {
            // Server-side apply's bookkeeping is not simulated (and not served).
            m.remove("managedFields");
        }
        self.objects.insert(key(kind, ns, &name), obj.clone());
        Ok(obj)
    }

    /// Replaces an object (PUT): the body's resourceVersion, when it has one, must be the
    /// stored one, as the API server's optimistic concurrency wants.
    pub fn replace(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        mut obj: Value,
    ) -> Result<Value, ApiError> {
        let old = self
            .get(kind, ns, name)
            .ok_or_else(|| ApiError::not_found(kind, name))?
            .clone();
        if let Some(rv) = obj["metadata"]["resourceVersion"].as_str()
            && Some(rv) != old["metadata"]["resourceVersion"].as_str()
        {
            return Err(conflict(kind, name));
        }
        for f in ["uid", "creationTimestamp", "namespace", "generation"] {
            obj["metadata"][f] = old["metadata"][f].clone();
        }
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.name());
        obj["metadata"]["resourceVersion"] = json!(self.bump());
        self.objects.insert(key(kind, ns, name), obj.clone());
        Ok(obj)
    }

    /// Changes an object in place (the controllers' status writes); bumps its
    /// resourceVersion if `f` changed anything. `None` when there is no such object.
    pub fn modify(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Option<Value> {
        let k = key(kind, ns, name);
        let mut obj = self.objects.get(&k)?.clone();
        let before = obj.clone();
        f(&mut obj);
        if obj != before {
            obj["metadata"]["resourceVersion"] = json!(self.bump());
            self.objects.insert(k, obj.clone());
        }
        Some(obj)
    }

    /// Removes an object, if `preconditions` (DeleteOptions') hold.
    pub fn delete(
        &mut self,
        kind: Kind,
        ns: &str,
        name: &str,
        preconditions: &Value,
    ) -> Result<Value, ApiError> {
        let k = key(kind, ns, name);
        let obj = self
            .objects
            .get(&k)
            .ok_or_else(|| ApiError::not_found(kind, name))?;
        for (field, what) in [("resourceVersion", "ResourceVersion"), ("uid", "UID")] {
            if let Some(want) = preconditions[field].as_str()
                && Some(want) != obj["metadata"][field].as_str()
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "Precondition failed: {what} in precondition: {want}, {what} in object meta: {}",
                        obj["metadata"][field].as_str().unwrap_or_default()
                    ),
                ));
            }
        }
        self.bump();
        Ok(self.objects.remove(&k).expect("checked above"))
    }
}

pub fn conflict(kind: Kind, name: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            kind.resource()
        ),
    )
}

/// A label selector as `kubectl -l` and kube's `ListParams::labels` write it: `k=v`,
/// `k==v`, `k!=v`, `k` (exists), `!k` (absent), comma-separated. Set-based terms
/// (`k in (a,b)`) are refused by [`Selector::parse`] rather than misread.
#[derive(Debug, Default)]
pub struct Selector(Vec<Term>);

#[derive(Debug)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

impl Selector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if t.contains(' ') || t.contains('(') {
                return Err(format!(
                    "set-based label selector term {t:?} is not simulated"
                ));
            }
            let term = if let Some((k, v)) = t.split_once("!=") {
                Term::Ne(k.into(), v.into())
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                Term::Eq(k.into(), v.into())
            } else if let Some(k) = t.strip_prefix('!') {
                Term::Absent(k.into())
            } else {
                Term::Exists(t.into())
            };
            terms.push(term);
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => get(k) == Some(v.as_str()),
            Term::Ne(k, v) => get(k) != Some(v.as_str()),
            Term::Exists(k) => get(k).is_some(),
            Term::Absent(k) => get(k).is_none(),
        })
    }
}

/// JSON merge patch (RFC 7386): maps merge recursively, `null` removes, anything else
/// replaces. Also the simulator's stand-in for server-side apply (see `apiserver.rs`).
pub fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (_, Some(p)) => {
            *target = Value::Object(Default::default());
            let t = target.as_object_mut().expect("just made");
            for (k, v) in p {
                if !v.is_null() {
                    let mut slot = Value::Null;
                    merge(&mut slot, v);
                    t.insert(k.clone(), slot);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// A JSON string field as an owned string, empty when absent (the API's own default for
/// the names and labels the simulator reads).
pub fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// A time as RFC 3339 UTC, seconds (`metav1.Time`), by the project's own formatter.
pub fn rfc3339(t: SystemTime) -> String {
    fedimdb::report::format_utc(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// A time as `metav1.MicroTime` (a Lease's renewTime): [`rfc3339`] with microseconds.
pub fn rfc3339_micro(t: SystemTime) -> String {
    let micros = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_micros());
    let seconds = rfc3339(t);
    format!("{}.{micros:06}Z", seconds.trim_end_matches('Z'))
}
