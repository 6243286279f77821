//! Fixtures of the `pipeline k8s` integration tests: running the binary (on a kubeconfig,
//! or with `--dry-run`), writing a kubeconfig, and a minimal fake Kubernetes API server.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const PIPELINE: &str = env!("CARGO_BIN_EXE_pipeline");

/// A command's stdout and stderr.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a tool (kubectl, hadolint, …) that must succeed, and returns its stdout; on
/// failure the assertion names the command and shows its output.
pub fn tool_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
    let program = cmd.get_program().to_string_lossy().into_owned();
    assert!(
        o.status.success(),
        "{program} {}:\n{}",
        args.join(" "),
        text(&o)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The YAML printed by `pipeline k8s --dry-run --run-id ci ARGS`, which must succeed.
pub fn dry_run(args: &[&str]) -> String {
    let o = Command::new(PIPELINE)
        .args(["k8s", "--dry-run", "--run-id", "ci"])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8(o.stdout).unwrap()
}

/// `pipeline k8s` configured by the kubeconfig at `kubeconfig` alone (not by an in-cluster
/// service account).
pub fn pipeline_k8s_command(kubeconfig: &Path) -> Command {
    let mut c = Command::new(PIPELINE);
    c.arg("k8s")
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT");
    c
}

/// Runs `pipeline k8s ARGS` on the kubeconfig at `kubeconfig`.
pub fn pipeline_k8s(args: &[&str], kubeconfig: &Path) -> Output {
    pipeline_k8s_command(kubeconfig)
        .args(args)
        .output()
        .unwrap()
}

/// Writes `DIR/kubeconfig`: one cluster at `server`, its user given as the YAML `user`.
pub fn kubeconfig(dir: &Path, server: &str, user: &str) -> PathBuf {
    let kc = dir.join("kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n\
             users:\n- name: u\n  user: {user}\n"
        ),
    )
    .unwrap();
    kc
}

/// A minimal Kubernetes API server over plain HTTP, enough for `pipeline k8s` to take its
/// lock and apply a first Job that never finishes. Records `METHOD path` of each request.
pub fn fake_api_server() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::{Arc, Mutex};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let log = log.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut out = conn;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or_default().to_string();
                    let path = parts
                        .next()
                        .unwrap_or_default()
                        .split('?')
                        .next()
                        .unwrap()
                        .to_string();
                    let mut length = 0;
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            length = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    log.lock().unwrap().push(format!("{method} {path}"));
                    let job = |name: &str| {
                        serde_json::json!({ "apiVersion": "batch/v1", "kind": "Job",
                            "metadata": { "name": name, "namespace": "fedimdb" },
                            "status": { "active": 1 } })
                    };
                    let (code, reply) = match (method.as_str(), path.as_str()) {
                        ("GET", "/version") => (
                            200,
                            serde_json::json!({ "major": "1", "minor": "33", "gitVersion": "v1.33.0",
                                "gitCommit": "x", "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z",
                                "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64" }),
                        ),
                        ("POST", p) if p.ends_with("/leases") => {
                            let mut l: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            l["metadata"]["resourceVersion"] = "1".into();
                            (201, l)
                        }
                        ("DELETE", p) if p.contains("/leases/") => (
                            200,
                            serde_json::json!({ "kind": "Status", "apiVersion": "v1",
                                                "metadata": {}, "status": "Success" }),
                        ),
                        ("GET", "/apis/batch/v1/namespaces/fedimdb/jobs") => (
                            200,
                            serde_json::json!({ "apiVersion": "batch/v1", "kind": "JobList",
                                                "metadata": {}, "items": [] }),
                        ),
                        ("PATCH" | "GET", p) if p.contains("/jobs/") => {
                            (200, job(p.rsplit('/').next().unwrap()))
                        }
                        _ => (
                            404,
                            serde_json::json!({ "kind": "Status", "apiVersion": "v1", "metadata": {},
                                "status": "Failure", "reason": "NotFound", "code": 404, "message": "not here" }),
                        ),
                    };
                    let reply = reply.to_string();
                    let head = format!(
                        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        reply.len()
                    );
                    if out.write_all(head.as_bytes()).is_err()
                        || out.write_all(reply.as_bytes()).is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, seen)
}
