//! The module that talks to the Kubernetes API (with `lock.rs`): takes the lock on the
//! volume, server-side-applies each step's Job, waits for it to complete or fail while
//! showing progress, and on failure collects the last log lines of the failed pods. A
//! driver running as a Job (`--driver-job`) also writes the run's phase, round and latest
//! test accuracy as labels on that Job, and suspends that Job when a step fails, so that
//! applying the Job again resumes the run.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use fedimdb::outcome::Outcome as StepOutcome;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams, LogParams, Patch, PatchParams};

use super::jobs::{MANAGER, Step};
use super::lock::{Lock, LockConfig};
use crate::plan::StepKind;
use crate::rounds::{RoundRow, round_table, summarize};

/// How long releasing the lock may take before the run ends without (an unreachable API
/// server must not hold up the exit; the lock then expires by itself).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(15);

/// How a finished Job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Complete,
    /// The `Failed` (or `FailureTarget`) condition, with its reason and message.
    Failed {
        reason: String,
        message: String,
    },
}

/// What the wait loop reads from a Job's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub succeeded: i32,
    pub failed: i32,
    pub active: i32,
    /// Indexed Jobs: the indices done, as the API writes them (`0,2-4`).
    pub completed_indexes: Option<String>,
    /// Indexed Jobs with `backoffLimitPerIndex`: the indices that failed for good.
    pub failed_indexes: Option<String>,
}

impl Progress {
    /// Pods (indices, for an Indexed Job) that succeeded.
    pub fn done(&self) -> i32 {
        match &self.completed_indexes {
            Some(c) => count_indexes(c) as i32,
            None => self.succeeded,
        }
    }
}

/// How many indices an index set as the API writes it (`0,2-4`) holds.
pub fn count_indexes(set: &str) -> usize {
    set.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 1,
            },
            None => 1,
        })
        .sum()
}

/// The outcome of a Job if it has finished: its `Complete` or `Failed` condition.
/// (`kube::runtime::conditions::is_job_completed` only reports completion; a failed Job
/// would be waited on forever.)
pub fn outcome(job: &Job) -> Option<Outcome> {
    let conds = job.status.as_ref()?.conditions.as_ref()?;
    for c in conds.iter().filter(|c| c.status == "True") {
        match c.type_.as_str() {
            "Complete" => return Some(Outcome::Complete),
            "Failed" | "FailureTarget" => {
                return Some(Outcome::Failed {
                    reason: c.reason.clone().unwrap_or_default(),
                    message: c.message.clone().unwrap_or_default(),
                });
            }
            _ => {}
        }
    }
    None
}

pub fn progress(job: &Job) -> Progress {
    let s = job.status.clone().unwrap_or_default();
    Progress {
        succeeded: s.succeeded.unwrap_or(0),
        failed: s.failed.unwrap_or(0),
        active: s.active.unwrap_or(0),
        completed_indexes: s.completed_indexes.filter(|c| !c.is_empty()),
        failed_indexes: s.failed_indexes.filter(|c| !c.is_empty()),
    }
}

/// Whether a Job belongs to another run of the pipeline on the same claim and is still
/// running (no `Complete` or `Failed` condition).
fn active_job_of_other_run<'a>(job: &'a Job, run_id: &str, claim: &str) -> Option<&'a str> {
    let run = job.metadata.labels.as_ref()?.get("fedimdb/run")?;
    if run == run_id || outcome(job).is_some() {
        return None;
    }
    let uses_claim = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.volumes.as_ref())
        .is_some_and(|vs| {
            vs.iter().any(|v| {
                v.persistent_volume_claim
                    .as_ref()
                    .is_some_and(|c| c.claim_name == claim)
            })
        });
    uses_claim.then_some(run.as_str())
}

/// The outcome record a pod's container left as its termination message.
pub fn outcome_of(pod: &Pod, container: Option<&str>) -> Option<StepOutcome> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let status = statuses
        .iter()
        .find(|c| container.is_none_or(|name| c.name == name))?;
    let message = status
        .state
        .as_ref()?
        .terminated
        .as_ref()?
        .message
        .as_deref()?;
    StepOutcome::parse(message).ok()
}

/// Labels the driver writes on its own Job (`kubectl get jobs -L ...`): the run's phase
/// (`running`, `done`, `failed`, `interrupted`), the round of the step it is at, and the
/// test accuracy of the latest round aggregated (a fraction, 4 decimals).
pub const PHASE_LABEL: &str = "fedimdb.io/phase";
pub const ROUND_LABEL: &str = "fedimdb.io/round";
pub const ACCURACY_LABEL: &str = "fedimdb.io/accuracy";
/// Annotation with the step the run is at, in words (`[4/13] trainers of round 1`).
pub const STEP_ANNOTATION: &str = "fedimdb.io/step";
/// Annotation with why the run stopped, on a driver Job suspended after a failed step
/// (removed when a driver runs again).
pub const ERROR_ANNOTATION: &str = "fedimdb.io/error";
/// The longest error written into [`ERROR_ANNOTATION`] (the step's pod logs hold the rest).
const ERROR_ANNOTATION_MAX: usize = 2000;

/// What the run has seen so far: the round table, and what the driver's Job last said.
#[derive(Debug, Default)]
struct RunState {
    rows: Vec<RoundRow>,
    /// The trainers of the round in progress (`done/total outcome`) and when they started.
    trainers: Option<(String, Instant)>,
    /// What the last finished step's pods did (their outcome records), and its accuracy.
    last: Option<(String, Option<f64>)>,
    /// The round and accuracy last written on the driver's Job.
    round: Option<u32>,
    accuracy: Option<f64>,
    /// Set once writing to the driver's Job failed (said once, not on every step).
    record_failed: bool,
}

/// Applies and waits for Jobs in one namespace.
pub struct Orchestrator {
    jobs: Api<Job>,
    pods: Api<Pod>,
    leases: Api<Lease>,
    /// How often a Job's status is read.
    pub poll: Duration,
    /// How long one step may take before the run gives up.
    pub timeout: Duration,
    /// Log lines shown per failed pod.
    pub tail_lines: i64,
    /// Every progress line printed (also kept for tests).
    pub lines: Mutex<Vec<String>>,
    /// The Job this driver runs in, whose labels say how the run goes (`--driver-job`).
    pub driver_job: Option<String>,
    /// How long a driver that suspended its Job waits for the Job controller to stop its
    /// pod before it exits by itself.
    pub suspend_wait: Duration,
    state: Mutex<RunState>,
}

impl Orchestrator {
    pub fn new(client: Client, namespace: &str, poll: Duration, timeout: Duration) -> Self {
        Orchestrator {
            jobs: Api::namespaced(client.clone(), namespace),
            pods: Api::namespaced(client.clone(), namespace),
            leases: Api::namespaced(client, namespace),
            poll,
            timeout,
            tail_lines: 20,
            lines: Mutex::new(Vec::new()),
            driver_job: None,
            suspend_wait: Duration::from_secs(120),
            state: Mutex::new(RunState::default()),
        }
    }

    /// The round table so far (one row per round whose aggregator finished).
    pub fn rounds(&self) -> Vec<RoundRow> {
        self.state.lock().unwrap().rows.clone()
    }

    /// Writes the run's phase, the round of `step` (else the last one) and the latest test
    /// accuracy as labels on the driver's Job, and the step as an annotation: a JSON merge
    /// patch of its metadata, which leaves the rest of the Job (and kubectl's fields) alone.
    /// Best effort: a failure is said once and the run goes on.
    async fn record(&self, phase: &str, step: Option<(usize, usize, &Step)>) {
        let Some(job) = &self.driver_job else {
            return;
        };
        let (round, accuracy) = {
            let mut st = self.state.lock().unwrap();
            if let Some(r) = step.and_then(|(_, _, s)| s.kind.round()) {
                st.round = Some(r);
            }
            (st.round, st.accuracy)
        };
        let mut labels = serde_json::Map::new();
        labels.insert(PHASE_LABEL.into(), phase.into());
        if let Some(r) = round {
            labels.insert(ROUND_LABEL.into(), r.to_string().into());
        }
        // A label value must be alphanumeric at both ends: a NaN would make the API server
        // refuse the whole patch.
        if let Some(a) = accuracy.filter(|a| a.is_finite() && *a >= 0.0) {
            labels.insert(ACCURACY_LABEL.into(), format!("{a:.4}").into());
        }
        let mut patch = serde_json::json!({ "metadata": { "labels": labels } });
        if let Some((i, n, s)) = step {
            patch["metadata"]["annotations"] =
                serde_json::json!({ STEP_ANNOTATION: format!("[{i}/{n}] {}", s.kind) });
        }
        if phase != "failed" {
            // A run going on is no longer stopped by the error a suspended driver left.
            patch["metadata"]["annotations"][ERROR_ANNOTATION] = serde_json::Value::Null;
        }
        let pp = PatchParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        if let Err(e) = self.jobs.patch(job, &pp, &Patch::Merge(&patch)).await {
            let first = !std::mem::replace(&mut self.state.lock().unwrap().record_failed, true);
            if first {
                let hint = match &e {
                    kube::Error::Api(s) if s.code == 403 => " (the Role needs `patch` on jobs)",
                    kube::Error::Api(s) if s.code == 404 => {
                        " (no such Job: --driver-job must name the Job this driver runs in)"
                    }
                    _ => "",
                };
                self.say(format!(
                    "  note: cannot write the run's progress on job {job} ({e}); the run goes on, \
                     but `kubectl get jobs -L {PHASE_LABEL}` will not show it{hint}"
                ));
            }
        }
    }

    fn say(&self, line: String) {
        eprintln!("{line}");
        self.lines.lock().unwrap().push(line);
    }

    /// Lists the objects matching a label selector for a best-effort note: a failure is
    /// said (naming `what`) and gives `None`, so that it never changes how the run ends.
    async fn list_or_say<K>(&self, api: &Api<K>, selector: &str, what: &str) -> Option<Vec<K>>
    where
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        match api.list(&ListParams::default().labels(selector)).await {
            Ok(l) => Some(l.items),
            Err(e) => {
                self.say(format!("  (cannot list {what}: {e})"));
                None
            }
        }
    }

    /// Takes the lock on the volume, runs every step, and releases the lock however the run
    /// ends: done, failed, lock lost, or `shutdown` resolving (SIGINT/SIGTERM; its output
    /// names the signal). When a step failed, a driver running as a Job then suspends that
    /// Job and waits for its pod to be stopped ([`Orchestrator::suspend`]).
    pub async fn run_locked(
        &self,
        steps: &[Step],
        lock: LockConfig,
        shutdown: impl Future<Output = String>,
    ) -> Result<()> {
        let run_id = lock.run_id.clone();
        let claim = lock.claim.clone();
        let say = |l: String| self.say(l);
        let lock = match Lock::acquire(self.leases.clone(), lock, &say).await {
            Ok(l) => l,
            Err(e) => {
                self.record("failed", None).await;
                return Err(e);
            }
        };
        self.note_other_runs(&run_id, &claim).await;
        let ns = self.jobs_namespace();
        tokio::pin!(shutdown);
        // Whether a step failed (rather than the driver losing its lock or being stopped).
        let (result, phase, step_failed) = tokio::select! {
            r = self.run(steps) => {
                let phase = if r.is_ok() { "done" } else { "failed" };
                let failed = r.is_err();
                (r, phase, failed)
            }
            why = lock.lost() => (Err(anyhow!(
                "{why}; stopping without applying more Jobs (those applied keep running: \
                 `kubectl -n {ns} get jobs -l fedimdb/run={run_id}`)"
            )), "failed", false),
            sig = &mut shutdown => (Err(anyhow!(
                "interrupted by {sig}; the Jobs of this run keep running in the cluster \
                 (`kubectl -n {ns} delete jobs -l fedimdb/run={run_id}` stops them); run \
                 `pipeline k8s` again to resume"
            )), "interrupted", false),
        };
        self.record(phase, None).await;
        if tokio::time::timeout(RELEASE_TIMEOUT, lock.release(&say))
            .await
            .is_err()
        {
            self.say(format!(
                "could not release the lock within {} s; it expires by itself {} s after its last renewal",
                RELEASE_TIMEOUT.as_secs(),
                super::lock::DURATION_S
            ));
        }
        if step_failed
            && let Err(e) = &result
            && self.suspend(e).await
        {
            // The Job controller stops this pod (SIGTERM) without counting it as failed.
            let _ = tokio::time::timeout(self.suspend_wait, &mut shutdown).await;
        }
        result
    }

    /// After a failed step, a driver running as a Job suspends that Job (`spec.suspend`)
    /// rather than letting it fail: a failed Job is finished for good, and applying it again
    /// unchanged does nothing until its `ttlSecondsAfterFinished` has removed it, whereas a
    /// suspended one is resumed by applying its manifest again (which says `suspend: false`)
    /// once the cause is fixed. Retrying at once would meet the same cause (each step Job
    /// has already retried its pods). The error is kept as the annotation
    /// [`ERROR_ANNOTATION`]: the Job controller deletes the pod, and its log with it, when
    /// it suspends the Job. False if there is no driver Job or it cannot be patched: the
    /// driver then exits 1 and the Job controller retries it per `backoffLimit`.
    async fn suspend(&self, error: &anyhow::Error) -> bool {
        let Some(job) = &self.driver_job else {
            return false;
        };
        let mut why = format!("{error:#}");
        if why.len() > ERROR_ANNOTATION_MAX {
            let mut end = ERROR_ANNOTATION_MAX;
            while !why.is_char_boundary(end) {
                end -= 1;
            }
            why.truncate(end);
            why.push_str(" …");
        }
        let patch = serde_json::json!({
            "metadata": { "annotations": { ERROR_ANNOTATION: why } },
            "spec": { "suspend": true },
        });
        let pp = PatchParams {
            field_manager: Some(MANAGER.into()),
            ..Default::default()
        };
        let ns = self.jobs_namespace();
        match self.jobs.patch(job, &pp, &Patch::Merge(&patch)).await {
            Ok(_) => {
                self.say(format!(
                    "suspended job {job}: the run stopped at a failed step (the step's Job and \
                     its pods' logs are kept). Fix the cause, then apply the run overlay again \
                     (`kubectl apply -k manifests/overlays/OVERLAY/run`, which sets suspend: \
                     false) or `kubectl -n {ns} patch job {job} --type merge -p \
                     '{{\"spec\":{{\"suspend\":false}}}}'`: a new driver resumes the run, \
                     keeping every step whose outputs verify"
                ));
                true
            }
            Err(e) => {
                self.say(format!(
                    "  note: cannot suspend job {job} ({e}); exiting, and the Job controller \
                     retries the driver (backoffLimit)"
                ));
                false
            }
        }
    }

    /// Says which Jobs of other runs on the same claim are still active (a driver that died
    /// leaves its Jobs running). Best effort.
    async fn note_other_runs(&self, run_id: &str, claim: &str) {
        let selector = format!("app.kubernetes.io/managed-by={MANAGER}");
        let Some(jobs) = self
            .list_or_say(&self.jobs, &selector, "the Jobs of other runs")
            .await
        else {
            return;
        };
        let mut by_run: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for j in &jobs {
            if let Some(run) = active_job_of_other_run(j, run_id, claim) {
                by_run
                    .entry(run.to_string())
                    .or_default()
                    .push(j.metadata.name.clone().unwrap_or_default());
            }
        }
        let ns = self.jobs_namespace();
        for (run, names) in by_run {
            self.say(format!(
                "  note: Jobs of run {run} are still active on claim {claim}: {}; they may still write \
                 to the volume (what they write is verified before use; \
                 `kubectl -n {ns} delete jobs -l fedimdb/run={run}` stops them)",
                names.join(", ")
            ));
        }
    }

    /// Runs every step in order; stops at the first that does not complete.
    pub async fn run(&self, steps: &[Step]) -> Result<()> {
        let started = Instant::now();
        for (i, step) in steps.iter().enumerate() {
            self.say(format!(
                "[{}/{}] {} (job {})",
                i + 1,
                steps.len(),
                step.kind,
                step.name()
            ));
            self.record("running", Some((i + 1, steps.len(), step)))
                .await;
            let step_started = Instant::now();
            self.apply(step).await?;
            self.wait(step).await?;
            self.note_round(step, step_started).await;
        }
        let rows = self.rounds();
        if !rows.is_empty() {
            self.say("rounds:".into());
            for line in round_table(&rows) {
                self.say(format!("  {line}"));
            }
        }
        self.say(format!(
            "all {} steps done in {:.0} s; the server hot-reloads model/latest.* from the volume, nothing else to do",
            steps.len(),
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// After a step: the trainers' outcome is kept for their round's row; after the
    /// aggregator, the row is printed (the header before the first) and the accuracy
    /// becomes the driver Job's label.
    async fn note_round(&self, step: &Step, started: Instant) {
        let row = {
            let mut st = self.state.lock().unwrap();
            let (what, accuracy) = st
                .last
                .take()
                .unwrap_or_else(|| ("outcome unknown".into(), None));
            match step.kind {
                StepKind::Copier => None,
                StepKind::Trainer(_) => {
                    st.trainers = Some((what, started));
                    None
                }
                StepKind::Aggregator(round) => {
                    let (trainers, since) = st.trainers.take().unwrap_or(("-".into(), started));
                    if accuracy.is_some() {
                        st.accuracy = accuracy;
                    }
                    let row = RoundRow {
                        round,
                        trainers,
                        aggregator: what,
                        accuracy,
                        seconds: since.elapsed().as_secs_f64(),
                    };
                    st.rows.push(row.clone());
                    Some((row, st.rows.len() == 1))
                }
            }
        };
        if let Some((row, first)) = row {
            let table = round_table(std::slice::from_ref(&row));
            if first {
                self.say(format!("  {}", table[0]));
            }
            self.say(format!("  {}", table[1]));
            self.record("running", None).await;
        }
    }

    /// Server-side apply of the step's Job (field manager `fedimdb-pipeline`, not forced:
    /// a field owned by another manager is reported as a conflict rather than taken over).
    pub async fn apply(&self, step: &Step) -> Result<Job> {
        let name = step.name();
        let pp = PatchParams::apply(MANAGER);
        match self.jobs.patch(name, &pp, &Patch::Apply(&step.job)).await {
            Ok(j) => Ok(j),
            Err(kube::Error::Api(s)) if s.code == 409 => bail!(
                "conflict applying job {name}: {} (another field manager owns these fields; \
                 delete the job with `kubectl -n {} delete job {name}` or use another --run-id)",
                s.message,
                self.jobs_namespace()
            ),
            Err(e) => Err(e).with_context(|| format!("cannot apply job {name}")),
        }
    }

    fn jobs_namespace(&self) -> String {
        self.jobs.namespace().unwrap_or("default").to_string()
    }

    /// Waits for the step's Job to complete, printing `done/total` as pods finish. On
    /// failure (or timeout) prints the failed pods' last log lines and returns an error.
    pub async fn wait(&self, step: &Step) -> Result<()> {
        let name = step.name();
        let total = step.completions();
        let started = Instant::now();
        let mut last: Option<Progress> = None;
        loop {
            let job = self
                .jobs
                .get(name)
                .await
                .with_context(|| format!("cannot read job {name}"))?;
            let p = progress(&job);
            if last.as_ref() != Some(&p) {
                let indices = p
                    .completed_indexes
                    .as_deref()
                    .map(|c| format!(" (indices {c})"));
                self.say(format!(
                    "  {}: {}/{} done{}, {} running, {} failed",
                    step.kind,
                    p.succeeded,
                    total,
                    indices.unwrap_or_default(),
                    p.active,
                    p.failed
                ));
                last = Some(p);
            }
            match outcome(&job) {
                Some(Outcome::Complete) => {
                    self.say(format!(
                        "  {} complete in {:.0} s",
                        step.kind,
                        started.elapsed().as_secs_f64()
                    ));
                    self.show_outcomes(step).await;
                    return Ok(());
                }
                Some(Outcome::Failed { reason, message }) => {
                    self.show_failed_pods(name).await;
                    let p = progress(&job);
                    let (done, quorum) = (p.done(), step.quorum());
                    let failed = p
                        .failed_indexes
                        .as_deref()
                        .map(|f| format!(", failed indices {f}"))
                        .unwrap_or_default();
                    if quorum < total {
                        if done >= quorum {
                            self.say(format!(
                                "  warning: job {name} failed ({reason}{failed}), but {done} of {total} \
                                 succeeded, at least --min-workers {quorum}: going on with {done}"
                            ));
                            self.show_outcomes(step).await;
                            return Ok(());
                        }
                        bail!(
                            "job {name} ({}) failed: {reason}: {message}{failed}: {done} of {total} \
                             succeeded, fewer than --min-workers {quorum}",
                            step.kind
                        );
                    }
                    bail!("job {name} ({}) failed: {reason}: {message}", step.kind);
                }
                None => {}
            }
            if started.elapsed() >= self.timeout {
                self.show_failed_pods(name).await;
                bail!(
                    "job {name} ({}) did not finish within {} s (see --step-timeout); it is left running: \
                     `kubectl -n {} describe job {name}`",
                    step.kind,
                    self.timeout.as_secs_f64(),
                    self.jobs_namespace()
                );
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    /// Says what the step's pods did, from the outcome record each container leaves as its
    /// termination message (`fedimdb::outcome`): up to date or computed, and the round's
    /// test accuracy for an aggregator. Best effort: says nothing when the pods cannot be
    /// listed, and counts a pod without a readable record as unknown.
    async fn show_outcomes(&self, step: &Step) {
        let selector = format!("batch.kubernetes.io/job-name={}", step.name());
        let what = format!("the pods of job {}", step.name());
        let Some(pods) = self.list_or_say(&self.pods, &selector, &what).await else {
            return;
        };
        let records: Vec<Option<StepOutcome>> = pods
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
            .map(|p| outcome_of(p, step.container()))
            .collect();
        if let Some(line) = summarize(&records, "pods") {
            self.say(format!("  {}: {line}", step.kind));
            let accuracy = records.iter().flatten().find_map(|o| o.test_accuracy);
            let what = match step.kind {
                StepKind::Trainer(_) => {
                    RoundRow::trainers_cell(&records, step.completions() as usize, "pods")
                }
                _ => RoundRow::aggregator_cell(&line),
            };
            self.state.lock().unwrap().last = Some((what, accuracy));
        }
    }

    /// Prints the last log lines of the Job's failed pods (best effort: errors are shown,
    /// not returned, so that the Job's own failure is what the run reports).
    async fn show_failed_pods(&self, job: &str) {
        let selector = format!("batch.kubernetes.io/job-name={job}");
        let what = format!("the pods of job {job}");
        let Some(pods) = self.list_or_say(&self.pods, &selector, &what).await else {
            return;
        };
        let failed: Vec<_> = pods
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed"))
            .collect();
        if failed.is_empty() {
            self.say(format!("  no failed pods of job {job} to show logs of"));
        }
        for pod in failed {
            let pname = pod.metadata.name.clone().unwrap_or_default();
            let lp = LogParams {
                tail_lines: Some(self.tail_lines),
                ..Default::default()
            };
            match self.pods.logs(&pname, &lp).await {
                Ok(text) => {
                    self.say(format!(
                        "  --- last {} log lines of pod {pname} ---",
                        self.tail_lines
                    ));
                    for l in text.lines() {
                        self.say(format!("  | {l}"));
                    }
                }
                Err(e) => self.say(format!("  (cannot read the logs of pod {pname}: {e})")),
            }
        }
    }
}
