//! The Open Inference Protocol (KServe v2 REST) routes and their errors.

mod common;

use common::{NEGATIVE, POSITIVE, TestServer};
use serde_json::{Value, json};

fn infer_body(shape: Value, data: Value) -> Value {
    json!({ "id": "req-1", "inputs": [{ "name": "text", "shape": shape, "datatype": "BYTES", "data": data }] })
}

#[test]
fn health_metadata_and_infer() {
    let s = TestServer::start(|_| {});
    assert_eq!(s.get("/v2/health/live").json()["live"], true);
    let r = s.get("/v2/health/ready");
    assert_eq!((r.status, r.json()["ready"].clone()), (200, json!(true)));
    let v = s.get("/v2").json();
    assert_eq!(v["name"], "fedimdb-server");
    assert!(v["extensions"].is_array());
    let m = s.get("/v2/models/fedimdb").json();
    assert_eq!(m["name"], "fedimdb");
    assert_eq!(m["versions"], json!(["1"]));
    assert_eq!(m["inputs"][0]["datatype"], "BYTES");
    assert_eq!(m["outputs"][0]["name"], "probability");
    assert_eq!(s.get("/v2/models/fedimdb/ready").json()["ready"], true);
    assert_eq!(s.get("/v2/models/fedimdb/versions/1").status, 200);
    assert_eq!(s.get("/v2/models/fedimdb/versions/1/ready").status, 200);

    let r = s.post_json("/v2/models/fedimdb/infer", &infer_body(json!([2]), json!([POSITIVE, NEGATIVE])));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!((v["model_name"].as_str(), v["model_version"].as_str(), v["id"].as_str()), (Some("fedimdb"), Some("1"), Some("req-1")));
    let out = &v["outputs"][0];
    assert_eq!((out["name"].as_str(), out["datatype"].as_str()), (Some("probability"), Some("FP32")));
    assert_eq!(out["shape"], json!([2]));
    let p: Vec<f64> = out["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert!(p[0] > 0.5 && p[1] < 0.5, "{p:?}");

    // [N, 1], flat or nested data, and the versioned route; no Content-Type is accepted here
    // (Triton's HTTP client sends none).
    for data in [json!([POSITIVE, NEGATIVE]), json!([[POSITIVE], [NEGATIVE]])] {
        let body = infer_body(json!([2, 1]), data).to_string();
        let r = s.post_raw("/v2/models/fedimdb/versions/1/infer", &[], body.as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["outputs"][0]["shape"], json!([2, 1]));
    }
    let r = s.post_json("/v2/models/fedimdb/infer", &json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": [POSITIVE] }], "outputs": [{ "name": "probability" }] }));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json().get("id").is_none());
}

#[test]
fn v2_bad_requests() {
    let s = TestServer::start(|c| c.max_texts = 3);
    let infer = "/v2/models/fedimdb/infer";
    let cases: Vec<(&str, &str, Value, u16, &str)> = vec![
        ("unknown model", "/v2/models/other/infer", infer_body(json!([1]), json!(["a"])), 404, "unknown model"),
        ("unknown version", "/v2/models/fedimdb/versions/9/infer", infer_body(json!([1]), json!(["a"])), 404, "no version"),
        ("wrong datatype", infer, json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "FP32", "data": [1.0] }] }), 400, "datatype"),
        ("shape vs data", infer, infer_body(json!([3]), json!(["a", "b"])), 400, "2 elements"),
        ("3-d shape", infer, infer_body(json!([1, 1, 1]), json!(["a"])), 400, "shape"),
        ("[N, 2] shape", infer, infer_body(json!([1, 2]), json!(["a", "b"])), 400, "shape"),
        ("negative shape", infer, infer_body(json!([-1]), json!(["a"])), 400, "shape"),
        ("number in data", infer, infer_body(json!([2]), json!(["a", 5])), 400, "element 1 is a number"),
        ("empty text", infer, infer_body(json!([1]), json!([""])), 400, "empty"),
        ("no texts", infer, infer_body(json!([0]), json!([])), 400, "no texts"),
        ("too many", infer, infer_body(json!([4]), json!(["a", "b", "c", "d"])), 413, "--max-texts"),
        ("two inputs", infer, json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"] }, { "name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"] }] }), 400, "exactly one"),
        ("input name", infer, json!({ "inputs": [{ "name": "review", "shape": [1], "datatype": "BYTES", "data": ["a"] }] }), 400, "unknown input"),
        ("output name", infer, json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"] }], "outputs": [{ "name": "label" }] }), 400, "unknown output"),
        ("binary output", infer, json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"] }], "parameters": { "binary_data_output": true } }), 400, "binary"),
        ("no inputs field", infer, json!({}), 400, "inputs"),
    ];
    for (what, path, body, status, msg) in cases {
        let r = s.post_json(path, &body);
        assert_eq!(r.status, status, "{what}: {}", r.text());
        assert!(r.error().contains(msg), "{what}: {}", r.error());
    }
    assert_eq!(s.get("/v2/models/other").status, 404);
    assert_eq!(s.get("/v2/models/other/ready").status, 404);
    assert_eq!(s.get("/v2/models/fedimdb/versions/2/ready").status, 404);
    let r = s.post_raw(infer, &[("Content-Type", "text/plain")], infer_body(json!([1]), json!(["a"])).to_string().as_bytes());
    assert_eq!(r.status, 415);
    let r = s.post_raw(infer, &[], b"{not json");
    assert_eq!(r.status, 400);
    r.error();
}
