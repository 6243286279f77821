//! `pipeline k8s` against the simulated cluster of `tests/sim/`: a whole run whose pods are
//! the real binaries, compared byte for byte with `pipeline local`, and the failures the
//! Jobs' specs are written for (a pod killed mid-step, a usage error, an index failing for
//! good under `--min-workers`, a killed driver resumed, the in-cluster driver Job).
//!
//! Small runs (the first reviews of the shared archive, or synthetic ones without it;
//! [`common::WORKERS`] workers, [`common::ROUNDS`] rounds, [`common::QUICK`] training);
//! `make k8s-sim` runs the full default workflow (`tests/k8s_sim_run.rs`).

mod common;
mod sim;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{QUICK, ROUNDS, WORKERS, run, run_ok, small_archive};
use serde_json::Value;
use sim::fixtures::{
    NS, condition, failed, failing_trainer, last_accuracy, model_sha, pipeline_k8s, pipeline_local,
    sim, volume_with,
};
use sim::{Launch, LaunchHook, Sim};

/// The run's flags, the same for both executors.
fn flags() -> Vec<String> {
    let mut f = vec![
        "--workers".to_string(),
        WORKERS.to_string(),
        "--rounds".to_string(),
        ROUNDS.to_string(),
    ];
    f.extend(QUICK.iter().map(|s| s.to_string()));
    f
}

fn with<'a>(base: &'a [String], more: &[&'a str]) -> Vec<&'a str> {
    base.iter()
        .map(String::as_str)
        .chain(more.iter().copied())
        .collect()
}

/// The small archive and the model `pipeline local` makes of it with [`flags`], made once
/// for all the tests here (under cargo's temporary folder for this test target).
struct Reference {
    archive: PathBuf,
    model_sha: String,
}

fn reference() -> &'static Reference {
    static R: OnceLock<Reference> = OnceLock::new();
    R.get_or_init(|| {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("k8s_sim-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (archive, _) = small_archive(&dir, 300, 150);
        let root = dir.join("local");
        let f = flags();
        let (out, _) = run_ok(&mut pipeline_local(
            &archive,
            &root,
            &with(&f, &["--jobs", "2"]),
        ));
        assert!(
            sim::fixtures::final_line(&String::from_utf8_lossy(&out.stdout)).is_some(),
            "pipeline local did not end with its `done: test accuracy` line"
        );
        Reference {
            model_sha: model_sha(&root),
            archive,
        }
    })
}

/// A simulator on a fresh volume holding the reference archive.
fn cluster(hook: Option<LaunchHook>) -> (tempfile::TempDir, PathBuf, Sim) {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let vol = volume_with(dir.path(), &r.archive);
    let s = sim(&vol, &r.archive, hook);
    (dir, vol, s)
}

fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

fn status_str<'a>(job: &'a Value, field: &str) -> &'a str {
    job["status"][field].as_str().unwrap_or_default()
}

fn status_num(job: &Value, field: &str) -> i64 {
    job["status"][field].as_i64().unwrap_or(-1)
}

fn exit_code(pod: &Value) -> Option<i64> {
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"].as_i64()
}

fn assert_all_served(s: &Sim) {
    let u = s.unserved();
    assert!(
        u.is_empty(),
        "the simulator was asked for what it does not serve:\n{}",
        u.join("\n")
    );
}

#[test]
fn a_run_on_the_simulated_cluster_publishes_the_model_pipeline_local_makes() {
    let t0 = Instant::now();
    let r = reference();
    let (_dir, vol, s) = cluster(None);
    let f = flags();
    let (_, log) = run_ok(&mut pipeline_k8s(&s, &with(&f, &["--run-id", "one"])));
    assert_eq!(
        model_sha(&vol),
        r.model_sha,
        "the model published through the simulated cluster differs from pipeline local's:\n{log}"
    );
    assert_all_served(&s);
    let steps = 1 + 2 * (ROUNDS as usize + 1);
    assert!(log.contains(&format!("all {steps} steps done")), "{log}");
    // Every Job complete, as the real controller reports it.
    let jobs = s.jobs(NS);
    assert_eq!(jobs.len(), steps, "one Job per step");
    for j in &jobs {
        assert!(
            condition(j, "Complete").is_some(),
            "job {} not complete: {}",
            name(j),
            j["status"]
        );
        assert!(
            !j["status"]["completionTime"].is_null(),
            "job {} has no completionTime",
            name(j)
        );
    }
    let trainers = s
        .job(NS, "fedimdb-one-trainer-r1")
        .expect("the trainers of round 1");
    let all = format!("0-{}", WORKERS - 1);
    assert_eq!(status_str(&trainers, "completedIndexes"), all);
    assert_eq!(status_str(&trainers, "failedIndexes"), "");
    assert_eq!(status_num(&trainers, "succeeded"), WORKERS as i64);
    assert_eq!(status_num(&trainers, "failed"), 0);
    // The driver read each step's outcome from the termination messages.
    assert!(
        log.contains(&format!("{WORKERS}/{WORKERS} computed")),
        "{log}"
    );
    assert!(
        last_accuracy(&s).is_some(),
        "no test accuracy in the last aggregator's record"
    );
    // The lock was taken and released.
    assert!(
        s.lease(NS, "fedimdb-pipeline-fedimdb-data").is_none(),
        "the lock was not released"
    );
    assert!(
        s.requests()
            .iter()
            .any(|r| r.starts_with("POST /apis/coordination.k8s.io/v1/namespaces/fedimdb/leases"))
    );
    eprintln!(
        "took {:.1} s (with the reference run)",
        t0.elapsed().as_secs_f64()
    );
}

/// `mail.csv` of a few dozen synthetic reviews: the positive ones labeled `spam`, the
/// negative ones `ham` (40 of each).
fn mail_csv() -> String {
    let mut csv = "text,label\n".to_owned();
    for (name, bytes) in common::synthetic(40) {
        let mut parts = name.split('/');
        let (split, folder) = (parts.next().unwrap(), parts.next().unwrap());
        if split == "train" {
            let text = String::from_utf8(bytes).unwrap().replace('"', "\"\"");
            let label = if folder == "pos" { "spam" } else { "ham" };
            csv.push_str(&format!("\"{text}\",{label}\n"));
        }
    }
    csv
}

/// Your own labeled text on the volume: `pipeline k8s --source own/NAME` with the source
/// flags of `pipeline local` (`reading`) shards it in a copier Job without the download, and
/// the run publishes the model `pipeline local` makes of the same file. Returns the volume
/// (in `dir`) and the last aggregator's test accuracy. `extra`: more flags for both runs.
fn own_csv_through_the_cluster(
    dir: &Path,
    name: &str,
    csv: &str,
    reading: &[&str],
    extra: &[&str],
) -> (PathBuf, f64) {
    let vol = dir.join("vol");
    std::fs::create_dir_all(vol.join("own")).unwrap();
    let path = vol.join("own").join(name);
    std::fs::write(&path, csv).unwrap();
    let f = flags();
    let local = dir.join("local");
    run_ok(&mut pipeline_local(
        &path,
        &local,
        &with(&f, &[reading, extra, &["--jobs", "2"]].concat()),
    ));
    // No archive: the copier Job has no download container for the offline hook to touch.
    let s = sim(&vol, &path, None);
    let source = format!("own/{name}");
    let (_, log) = run_ok(&mut pipeline_k8s(
        &s,
        &with(
            &f,
            &[
                &["--run-id", "csv", "--source", source.as_str()],
                reading,
                extra,
            ]
            .concat(),
        ),
    ));
    assert_eq!(
        model_sha(&vol),
        model_sha(&local),
        "the model of {name} through the simulated cluster differs from pipeline local's:\n{log}"
    );
    assert_all_served(&s);
    let copier = s.job(NS, "fedimdb-csv-copier").expect("the copier Job");
    let pod = &copier["spec"]["template"]["spec"];
    assert!(pod["initContainers"].is_null(), "no download: {pod}");
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[..2], ["--source", &format!("/data/own/{name}")]);
    assert!(args.ends_with(reading), "{args:?}");
    let accuracy = last_accuracy(&s).expect("the last aggregator's test accuracy");
    (vol, accuracy)
}

#[test]
fn a_csv_on_the_volume_trains_through_the_simulated_cluster_as_pipeline_local_does() {
    let dir = tempfile::tempdir().unwrap();
    let (vol, accuracy) = own_csv_through_the_cluster(
        dir.path(),
        "mail.csv",
        &mail_csv(),
        &["--test-fraction", "0.25"],
        &[],
    );
    let manifest = fedimdb::manifest::DataManifest::read(&vol.join("data/manifest.json")).unwrap();
    assert_eq!(manifest.labels, ["ham", "spam"]);
    assert_eq!(manifest.test.label_counts, [10, 10]);
    assert!(accuracy > 0.9, "test accuracy {accuracy}");
}

/// The same with three labels (bug/feature/question tickets): the K-class model the
/// simulated cluster publishes is `pipeline local`'s, byte for byte, with its three labels
/// and rows.
#[test]
fn three_labels_on_the_volume_train_through_the_simulated_cluster_as_pipeline_local_does() {
    let dir = tempfile::tempdir().unwrap();
    let csv = common::to_csv(&common::tickets(100));
    let (vol, accuracy) = own_csv_through_the_cluster(
        dir.path(),
        "tickets.csv",
        &csv,
        &["--test-fraction", "0.2"],
        &["--multiclass", "softmax"],
    );
    let manifest = fedimdb::manifest::DataManifest::read(&vol.join("data/manifest.json")).unwrap();
    assert_eq!(manifest.labels, common::TICKET_LABELS);
    assert_eq!(manifest.test.label_counts, [20, 20, 20]);
    assert!(accuracy > 0.85, "test accuracy {accuracy}");
    let card: Value =
        serde_json::from_slice(&std::fs::read(vol.join("model/latest.json")).unwrap()).unwrap();
    assert_eq!(
        card["labels"],
        serde_json::json!(common::TICKET_LABELS),
        "{card}"
    );
    let ck = fedimdb::checkpoint::Checkpoint::load(&vol.join("model/latest.safetensors")).unwrap();
    assert_eq!(ck.tensors[fedimdb::model::BIAS].len(), 3);
    assert_eq!(
        ck.header.config.multiclass,
        Some(fedimdb::model::Multiclass::Softmax)
    );
}

#[test]
fn a_trainer_pod_killed_mid_step_is_retried_and_the_model_is_unchanged() {
    let fired = AtomicBool::new(false);
    // The first pod of index 1 in round 1 dies by SIGKILL right after writing its update
    // (fedimdb::fault), as if its node had died.
    let hook: LaunchHook = Box::new(move |l: &mut Launch| {
        if l.job.ends_with("-trainer-r1")
            && l.index == Some(1)
            && !fired.swap(true, Ordering::SeqCst)
        {
            l.env
                .push(("FEDIMDB_FAULT".into(), "trainer:1:1:update-written".into()));
        }
    });
    let (_dir, vol, s) = cluster(Some(hook));
    let f = flags();
    let (_, log) = run_ok(&mut pipeline_k8s(&s, &with(&f, &["--run-id", "kill"])));
    assert_eq!(model_sha(&vol), reference().model_sha, "{log}");
    let job = s.job(NS, "fedimdb-kill-trainer-r1").unwrap();
    assert!(condition(&job, "Complete").is_some(), "{}", job["status"]);
    assert_eq!(status_num(&job, "failed"), 1, "{}", job["status"]);
    assert_eq!(
        status_str(&job, "completedIndexes"),
        format!("0-{}", WORKERS - 1)
    );
    let pods: Vec<Value> = s
        .pods_of(NS, "fedimdb-kill-trainer-r1")
        .into_iter()
        .filter(|p| p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "1")
        .collect();
    assert_eq!(pods.len(), 2, "index 1 ran twice: {pods:#?}");
    assert_eq!(exit_code(&pods[0]), Some(137), "SIGKILL is exit code 137");
    assert_eq!(pods[0]["status"]["phase"], "Failed");
    assert_eq!(pods[1]["status"]["phase"], "Succeeded");
    let failures = |p: &Value| {
        p["metadata"]["annotations"]["batch.kubernetes.io/job-index-failure-count"].clone()
    };
    assert_eq!(
        (failures(&pods[0]), failures(&pods[1])),
        ("0".into(), "1".into())
    );
    assert_all_served(&s);
}

#[test]
fn exit_code_2_fails_the_job_at_once_without_a_retry() {
    // A usage error: the aggregator of round 1 gets a flag it does not know (clap exits 2).
    let hook: LaunchHook = Box::new(|l: &mut Launch| {
        if l.job.ends_with("-aggregator-r1") {
            l.args.push("--no-such-flag".into());
        }
    });
    let (_dir, _vol, s) = cluster(Some(hook));
    let f = flags();
    let (out, log) = run(&mut pipeline_k8s(&s, &with(&f, &["--run-id", "usage"])));
    assert_eq!(out.status.code(), Some(1), "the run must fail:\n{log}");
    let job = s.job(NS, "fedimdb-usage-aggregator-r1").unwrap();
    let (reason, message) = failed(&job);
    assert_eq!(reason, "PodFailurePolicy");
    assert!(
        message.contains("failed with exit code 2 matching FailJob rule at index 0"),
        "{message}"
    );
    assert!(condition(&job, "FailureTarget").is_some());
    assert_eq!(
        s.pods_of(NS, "fedimdb-usage-aggregator-r1").len(),
        1,
        "no retry after exit code 2"
    );
    assert!(log.contains("failed: PodFailurePolicy"), "{log}");
    // The driver showed the failed pod's log: clap's complaint.
    assert!(
        log.contains("--no-such-flag"),
        "the failed pod's log was not shown:\n{log}"
    );
    // Nothing was applied after the failed step.
    assert!(s.job(NS, "fedimdb-usage-trainer-r2").is_none());
    assert!(
        s.lease(NS, "fedimdb-pipeline-fedimdb-data").is_none(),
        "the lock was not released"
    );
    assert_all_served(&s);
}

#[test]
fn an_index_failing_past_its_limit_is_left_out_under_min_workers() {
    // Index 2 of round 1 dies every time: 1 + backoffLimitPerIndex (2) pods.
    let hook = failing_trainer(1, 2);
    let (_dir, vol, s) = cluster(Some(hook));
    let f = flags();
    let quorum = (WORKERS - 1).to_string();
    let (_, log) = run_ok(&mut pipeline_k8s(
        &s,
        &with(&f, &["--run-id", "quorum", "--min-workers", &quorum]),
    ));
    let job = s.job(NS, "fedimdb-quorum-trainer-r1").unwrap();
    let (reason, _) = failed(&job);
    assert_eq!(reason, "FailedIndexes");
    assert_eq!(status_str(&job, "failedIndexes"), "2");
    assert_eq!(
        status_str(&job, "completedIndexes"),
        format!("0-{}", WORKERS - 2)
    );
    assert_eq!(
        status_num(&job, "failed"),
        3,
        "1 + backoffLimitPerIndex pods of index 2 failed"
    );
    assert!(log.contains(&format!("going on with {quorum}")), "{log}");
    assert!(
        condition(
            &s.job(NS, "fedimdb-quorum-aggregator-r1").unwrap(),
            "Complete"
        )
        .is_some()
    );
    // `pipeline local` with the same fault armed (every trainer of shard 2, round 1 dies
    // there) and the same quorum publishes the same model.
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("local");
    let mut local = pipeline_local(&r.archive, &root, &with(&f, &["--min-workers", &quorum]));
    local.env("FEDIMDB_FAULT", "trainer:1:2:update-written");
    run_ok(&mut local);
    assert_eq!(model_sha(&vol), model_sha(&root), "{log}");
    assert_all_served(&s);
}

#[test]
fn without_min_workers_an_index_failing_for_good_fails_the_job() {
    let hook = failing_trainer(0, 0);
    let (_dir, _vol, s) = cluster(Some(hook));
    let f = flags();
    let (out, log) = run(&mut pipeline_k8s(&s, &with(&f, &["--run-id", "strict"])));
    assert_eq!(out.status.code(), Some(1), "{log}");
    let job = s.job(NS, "fedimdb-strict-trainer-r0").unwrap();
    let (reason, _) = failed(&job);
    assert_eq!(reason, "MaxFailedIndexesExceeded");
    assert_eq!(status_str(&job, "failedIndexes"), "0");
    assert!(log.contains("MaxFailedIndexesExceeded"), "{log}");
    assert_all_served(&s);
}

#[test]
fn a_killed_driver_is_resumed_once_its_lock_has_expired() {
    let (dir, vol, s) = cluster(None);
    let f = flags();
    let lease = "fedimdb-pipeline-fedimdb-data";
    let first_log = dir.path().join("first.log");
    let mut first = pipeline_k8s(&s, &with(&f, &["--run-id", "first"]))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&first_log).unwrap())
        .spawn()
        .unwrap();
    s.wait_for(
        "the first driver to reach round 1",
        Duration::from_secs(600),
        |s| s.job(NS, "fedimdb-first-trainer-r1").map(|_| ()),
    );
    first.kill().unwrap(); // SIGKILL: no lock release
    first.wait().unwrap();
    assert!(
        s.lease(NS, lease).is_some(),
        "a killed driver leaves its lock"
    );

    // Within the lease's 60 s, another driver refuses to start.
    let (out, log) = run(&mut pipeline_k8s(&s, &with(&f, &["--run-id", "second"])));
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("is locked by another pipeline"), "{log}");
    assert!(log.contains("run first"), "the holder is named: {log}");
    assert!(
        s.job(NS, "fedimdb-second-copier").is_none(),
        "nothing applied"
    );

    // 120 s later (the simulator ages the lease), the next driver takes it over.
    s.age_lease(NS, lease, Duration::from_secs(120));
    let (_, log) = run_ok(&mut pipeline_k8s(&s, &with(&f, &["--run-id", "third"])));
    assert!(log.contains("found an interrupted run"), "{log}");
    assert!(log.contains("taking it over and resuming"), "{log}");
    assert!(
        log.contains("copier: up to date"),
        "the copier's work was kept: {log}"
    );
    assert_eq!(model_sha(&vol), reference().model_sha, "{log}");
    assert!(s.lease(NS, lease).is_none(), "the lock was not released");
    assert_all_served(&s);
}

/// The driver Job of `manifests/components/run`, with the parameters components/params
/// would put in for the small run; the training flags the driver's args lack are appended
/// (the driver takes them as `pipeline k8s`), and a short poll.
fn driver_job() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/components/run/driver-job.yaml");
    let mut job: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let c = &mut job["spec"]["template"]["spec"]["containers"][0];
    for e in c["env"].as_array_mut().unwrap() {
        match e["name"].as_str().unwrap() {
            "WORKERS" => e["value"] = WORKERS.to_string().into(),
            "ROUNDS" => e["value"] = ROUNDS.to_string().into(),
            _ => {}
        }
    }
    let args = c["args"].as_array_mut().unwrap();
    for a in QUICK.iter().chain(&["--poll", "0.05"]) {
        args.push((*a).into());
    }
    job
}

/// Waits until the driver Job has ended (`Complete` or `Failed`) or been suspended.
fn driver_ended(s: &Sim) -> Value {
    s.wait_for("the driver Job to end", Duration::from_secs(900), |s| {
        let j = s.job(NS, "fedimdb-driver")?;
        ["Complete", "Failed", "Suspended"]
            .iter()
            .any(|c| condition(&j, c).is_some())
            .then_some(j)
    })
}

/// The logs of the pods of the driver Job, those deleted included.
fn driver_log(s: &Sim, pods: &[&str]) -> String {
    pods.iter()
        .map(|p| s.log(NS, p, "pipeline"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_driver_job_of_the_manifests_runs_in_the_simulated_cluster() {
    let (_dir, vol, s) = cluster(None);
    s.create_job(NS, driver_job());
    let done = driver_ended(&s);
    let pods = s.pods_of(NS, "fedimdb-driver");
    let log = driver_log(&s, &pods.iter().map(name).collect::<Vec<_>>());
    assert!(
        condition(&done, "Complete").is_some(),
        "the driver Job failed: {}\n{log}",
        done["status"]
    );
    assert_eq!(pods.len(), 1, "one driver pod");
    assert_eq!(
        done["metadata"]["labels"]["fedimdb.io/phase"], "done",
        "{log}"
    );
    assert!(
        !done["metadata"]["labels"]["fedimdb.io/accuracy"].is_null(),
        "no accuracy label"
    );
    assert!(
        log.contains("rounds:"),
        "the round table is in the driver's log:\n{log}"
    );
    assert_eq!(model_sha(&vol), reference().model_sha, "{log}");
    assert_all_served(&s);
}

/// A step that fails makes the driver suspend its Job instead of failing it: a failed Job
/// is finished, and applying it again would change nothing until its TTL removed it. Here
/// the trainers of round 1 get a flag they do not know while a "cause" file exists (exit
/// code 2: their Job fails at once). Once the cause is gone, applying the same driver Job
/// again, as `kubectl apply -k manifests/overlays/O/run` does, resumes the run: the new
/// driver keeps what the first one computed and publishes the model of an uninterrupted
/// run.
#[test]
fn applying_the_driver_job_again_after_a_failed_step_resumes_the_run() {
    let scratch = tempfile::tempdir().unwrap();
    let cause = scratch.path().join("cause");
    std::fs::write(&cause, "").unwrap();
    let present = cause.clone();
    let hook: LaunchHook = Box::new(move |l: &mut Launch| {
        if l.job.ends_with("-trainer-r1") && present.exists() {
            l.args.push("--no-such-flag".into());
        }
    });
    let (_dir, vol, s) = cluster(Some(hook));
    let job = driver_job();
    let (code, made) = sim::fixtures::kubectl_apply(&s, NS, &job);
    assert_eq!(code, 201, "{made}");

    let suspended = s.wait_for(
        "the driver Job to be suspended and its pod gone",
        Duration::from_secs(900),
        |s| {
            let j = s.job(NS, "fedimdb-driver")?;
            let gone = s.pods_of(NS, "fedimdb-driver").is_empty();
            (condition(&j, "Suspended").is_some() && gone).then_some(j)
        },
    );
    let first = driver_log(&s, &["fedimdb-driver-00000"]);
    assert_eq!(
        condition(&suspended, "Suspended").unwrap().0,
        "JobSuspended",
        "{}",
        suspended["status"]
    );
    assert!(condition(&suspended, "Failed").is_none(), "{first}");
    assert_eq!(suspended["spec"]["suspend"], true);
    assert_eq!(
        status_num(&suspended, "failed"),
        0,
        "the pod stopped by the suspension is not a failure: {}",
        suspended["status"]
    );
    assert_eq!(
        suspended["metadata"]["labels"]["fedimdb.io/phase"],
        "failed"
    );
    let error = suspended["metadata"]["annotations"]["fedimdb.io/error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        error.contains("trainers of round 1") && error.contains("PodFailurePolicy"),
        "{error}"
    );
    assert!(first.contains("suspended job fedimdb-driver"), "{first}");
    let trainers = s
        .jobs(NS)
        .into_iter()
        .find(|j| name(j).ends_with("-trainer-r1"))
        .expect("the trainers of round 1");
    assert_eq!(failed(&trainers).0, "PodFailurePolicy");
    assert!(
        s.lease(NS, "fedimdb-pipeline-fedimdb-data").is_none(),
        "the suspended driver released the lock"
    );

    // The cause is fixed; the same Job is applied again. (A second later at least: the run
    // id is the Unix time in seconds, and a driver of the same second would find the
    // failed Jobs of the first under the same names, as with the same --run-id.)
    std::fs::remove_file(&cause).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let (code, resumed) = sim::fixtures::kubectl_apply(&s, NS, &job);
    assert_eq!(code, 200, "{resumed}");
    assert_eq!(resumed["spec"]["suspend"], false);
    s.wait_for(
        "the Job controller to resume the driver Job",
        Duration::from_secs(60),
        |s| {
            condition(&s.job(NS, "fedimdb-driver")?, "Suspended")
                .is_none()
                .then_some(())
        },
    );
    let done = driver_ended(&s);
    let second = driver_log(&s, &["fedimdb-driver-00001"]);
    assert!(
        condition(&done, "Complete").is_some(),
        "{}\n{second}",
        done["status"]
    );
    assert_eq!(model_sha(&vol), reference().model_sha, "{second}");
    for kept in ["copier: up to date", "trainers of round 0: up to date"] {
        assert!(second.contains(kept), "{kept}: {second}");
    }
    let resumed_condition = done["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Suspended")
        .unwrap();
    assert_eq!(
        (&resumed_condition["status"], &resumed_condition["reason"]),
        (&"False".into(), &"JobResumed".into())
    );
    assert_eq!(status_num(&done, "failed"), 0, "{}", done["status"]);
    assert_eq!(done["metadata"]["labels"]["fedimdb.io/phase"], "done");
    assert!(
        done["metadata"]["annotations"]["fedimdb.io/error"].is_null(),
        "the resumed run cleared the error: {}",
        done["metadata"]
    );
    assert_eq!(s.pods_of(NS, "fedimdb-driver").len(), 1);
    assert_all_served(&s);
}

/// A trainer pod evicted (a node drained, a preemption: the pod gets the `DisruptionTarget`
/// condition, then SIGTERM) is replaced without counting against its index's retries: the
/// trainers' `podFailurePolicy` Ignores it. Index 1 of round 1 is evicted three times, one
/// more than `backoffLimitPerIndex` (2) would allow as failures, and the run still
/// publishes the model of an uninterrupted run. Its first three pods find a named pipe in
/// place of the data manifest and wait on it, so that each is still running when evicted.
#[test]
fn evicted_trainer_pods_do_not_count_against_the_retries_of_their_index() {
    const EVICTIONS: usize = 3;
    let scratch = tempfile::tempdir().unwrap();
    let stuck = scratch.path().join("stuck");
    std::fs::create_dir_all(stuck.join("data")).unwrap();
    let fifo = std::ffi::CString::new(
        stuck
            .join("data/manifest.json")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: mkfifo(3) on a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
    let launched = std::sync::atomic::AtomicUsize::new(0);
    let root = stuck.display().to_string();
    let hook: LaunchHook = Box::new(move |l: &mut Launch| {
        if l.job.ends_with("-trainer-r1")
            && l.index == Some(1)
            && launched.fetch_add(1, Ordering::SeqCst) < EVICTIONS
            && let Some(i) = l.args.iter().position(|a| a == "--root")
        {
            l.args[i + 1] = root.clone();
        }
    });
    let (dir, vol, s) = cluster(Some(hook));
    let f = flags();
    let log_path = dir.path().join("driver.log");
    let mut driver = pipeline_k8s(&s, &with(&f, &["--run-id", "evict"]))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let job = "fedimdb-evict-trainer-r1";
    let index_1 = |p: &Value| p["metadata"]["labels"][sim::controller::INDEX_KEY] == "1";
    let mut evicted: Vec<String> = Vec::new();
    for n in 0..EVICTIONS {
        let pod = s.wait_for(
            &format!("pod {n} of index 1 to run"),
            Duration::from_secs(600),
            |s| {
                s.pods_of(NS, job)
                    .into_iter()
                    .find(|p| {
                        index_1(p)
                            && p["status"]["phase"] == "Running"
                            && !evicted.iter().any(|e| e == name(p))
                    })
                    .map(|p| name(&p).to_string())
            },
        );
        s.evict_pod(NS, &pod);
        evicted.push(pod);
    }
    let status = driver.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "{log}");
    let done = s.job(NS, job).unwrap();
    assert!(condition(&done, "Complete").is_some(), "{}", done["status"]);
    assert_eq!(
        status_num(&done, "failed"),
        0,
        "evictions are not failures: {}",
        done["status"]
    );
    assert_eq!(
        status_str(&done, "completedIndexes"),
        format!("0-{}", WORKERS - 1)
    );
    let last = s
        .pods_of(NS, job)
        .into_iter()
        .filter(|p| index_1(p) && !evicted.iter().any(|e| e == name(p)))
        .collect::<Vec<_>>();
    assert_eq!(
        last.len(),
        1,
        "one pod of index 1 after the evictions: {last:#?}"
    );
    assert_eq!(last[0]["status"]["phase"], "Succeeded");
    assert_eq!(
        last[0]["metadata"]["annotations"]["batch.kubernetes.io/job-index-failure-count"], "0",
        "no eviction counted against the index"
    );
    assert_eq!(model_sha(&vol), reference().model_sha, "{log}");
    assert_all_served(&s);
}

/// The simulator's own API semantics, which the tests above rely on: apply, immutability,
/// merge patches, selectors, the Lease's optimistic concurrency, unserved requests.
#[test]
fn the_simulated_api_server_answers_as_the_kubernetes_api_does() {
    use sim::fixtures::http;
    let s = sim::fixtures::bare_sim();
    let jobs = "/apis/batch/v1/namespaces/fedimdb/jobs";
    let apply = "application/apply-patch+yaml";
    // Suspended: no pods are made.
    let job = |arg: &str| {
        format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: j\n  labels: {{a: b}}\nspec:\n  \
             suspend: true\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      \
             - name: c\n        image: fedimdb/copier:0.1.0\n        args: [{arg}]\n"
        )
    };
    let (code, made) = http(
        &s,
        "PATCH",
        &format!("{jobs}/j?fieldManager=t"),
        apply,
        &job("x"),
    );
    assert_eq!(code, 201, "{made}");
    assert_eq!(
        made["spec"]["backoffLimit"], 6,
        "defaults filled in: {made}"
    );
    // The Job controller marks it suspended (a status write, with a new resourceVersion).
    let suspended = s.wait_for(
        "job j to be marked suspended",
        Duration::from_secs(60),
        |s| {
            s.job(NS, "j")
                .filter(|j| condition(j, "Suspended").is_some())
        },
    );
    let rv = suspended["metadata"]["resourceVersion"].clone();
    let (code, again) = http(
        &s,
        "PATCH",
        &format!("{jobs}/j?fieldManager=t"),
        apply,
        &job("x"),
    );
    assert_eq!(
        (code, &again["metadata"]["resourceVersion"]),
        (200, &rv),
        "an unchanged apply changes nothing"
    );
    let (code, err) = http(
        &s,
        "PATCH",
        &format!("{jobs}/j?fieldManager=t"),
        apply,
        &job("y"),
    );
    assert_eq!(code, 422, "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("field is immutable"),
        "{err}"
    );
    let (code, _) = http(&s, "PATCH", &format!("{jobs}/j"), apply, &job("x"));
    assert_eq!(code, 400, "apply without a fieldManager");
    let merge = "application/merge-patch+json";
    let (code, patched) = http(
        &s,
        "PATCH",
        &format!("{jobs}/j"),
        merge,
        r#"{"metadata":{"labels":{"p":"q","a":null}}}"#,
    );
    assert_eq!(code, 200);
    assert_eq!(patched["metadata"]["labels"], serde_json::json!({"p": "q"}));
    let (_, list) = http(&s, "GET", &format!("{jobs}?labelSelector=p%3Dq"), "", "");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{list}");
    let (_, list) = http(&s, "GET", &format!("{jobs}?labelSelector=p%21%3Dq"), "", "");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");

    let leases = "/apis/coordination.k8s.io/v1/namespaces/fedimdb/leases";
    let lease = r#"{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"l"},"spec":{"holderIdentity":"me"}}"#;
    let (code, l) = http(&s, "POST", leases, "application/json", lease);
    assert_eq!(code, 201, "{l}");
    let (code, e) = http(&s, "POST", leases, "application/json", lease);
    assert_eq!((code, e["reason"].as_str()), (409, Some("AlreadyExists")));
    let stale = r#"{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"l","resourceVersion":"1"},"spec":{}}"#;
    let (code, e) = http(&s, "PUT", &format!("{leases}/l"), "application/json", stale);
    assert_eq!((code, e["reason"].as_str()), (409, Some("Conflict")), "{e}");
    let (code, _) = http(
        &s,
        "DELETE",
        &format!("{leases}/l"),
        "application/json",
        r#"{"preconditions":{"resourceVersion":"1"}}"#,
    );
    assert_eq!(code, 409, "a delete with a stale precondition");
    let now = format!(
        r#"{{"preconditions":{{"resourceVersion":{}}}}}"#,
        l["metadata"]["resourceVersion"]
    );
    let (code, _) = http(
        &s,
        "DELETE",
        &format!("{leases}/l"),
        "application/json",
        &now,
    );
    assert_eq!(code, 200);
    assert_eq!(http(&s, "GET", &format!("{leases}/l"), "", "").0, 404);

    assert!(s.unserved().is_empty(), "{:?}", s.unserved());
    let (code, _) = http(&s, "GET", &format!("{jobs}?watch=true"), "", "");
    assert_eq!(code, 404);
    assert_eq!(s.unserved().len(), 1, "an unserved request is recorded");
    assert!(s.pods_of(NS, "j").is_empty(), "a suspended Job has no pods");
}

/// Pods that run until stopped (the server, on an empty volume), to see what the Job
/// controller and the API do with running pods: a pod killed by SIGKILL counts against
/// `backoffLimit` (0 here: the Job fails, its other pod is stopped first), a Job deleted
/// with `Background` propagation takes its pods with it, one deleted with the default
/// (`Orphan`, for batch/v1) leaves them running without an owner.
#[test]
fn killed_pods_count_against_the_backoff_limit_and_deleted_jobs_stop_or_orphan_their_pods() {
    use serde_json::json;
    use sim::fixtures::http;
    common::bin("server"); // fails now, naming it, if it was not built
    let s = sim::fixtures::bare_sim();
    let job = |name: &str| {
        json!({
            "apiVersion": "batch/v1", "kind": "Job", "metadata": { "name": name },
            "spec": { "parallelism": 2, "completions": 2, "backoffLimit": 0, "template": { "spec": {
                "restartPolicy": "Never", "automountServiceAccountToken": false,
                "volumes": [{ "name": "data", "emptyDir": {} }],
                "containers": [{
                    "name": "server", "image": "fedimdb/server:0.1.0",
                    "args": ["--root", "/data", "--listen", "127.0.0.1:0"],
                    "volumeMounts": [{ "name": "data", "mountPath": "/data" }],
                }],
            }}},
        })
    };
    let running = |j: &'static str| {
        move |s: &Sim| {
            let pods = s.pods_of(NS, j);
            (pods.len() == 2 && pods.iter().all(|p| p["status"]["phase"] == "Running"))
                .then(|| pods.iter().map(|p| name(p).to_string()).collect::<Vec<_>>())
        }
    };
    let minute = Duration::from_secs(60);

    s.create_job(NS, job("killed"));
    let pods = s.wait_for("two running pods of job killed", minute, running("killed"));
    assert!(s.kill_pod(NS, &pods[0]), "pod {} runs no process", pods[0]);
    let j = s.wait_for("job killed to fail", minute, |s| {
        let j = s.job(NS, "killed")?;
        condition(&j, "Failed").map(|_| j)
    });
    assert_eq!(
        condition(&j, "Failed").unwrap().0,
        "BackoffLimitExceeded",
        "{}",
        j["status"]
    );
    assert!(condition(&j, "FailureTarget").is_some(), "{}", j["status"]);
    assert_eq!(
        status_num(&j, "active"),
        0,
        "the other pod was stopped: {}",
        j["status"]
    );
    let killed = s.pods_of(NS, "killed");
    let first = killed.iter().find(|p| name(p) == pods[0]).unwrap();
    assert_eq!(exit_code(first), Some(137));
    // The controller deletes the pods it stops (as the real one does): only the killed
    // one is left, and no replacement was made past backoffLimit 0.
    assert_eq!(killed.len(), 1, "{killed:#?}");

    let jobs = "/apis/batch/v1/namespaces/fedimdb/jobs";
    s.create_job(NS, job("background"));
    s.wait_for(
        "two running pods of job background",
        minute,
        running("background"),
    );
    let body = r#"{"propagationPolicy":"Background"}"#;
    let (code, st) = http(
        &s,
        "DELETE",
        &format!("{jobs}/background"),
        "application/json",
        body,
    );
    assert_eq!(code, 200, "{st}");
    assert!(s.job(NS, "background").is_none());
    s.wait_for("the pods of job background to be gone", minute, |s| {
        s.pods_of(NS, "background").is_empty().then_some(())
    });

    s.create_job(NS, job("orphan"));
    let pods = s.wait_for("two running pods of job orphan", minute, running("orphan"));
    let (code, st) = http(
        &s,
        "DELETE",
        &format!("{jobs}/orphan"),
        "application/json",
        "",
    );
    assert_eq!(code, 200, "{st}");
    assert!(s.job(NS, "orphan").is_none());
    let left = s.pods_of(NS, "orphan");
    assert_eq!(left.len(), 2, "orphaned pods stay");
    for p in &left {
        assert_eq!(p["status"]["phase"], "Running", "{} was stopped", name(p));
        assert!(
            p["metadata"]["ownerReferences"].is_null(),
            "{} still has an owner",
            name(p)
        );
    }
    assert!(
        s.kill_pod(NS, &pods[0]),
        "an orphaned pod's process still runs"
    );
    assert_all_served(&s);
}
