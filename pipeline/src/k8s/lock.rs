//! The lock on the shared volume: one `coordination.k8s.io/v1` Lease per claim
//! (`fedimdb-pipeline-CLAIM`), so that two drivers never apply Jobs writing into the same
//! volume at the same time.
//!
//! - Taken with `create` before the first Job; 409 means someone holds it.
//! - Renewed (`renewTime`) by a background task every third of `leaseDurationSeconds`.
//! - A holder whose last renewal is older than the lease duration is dead (its driver was
//!   killed, its pod lost): the lock is taken over with a `replace` conditioned on the
//!   resourceVersion read, so of two drivers resuming at once only one wins.
//! - Released (deleted, conditioned on its resourceVersion, so only if still ours) when the
//!   run ends, whatever the outcome, and on SIGINT/SIGTERM.
//!
//! Staleness compares the holder's `renewTime` with this machine's clock: clocks more than
//! a few seconds apart shorten or lengthen the wait for a dead holder's lock by as much.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::jobs::MANAGER;

/// `leaseDurationSeconds` of the lock: a holder silent for longer is taken for dead.
pub const DURATION_S: i32 = 60;

/// The Lease guarding the volume of `claim` (one lock per claim and namespace).
pub fn lease_name(claim: &str) -> String {
    format!("fedimdb-pipeline-{claim}")
}

/// Who holds the lock: the host (the pod's name in a cluster), the process and the run.
pub fn holder_identity(run_id: &str) -> String {
    format!(
        "{} pid {} run {run_id}",
        crate::lock::host_name(),
        std::process::id()
    )
}

/// What the lock is and who takes it.
#[derive(Debug, Clone)]
pub struct LockConfig {
    /// The Lease's name ([`lease_name`]).
    pub name: String,
    /// This driver's `holderIdentity` ([`holder_identity`]).
    pub holder: String,
    pub run_id: String,
    /// The claim the lock guards (an annotation on the Lease, and whose Jobs count as
    /// another run's).
    pub claim: String,
    /// `leaseDurationSeconds`.
    pub duration_s: i32,
    /// How often the lock is renewed (a third of the duration).
    pub renew_every: Duration,
}

impl LockConfig {
    pub fn new(claim: &str, run_id: &str) -> Self {
        LockConfig {
            name: lease_name(claim),
            holder: holder_identity(run_id),
            run_id: run_id.to_string(),
            claim: claim.to_string(),
            duration_s: DURATION_S,
            renew_every: Duration::from_secs((DURATION_S / 3) as u64),
        }
    }
}

/// Seconds from `then` to `now` (negative if `then` is in the future).
fn seconds_since(now: Timestamp, then: Timestamp) -> i64 {
    (now.as_millisecond() - then.as_millisecond()).div_euclid(1000)
}

/// A timestamp to the second, for messages.
fn show(t: Timestamp) -> String {
    Timestamp::from_second(t.as_second())
        .unwrap_or(t)
        .to_string()
}

fn holder_of(lease: &Lease) -> Option<String> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .filter(|h| !h.is_empty())
}

/// A held lock: renewed in the background until [`Lock::release`].
pub struct Lock {
    api: Api<Lease>,
    cfg: LockConfig,
    /// The Lease as last written by us (its resourceVersion conditions the next write).
    current: Arc<Mutex<Lease>>,
    lost: watch::Receiver<Option<String>>,
    renewer: Option<JoinHandle<()>>,
}

impl Lock {
    /// The Lease this driver writes: held by us, renewed now.
    fn lease(cfg: &LockConfig, namespace: &str, now: Timestamp, transitions: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(namespace.to_string()),
                labels: Some(
                    [
                        ("app.kubernetes.io/name", "fedimdb"),
                        ("app.kubernetes.io/part-of", "fedimdb"),
                        ("app.kubernetes.io/component", "pipeline-lock"),
                        ("app.kubernetes.io/managed-by", MANAGER),
                        ("fedimdb/run", cfg.run_id.as_str()),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ),
                annotations: Some(
                    [("fedimdb/claim".to_string(), cfg.claim.clone())]
                        .into_iter()
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.holder.clone()),
                lease_duration_seconds: Some(cfg.duration_s),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }

    /// Takes the lock: creates the Lease, or takes over one whose holder stopped renewing
    /// it. Fails, naming the holder, if the lock is held and alive.
    pub async fn acquire(
        api: Api<Lease>,
        cfg: LockConfig,
        say: &(dyn Fn(String) + Sync),
    ) -> Result<Lock> {
        let ns = api.namespace().unwrap_or("default").to_string();
        let name = cfg.name.clone();
        let pp = PostParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        // Three tries: the Lease can be released between our create and our read.
        for _ in 0..3 {
            let now = Timestamp::now();
            match api.create(&pp, &Self::lease(&cfg, &ns, now, 0)).await {
                Ok(l) => {
                    say(format!(
                        "locked the volume of claim {}: Lease {ns}/{name} held by {:?}",
                        cfg.claim, cfg.holder
                    ));
                    return Ok(Self::held(api, cfg, l));
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(kube::Error::Api(s)) if s.code == 403 => bail!(
                    "not allowed to create the lock Lease {ns}/{name}: {} (the pipeline needs \
                     get/create/update/delete on leases.coordination.k8s.io in namespace {ns}; \
                     see the Role fedimdb-pipeline in manifests/base/pipeline-rbac.yaml)",
                    s.message
                ),
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot create the lock Lease {ns}/{name}"));
                }
            }
            let Some(old) = api
                .get_opt(&name)
                .await
                .with_context(|| format!("cannot read the lock Lease {ns}/{name}"))?
            else {
                continue; // released in between: create again
            };
            let spec = old.spec.clone().unwrap_or_default();
            let duration = spec.lease_duration_seconds.unwrap_or(cfg.duration_s).max(1);
            let renewed = spec
                .renew_time
                .clone()
                .or(spec.acquire_time.clone())
                .map(|t| t.0);
            let now = Timestamp::now();
            let interrupted = match holder_of(&old) {
                None => None, // released by setting no holder (client-go's way)
                Some(holder) => {
                    let age = renewed.map(|r| seconds_since(now, r));
                    match age {
                        Some(age) if age <= duration as i64 => {
                            let renewed = renewed.unwrap();
                            bail!(
                                "the volume of claim {} is locked by another pipeline: Lease {ns}/{name} \
                                 is held by {holder:?}, last renewed {} ({age} s ago; a holder silent for \
                                 {duration} s counts as dead). Wait for that run to end; if its driver \
                                 died, run `pipeline k8s` again after {} and it resumes the run; if you \
                                 know it is dead and cannot wait: `kubectl -n {ns} delete lease {name}`",
                                cfg.claim,
                                show(renewed),
                                show(
                                    Timestamp::from_second(
                                        renewed.as_second() + duration as i64 + 1
                                    )
                                    .unwrap_or(renewed)
                                ),
                            )
                        }
                        _ => Some((holder, renewed, age)),
                    }
                }
            };
            // Take it over, only if nobody changed it since we read it.
            let transitions = spec.lease_transitions.unwrap_or(0).saturating_add(1);
            let mut mine = Self::lease(&cfg, &ns, now, transitions);
            mine.metadata.resource_version = old.metadata.resource_version.clone();
            match api.replace(&name, &pp, &mine).await {
                Ok(l) => {
                    match interrupted {
                        Some((holder, renewed, age)) => say(format!(
                            "found an interrupted run: lock {ns}/{name} held by {holder:?}, last renewed {} \
                             ({} ago); taking it over and resuming (steps whose outputs verify are skipped)",
                            renewed.map(show).unwrap_or_else(|| "never".into()),
                            age.map(|a| format!("{a} s"))
                                .unwrap_or_else(|| "long".into()),
                        )),
                        None => say(format!(
                            "locked the volume of claim {}: Lease {ns}/{name} (released, no holder) now held by {:?}",
                            cfg.claim, cfg.holder
                        )),
                    }
                    return Ok(Self::held(api, cfg, l));
                }
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                    let now_held = match api.get_opt(&name).await {
                        Ok(Some(l)) => holder_of(&l)
                            .map(|h| format!("; it is now held by {h:?}"))
                            .unwrap_or_default(),
                        _ => String::new(),
                    };
                    bail!(
                        "the lock Lease {ns}/{name} changed while this run was taking it over from a \
                         dead holder: another pipeline is resuming the same volume{now_held}. Not \
                         starting; wait for that run to end"
                    )
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot take over the lock Lease {ns}/{name}"));
                }
            }
        }
        bail!("the lock Lease {ns}/{name} kept appearing and disappearing; try again")
    }

    /// Starts renewing the lock just taken.
    fn held(api: Api<Lease>, cfg: LockConfig, lease: Lease) -> Lock {
        let current = Arc::new(Mutex::new(lease));
        let (tx, rx) = watch::channel(None);
        let renewer = tokio::spawn(renew(api.clone(), cfg.clone(), current.clone(), tx));
        Lock {
            api,
            cfg,
            current,
            lost: rx,
            renewer: Some(renewer),
        }
    }

    /// Resolves, with the reason, if the lock is lost (taken over or deleted by someone
    /// else, or not renewed for longer than its duration).
    pub async fn lost(&self) -> String {
        let mut rx = self.lost.clone();
        match rx.wait_for(|v| v.is_some()).await {
            Ok(v) => v.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops renewing and deletes the Lease if it is still ours (best effort: problems are
    /// reported, the Lease then expires by itself).
    pub async fn release(mut self, say: &(dyn Fn(String) + Sync)) {
        if let Some(h) = self.renewer.take() {
            h.abort();
            let _ = h.await;
        }
        let ns = self.api.namespace().unwrap_or("default").to_string();
        let name = self.cfg.name.clone();
        let mut lease = self.current.lock().unwrap().clone();
        for _ in 0..3 {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: lease.metadata.resource_version.clone(),
                    uid: lease.metadata.uid.clone(),
                }),
                ..Default::default()
            };
            match self.api.delete(&name, &dp).await {
                Ok(_) => {
                    say(format!("released the lock {ns}/{name}"));
                    return;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    say(format!("the lock {ns}/{name} was already gone"));
                    return;
                }
                Err(kube::Error::Api(s)) if s.code == 409 => match self.api.get_opt(&name).await {
                    Ok(Some(l)) if holder_of(&l).as_deref() == Some(self.cfg.holder.as_str()) => {
                        lease = l; // renewed meanwhile: delete that version
                    }
                    Ok(Some(l)) => {
                        say(format!(
                            "the lock {ns}/{name} is now held by {:?}; left alone",
                            holder_of(&l).unwrap_or_default()
                        ));
                        return;
                    }
                    Ok(None) => {
                        say(format!("the lock {ns}/{name} was already gone"));
                        return;
                    }
                    Err(e) => {
                        say(format!(
                            "cannot read the lock {ns}/{name} to release it: {e}"
                        ));
                        break;
                    }
                },
                Err(e) => {
                    say(format!("cannot release the lock {ns}/{name}: {e}"));
                    break;
                }
            }
        }
        say(format!(
            "the lock {ns}/{name} expires by itself {} s after its last renewal (or: `kubectl -n {ns} delete lease {name}`)",
            self.cfg.duration_s
        ));
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some(h) = self.renewer.take() {
            h.abort();
        }
    }
}

/// Renews the lock every `renew_every` until it is lost (reported on `lost`) or the task is
/// aborted by [`Lock::release`].
async fn renew(
    api: Api<Lease>,
    cfg: LockConfig,
    current: Arc<Mutex<Lease>>,
    lost: watch::Sender<Option<String>>,
) {
    let ns = api.namespace().unwrap_or("default").to_string();
    let name = cfg.name.clone();
    // Give up while others still see the lock as alive: a renewal period before it expires.
    let duration = Duration::from_secs(cfg.duration_s.max(1) as u64);
    let limit = duration
        .saturating_sub(cfg.renew_every)
        .max(cfg.renew_every);
    let answer_within = cfg.renew_every.max(Duration::from_secs(1));
    let mut last_ok = Instant::now();
    let mut last_error = String::new();
    let mut wait = true;
    loop {
        if wait {
            tokio::time::sleep(cfg.renew_every).await;
        }
        wait = true;
        let mut lease = current.lock().unwrap().clone();
        if let Some(s) = lease.spec.as_mut() {
            s.renew_time = Some(MicroTime(Timestamp::now()));
        }
        let pp = PostParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        let gone = |why: String| format!("lost the lock {ns}/{name}: {why}");
        match tokio::time::timeout(answer_within, api.replace(&name, &pp, &lease)).await {
            Ok(Ok(l)) => {
                *current.lock().unwrap() = l;
                last_ok = Instant::now();
            }
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => match api.get_opt(&name).await {
                Ok(Some(l)) if holder_of(&l).as_deref() == Some(cfg.holder.as_str()) => {
                    // Changed by someone (a label?) but still ours: renew that version now.
                    *current.lock().unwrap() = l;
                    wait = false;
                }
                Ok(Some(l)) => {
                    let _ = lost.send(Some(gone(format!(
                        "it is now held by {:?}",
                        holder_of(&l).unwrap_or_default()
                    ))));
                    return;
                }
                Ok(None) => {
                    let _ = lost.send(Some(gone("the Lease was deleted".into())));
                    return;
                }
                Err(e) => last_error = e.to_string(),
            },
            Ok(Err(kube::Error::Api(s))) if s.code == 404 => {
                let _ = lost.send(Some(gone("the Lease was deleted".into())));
                return;
            }
            Ok(Err(e)) => {
                last_error = e.to_string();
                eprintln!("  warning: cannot renew the lock {ns}/{name}: {e}");
            }
            Err(_) => {
                last_error = format!("no answer within {} s", answer_within.as_secs());
                eprintln!("  warning: cannot renew the lock {ns}/{name}: {last_error}");
            }
        }
        if last_ok.elapsed() >= limit {
            let _ = lost.send(Some(gone(format!(
                "not renewed for {} s (last error: {last_error}), so another pipeline may have taken it",
                last_ok.elapsed().as_secs()
            ))));
            return;
        }
    }
}
