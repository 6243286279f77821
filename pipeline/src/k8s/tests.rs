//! Tests of `pipeline k8s` without a cluster: the Job builders (pure), and the orchestrator
//! against API responses served through kube's client on a mock service (`tower-test`).
//! The fixtures (the mock, the fake cluster, object builders) are in `tests/fixtures.rs`;
//! the tests of each source module in the file of its name under `tests/`.

mod fixtures;

/// `jobs.rs`: the Jobs of a plan, their arguments, resume and quorum.
mod jobs;

/// `api.rs`: a Job's outcome, and `Orchestrator::run` applying and waiting for the Jobs.
mod api;

/// `lock.rs`: the Lease taken, renewed, taken over and released around a run.
mod lock;

/// The whole run (`Orchestrator::run_locked`): steps up to date, partly failed rounds.
mod driver;
