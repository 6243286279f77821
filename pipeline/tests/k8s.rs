//! `pipeline k8s` and the Kubernetes files, without a cluster (none is reachable in CI):
//! every kustomize overlay (and its `run` variant with the driver Job) and the `--dry-run`
//! output validate against the Kubernetes schemas (`kubectl kustomize`,
//! `kubernetes-validate --strict`) and pass checkov, the NetworkPolicies select the pods
//! they are written for, the step templates equal the Jobs the driver builds, the
//! Dockerfiles pass hadolint, and bad input (flags, kubeconfig, unreachable API server)
//! fails clearly.
//! Tests that need a tool skip with a notice when it is missing; `.ci/run` installs them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    PIPELINE, dry_run, fake_api_server, kubeconfig, pipeline_k8s, pipeline_k8s_command, text,
    tool_ok,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A tool from PATH or from the CI venv ($HOME/.cache/fedimdb/venv/bin).
fn tool(name: &str) -> Option<PathBuf> {
    let venv = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/fedimdb/venv/bin"));
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(venv)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn need(name: &str) -> Option<PathBuf> {
    let t = tool(name);
    if t.is_none() {
        eprintln!("SKIPPED: `{name}` is not installed (bash .ci/run installs it)");
    }
    t
}

/// Validates a multi-document YAML file strictly against the current Kubernetes schemas.
fn validate(validator: &Path, yaml: &str, what: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("all.yaml");
    std::fs::write(&f, yaml).unwrap();
    let o = Command::new(validator)
        .arg("--strict")
        .arg("--quiet")
        .arg(&f)
        .output()
        .unwrap();
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("{what} does not validate:\n{}", text(&o)))
    }
}

fn kustomize(kubectl: &Path, overlay: &str) -> String {
    let dir = repo().join("manifests/overlays").join(overlay);
    tool_ok(Command::new(kubectl).arg("kustomize").arg(&dir))
}

/// Every overlay in manifests/overlays.
const OVERLAYS: [&str; 4] = ["local", "gke", "gpu", "gke-filestore"];

/// `(OBJECT/CONTAINER, image, imagePullPolicy)` of every container of every workload.
fn images(docs: &[serde_yaml::Value]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for d in docs {
        let Some(spec) = pod_spec(d) else { continue };
        for c in containers(spec) {
            out.push((
                format!(
                    "{}/{}",
                    d["metadata"]["name"].as_str().unwrap(),
                    c["name"].as_str().unwrap()
                ),
                c["image"].as_str().unwrap().to_string(),
                c["imagePullPolicy"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

/// The pod spec of a workload (Deployment, Job, Pod), or None for other kinds.
fn pod_spec(d: &serde_yaml::Value) -> Option<&serde_yaml::Value> {
    match d["kind"].as_str()? {
        "Deployment" | "Job" => Some(&d["spec"]["template"]["spec"]),
        "Pod" => Some(&d["spec"]),
        _ => None,
    }
}

/// The object called `name` among `docs`.
fn named<'a>(docs: &'a [serde_yaml::Value], name: &str) -> &'a serde_yaml::Value {
    docs.iter()
        .find(|d| d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no object named {name}"))
}

/// The containers of a pod spec, main then init.
fn containers(spec: &serde_yaml::Value) -> impl Iterator<Item = &serde_yaml::Value> {
    spec["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .chain(spec["initContainers"].as_sequence().into_iter().flatten())
}

/// The labels of a workload's pods.
fn pod_labels(d: &serde_yaml::Value) -> &serde_yaml::Value {
    match d["kind"].as_str() {
        Some("Pod") => &d["metadata"]["labels"],
        _ => &d["spec"]["template"]["metadata"]["labels"],
    }
}

fn docs(yaml: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// kubectl, if its built-in kustomize is v5 or later (the manifests use components,
/// replacements and `labels`; Debian bookworm's kubectl 1.20 bundles kustomize v2).
fn kubectl_with_kustomize_5() -> Option<PathBuf> {
    let kubectl = need("kubectl")?;
    let o = Command::new(&kubectl)
        .args(["version", "--client"])
        .output()
        .ok()?;
    let out = text(&o);
    let major = out
        .lines()
        .find_map(|l| l.strip_prefix("Kustomize Version: v"))
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok());
    match major {
        Some(m) if m >= 5 => Some(kubectl),
        _ => {
            eprintln!(
                "SKIPPED: {} bundles no kustomize v5 or later:\n{out}",
                kubectl.display()
            );
            None
        }
    }
}

#[test]
fn every_overlay_renders_and_validates() {
    let (Some(kubectl), Some(validator)) =
        (kubectl_with_kustomize_5(), need("kubernetes-validate"))
    else {
        return;
    };
    // The validator must catch a wrong field (else a pass would mean nothing).
    let bogus = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: x\nspec:\n  completionz: 1\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: x\n        image: x:1\n";
    assert!(
        validate(&validator, bogus, "bogus").is_err(),
        "kubernetes-validate --strict accepts an unknown field"
    );

    for overlay in OVERLAYS {
        let yaml = kustomize(&kubectl, overlay);
        validate(&validator, &yaml, overlay).unwrap();
        let docs = docs(&yaml);
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        for k in [
            "Namespace",
            "Deployment",
            "Service",
            "PersistentVolumeClaim",
            "Job",
            "Pod",
            "NetworkPolicy",
        ] {
            assert!(kinds.contains(&k), "{overlay}: no {k} in {kinds:?}");
        }
        // The shared volume: the in-cluster NFS server's, or a ReadWriteMany StorageClass's.
        let named = |kind: &str, name: &str| {
            docs.iter()
                .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        };
        let claim = named("PersistentVolumeClaim", "fedimdb-data").unwrap();
        assert_eq!(
            claim["spec"]["accessModes"][0], "ReadWriteMany",
            "{overlay}"
        );
        let namespace = named("Namespace", "fedimdb").unwrap();
        let enforce = &namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"];
        if overlay == "gke-filestore" {
            for (kind, name) in [
                ("Deployment", "fedimdb-nfs"),
                ("Service", "fedimdb-nfs"),
                ("PersistentVolumeClaim", "fedimdb-nfs-disk"),
                ("PersistentVolume", "fedimdb-data"),
                ("NetworkPolicy", "fedimdb-nfs"),
            ] {
                assert!(
                    named(kind, name).is_none(),
                    "{overlay}: {kind} {name} is left"
                );
            }
            assert_eq!(claim["spec"]["storageClassName"], "standard-rwx");
            assert!(
                claim["spec"]["volumeName"].is_null(),
                "{overlay}: {claim:?}"
            );
            assert_eq!(enforce, "restricted", "no privileged pod is left");
        } else {
            assert!(named("Deployment", "fedimdb-nfs").is_some(), "{overlay}");
            let pv = named("PersistentVolume", "fedimdb-data").unwrap();
            assert_eq!(claim["spec"]["volumeName"], "fedimdb-data", "{overlay}");
            assert_eq!(claim["spec"]["storageClassName"], "", "{overlay}");
            assert_eq!(
                pv["spec"]["nfs"]["server"],
                named("Service", "fedimdb-nfs").unwrap()["spec"]["clusterIP"],
                "{overlay}"
            );
            assert_eq!(
                enforce, "privileged",
                "{overlay}: the NFS server is privileged"
            );
        }
        // Images: by tag on a local cluster (loaded into the nodes), by digest elsewhere.
        for (who, image, policy) in images(&docs) {
            if overlay == "local" {
                assert!(!image.contains('@'), "{who}: {image}");
            } else {
                assert!(
                    image.contains("@sha256:"),
                    "{overlay} {who}: {image} is not pinned by digest"
                );
            }
            // Kind-loaded images need IfNotPresent; a digest makes it as safe as Always.
            if image.contains("fedimdb/") {
                assert_eq!(policy, "IfNotPresent", "{overlay} {who}: {image}");
            }
        }
        assert!(
            !kinds.contains(&"ConfigMap")
                || docs
                    .iter()
                    .all(|d| d["metadata"]["name"] != "fedimdb-params"),
            "{overlay}: the local-config parameters must not be applied"
        );
        let trainer = docs
            .iter()
            .find(|d| d["metadata"]["name"] == "fedimdb-trainer")
            .unwrap();
        assert_eq!(trainer["spec"]["completionMode"], "Indexed");
        assert_eq!(
            trainer["spec"]["completions"],
            trainer["spec"]["parallelism"]
        );
        assert!(
            trainer["spec"]["completions"].as_u64().is_some(),
            "{overlay}: completions must be a number"
        );
        let gpu = trainer["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            == "1";
        assert_eq!(gpu, overlay == "gpu", "{overlay}: GPU request");
        let server_svc = docs
            .iter()
            .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "fedimdb-server")
            .unwrap();
        let want = match overlay {
            "local" => "NodePort",
            _ => "LoadBalancer",
        };
        assert_eq!(server_svc["spec"]["type"], want, "{overlay}");
        // Everything but the NFS server runs locked down, with requests and limits.
        for d in &docs {
            let Some(spec) = pod_spec(d) else { continue };
            let name = d["metadata"]["name"].as_str().unwrap();
            for c in containers(spec) {
                let cname = c["name"].as_str().unwrap();
                let image = c["image"].as_str().unwrap();
                assert!(
                    image.contains(':') && !image.ends_with(":latest"),
                    "{name}/{cname}: unpinned image {image}"
                );
                for k in ["requests", "limits"] {
                    for r in ["cpu", "memory"] {
                        assert!(
                            !c["resources"][k][r].is_null(),
                            "{overlay} {name}/{cname}: no {k}.{r}"
                        );
                    }
                }
                if name == "fedimdb-nfs" {
                    continue; // The documented exception (manifests/base/nfs-server.yaml).
                }
                let sc = &c["securityContext"];
                assert_eq!(sc["runAsNonRoot"], true, "{name}/{cname}");
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}/{cname}");
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}/{cname}");
                assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{name}/{cname}");
                assert_eq!(
                    sc["seccompProfile"]["type"], "RuntimeDefault",
                    "{name}/{cname}"
                );
            }
            if d["kind"] == "Job" {
                for k in [
                    "podFailurePolicy",
                    "activeDeadlineSeconds",
                    "ttlSecondsAfterFinished",
                ] {
                    assert!(!d["spec"][k].is_null(), "{overlay} {name}: no {k}");
                }
            }
        }
    }
}

#[test]
fn dry_run_prints_jobs_that_validate() {
    for overlay in ["local", "gpu"] {
        let yaml = dry_run(&[
            "--workers",
            "3",
            "--rounds",
            "2",
            "--overlay",
            overlay,
            "--registry",
            "europe-docker.pkg.dev/p/fedimdb",
            "--image-tag",
            "1.2.3",
        ]);
        let docs = docs(&yaml);
        assert_eq!(
            docs.len(),
            1 + 2 * 3,
            "copier + (trainer, aggregator) x rounds 0..=2"
        );
        assert_eq!(docs[1]["metadata"]["name"], "fedimdb-ci-trainer-r0");
        assert_eq!(docs[1]["spec"]["completions"], 3);
        let image = docs[1]["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap();
        let want = if overlay == "gpu" {
            "trainer-cuda"
        } else {
            "trainer"
        };
        assert_eq!(
            image,
            format!("europe-docker.pkg.dev/p/fedimdb/{want}:1.2.3")
        );
        if let Some(v) = need("kubernetes-validate") {
            validate(&v, &yaml, "pipeline k8s --dry-run").unwrap();
        }
    }
}

/// `--from-round` and `--min-workers` change the Jobs' arguments and the trainers' failure
/// budget, and the Jobs still validate.
#[test]
fn dry_run_with_from_round_and_min_workers() {
    let yaml = dry_run(&[
        "--workers",
        "3",
        "--rounds",
        "2",
        "--from-round",
        "1",
        "--min-workers",
        "2",
    ]);
    let docs = docs(&yaml);
    let args = |i: usize| -> Vec<String> {
        docs[i]["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let resume = |i: usize| args(i).iter().any(|a| a == "--resume");
    // copier, then (trainer, aggregator) of rounds 0, 1, 2.
    assert!(!resume(0), "the copier is idempotent without it");
    assert!(resume(1) && resume(2), "round 0 resumes");
    for (i, d) in docs.iter().enumerate().skip(3) {
        assert!(
            !resume(i),
            "{:?}: rounds from 1 on recompute",
            d["metadata"]["name"]
        );
    }
    for i in [1, 3, 5] {
        assert_eq!(docs[i]["spec"]["maxFailedIndexes"], 1);
        assert_eq!(docs[i]["spec"]["backoffLimitPerIndex"], 2);
    }
    let agg = args(2);
    let m = agg.iter().position(|a| a == "--min-workers").unwrap();
    assert_eq!(agg[m + 1], "2");
    if let Some(v) = need("kubernetes-validate") {
        validate(
            &v,
            &yaml,
            "pipeline k8s --dry-run --from-round --min-workers",
        )
        .unwrap();
    }
}

/// The Role in manifests/ grants every verb the driver uses.
#[test]
fn the_pipeline_role_grants_what_the_driver_uses() {
    let Some(kubectl) = kubectl_with_kustomize_5() else {
        return;
    };
    let docs = docs(&kustomize(&kubectl, "local"));
    let role = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "fedimdb-pipeline")
        .expect("a Role fedimdb-pipeline");
    let granted = |group: &str, resource: &str, verb: &str| {
        role["rules"].as_sequence().unwrap().iter().any(|r| {
            let has = |k: &str, v: &str| {
                r[k].as_sequence()
                    .unwrap()
                    .iter()
                    .any(|x| x.as_str() == Some(v))
            };
            has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
        })
    };
    for (group, resource, verbs) in [
        ("batch", "jobs", &["get", "list", "create", "patch"][..]),
        ("", "pods", &["get", "list"]),
        ("", "pods/log", &["get"]),
        (
            "coordination.k8s.io",
            "leases",
            &["get", "create", "update", "delete"],
        ),
    ] {
        for v in verbs {
            assert!(granted(group, resource, v), "{v} {resource}.{group}");
        }
    }
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "RoleBinding" && d["metadata"]["name"] == "fedimdb-pipeline")
        .unwrap();
    assert_eq!(binding["roleRef"]["name"], "fedimdb-pipeline");
    assert_eq!(binding["subjects"][0]["name"], "fedimdb-pipeline");
    assert_eq!(binding["subjects"][0]["namespace"], "fedimdb");
    assert!(
        docs.iter()
            .any(|d| d["kind"] == "ServiceAccount" && d["metadata"]["name"] == "fedimdb-pipeline")
    );
}

#[test]
fn bad_flags_fail_clearly() {
    let none = Path::new("/nonexistent/kubeconfig");
    for (args, want) in [
        (&["--workers", "0"][..], "--workers must be at least 1"),
        (&["--rounds", "0"], "--rounds must be at least 1"),
        (&["--epochs", "0"], "--epochs must be at least 1"),
        (&["--image-tag", "latest"], "pinned tag"),
        (&["--namespace", "Bad_NS"], "not a valid namespace"),
        (&["--run-id", "UPPER"], "--run-id"),
        (
            &["--rounds", "2", "--from-round", "3"],
            "--from-round 3 is past the last round (2",
        ),
        (
            &["--min-workers", "0"],
            "--min-workers must be between 1 and --workers (5), not 0",
        ),
        (
            &["--workers", "3", "--min-workers", "4"],
            "--min-workers must be between 1 and --workers (3), not 4",
        ),
        (&["--claim", "Bad Claim"], "not a valid claim name"),
        (
            &["--copier-image", "r.io/copier:latest"],
            "--copier-image \"r.io/copier:latest\" must name an image by a pinned tag",
        ),
        (
            &["--trainer-image", "r.io/trainer@sha256:12ab"],
            "or by digest (NAME@sha256: and 64 hex digits)",
        ),
        (
            &["--aggregator-image", "r.io/aggregator"],
            "--aggregator-image",
        ),
        (
            &["--driver-job", "Driver_1"],
            "--driver-job \"Driver_1\" is not a Job name",
        ),
        (&["--overlay", "aks"], "invalid value 'aks' for '--overlay"),
        (&["--frobnicate", "3"], "unexpected argument '--frobnicate'"),
        (
            &["--workers", "many"],
            "invalid value 'many' for '--workers",
        ),
    ] {
        let o = pipeline_k8s(&[args, &["--dry-run"][..]].concat(), none);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(o.stdout.is_empty(), "{args:?} printed YAML");
        assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
    }
}

/// `--source` names a file on the volume: the copier Job shards it at `/data/...` with the
/// source flags among its arguments (the plan's, as `pipeline local` runs them), and has
/// no download init container; `--test` is a path on the volume too.
#[test]
fn a_source_on_the_volume_reaches_the_copier_job_with_its_flags() {
    let yaml = dry_run(&[
        "--workers",
        "2",
        "--rounds",
        "1",
        "--source",
        "own/mail.tsv",
        "--text-column",
        "body",
        "--label-column",
        "tag",
        "--test",
        "/data/own/mail-test.tsv",
    ]);
    let jobs = docs(&yaml);
    let copier = named(&jobs, "fedimdb-ci-copier");
    let pod = &copier["spec"]["template"]["spec"];
    assert!(pod["initContainers"].is_null(), "{pod:?}");
    assert_eq!(
        strings(&pod["containers"][0]["args"]).join(" "),
        "--source /data/own/mail.tsv --out /data --workers 2 --seed 42 --partition iid \
         --text-column body --label-column tag --test /data/own/mail-test.tsv"
    );
    // The other steps do not take them.
    for d in &jobs[1..] {
        let args = strings(&d["spec"]["template"]["spec"]["containers"][0]["args"]);
        assert!(!args.iter().any(|a| a.contains("mail")), "{args:?}");
    }
    if let Some(v) = need("kubernetes-validate") {
        validate(&v, &yaml, "pipeline k8s --dry-run --source").unwrap();
    }
    // Without --source, the archive as before: downloaded, then sharded.
    let yaml = dry_run(&["--workers", "2", "--rounds", "1"]);
    let jobs = docs(&yaml);
    let pod = &named(&jobs, "fedimdb-ci-copier")["spec"]["template"]["spec"];
    assert_eq!(pod["initContainers"][0]["name"], "download");
    assert_eq!(
        strings(&pod["containers"][0]["args"])[..4],
        [
            "--source",
            "/data/download/aclImdb_v1.tar.gz",
            "--out",
            "/data"
        ]
    );
}

/// Source flags that cannot apply, and paths that are not on the volume, are refused by
/// name before the driver talks to the cluster: the API server sees no request.
#[test]
fn bad_source_flags_are_refused_before_anything_is_applied() {
    let (url, seen) = fake_api_server();
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), &url, "{}");
    for (args, want) in [
        (
            &["--test-fraction", "0.2"][..],
            "without --source, the source (the IMDB archive) is the IMDB dataset, which has its \
             own test split: drop --test and --test-fraction",
        ),
        (
            &["--source", "own/mail.csv"],
            "/data/own/mail.csv has no test split: pass --test SOURCE",
        ),
        (
            &["--source", "own/mail.csv", "--test-fraction", "0"],
            "--test-fraction must be between 0 and 1 (exclusive), not 0",
        ),
        (
            &[
                "--source",
                "own/mail",
                "--format",
                "folders",
                "--text-column",
                "t",
                "--test-fraction",
                "0.2",
            ],
            "--text-column applies to CSV, TSV, JSON Lines and Parquet sources; /data/own/mail is \
             a folders source",
        ),
        (
            &[
                "--source",
                "own/mail.csv",
                "--test",
                "t.csv",
                "--test-fraction",
                "0.2",
            ],
            "the argument '--test <SOURCE>' cannot be used with '--test-fraction <F>'",
        ),
        (
            &["--source", "/home/me/mail.csv", "--test-fraction", "0.2"],
            "--source /home/me/mail.csv is not on the volume: give a path relative to the \
             volume's root (the pods mount it at /data)",
        ),
        (
            &["--source", "own/../../etc/passwd", "--test-fraction", "0.2"],
            "--source own/../../etc/passwd must stay inside the volume",
        ),
        (
            &["--source", "data/mail.csv", "--test-fraction", "0.2"],
            "--source data/mail.csv is in data/, which the run writes",
        ),
        (
            &["--source", "own/mail.csv", "--test", "/tmp/test.csv"],
            "--test /tmp/test.csv is not on the volume",
        ),
        (
            &["--source", "/data"],
            "--source /data names the volume's root",
        ),
    ] {
        let o = pipeline_k8s(&[&["--workers", "2", "--rounds", "1"], args].concat(), &kc);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(text(&o).contains(want), "{args:?}: {}", text(&o));
    }
    let seen = seen.lock().unwrap();
    assert!(
        seen.is_empty(),
        "requests before the flags were checked: {seen:?}"
    );
}

#[test]
fn missing_kubeconfig_fails_clearly() {
    let o = pipeline_k8s(
        &["--workers", "2", "--rounds", "1"],
        Path::new("/nonexistent/kubeconfig"),
    );
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("no usable Kubernetes configuration") && t.contains("KUBECONFIG"),
        "{t}"
    );
}

#[test]
fn unreachable_api_server_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), "https://127.0.0.1:1", "{ token: t }");
    let t0 = std::time::Instant::now();
    let o = pipeline_k8s(&["--workers", "2", "--rounds", "1"], &kc);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("cannot reach the Kubernetes API server at https://127.0.0.1:1"),
        "{t}"
    );
    assert!(t0.elapsed().as_secs() < 30);
}

#[test]
fn dockerfiles_pass_hadolint() {
    let Some(hadolint) = need("hadolint") else {
        return;
    };
    let files: Vec<PathBuf> = std::fs::read_dir(repo().join("docker"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("Dockerfile") && !n.ends_with(".dockerignore")
        })
        .collect();
    assert!(!files.is_empty(), "no docker/Dockerfile*");
    for f in files {
        tool_ok(
            Command::new(&hadolint)
                .args(["--failure-threshold", "info"])
                .arg(&f),
        );
    }
}

/// The arguments of every Job parse in the real binaries (built next to `pipeline` by
/// `make test`): each fails for want of data on an empty volume, never with a usage error
/// (exit status 2, which the Jobs' podFailurePolicy turns into an immediate failure).
#[test]
fn the_jobs_arguments_parse_in_the_binaries() {
    let bin_dir = Path::new(PIPELINE).parent().unwrap();
    let missing: Vec<_> = ["copier", "trainer", "aggregator"]
        .into_iter()
        .filter(|b| !bin_dir.join(b).is_file())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "SKIPPED: {missing:?} not built in {} (make test builds them)",
            bin_dir.display()
        );
        return;
    }
    let yaml = dry_run(&[
        "--workers",
        "2",
        "--rounds",
        "1",
        "--from-round",
        "1",
        "--min-workers",
        "1",
        "--force",
    ]);
    let volume = tempfile::tempdir().unwrap();
    let root = volume.path().to_str().unwrap();
    for d in docs(&yaml) {
        let pod = &d["spec"]["template"]["spec"];
        let containers = pod["initContainers"]
            .as_sequence()
            .into_iter()
            .flatten()
            .chain(pod["containers"].as_sequence().unwrap());
        for c in containers {
            let image = c["image"].as_str().unwrap();
            let binary = image.rsplit('/').next().unwrap().split(':').next().unwrap();
            let args: Vec<String> = c["args"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().replace("/data", root))
                .collect();
            if args.first().map(String::as_str) == Some("download") {
                continue; // would download the archive
            }
            let o = Command::new(bin_dir.join(binary))
                .args(&args)
                .env("JOB_COMPLETION_INDEX", "0")
                .output()
                .unwrap();
            let name = d["metadata"]["name"].as_str().unwrap();
            assert_ne!(
                o.status.code(),
                Some(2),
                "{name}: {binary} {args:?} is a usage error:\n{}",
                text(&o)
            );
            assert!(!o.status.success(), "{name}: succeeded on an empty volume");
        }
    }
}

/// Ctrl-C (SIGINT) of a running `pipeline k8s` releases its lock before it exits.
#[cfg(unix)]
#[test]
fn sigint_releases_the_lock() {
    let (url, seen) = fake_api_server();
    let dir = tempfile::tempdir().unwrap();
    let kc = kubeconfig(dir.path(), &url, "{}");
    let mut child = pipeline_k8s_command(&kc)
        .args([
            "--workers",
            "2",
            "--rounds",
            "1",
            "--run-id",
            "sig",
            "--poll",
            "0.05",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !seen
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.starts_with("GET ") && r.contains("/jobs/fedimdb-sig-copier"))
    {
        if t0.elapsed().as_secs() > 30 {
            let _ = child.kill();
            panic!(
                "the run never waited for its first Job: {:?}\n{}",
                seen.lock().unwrap(),
                text(&child.wait_with_output().unwrap())
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains("interrupted by SIGINT"), "{t}");
    assert!(
        t.contains("released the lock fedimdb/fedimdb-pipeline-fedimdb-data"),
        "{t}"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.last().unwrap(),
        "DELETE /apis/coordination.k8s.io/v1/namespaces/fedimdb/leases/fedimdb-pipeline-fedimdb-data",
        "{seen:?}"
    );
}

/// The KServe InferenceService (manifests/kserve) runs the server Deployment's container:
/// same image, arguments, probes, security, resources and read-only volume, so serving
/// through KServe cannot drift from the tested Deployment.
#[test]
fn the_inference_service_runs_the_server_deployments_container() {
    let read = |path: &str| std::fs::read_to_string(repo().join(path)).unwrap();
    let deployment = docs(&read("manifests/base/server.yaml"))
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap();
    let isvc = docs(&read("manifests/kserve/inferenceservice.yaml")).remove(0);
    assert_eq!(isvc["apiVersion"], "serving.kserve.io/v1beta1");
    assert_eq!(isvc["kind"], "InferenceService");
    let pod = &deployment["spec"]["template"]["spec"];
    let predictor = &isvc["spec"]["predictor"];
    for field in ["securityContext", "volumes", "automountServiceAccountToken"] {
        assert_eq!(predictor[field], pod[field], "{field}");
    }
    let mut container = predictor["containers"][0].clone();
    assert_eq!(container["name"], "kserve-container");
    container["name"] = pod["containers"][0]["name"].clone();
    assert_eq!(container, pod["containers"][0]);
    if let Some(kubectl) = kubectl_with_kustomize_5() {
        let dir = repo().join("manifests/kserve");
        let rendered = docs(&tool_ok(Command::new(kubectl).arg("kustomize").arg(&dir)));
        assert_eq!(rendered[0]["metadata"]["namespace"], "fedimdb");
    }
}

/// A 64-hex-digit digest for image references in tests.
const DIGEST: &str = "sha256:5f2c0e4a9b7d1c3e8f6a0b2d4c6e8f1a3b5d7c9e1f3a5b7d9c1e3f5a7b9d1c3e";

/// What checkov found in one YAML file: failed `(check id, resource)` pairs, skipped
/// checks with their reasons, and how many resources it looked at.
struct Checkov {
    failed: Vec<(String, String)>,
    skipped: Vec<(String, String, String)>,
    resources: u64,
}

fn checkov(bin: &Path, yaml: &str, what: &str) -> Checkov {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("all.yaml");
    std::fs::write(&f, yaml).unwrap();
    // --skip-download: no policy download from the network; exit status 1 means "failed
    // checks", so the JSON decides, not the status.
    let o = Command::new(bin)
        .args([
            "--framework",
            "kubernetes",
            "--skip-download",
            "--output",
            "json",
            "--file",
        ])
        .arg(&f)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: checkov printed no JSON report ({e}):\n{}",
            text(&o)
        )
    });
    let summary = report.get("summary").unwrap_or(&report);
    assert_eq!(
        summary["parsing_errors"],
        0,
        "{what}: checkov could not parse it:\n{}",
        text(&o)
    );
    let list = |kind: &str| -> Vec<serde_json::Value> {
        report["results"][kind]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let id = |c: &serde_json::Value| c["check_id"].as_str().unwrap().to_string();
    let resource = |c: &serde_json::Value| c["resource"].as_str().unwrap().to_string();
    Checkov {
        failed: list("failed_checks")
            .iter()
            .map(|c| (id(c), resource(c)))
            .collect(),
        skipped: list("skipped_checks")
            .iter()
            .map(|c| {
                let why = c["check_result"]["suppress_comment"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                (id(c), resource(c), why)
            })
            .collect(),
        resources: summary["resource_count"].as_u64().unwrap_or(0),
    }
}

/// checkov finds nothing to fix in any overlay, the KServe manifests or the Jobs of
/// `pipeline k8s --dry-run` (with the NetworkPolicies they run under). A check is skipped
/// only by a `checkov.io/skipN: CKV_K8S_x=REASON` annotation on the object, and every skip
/// gives its reason (docs/KUBERNETES.md lists them).
#[test]
fn checkov_finds_no_failed_checks() {
    let (Some(kubectl), Some(checkov_bin)) = (kubectl_with_kustomize_5(), need("checkov")) else {
        return;
    };
    // checkov must catch what it is here for: a privileged root pod without limits fails.
    let bad = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\n  namespace: x\nspec:\n  containers:\n  - name: c\n    image: busybox:1.37.0\n    securityContext:\n      privileged: true\n";
    let r = checkov(&checkov_bin, bad, "bad pod");
    assert!(
        r.failed.iter().any(|(id, _)| id == "CKV_K8S_16"),
        "checkov does not flag a privileged container: {:?}",
        r.failed
    );

    let mut targets: Vec<(String, String)> = OVERLAYS
        .iter()
        .flat_map(|o| [o.to_string(), format!("{o}/run")])
        .map(|o| (format!("overlay {o}"), kustomize(&kubectl, &o)))
        .collect();
    let kserve = repo().join("manifests/kserve");
    targets.push((
        "manifests/kserve".into(),
        tool_ok(Command::new(&kubectl).arg("kustomize").arg(&kserve)),
    ));
    // The driver's Jobs run in the namespace of an overlay, under its NetworkPolicies:
    // checkov sees them together (else every Job would lack a policy).
    let policies = |overlay: &str| -> String {
        docs(&kustomize(&kubectl, overlay))
            .into_iter()
            .filter(|d| d["kind"] == "NetworkPolicy")
            .map(|d| format!("---\n{}", serde_yaml::to_string(&d).unwrap()))
            .collect()
    };
    let image = |b: &str| format!("europe-docker.pkg.dev/p/fedimdb/{b}@{DIGEST}");
    for (overlay, digests) in [("local", false), ("gke", true), ("gpu", true)] {
        let mut args = vec!["--workers", "3", "--rounds", "1", "--overlay", overlay];
        let pinned = [
            ("--copier-image", image("copier")),
            (
                "--trainer-image",
                image(if overlay == "gpu" {
                    "trainer-cuda"
                } else {
                    "trainer"
                }),
            ),
            ("--aggregator-image", image("aggregator")),
        ];
        if digests {
            for (flag, img) in &pinned {
                args.extend([*flag, img.as_str()]);
            }
        }
        let yaml = format!("{}{}", dry_run(&args), policies(overlay));
        targets.push((format!("pipeline k8s --dry-run --overlay {overlay}"), yaml));
    }

    let mut problems = Vec::new();
    for (what, yaml) in &targets {
        let r = checkov(&checkov_bin, yaml, what);
        // checkov has no checks for KServe's InferenceService (0 resources); its container
        // is the server Deployment's, checked in every overlay (see the test below).
        if what != "manifests/kserve" {
            assert!(r.resources > 0, "{what}: checkov looked at nothing");
        }
        for (id, resource) in &r.failed {
            problems.push(format!("{what}: {id} failed on {resource}"));
        }
        for (id, resource, why) in &r.skipped {
            if why.trim().is_empty() || why == "No comment provided" {
                problems.push(format!(
                    "{what}: {id} skipped on {resource} without a reason"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "checkov:\n{}\n(fix the manifest, or skip a check that cannot pass with a \
         `checkov.io/skipN: ID=REASON` annotation and say why in docs/KUBERNETES.md)",
        problems.join("\n")
    );
}

/// Whether a NetworkPolicy's podSelector selects pods with these labels (matchLabels only:
/// the policies use nothing else, which the test checks).
fn selects(policy: &serde_yaml::Value, labels: &serde_yaml::Value) -> bool {
    let selector = &policy["spec"]["podSelector"];
    assert!(
        selector["matchExpressions"].is_null(),
        "{}: matchExpressions are not understood by this test",
        policy["metadata"]["name"].as_str().unwrap()
    );
    match selector["matchLabels"].as_mapping() {
        None => true,
        Some(want) => want.iter().all(|(k, v)| &labels[k.as_str().unwrap()] == v),
    }
}

/// Each NetworkPolicy selects exactly the pods it is written for: the pods of the overlay,
/// and those of the Jobs `pipeline k8s` creates, by their labels.
#[test]
fn network_policies_select_the_intended_pods() {
    let Some(kubectl) = kubectl_with_kustomize_5() else {
        return;
    };
    let rendered = docs(&kustomize(&kubectl, "local/run"));
    let driver_jobs = docs(&dry_run(&["--workers", "2", "--rounds", "1"]));
    let workloads: Vec<&serde_yaml::Value> = rendered
        .iter()
        .chain(&driver_jobs)
        .filter(|d| pod_spec(d).is_some())
        .collect();
    let name = |d: &serde_yaml::Value| d["metadata"]["name"].as_str().unwrap().to_string();
    let all: Vec<String> = workloads.iter().map(|d| name(d)).collect();
    let steps: Vec<String> = all
        .iter()
        .filter(|n| {
            ["copier", "trainer", "aggregator"]
                .iter()
                .any(|s| n.contains(s))
        })
        .cloned()
        .collect();
    assert_eq!(
        steps.len(),
        3 + 5,
        "3 templates, copier + 2 rounds of 2 Jobs: {all:?}"
    );
    let copiers: Vec<String> = all
        .iter()
        .filter(|n| n.ends_with("copier"))
        .cloned()
        .collect();
    assert_eq!(copiers, ["fedimdb-copier", "fedimdb-ci-copier"], "{all:?}");
    let expected: Vec<(&str, Vec<String>)> = vec![
        ("fedimdb-default-deny", all.clone()),
        ("fedimdb-nfs", vec!["fedimdb-nfs".into()]),
        ("fedimdb-server", vec!["fedimdb-server".into()]),
        ("fedimdb-steps", steps),
        ("fedimdb-copier-download", copiers),
        ("fedimdb-inspector", vec!["fedimdb-inspector".into()]),
        ("fedimdb-pipeline", vec!["fedimdb-driver".into()]),
    ];
    let policies: Vec<&serde_yaml::Value> = rendered
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    let names: Vec<String> = policies.iter().map(|p| name(p)).collect();
    assert_eq!(names.len(), expected.len(), "{names:?}");
    for (policy_name, want) in &expected {
        let policy = policies
            .iter()
            .find(|p| &name(p) == policy_name)
            .unwrap_or_else(|| panic!("no NetworkPolicy {policy_name} in {names:?}"));
        let mut got: Vec<String> = workloads
            .iter()
            .filter(|d| selects(policy, pod_labels(d)))
            .map(|d| name(d))
            .collect();
        let mut want = want.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "pods selected by NetworkPolicy {policy_name}");
    }
    // Every pod has a policy of its own beside the default deny (checkov's CKV2_K8S_6
    // asks for it, and a policy written for a pod documents what it may do).
    for d in &workloads {
        assert!(
            policies
                .iter()
                .filter(|p| name(p) != "fedimdb-default-deny")
                .any(|p| selects(p, pod_labels(d))),
            "{} has no NetworkPolicy of its own",
            name(d)
        );
    }
    let policy = |n: &str| *policies.iter().find(|p| name(p) == n).unwrap();
    let ports = |rules: &serde_yaml::Value| -> Vec<(String, u64)> {
        rules
            .as_sequence()
            .into_iter()
            .flatten()
            .flat_map(|r| r["ports"].as_sequence().cloned().unwrap_or_default())
            .map(|p| {
                (
                    p["protocol"].as_str().unwrap().to_string(),
                    p["port"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let with_types = |p: &serde_yaml::Value, types: &[&str]| {
        let got: Vec<&str> = p["spec"]["policyTypes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(got, types, "{}", name(p));
    };
    // No ingress at all to the Jobs' pods, the inspector and the driver.
    for n in [
        "fedimdb-steps",
        "fedimdb-inspector",
        "fedimdb-pipeline",
        "fedimdb-default-deny",
    ] {
        with_types(policy(n), &["Ingress", "Egress"]);
        assert!(policy(n)["spec"]["ingress"].is_null(), "{n} admits traffic");
    }
    // The server's container port is open; the NFS Service's ports are open from the
    // nodes' range only; the driver reaches the API server's ports.
    let server = rendered
        .iter()
        .find(|d| d["kind"] == "Deployment" && name(d) == "fedimdb-server")
        .unwrap();
    let http = pod_spec(server).unwrap()["containers"][0]["ports"][0]["containerPort"]
        .as_u64()
        .unwrap();
    assert_eq!(
        ports(&policy("fedimdb-server")["spec"]["ingress"]),
        [("TCP".to_string(), http)]
    );
    let nfs = &policy("fedimdb-nfs")["spec"]["ingress"];
    let open = ports(nfs);
    let svc = rendered
        .iter()
        .find(|d| d["kind"] == "Service" && name(d) == "fedimdb-nfs")
        .unwrap();
    for p in svc["spec"]["ports"].as_sequence().unwrap() {
        let port = p["port"].as_u64().unwrap();
        assert!(
            open.contains(&("TCP".to_string(), port)),
            "NFS port {port} closed: {open:?}"
        );
    }
    assert_eq!(nfs.as_sequence().unwrap().len(), 1, "one rule: {nfs:?}");
    assert_eq!(
        nfs[0]["from"][0]["ipBlock"]["cidr"], "172.16.0.0/12",
        "nodeCIDR of params.yaml"
    );
    let egress = ports(&policy("fedimdb-pipeline")["spec"]["egress"]);
    assert!(egress.contains(&("TCP".to_string(), 443)), "{egress:?}");
}

/// The environment variable `name` of a container, as a string.
fn env_of(container: &serde_yaml::Value, name: &str) -> Option<String> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str().map(str::to_string))
}

/// `$(VAR)` in `arg` replaced by `value(VAR)`, as Kubernetes expands a container's args.
fn expand(arg: &str, value: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        let end = rest[start..]
            .find(')')
            .map(|e| start + e)
            .expect("unclosed $(");
        let var = &rest[start + 2..end];
        out.push_str(&rest[..start]);
        out.push_str(&value(var).unwrap_or_else(|| panic!("no value for $({var}) in {arg}")));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Arguments as (flag, value) groups; a leading subcommand is a group of its own.
fn arg_groups(args: &[String]) -> Vec<Vec<String>> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    for a in args {
        match groups.last_mut() {
            Some(g) if !a.starts_with("--") && g[0].starts_with("--") && g.len() == 1 => {
                g.push(a.clone())
            }
            _ => groups.push(vec![a.clone()]),
        }
    }
    groups
}

fn strings(v: &serde_yaml::Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(|a| a.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Where a Job's containers are: (`initContainers` or `containers`, index).
fn container_slots(job: &serde_yaml::Value) -> Vec<(&'static str, usize)> {
    ["initContainers", "containers"]
        .into_iter()
        .flat_map(|key| {
            let n = job["spec"]["template"]["spec"][key]
                .as_sequence()
                .map_or(0, |s| s.len());
            (0..n).map(move |i| (key, i))
        })
        .collect()
}

/// A step template of manifests/base (rendered) and the Job `pipeline k8s` builds for the
/// same step, made comparable; every difference left is a drift between the two.
fn comparable(template: &serde_yaml::Value, built: &serde_yaml::Value) -> (String, String) {
    let mut t = template.clone();
    let mut b = built.clone();
    // Names differ by design: the template is `fedimdb-STEP`, the driver's Jobs
    // `fedimdb-RUN-STEP[-rROUND]`, one per run and round.
    for j in [&mut t, &mut b] {
        j["metadata"].as_mapping_mut().unwrap().remove("name");
    }
    // The templates are suspended, so that applying an overlay starts nothing.
    assert_eq!(t["spec"]["suspend"], true);
    t["spec"].as_mapping_mut().unwrap().remove("suspend");
    // The driver labels its Jobs with itself and the run they belong to; the templates
    // belong to no run.
    for in_template in [false, true] {
        let labels = if in_template {
            &mut b["spec"]["template"]["metadata"]["labels"]
        } else {
            &mut b["metadata"]["labels"]
        };
        let labels = labels.as_mapping_mut().unwrap();
        assert_eq!(labels.remove("fedimdb/run").unwrap(), "ci");
        assert_eq!(
            labels.remove("app.kubernetes.io/managed-by").unwrap(),
            "fedimdb-pipeline"
        );
    }
    let slots = container_slots(&t);
    assert!(!slots.is_empty());
    assert_eq!(slots, container_slots(&b), "the same containers");
    for (key, i) in slots {
        let tc = &mut t["spec"]["template"]["spec"][key][i];
        // The templates take the parameters as $(VAR)s from env entries that kustomize
        // fills from params.yaml; expanded, those entries have served their purpose.
        let env = tc.clone();
        let args: Vec<String> = strings(&tc["args"])
            .iter()
            .map(|a| expand(a, &|v| env_of(&env, v)))
            .collect();
        tc["args"] = serde_yaml::to_value(&args).unwrap();
        if let Some(serde_yaml::Value::Sequence(env)) = tc.get_mut("env") {
            env.retain(|e| {
                !["WORKERS", "ROUND", "STEPS", "BATCH"].contains(&e["name"].as_str().unwrap())
            });
        }
        // The driver passes every training flag explicitly (here all at their defaults:
        // the dry run gets none); a template names only those it takes from params.yaml,
        // and the binary's defaults are the same fedimdb::train::defaults. So the driver's
        // flags that the template does not name are left out, and the rest must be the
        // same flags, values and order.
        let named: Vec<&str> = args
            .iter()
            .filter(|a| a.starts_with("--"))
            .map(String::as_str)
            .collect();
        let bc = &mut b["spec"]["template"]["spec"][key][i];
        let kept: Vec<String> = arg_groups(&strings(&bc["args"]))
            .into_iter()
            .filter(|g| !g[0].starts_with("--") || named.contains(&g[0].as_str()))
            .flatten()
            .collect();
        bc["args"] = serde_yaml::to_value(&kept).unwrap();
    }
    (
        serde_yaml::to_string(&sorted(&t)).unwrap(),
        serde_yaml::to_string(&sorted(&b)).unwrap(),
    )
}

/// A YAML value with every mapping's keys in order (kustomize keeps a manifest's order,
/// the driver's serializer sorts them), so that equal objects print the same.
fn sorted(v: &serde_yaml::Value) -> serde_yaml::Value {
    match v {
        serde_yaml::Value::Mapping(m) => {
            let mut entries: Vec<(&serde_yaml::Value, &serde_yaml::Value)> = m.iter().collect();
            entries.sort_by_key(|(k, _)| k.as_str().unwrap_or_default().to_string());
            serde_yaml::Value::Mapping(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted(v)))
                    .collect(),
            )
        }
        serde_yaml::Value::Sequence(s) => {
            serde_yaml::Value::Sequence(s.iter().map(sorted).collect())
        }
        other => other.clone(),
    }
}

/// Where two YAML texts first differ: the line number and a few lines of each from there.
fn first_difference(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let at = la
        .iter()
        .zip(&lb)
        .position(|(x, y)| x != y)
        .unwrap_or(la.len().min(lb.len()));
    let from = at.saturating_sub(3);
    let show = |l: &[&str]| {
        l.iter()
            .skip(from)
            .take(10)
            .copied()
            .collect::<Vec<_>>()
            .join("\n")
    };
    format!(
        "first difference at line {}:\n--- template\n{}\n--- driver\n{}",
        at + 1,
        show(&la),
        show(&lb)
    )
}

/// The `pipeline k8s --overlay` whose Jobs an overlay's templates are.
fn pipeline_overlay(overlay: &str) -> &str {
    match overlay {
        "gke-filestore" => "gke",
        o => o,
    }
}

/// `pipeline k8s --dry-run` with the parameters and images of an overlay's templates.
fn driver_jobs_for(overlay: &str, rendered: &[serde_yaml::Value]) -> Vec<serde_yaml::Value> {
    let job = |n: &str| {
        rendered
            .iter()
            .find(|d| d["kind"] == "Job" && d["metadata"]["name"] == n)
            .unwrap_or_else(|| panic!("{overlay}: no Job {n}"))
    };
    let trainer = &job("fedimdb-trainer")["spec"]["template"]["spec"]["containers"][0];
    let param = |name: &str| env_of(trainer, name).unwrap();
    let image = |n: &str| {
        job(n)["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let round: u32 = param("ROUND").parse().unwrap();
    let rounds = round.max(1).to_string();
    let (workers, steps, batch) = (param("WORKERS"), param("STEPS"), param("BATCH"));
    let (copier, trainer_image, aggregator) = (
        image("fedimdb-copier"),
        image("fedimdb-trainer"),
        image("fedimdb-aggregator"),
    );
    docs(&dry_run(&[
        "--overlay",
        pipeline_overlay(overlay),
        "--workers",
        &workers,
        "--rounds",
        &rounds,
        "--steps",
        &steps,
        "--batch",
        &batch,
        "--copier-image",
        &copier,
        "--trainer-image",
        &trainer_image,
        "--aggregator-image",
        &aggregator,
    ]))
}

/// The suspended step templates of manifests/base, as each overlay renders them, are the
/// Jobs `pipeline k8s` builds for that overlay (pipeline/src/k8s/jobs.rs), field by field,
/// but for what `comparable` normalises and says why.
#[test]
fn the_step_templates_are_the_jobs_the_driver_builds() {
    let Some(kubectl) = kubectl_with_kustomize_5() else {
        return;
    };
    for overlay in OVERLAYS {
        let rendered = docs(&kustomize(&kubectl, overlay));
        let built = driver_jobs_for(overlay, &rendered);
        let round = env_of(
            &rendered
                .iter()
                .find(|d| d["metadata"]["name"] == "fedimdb-trainer")
                .unwrap()["spec"]["template"]["spec"]["containers"][0],
            "ROUND",
        )
        .unwrap();
        for (template, name) in [
            ("fedimdb-copier", "fedimdb-ci-copier".to_string()),
            ("fedimdb-trainer", format!("fedimdb-ci-trainer-r{round}")),
            (
                "fedimdb-aggregator",
                format!("fedimdb-ci-aggregator-r{round}"),
            ),
        ] {
            let (t, b) = comparable(named(&rendered, template), named(&built, &name));
            assert!(
                t == b,
                "{overlay}: the template {template} and the driver's {name} differ \
                 (update manifests/ or pipeline/src/k8s/jobs.rs); {}",
                first_difference(&t, &b)
            );
        }
    }
}

/// The rendered driver Job of `overlays/OVERLAY/run`.
fn driver_job(docs: &[serde_yaml::Value]) -> &serde_yaml::Value {
    docs.iter()
        .find(|d| d["kind"] == "Job" && d["metadata"]["name"] == "fedimdb-driver")
        .expect("a Job fedimdb-driver")
}

/// `kubectl apply -k manifests/overlays/OVERLAY/run` applies the overlay unchanged plus the
/// driver Job, which validates, runs `pipeline k8s` as the ServiceAccount fedimdb-pipeline
/// with the parameters of params.yaml and the templates' images, and whose arguments,
/// expanded as Kubernetes does, make the binary build exactly the Jobs of the templates.
#[test]
fn the_run_overlays_add_a_driver_job_that_runs_the_templates() {
    let Some(kubectl) = kubectl_with_kustomize_5() else {
        return;
    };
    let validator = need("kubernetes-validate");
    for overlay in OVERLAYS {
        let plain = docs(&kustomize(&kubectl, overlay));
        let run_yaml = kustomize(&kubectl, &format!("{overlay}/run"));
        if let Some(v) = &validator {
            validate(v, &run_yaml, &format!("{overlay}/run")).unwrap();
        }
        let run = docs(&run_yaml);
        let driver = driver_job(&run);
        let rest: Vec<&serde_yaml::Value> = run
            .iter()
            .filter(|d| d["metadata"]["name"] != "fedimdb-driver")
            .collect();
        assert_eq!(
            rest,
            plain.iter().collect::<Vec<_>>(),
            "{overlay}/run must be {overlay} plus the driver Job (same components)"
        );
        assert_eq!(driver["metadata"]["namespace"], "fedimdb");
        // Runs as soon as applied, and says so: applying it again un-suspends a driver Job
        // suspended after a failed step (which resumes the run); retried, bounded, and gone
        // an hour after it ended (then a new apply starts a new driver).
        assert_eq!(driver["spec"]["suspend"], false, "{overlay}");
        for k in ["backoffLimit", "activeDeadlineSeconds", "podFailurePolicy"] {
            assert!(
                !driver["spec"][k].is_null(),
                "{overlay}: driver without {k}"
            );
        }
        assert_eq!(driver["spec"]["ttlSecondsAfterFinished"], 3600);
        let pod = &driver["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "fedimdb-pipeline");
        assert_eq!(pod["restartPolicy"], "Never");
        let c = &pod["containers"][0];
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["capabilities"]["drop"][0], "ALL");
        let image = c["image"].as_str().unwrap();
        assert!(image.contains("fedimdb/pipeline"), "{image}");
        assert_eq!(
            image.contains("@sha256:"),
            overlay != "local",
            "{overlay}: {image}"
        );
        // The environment the pod gets: fieldRefs as the kubelet fills them in.
        let field = |e: &serde_yaml::Value| -> Option<String> {
            let path = e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?;
            Some(match path {
                "metadata.namespace" => "fedimdb".into(),
                "metadata.name" => "fedimdb-driver-x7k2p".into(),
                "metadata.labels['batch.kubernetes.io/job-name']" => "fedimdb-driver".into(),
                p => panic!("{overlay}: unexpected fieldRef {p}"),
            })
        };
        let env: Vec<(String, String)> = c["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|e| {
                let v = e["value"].as_str().map(str::to_string).or_else(|| field(e));
                (e["name"].as_str().unwrap().to_string(), v.unwrap())
            })
            .collect();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let args: Vec<String> = strings(&c["args"])
            .iter()
            .map(|a| expand(a, &get))
            .collect();
        assert_eq!(args[0], "k8s");
        assert_eq!(get("OVERLAY").unwrap(), pipeline_overlay(overlay));
        // What the driver would apply, from its own arguments and environment.
        let o = Command::new(PIPELINE)
            .args(&args)
            .args(["--dry-run", "--run-id", "ci"])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{overlay}: the driver's arguments {args:?}:\n{}",
            text(&o)
        );
        let built = docs(&String::from_utf8(o.stdout).unwrap());
        let rounds: usize = get("ROUNDS").unwrap().parse().unwrap();
        assert_eq!(built.len(), 1 + 2 * (rounds + 1), "{overlay}");
        for (template, name) in [
            ("fedimdb-copier", "fedimdb-ci-copier"),
            ("fedimdb-trainer", "fedimdb-ci-trainer-r0"),
            ("fedimdb-aggregator", "fedimdb-ci-aggregator-r0"),
        ] {
            let (t, b) = comparable(named(&plain, template), named(&built, name));
            assert!(
                t == b,
                "{overlay}/run: the driver would run another {template}; {}",
                first_difference(&t, &b)
            );
        }
    }
}
