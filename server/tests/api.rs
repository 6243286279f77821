//! Every route and every bad input, against a real server on 127.0.0.1:0.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{NEGATIVE, POSITIVE, TestServer};
use serde_json::{Value, json};

#[test]
fn page_is_self_contained_and_accessible() {
    let s = TestServer::start(|_| {});
    let html = s.get_text("/", "text/html");
    common::assert_contains_all(
        "the page",
        &html,
        &[
            "name=\"viewport\"",
            "<label for=\"review\"",
            "aria-live=\"polite\"",
            "id=\"predict\"",
            "id=\"sample\"",
            "ctrlKey",
            "metaKey",
            "<svg",
        ],
    );
    // No CDN or other outside resource: nothing is fetched from another origin.
    for outside in ["http://", "https://", "//cdn", "<link "] {
        assert!(!html.contains(outside), "page refers to {outside}");
    }
}

#[test]
fn predict_one_and_many() {
    let s = TestServer::start(|_| {});
    let r = s.post_json("/api/predict", &json!({ "text": POSITIVE }));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["model_version"], "1");
    let p = &v["predictions"][0];
    assert_eq!(p["label"], "positive");
    assert!(p["probability"].as_f64().unwrap() > 0.5);
    let top = common::strs(&p["top_positive"], "text");
    assert!(!top.is_empty() && top.len() <= 5, "{top:?}");
    assert!(p.get("highlight").is_none());

    let r = s.post_json(
        "/api/predict",
        &json!({ "texts": [POSITIVE, NEGATIVE, POSITIVE], "top_k": 2, "highlight": true }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let preds = v["predictions"].as_array().unwrap();
    let labels = common::strs(&v["predictions"], "label");
    assert_eq!(labels, ["positive", "negative", "positive"]);
    assert!(preds[1]["top_negative"].as_array().unwrap().len() <= 2);
    let hl = preds[1]["highlight"].as_array().unwrap();
    let chars: Vec<char> = NEGATIVE.chars().collect();
    let worst = hl
        .iter()
        .min_by(|a, b| {
            a["weight"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["weight"].as_f64().unwrap())
        })
        .unwrap();
    let word: String = chars
        [worst["start"].as_u64().unwrap() as usize..worst["end"].as_u64().unwrap() as usize]
        .iter()
        .collect();
    assert!(
        ["awful", "boring", "hated", "terrible", "dull"].contains(&word.as_str()),
        "most negative token: {word}"
    );

    // No explanation asked: none computed.
    let v = s
        .post_json("/api/predict", &json!({ "texts": [NEGATIVE], "top_k": 0 }))
        .json();
    assert!(
        v["predictions"][0]["top_negative"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn a_request_larger_than_a_batch_is_split_and_kept_in_order() {
    let s = TestServer::start(|c| c.max_batch = 3);
    let texts: Vec<&str> = (0..20)
        .map(|i| if i % 3 == 0 { NEGATIVE } else { POSITIVE })
        .collect();
    let v = s
        .post_json("/api/predict", &json!({ "texts": texts, "top_k": 0 }))
        .json();
    let labels = common::strs(&v["predictions"], "label");
    let want: Vec<&str> = (0..20)
        .map(|i| if i % 3 == 0 { "negative" } else { "positive" })
        .collect();
    assert_eq!(labels, want);
}

#[test]
fn preprocess_model_sample_metrics_openapi() {
    let s = TestServer::start(|_| {});
    let v = s
        .post_json(
            "/api/preprocess",
            &json!({ "text": "Not BAD<br />at all!" }),
        )
        .json();
    assert_eq!(v["normalized"], "not bad at all!");
    assert_eq!(v["tokens"], json!(["not", "bad", "at", "all", "!"]));
    assert_eq!(v["max_ngram"], 2);
    assert_eq!(v["ngrams"].as_array().unwrap().len(), 5 + 4);
    assert_eq!(v["ngrams"][1]["text"], "not bad");

    let m = s.get("/api/model").json();
    assert_eq!(m["name"], "fedimdb");
    assert_eq!(m["round"], 1);
    assert_eq!(m["workers"], 2);
    assert_eq!(m["partition"], "iid");
    assert_eq!(m["trained_at"], "2026-01-02T03:04:05Z");
    assert_eq!(m["history"][0]["round"], 1);
    assert!(m["last_reload_error"].is_null());

    let r = s.get("/api/sample");
    assert_eq!(r.status, 200);
    let v = r.json();
    assert!([POSITIVE, NEGATIVE].contains(&v["text"].as_str().unwrap()));
    assert!(["positive", "negative"].contains(&v["label"].as_str().unwrap()));

    s.post_json("/api/predict", &json!({ "text": POSITIVE }));
    let m = s.get_text("/metrics", "text/plain");
    common::assert_contains_all(
        "/metrics",
        &m,
        &[
            "fedimdb_http_requests_total{route=\"/api/predict\",method=\"POST\",status=\"200\"} 1",
            "fedimdb_http_request_duration_seconds_bucket{route=\"/api/predict\",le=\"+Inf\"} 1",
            "fedimdb_batch_size_count",
            "fedimdb_queue_seconds_bucket",
            "fedimdb_model_info{version=\"1\"",
            "fedimdb_model_reloads_total{result=\"ok\"} 1",
            "fedimdb_reviews_scored_total 1",
        ],
    );

    let doc = s.get("/openapi.json").json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
}

/// The OpenAPI document lists exactly the routes the server answers, with their methods.
#[test]
fn openapi_matches_the_router() {
    let s = TestServer::start(|_| {});
    let doc = s.get("/openapi.json").json();
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = Vec::new();
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            documented.push(format!("{} {path}", method.to_uppercase()));
            let concrete = path.replace("{name}", "fedimdb").replace("{version}", "1");
            let r = if method == "get" {
                s.get(&concrete)
            } else {
                s.post_json(&concrete, &json!({}))
            };
            assert!(
                r.status != 404 && r.status != 405,
                "{method} {path} is documented but answers {}",
                r.status
            );
            for code in r.status.to_string().split(' ') {
                assert!(
                    ops[method]["responses"].get(code).is_some(),
                    "{method} {path} answered {code}, not documented"
                );
            }
        }
    }
    documented.sort();
    let mut routed = vec![
        "GET /",
        "GET /openapi.json",
        "GET /metrics",
        "POST /api/predict",
        "POST /api/preprocess",
        "GET /api/model",
        "GET /api/sample",
        "GET /v2",
        "GET /v2/health/live",
        "GET /v2/health/ready",
        "POST /v2/repository/index",
        "GET /v2/models/{name}",
        "GET /v2/models/{name}/ready",
        "POST /v2/models/{name}/infer",
        "GET /v2/models/{name}/versions/{version}",
        "GET /v2/models/{name}/versions/{version}/ready",
        "POST /v2/models/{name}/versions/{version}/infer",
    ];
    routed.sort();
    assert_eq!(documented, routed);
}

/// The document's rule for a non-blank text (a character outside Unicode White_Space, which
/// is what `str::trim` strips and the server refuses with 400) names exactly Rust's
/// whitespace, so generated "valid" texts are never refused as blank and blank ones never
/// pass as valid (found by schemathesis: `minLength: 1` alone let " " count as valid).
#[test]
fn openapi_non_blank_pattern_is_rusts_whitespace() {
    let doc: Value = serde_json::from_str(include_str!("../static/openapi.json")).unwrap();
    let schemas = &doc["components"]["schemas"];
    let pattern = schemas["PredictRequest"]["properties"]["text"]["pattern"]
        .as_str()
        .unwrap();
    for p in [
        &schemas["PredictRequest"]["properties"]["texts"]["items"]["pattern"],
        &schemas["PreprocessRequest"]["properties"]["text"]["pattern"],
        &schemas["InferInput"]["properties"]["data"]["items"]["oneOf"][0]["pattern"],
    ] {
        assert_eq!(p.as_str(), Some(pattern));
    }
    // The pattern is one negated class of escapes, single characters and ranges.
    let class = pattern
        .strip_prefix("[^")
        .and_then(|p| p.strip_suffix(']'))
        .expect("a negated character class");
    let mut chars = Vec::new();
    let mut rest = class;
    while !rest.is_empty() {
        let (c, tail) = match rest.strip_prefix('\\') {
            Some(esc) if esc.starts_with('u') => (
                char::from_u32(u32::from_str_radix(&esc[1..5], 16).unwrap()).unwrap(),
                &esc[5..],
            ),
            Some(esc) => (
                [('t', '\t'), ('n', '\n'), ('f', '\x0c'), ('r', '\r')]
                    .iter()
                    .find(|(k, _)| esc.starts_with(*k))
                    .unwrap()
                    .1,
                &esc[1..],
            ),
            None => (
                rest.chars().next().unwrap(),
                &rest[rest.chars().next().unwrap().len_utf8()..],
            ),
        };
        chars.push(c);
        rest = tail;
        if let Some(tail) = rest.strip_prefix('-') {
            let end = tail
                .strip_prefix("\\u")
                .map(|h| char::from_u32(u32::from_str_radix(&h[..4], 16).unwrap()).unwrap())
                .unwrap();
            chars.extend((c as u32 + 1..=end as u32).filter_map(char::from_u32));
            rest = &tail[6..];
        }
    }
    chars.sort_unstable();
    let whitespace: Vec<char> = (0..=0x10ffff)
        .filter_map(char::from_u32)
        .filter(|c| c.is_whitespace())
        .collect();
    assert_eq!(chars, whitespace);
    // And the exactly-one-of rule for text/texts is stated.
    assert_eq!(
        schemas["PredictRequest"]["oneOf"],
        json!([{ "required": ["text"] }, { "required": ["texts"] }])
    );
    // Binary tensor extension answers are documented.
    for path in [
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    ] {
        assert!(
            doc["paths"][path]["post"]["responses"]["200"]["content"]["application/octet-stream"]
                .is_object(),
            "{path}"
        );
    }
}

#[test]
fn bad_inputs_get_4xx_json_errors() {
    let s = TestServer::start(|c| {
        c.max_text_bytes = 1000;
        c.max_texts = 4;
    });
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        ("empty text", json!({ "text": "" }), 400, "text 0 is empty"),
        ("blank text", json!({ "text": "  \n " }), 400, "empty"),
        (
            "text over the limit",
            json!({ "text": "a".repeat(1001) }),
            413,
            "--max-text-bytes",
        ),
        (
            "too many texts",
            json!({ "texts": ["a", "b", "c", "d", "e"] }),
            413,
            "--max-texts",
        ),
        ("empty list", json!({ "texts": [] }), 400, "no texts"),
        (
            "both",
            json!({ "text": "a", "texts": ["b"] }),
            400,
            "not both",
        ),
        ("neither", json!({}), 400, "missing"),
        ("wrong type", json!({ "text": 5 }), 400, "schema"),
        ("unknown field", json!({ "txt": "a" }), 400, "unknown field"),
        (
            "top_k too big",
            json!({ "text": "a", "top_k": 51 }),
            400,
            "top_k",
        ),
        ("not an object", json!(["a"]), 400, "expected a JSON object"),
        (
            "fields as an array",
            json!(["a", null, 5, false]),
            400,
            "expected a JSON object",
        ),
        // Optional fields may be left out but not null (the OpenAPI document does not allow
        // null; schemathesis found `{"text": "…", "texts": null}` accepted).
        (
            "null texts",
            json!({ "text": "a", "texts": null }),
            400,
            "invalid type: null",
        ),
        (
            "null text",
            json!({ "text": null, "texts": ["a"] }),
            400,
            "invalid type: null",
        ),
        (
            "null top_k",
            json!({ "text": "a", "top_k": null }),
            400,
            "invalid type: null",
        ),
    ];
    for (what, body, status, msg) in cases {
        let r = s.post_json("/api/predict", &body);
        assert_eq!(r.status, status, "{what}: {}", r.text());
        assert!(r.error().contains(msg), "{what}: {}", r.error());
    }
    let r = s.post_json("/api/preprocess", &json!({ "text": "" }));
    assert_eq!(r.status, 400, "{}", r.text());

    let json_ct = [("Content-Type", "application/json")];
    for (body, msg) in [
        (&b"{\"text\": "[..], "not valid JSON"),
        (&b"{\"text\": \"caf\xe9\"}"[..], "UTF-8"),
    ] {
        let r = s.post_raw("/api/predict", &json_ct, body);
        assert_eq!(
            (r.status, r.error().contains(msg)),
            (400, true),
            "{}",
            r.text()
        );
    }
    let r = s.post_raw(
        "/api/predict",
        &[("Content-Type", "text/plain")],
        b"{\"text\": \"hi\"}",
    );
    assert_eq!(
        (r.status, r.error().contains("application/json")),
        (415, true),
        "{}",
        r.text()
    );
    let r = s.post_raw("/api/predict", &[], b"{\"text\": \"hi\"}");
    assert_eq!(r.status, 415, "{}", r.text());
    // A body over the whole-body limit is refused while it is read.
    let big = format!(
        "{{\"texts\": [\"{}\"]}}",
        "a".repeat(s.state().config.max_body_bytes())
    );
    let r = s.post_raw("/api/predict", &json_ct, big.as_bytes());
    assert_eq!(r.status, 413, "{}", r.text());
    r.error();

    let r = s.get("/no/such/route");
    assert_eq!(
        (r.status, r.error().contains("/no/such/route")),
        (404, true)
    );
    let r = s.get("/api/predict");
    assert_eq!(r.status, 405);
    r.error();
    let r = s.post_json("/api/model", &json!({}));
    assert_eq!(r.status, 405);
    r.error();
}

#[test]
fn a_slow_client_times_out_without_holding_a_worker() {
    let s = TestServer::start(|c| {
        c.read_timeout_ms = 300;
        c.workers = 1;
    });
    // Promise 100 bytes, send 10, then stall.
    let mut slow = TcpStream::connect(s.addr).unwrap();
    write!(slow, "POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"text\": \"").unwrap();
    // Meanwhile the only worker still answers others.
    let t = Instant::now();
    let r = s.post_json("/api/predict", &json!({ "text": POSITIVE }));
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() < Duration::from_millis(300)
            || cfg!(debug_assertions)
            || t.elapsed() < Duration::from_secs(5)
    );
    let r = common::read_response(&mut slow);
    assert_eq!(r.status, 408, "{}", r.text());
    assert!(r.error().contains("not received"));
}

#[test]
fn root_without_a_model_starts_unready_then_serves_what_is_published() {
    let root = tempfile::tempdir().unwrap();
    let s = TestServer::start_on(root, |_| {});
    let r = s.get("/v2/health/ready");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["ready"], false);
    assert!(
        r.json()["last_reload_error"]["message"]
            .as_str()
            .unwrap()
            .contains("no model published yet")
    );
    assert_eq!(s.get("/v2/health/live").status, 200);
    let r = s.post_json("/api/predict", &json!({ "text": POSITIVE }));
    assert_eq!((r.status, r.header("retry-after")), (503, Some("1")));
    assert!(r.error().contains("no model"));
    assert_eq!(s.get("/api/model").status, 503);
    assert_eq!(s.get("/api/sample").status, 404);
    // The repository index names the model as unavailable, with the reason.
    let index = s.post_raw("/v2/repository/index", &[], b"").json();
    assert_eq!(
        (index[0]["name"].as_str(), index[0]["state"].as_str()),
        (Some("fedimdb"), Some("UNAVAILABLE"))
    );
    assert!(
        index[0]["reason"]
            .as_str()
            .unwrap()
            .contains("no model published yet"),
        "{index}"
    );
    let ready_only = s.post_json("/v2/repository/index", &json!({ "ready": true }));
    assert_eq!((ready_only.status, ready_only.json()), (200, json!([])));
    // Model readiness answers its own body (ready: false) with or without a version, as the
    // OpenAPI document says; schemathesis found the versioned route answering an error body.
    for path in [
        "/v2/models/fedimdb/ready",
        "/v2/models/fedimdb/versions/3/ready",
    ] {
        let r = s.get(path);
        assert_eq!(
            (r.status, r.json()),
            (503, json!({ "name": "fedimdb", "ready": false })),
            "{path}"
        );
    }

    common::publish(s.root.path(), &common::tiny_model(3, 1.0));
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.get("/v2/health/ready").status != 200 {
        assert!(
            Instant::now() < deadline,
            "the published model was not picked up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = s
        .post_json("/api/predict", &json!({ "text": POSITIVE }))
        .json();
    assert_eq!(v["model_version"], "3");
}

#[test]
fn model_file_mode_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    common::tiny_model(7, 1.0).save(&path).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = server::Config::new(server::ModelSource::File(path.clone()));
    c.listen = "127.0.0.1:0".parse().unwrap();
    let srv = rt.block_on(server::start(c.clone())).unwrap();
    let r = common::request(srv.addr, "GET", "/api/model", &[], b"");
    assert_eq!(r.json()["version"], "7");
    assert!(r.json()["trained_at"].is_null());
    let r = common::request(srv.addr, "GET", "/api/sample", &[], b"");
    assert_eq!(r.status, 404);
    rt.block_on(srv.stop()).unwrap();

    std::fs::write(&path, b"not a model").unwrap();
    let e = format!("{:#}", rt.block_on(server::start(c)).err().unwrap());
    assert!(e.contains("m.safetensors"), "{e}");
}
