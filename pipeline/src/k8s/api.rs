//! The one module that talks to the Kubernetes API: server-side-applies each step's Job,
//! waits for it to complete or fail while showing progress, and on failure collects the
//! last log lines of the failed pods.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams, LogParams, Patch, PatchParams};

use super::jobs::{MANAGER, Step};

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
    }
}

/// Applies and waits for Jobs in one namespace.
pub struct Orchestrator {
    jobs: Api<Job>,
    pods: Api<Pod>,
    /// How often a Job's status is read.
    pub poll: Duration,
    /// How long one step may take before the run gives up.
    pub timeout: Duration,
    /// Log lines shown per failed pod.
    pub tail_lines: i64,
    /// Every progress line printed (also kept for tests).
    pub lines: Mutex<Vec<String>>,
}

impl Orchestrator {
    pub fn new(client: Client, namespace: &str, poll: Duration, timeout: Duration) -> Self {
        Orchestrator {
            jobs: Api::namespaced(client.clone(), namespace),
            pods: Api::namespaced(client, namespace),
            poll,
            timeout,
            tail_lines: 20,
            lines: Mutex::new(Vec::new()),
        }
    }

    fn say(&self, line: String) {
        eprintln!("{line}");
        self.lines.lock().unwrap().push(line);
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
            self.apply(step).await?;
            self.wait(step).await?;
        }
        self.say(format!(
            "all {} steps done in {:.0} s; the server hot-reloads model/latest.* from the volume, nothing else to do",
            steps.len(),
            started.elapsed().as_secs_f64()
        ));
        Ok(())
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
                    return Ok(());
                }
                Some(Outcome::Failed { reason, message }) => {
                    self.show_failed_pods(name).await;
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

    /// Prints the last log lines of the Job's failed pods (best effort: errors are shown,
    /// not returned, so that the Job's own failure is what the run reports).
    async fn show_failed_pods(&self, job: &str) {
        let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"));
        let pods = match self.pods.list(&lp).await {
            Ok(l) => l.items,
            Err(e) => {
                self.say(format!("  (cannot list the pods of job {job}: {e})"));
                return;
            }
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
