//! What the tests of the simulated cluster share: a volume holding the archive where the
//! copier Job's `download` init container looks for it, a simulator serving it, the
//! `pipeline k8s` and `pipeline local` commands to compare, and the published model's hash.

use std::path::{Path, PathBuf};
use std::process::Command;

use fedimdb::digest::sha256_file;

use super::{Launch, LaunchHook, Sim, SimConfig};

/// The namespace the runs use (`pipeline k8s`'s default).
pub const NS: &str = "fedimdb";
/// The claim of the Jobs (`pipeline k8s`'s default).
pub const CLAIM: &str = "fedimdb-data";

/// The copier Job's init container runs `copier download --to /data/download`, which
/// keeps `aclImdb_v1.tar.gz` found there if its sha256 is the one it expects (by default,
/// the official archive's) and downloads it otherwise. The tests have no network and use
/// other archives, so the archive is put in place beforehand and this adds `--sha256` of
/// it to that container: the real init container then verifies it and skips the download.
pub fn offline_download(archive_sha256: String) -> impl Fn(&mut Launch) + Send + Sync {
    move |l: &mut Launch| {
        if l.container == "download" && l.args.first().map(String::as_str) == Some("download") {
            l.args
                .extend(["--sha256".to_string(), archive_sha256.clone()]);
        }
    }
}

/// A hook that arms the trainer fault `trainer:ROUND:INDEX:update-written` (see
/// `fedimdb::fault`) in every pod of index `index` of round `round`'s trainer Job, so that
/// each of them dies after writing its update.
pub fn failing_trainer(round: u32, index: u32) -> LaunchHook {
    let job = format!("-trainer-r{round}");
    Box::new(move |l: &mut Launch| {
        if l.job.ends_with(&job) && l.index == Some(index) {
            l.env.push((
                "FEDIMDB_FAULT".into(),
                format!("trainer:{round}:{index}:update-written"),
            ));
        }
    })
}

/// A new volume under `dir` with `archive` as `download/aclImdb_v1.tar.gz` (a symbolic
/// link: the download step only reads it).
pub fn volume_with(dir: &Path, archive: &Path) -> PathBuf {
    let vol = dir.join("vol");
    std::fs::create_dir_all(vol.join("download")).unwrap();
    std::os::unix::fs::symlink(
        archive.canonicalize().unwrap(),
        vol.join("download/aclImdb_v1.tar.gz"),
    )
    .unwrap();
    vol
}

/// A simulator whose claim `fedimdb-data` is `vol`, running the binaries of this build;
/// `hook` (if any) runs after the offline download's.
pub fn sim(vol: &Path, archive: &Path, hook: Option<LaunchHook>) -> Sim {
    // A missing binary would leave its pods Pending (ErrImagePull) until the driver's
    // --step-timeout: say so now instead.
    for b in ["copier", "trainer", "aggregator", "pipeline"] {
        crate::common::bin(b);
    }
    let sha = sha256_file(archive).unwrap();
    let offline = offline_download(sha);
    Sim::start(SimConfig {
        bin_dir: crate::common::bin_dir(),
        claims: [(CLAIM.to_string(), vol.to_path_buf())].into(),
        namespace: NS.into(),
        hook: Some(Box::new(move |l: &mut Launch| {
            offline(l);
            if let Some(h) = &hook {
                h(l);
            }
        })),
    })
}

/// `pipeline k8s` against the simulator: its kubeconfig, a short poll, and `flags`.
pub fn pipeline_k8s(sim: &Sim, flags: &[&str]) -> Command {
    let mut c = crate::common::bin("pipeline");
    for v in [
        "FEDIMDB_COPIER_IMAGE",
        "FEDIMDB_TRAINER_IMAGE",
        "FEDIMDB_AGGREGATOR_IMAGE",
        "FEDIMDB_REGISTRY",
        "FEDIMDB_TAG",
        "FEDIMDB_DRIVER_JOB",
        "FEDIMDB_FAULT",
    ] {
        c.env_remove(v);
    }
    c.env("KUBECONFIG", &sim.kubeconfig)
        .args([
            "k8s",
            "--namespace",
            NS,
            "--poll",
            "0.05",
            "--step-timeout",
            "900",
        ])
        .args(flags);
    c
}

/// `pipeline local --source ARCHIVE --root ROOT` with `flags`.
pub fn pipeline_local(archive: &Path, root: &Path, flags: &[&str]) -> Command {
    let mut c = crate::common::bin("pipeline");
    c.env_remove("FEDIMDB_FAULT")
        .arg("local")
        .args(flags)
        .arg("--source")
        .arg(archive)
        .arg("--root")
        .arg(root);
    c
}

/// The sha256 of the published model of a volume.
pub fn model_sha(root: &Path) -> String {
    let p = root.join("model/latest.safetensors");
    sha256_file(&p).unwrap_or_else(|e| panic!("no published model at {}: {e:#}", p.display()))
}

/// The `done: test accuracy …` line `pipeline local` ends with.
pub fn final_line(stdout: &str) -> Option<&str> {
    stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("done: test accuracy "))
}

/// A Job's condition of `type_` with status True: its (reason, message).
pub fn condition(job: &serde_json::Value, type_: &str) -> Option<(String, String)> {
    job["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_ && c["status"] == "True")
        .map(|c| {
            (
                super::store::text(&c["reason"]),
                super::store::text(&c["message"]),
            )
        })
}

/// A simulated cluster with no volume claims and no launch hook, for tests of the
/// simulator's own behaviour.
pub fn bare_sim() -> Sim {
    Sim::start(SimConfig {
        bin_dir: crate::common::bin_dir(),
        claims: Default::default(),
        namespace: NS.into(),
        hook: None,
    })
}

/// The (reason, message) of a Job that must have failed; panics with its status if not.
pub fn failed(job: &serde_json::Value) -> (String, String) {
    condition(job, "Failed").unwrap_or_else(|| panic!("not failed: {}", job["status"]))
}

/// The driver's last aggregator's test accuracy: from the termination message of the
/// last aggregator pod that succeeded (its outcome record).
pub fn last_accuracy(sim: &Sim) -> Option<f64> {
    let mut jobs: Vec<String> = sim
        .jobs(NS)
        .iter()
        .filter_map(|j| j["metadata"]["name"].as_str().map(str::to_string))
        .filter(|n| n.contains("-aggregator-r"))
        .collect();
    jobs.sort_by_key(|n| n.rsplit("-r").next().and_then(|r| r.parse::<u32>().ok()));
    let job = jobs.last()?;
    sim.pods_of(NS, job).iter().rev().find_map(|p| {
        let msg = p["status"]["containerStatuses"][0]["state"]["terminated"]["message"].as_str()?;
        fedimdb::outcome::Outcome::parse(msg).ok()?.test_accuracy
    })
}

/// One HTTP/1.1 request to the simulated API server (a few lines of std, so that the
/// tests of the API itself need no client library): the status code and the JSON body
/// (`Null` if the body is not JSON).
pub fn http(
    sim: &Sim,
    method: &str,
    path: &str,
    ctype: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(sim.addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        sim.addr,
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let code = reply
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {reply:?}"));
    let text = reply.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (
        code,
        serde_json::from_str(text).unwrap_or(serde_json::Value::Null),
    )
}

/// `kubectl apply` (client-side, kubectl's default) of the Job `job`: created, with the
/// `kubectl.kubernetes.io/last-applied-configuration` annotation, if absent; else patched
/// with what kubectl's three-way merge sends, a strategic merge patch of every field the
/// manifest sets to a value the live object does not have (and of those it no longer sets,
/// as null), nothing when nothing differs. The API server's answer: its code and object.
pub fn kubectl_apply(sim: &Sim, ns: &str, job: &serde_json::Value) -> (u16, serde_json::Value) {
    const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
    let mut config = job.clone();
    config["metadata"]["annotations"][LAST_APPLIED] = job.to_string().into();
    let name = super::store::text(&job["metadata"]["name"]);
    let jobs = format!("/apis/batch/v1/namespaces/{ns}/jobs");
    let Some(live) = sim.job(ns, &name) else {
        return http(sim, "POST", &jobs, "application/json", &config.to_string());
    };
    let last: serde_json::Value = live["metadata"]["annotations"][LAST_APPLIED]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let patch = three_way(&last, &config, &live);
    if patch.as_object().is_some_and(|p| p.is_empty()) {
        return (200, live);
    }
    http(
        sim,
        "PATCH",
        &format!("{jobs}/{name}"),
        "application/strategic-merge-patch+json",
        &patch.to_string(),
    )
}

/// kubectl's three-way merge, for maps and scalars: what `config` sets differently from
/// `live`, and what `last` set but `config` no longer does (as null). Fields only the
/// cluster set (status, defaults, labels written by controllers) are left alone.
fn three_way(
    last: &serde_json::Value,
    config: &serde_json::Value,
    live: &serde_json::Value,
) -> serde_json::Value {
    let mut patch = serde_json::Map::new();
    let (Some(c), Some(l)) = (config.as_object(), live.as_object()) else {
        return patch.into();
    };
    for (k, v) in c {
        match l.get(k) {
            Some(lv) if v.is_object() && lv.is_object() => {
                let sub = three_way(&last[k], v, lv);
                if sub.as_object().is_some_and(|m| !m.is_empty()) {
                    patch.insert(k.clone(), sub);
                }
            }
            lv if lv != Some(v) => {
                patch.insert(k.clone(), v.clone());
            }
            _ => {}
        }
    }
    for k in last.as_object().into_iter().flat_map(|m| m.keys()) {
        if !c.contains_key(k) && l.contains_key(k) {
            patch.insert(k.clone(), serde_json::Value::Null);
        }
    }
    patch.into()
}
