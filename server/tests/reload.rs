//! Hot reload: new models are picked up while clients keep sending requests, without one
//! failure; a broken model leaves the old one serving and is reported.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{POSITIVE, TestServer};
use fedimdb::layout::Layout;
use serde_json::json;

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn new_models_switch_in_without_failing_a_request_and_broken_ones_are_refused() {
    let s = TestServer::start(|_| {});
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|i| {
            let (addr, stop) = (s.addr, stop.clone());
            std::thread::spawn(move || {
                let (mut ok, mut failed, mut versions) = (0u32, Vec::new(), std::collections::BTreeSet::new());
                while !stop.load(Ordering::Relaxed) {
                    let r = if i % 2 == 0 {
                        common::request(addr, "POST", "/api/predict", &[("Content-Type", "application/json")], json!({ "text": POSITIVE }).to_string().as_bytes())
                    } else {
                        let body = json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": [POSITIVE] }] });
                        common::request(addr, "POST", "/v2/models/fedimdb/infer", &[], body.to_string().as_bytes())
                    };
                    if r.status == 200 {
                        ok += 1;
                        let v = r.json();
                        versions.insert(v.get("model_version").and_then(|x| x.as_str()).unwrap_or("?").to_owned());
                    } else {
                        failed.push(format!("{} {}", r.status, r.text()));
                    }
                }
                (ok, failed, versions)
            })
        })
        .collect();
    let version = || {
        s.get("/api/model").json()["version"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(version(), "1");

    // A new model, published the way the aggregator does it.
    let sha2 = common::publish(s.root.path(), &common::tiny_model(2, 0.5));
    wait_for("model 2", || version() == "2");
    assert_eq!(s.get("/api/model").json()["sha256"], sha2);
    std::thread::sleep(Duration::from_millis(200));

    // A broken model: a truncated file with a card naming it.
    let layout = Layout::new(s.root.path());
    let good = std::fs::read(layout.latest_model()).unwrap();
    fedimdb::atomic::write_bytes_atomic(&layout.latest_model(), &good[..good.len() / 2]).unwrap();
    common::write_card(s.root.path(), 3, &"0".repeat(64));
    wait_for("the reload error", || {
        !s.get("/api/model").json()["last_reload_error"].is_null()
    });
    let m = s.get("/api/model").json();
    assert_eq!(m["version"], "2", "the old model keeps serving");
    assert!(
        m["last_reload_error"]["message"]
            .as_str()
            .unwrap()
            .contains("latest.safetensors"),
        "{m}"
    );
    let r = s.get("/v2/health/ready");
    assert_eq!(r.status, 200);
    assert!(
        r.json()["last_reload_error"]["message"]
            .as_str()
            .unwrap()
            .contains("truncated"),
        "{}",
        r.text()
    );
    let metrics = s.get("/metrics").text();
    assert!(
        !metrics.contains("fedimdb_model_reloads_total{result=\"error\"} 0"),
        "{metrics}"
    );
    std::thread::sleep(Duration::from_millis(200));

    // A model whose card names another file's sha256 is refused too.
    let ck4 = common::tiny_model(4, 2.0);
    ck4.save(&layout.latest_model()).unwrap();
    common::write_card(s.root.path(), 4, &"f".repeat(64));
    wait_for("the sha mismatch", || {
        s.get("/api/model").json()["last_reload_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("ffff"))
    });
    assert_eq!(version(), "2");

    // The next good model clears the error.
    common::publish(s.root.path(), &common::tiny_model(5, 1.5));
    wait_for("model 5", || version() == "5");
    assert!(s.get("/api/model").json()["last_reload_error"].is_null());
    std::thread::sleep(Duration::from_millis(100));

    stop.store(true, Ordering::Relaxed);
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0;
    for c in clients {
        let (ok, failed, versions) = c.join().unwrap();
        assert!(
            failed.is_empty(),
            "{} requests failed, e.g. {}",
            failed.len(),
            failed[0]
        );
        total += ok;
        seen.extend(versions);
    }
    assert!(total > 20, "only {total} requests were made");
    assert!(
        seen.contains("1") && seen.contains("2") && seen.contains("5"),
        "versions seen: {seen:?}"
    );
    assert!(!seen.contains("3") && !seen.contains("4"));
}
