//! Soak: the real `server` binary under mixed concurrent load for `FEDIMDB_SOAK_SECONDS`
//! (default 60) while the model is replaced again and again, the way the aggregator publishes
//! (model file, then card, both written atomically), including two broken models that must be
//! refused while the old model keeps serving. Not one request may fail: any non-2xx answer,
//! connection error, malformed response, or answer from a model other than the one it names
//! counts. It prints requests, throughput, latency percentiles and how long each swap took to
//! be picked up.

mod common;
#[path = "common/process.rs"]
mod process;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{NEGATIVE, POSITIVE, Resp};
use fedimdb::checkpoint::Checkpoint;
use fedimdb::layout::Layout;
use fedimdb::model::ModelConfig;
use process::ServerProcess;
use serde_json::{Value, json};

/// One HTTP/1.1 connection, kept alive across requests unless `close` is asked; every way a
/// request can go wrong is an `Err` (the caller counts it as a failure) rather than a panic.
struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Self {
        Self { addr, stream: None }
    }

    fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        close: bool,
    ) -> Result<Resp, String> {
        let request = common::request_bytes(self.addr, method, path, headers, body, close);
        let result = self.exchange(&request);
        if result.is_err() || close {
            self.stream = None;
        }
        result
    }

    /// Sends one request and reads its whole response, which must have a Content-Length and
    /// nothing after it.
    fn exchange(&mut self, request: &[u8]) -> Result<Resp, String> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr).map_err(|e| format!("connect: {e}"))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            self.stream = Some(s);
        }
        let s = self.stream.as_mut().unwrap();
        s.write_all(request).map_err(|e| format!("write: {e}"))?;

        let mut raw = Vec::with_capacity(4096);
        let mut buf = [0u8; 16384];
        let (head_end, length) = loop {
            if let Some(head) = common::response_head(&raw) {
                break head;
            }
            let n = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!(
                    "connection closed before the response head ({} bytes)",
                    raw.len()
                ));
            }
            raw.extend_from_slice(&buf[..n]);
        };
        let length = length.ok_or("response without Content-Length")?;
        while raw.len() < head_end + 4 + length {
            let n = s.read(&mut buf).map_err(|e| format!("read body: {e}"))?;
            if n == 0 {
                return Err("connection closed in the middle of the body".into());
            }
            raw.extend_from_slice(&buf[..n]);
        }
        if raw.len() != head_end + 4 + length {
            return Err(format!(
                "{} bytes after the response",
                raw.len() - head_end - 4 - length
            ));
        }
        common::try_parse_response(&raw)
    }
}

/// What the load clients check answers against: every model published so far (good or
/// broken), by version.
#[derive(Clone, Copy, Debug)]
struct Published {
    /// Whether the model scores POSITIVE as positive (the models alternate).
    positive: bool,
    good: bool,
}

type Registry = Arc<Mutex<BTreeMap<String, (String, Published)>>>;

/// A model of `round` of the real size (2^22 buckets, word 1-3-grams: a 32 MiB file, so each
/// reload reads, hashes and parses as much as in production) counted from made-up reviews
/// (`common::model_file`), whose predictions point the right way (`positive`) or the wrong
/// way: consecutive models disagree, so an answer made with one model but labelled with
/// another would be caught.
fn model(round: u32, positive: bool) -> Checkpoint {
    let magnitude = 0.5 + 0.25 * (round % 4) as f32;
    let weight = if positive { magnitude } else { -magnitude };
    common::model_file(ModelConfig::default(), round, weight)
}

/// Checks one answer: 200, from a published good model, and with the labels that model gives.
fn check(kind: Kind, r: &Resp, expect: &[bool], registry: &Registry) -> Result<String, String> {
    if r.status != 200 {
        return Err(format!(
            "status {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        ));
    }
    let lookup = |v: &str| {
        registry
            .lock()
            .unwrap()
            .get(v)
            .cloned()
            .ok_or_else(|| format!("answer from unpublished model version {v:?}"))
    };
    let probabilities = |outputs: &Value| -> Result<Vec<f64>, String> {
        outputs[0]["data"]
            .as_array()
            .ok_or("no output data")?
            .iter()
            .map(|x| x.as_f64().ok_or_else(|| "bad probability".to_owned()))
            .collect()
    };
    let (version, probs) = match kind {
        Kind::Predict | Kind::PredictBatch => {
            let v: Value = serde_json::from_slice(&r.body).map_err(|e| format!("not JSON: {e}"))?;
            let version = v["model_version"]
                .as_str()
                .ok_or("no model_version")?
                .to_owned();
            let (sha, _) = lookup(&version)?;
            if v["model_sha256"] != sha.as_str() {
                return Err(format!(
                    "version {version} answered with sha256 {} (published {sha})",
                    v["model_sha256"]
                ));
            }
            let probs = v["predictions"]
                .as_array()
                .ok_or("no predictions")?
                .iter()
                .map(|p| p["probability"].as_f64().unwrap_or(-1.0))
                .collect();
            (version, probs)
        }
        Kind::InferJson => {
            let v: Value = serde_json::from_slice(&r.body).map_err(|e| format!("not JSON: {e}"))?;
            (
                v["model_version"]
                    .as_str()
                    .ok_or("no model_version")?
                    .to_owned(),
                probabilities(&v["outputs"])?,
            )
        }
        Kind::InferBinary => {
            let n: usize = r
                .header("inference-header-content-length")
                .and_then(|v| v.parse().ok())
                .ok_or("no Inference-Header-Content-Length")?;
            let head: Value = serde_json::from_slice(r.body.get(..n).ok_or("short body")?)
                .map_err(|e| format!("not JSON: {e}"))?;
            let probs = r.body[n..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect();
            (
                head["model_version"]
                    .as_str()
                    .ok_or("no model_version")?
                    .to_owned(),
                probs,
            )
        }
        Kind::Gets => return Ok(String::new()),
    };
    let (_, published) = lookup(&version)?;
    if !published.good {
        return Err(format!("answer from the broken model {version}"));
    }
    let labels: Vec<bool> = probs.iter().map(|p| *p >= 0.5).collect();
    let want: Vec<bool> = expect
        .iter()
        .map(|pos| *pos == published.positive)
        .collect();
    if labels != want {
        return Err(format!(
            "model {version} gave {probs:?}, expected positive = {want:?}"
        ));
    }
    Ok(version)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// `/api/predict`, one review, default explanation (top 5), keep-alive.
    Predict,
    /// `/api/predict`, 8 reviews, no explanation or highlights, keep-alive.
    PredictBatch,
    /// `/v2/models/fedimdb/infer`, JSON, 4 reviews, keep-alive.
    InferJson,
    /// `/v2/models/fedimdb/infer`, binary tensor extension in and out, 2 reviews, keep-alive.
    InferBinary,
    /// A new connection per request: GETs of the model card, readiness, metadata, metrics.
    Gets,
}

struct ClientReport {
    kind: Kind,
    ok: u64,
    failures: Vec<String>,
    versions: BTreeSet<String>,
    latencies_us: Vec<u32>,
}

fn client(
    kind: Kind,
    i: usize,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    registry: Registry,
) -> ClientReport {
    let mut conn = Conn::new(addr);
    let mut report = ClientReport {
        kind,
        ok: 0,
        failures: Vec::new(),
        versions: BTreeSet::new(),
        latencies_us: Vec::new(),
    };
    let json_ct = [("Content-Type", "application/json")];
    let batch: Vec<bool> = (0..8).map(|j| !(i + j).is_multiple_of(3)).collect();
    let text = |pos: bool| if pos { POSITIVE } else { NEGATIVE };
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let t = Instant::now();
        let (result, expect): (Result<Resp, String>, Vec<bool>) = match kind {
            Kind::Predict => {
                let pos = n.is_multiple_of(2);
                (
                    conn.send(
                        "POST",
                        "/api/predict",
                        &json_ct,
                        json!({ "text": text(pos) }).to_string().as_bytes(),
                        false,
                    ),
                    vec![pos],
                )
            }
            Kind::PredictBatch => {
                let body = json!({ "texts": batch.iter().map(|p| text(*p)).collect::<Vec<_>>(), "top_k": 0, "highlight": n.is_multiple_of(4) });
                (
                    conn.send(
                        "POST",
                        "/api/predict",
                        &json_ct,
                        body.to_string().as_bytes(),
                        false,
                    ),
                    batch.clone(),
                )
            }
            Kind::InferJson => {
                let expect = vec![true, false, n.is_multiple_of(2), true];
                let data: Vec<&str> = expect.iter().map(|p| text(*p)).collect();
                let body = json!({ "id": format!("soak-{i}-{n}"), "inputs": [{ "name": "text", "shape": [4], "datatype": "BYTES", "data": data }] });
                (
                    conn.send(
                        "POST",
                        "/v2/models/fedimdb/infer",
                        &[],
                        body.to_string().as_bytes(),
                        false,
                    ),
                    expect,
                )
            }
            Kind::InferBinary => {
                let expect = vec![!n.is_multiple_of(2), n.is_multiple_of(2)];
                let mut raw = Vec::new();
                for p in &expect {
                    raw.extend((text(*p).len() as u32).to_le_bytes());
                    raw.extend(text(*p).as_bytes());
                }
                let head = json!({
                    "inputs": [{ "name": "text", "shape": [2], "datatype": "BYTES", "parameters": { "binary_data_size": raw.len() } }],
                    "parameters": { "binary_data_output": true },
                })
                .to_string();
                let len = head.len().to_string();
                let mut body = head.into_bytes();
                body.extend(raw);
                let headers = [
                    ("Content-Type", "application/octet-stream"),
                    ("Inference-Header-Content-Length", len.as_str()),
                ];
                (
                    conn.send("POST", "/v2/models/fedimdb/infer", &headers, &body, false),
                    expect,
                )
            }
            Kind::Gets => {
                let path = [
                    "/api/model",
                    "/v2/health/ready",
                    "/v2/models/fedimdb",
                    "/v2/models/fedimdb/ready",
                    "/metrics",
                    "/v2",
                ][n % 6];
                (conn.send("GET", path, &[], b"", true), vec![])
            }
        };
        report
            .latencies_us
            .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
        if kind == Kind::Gets {
            // Bounded: a new connection each time, a few hundred per second at most.
            std::thread::sleep(Duration::from_millis(3));
        }
        match result.and_then(|r| check(kind, &r, &expect, &registry)) {
            Ok(version) => {
                report.ok += 1;
                if !version.is_empty() {
                    report.versions.insert(version);
                }
            }
            Err(e) => report.failures.push(format!("{kind:?} request {n}: {e}")),
        }
    }
    report
}

/// What happens to the model during the soak, in order, evenly spaced.
#[derive(Clone, Copy, Debug)]
enum Event {
    /// A good model of this round.
    Good(u32),
    /// A truncated model file with a card naming it.
    Truncated(u32),
    /// A complete model whose card names another sha256.
    ShaMismatch(u32),
}

#[test]
fn soak_under_load_with_model_swaps_and_no_failed_request() {
    let seconds: f64 = std::env::var("FEDIMDB_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    assert!(seconds >= 3.0, "FEDIMDB_SOAK_SECONDS must be at least 3");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("volume");
    let layout = Layout::new(&root);
    let registry: Registry = Arc::new(Mutex::new(BTreeMap::new()));
    let positive = |round: u32| round % 2 == 1;
    let publish = |round: u32| {
        let ck = model(round, positive(round));
        // The sha256 is known before the files are written: register first, so no answer
        // from the new model can arrive before the checker knows it.
        let sha = fedimdb::digest::sha256_bytes(&ck.to_bytes().unwrap());
        registry.lock().unwrap().insert(
            ck.header.round.to_string(),
            (
                sha.clone(),
                Published {
                    positive: positive(round),
                    good: true,
                },
            ),
        );
        assert_eq!(common::publish(&root, &ck), sha);
        sha
    };
    publish(1);
    common::write_test_set(&root);
    let server = ServerProcess::start(&root, dir.path().join("server.log"), &["--poll-ms", "250"]);
    let mut control = Conn::new(server.addr);
    let mut model_card = || {
        let r = control
            .send("GET", "/api/model", &[], b"", false)
            .unwrap_or_else(|e| panic!("GET /api/model: {e}"));
        assert_eq!(r.status, 200, "GET /api/model: {}", r.text());
        r.json()
    };
    assert_eq!(model_card()["version"], "1");

    let stop = Arc::new(AtomicBool::new(false));
    let kinds = [
        Kind::Predict,
        Kind::Predict,
        Kind::PredictBatch,
        Kind::InferJson,
        Kind::InferJson,
        Kind::InferBinary,
        Kind::Gets,
    ];
    let clients: Vec<_> = kinds
        .iter()
        .enumerate()
        .map(|(i, &kind)| {
            let (addr, stop, registry) = (server.addr, stop.clone(), registry.clone());
            std::thread::spawn(move || client(kind, i, addr, stop, registry))
        })
        .collect();

    let events = [
        Event::Good(2),
        Event::Good(3),
        Event::Truncated(4),
        Event::Good(5),
        Event::Good(6),
        Event::ShaMismatch(7),
        Event::Good(8),
        Event::Good(9),
    ];
    let start = Instant::now();
    let at =
        |k: usize| Duration::from_secs_f64(seconds * (k + 1) as f64 / (events.len() + 1) as f64);
    let mut pickups = Vec::new();
    let mut serving = "1".to_owned();
    for (k, event) in events.iter().enumerate() {
        if let Some(wait) = at(k).checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let t = Instant::now();
        // Waits for the server to show what was just published; returns how long that took
        // after the files were written (the server polls every 250 ms, this every 25 ms).
        let wait_for = |what: &str, cond: &mut dyn FnMut() -> bool| {
            let written = Instant::now();
            while !cond() {
                assert!(
                    written.elapsed() < Duration::from_secs(20),
                    "{what} was not picked up within 20 s"
                );
                std::thread::sleep(Duration::from_millis(25));
            }
            (written - t, written.elapsed())
        };
        match *event {
            Event::Good(round) => {
                let sha = publish(round);
                let times = wait_for(&format!("model {round}"), &mut || {
                    let m = model_card();
                    m["version"] == round.to_string().as_str()
                        && m["sha256"] == sha.as_str()
                        && m["last_reload_error"].is_null()
                });
                serving = round.to_string();
                pickups.push((format!("model {round}"), times));
            }
            Event::Truncated(round) | Event::ShaMismatch(round) => {
                let ck = model(round, positive(round));
                let bytes = ck.to_bytes().unwrap();
                registry.lock().unwrap().insert(
                    round.to_string(),
                    (
                        String::new(),
                        Published {
                            positive: positive(round),
                            good: false,
                        },
                    ),
                );
                let (file, sha) = match *event {
                    Event::Truncated(_) => (
                        &bytes[..bytes.len() / 2],
                        fedimdb::digest::sha256_bytes(&bytes),
                    ),
                    _ => (&bytes[..], "f".repeat(64)),
                };
                fedimdb::atomic::write_bytes_atomic(&layout.latest_model(), file).unwrap();
                common::write_card(&root, round, &sha);
                let times = wait_for(&format!("the refusal of broken model {round}"), &mut || {
                    !model_card()["last_reload_error"].is_null()
                });
                let m = model_card();
                assert_eq!(
                    m["version"],
                    serving.as_str(),
                    "the old model keeps serving after broken model {round}: {m}"
                );
                let msg = m["last_reload_error"]["message"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                let expected = if matches!(event, Event::Truncated(_)) {
                    "latest.safetensors"
                } else {
                    &sha[..16]
                };
                assert!(msg.contains(expected), "broken model {round}: {msg}");
                pickups.push((format!("refusal of broken model {round}"), times));
            }
        }
    }
    // Let the clients use the last model for the rest of the time.
    if let Some(wait) = Duration::from_secs_f64(seconds).checked_sub(start.elapsed()) {
        std::thread::sleep(wait);
    }
    stop.store(true, Ordering::Relaxed);
    let reports: Vec<ClientReport> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let elapsed = start.elapsed().as_secs_f64();

    let metrics = String::from_utf8(
        control
            .send("GET", "/metrics", &[], b"", false)
            .unwrap()
            .body,
    )
    .unwrap();
    let server_log = server.log_text();
    let status = server.terminate(Duration::from_secs(10));

    // Figures.
    let total: u64 = reports.iter().map(|r| r.ok + r.failures.len() as u64).sum();
    let mut all: Vec<u32> = reports
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    all.sort_unstable();
    let pct = |v: &[u32], q: f64| {
        v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    println!(
        "soak: {total} requests in {elapsed:.1} s = {:.0} req/s over {} clients; latency p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
        total as f64 / elapsed,
        reports.len(),
        pct(&all, 0.5),
        pct(&all, 0.99),
        pct(&all, 1.0)
    );
    let mut by_kind: BTreeMap<Kind, (u64, Vec<u32>)> = BTreeMap::new();
    for r in &reports {
        let e = by_kind.entry(r.kind).or_default();
        e.0 += r.ok + r.failures.len() as u64;
        e.1.extend(&r.latencies_us);
    }
    for (kind, (n, mut lat)) in by_kind {
        lat.sort_unstable();
        println!(
            "  {kind:?}: {n} requests, p50 {:.2} ms, p99 {:.2} ms",
            pct(&lat, 0.5),
            pct(&lat, 0.99)
        );
    }
    let swaps = events
        .iter()
        .filter(|e| matches!(e, Event::Good(_)))
        .count();
    println!(
        "  {swaps} model swaps and {} broken models refused (32 MiB model files):",
        events.len() - swaps
    );
    for (what, (write, seen)) in &pickups {
        println!(
            "    {what}: written in {:.0} ms, seen in /api/model {:.0} ms later",
            write.as_secs_f64() * 1000.0,
            seen.as_secs_f64() * 1000.0
        );
    }
    let failures: Vec<&String> = reports.iter().flat_map(|r| &r.failures).collect();
    println!("  failed requests: {}", failures.len());

    // Verdicts.
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed, e.g.:\n{}",
        failures.len(),
        failures
            .iter()
            .take(10)
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    let seen: BTreeSet<String> = reports
        .iter()
        .flat_map(|r| r.versions.iter().cloned())
        .collect();
    let good: BTreeSet<String> = ["1", "2", "3", "5", "6", "8", "9"].map(String::from).into();
    assert_eq!(seen, good, "model versions the clients were answered by");
    for r in &reports {
        assert!(r.ok > 0, "{:?} client made no request", r.kind);
    }
    assert!(
        metrics.contains("fedimdb_model_reloads_total{result=\"ok\"} 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fedimdb_model_reloads_total{result=\"error\"} 2"),
        "{metrics}"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "the server did not stop cleanly on SIGTERM ({status:?}):\n{server_log}"
    );
}
