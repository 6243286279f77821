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
    // The repository index, as Triton's client asks for it (no body) and with a filter.
    let ready = json!([{ "name": "fedimdb", "version": "1", "state": "READY", "reason": "" }]);
    for body in [&b""[..], b"{}", br#"{"ready": true}"#] {
        let r = s.post_raw(
            "/v2/repository/index",
            &[("content-type", "application/json")],
            body,
        );
        assert_eq!(
            (r.status, r.json()),
            (200, ready.clone()),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    let r = s.post_raw("/v2/repository/index", &[], b"{ready");
    assert_eq!(r.status, 400);
    assert!(r.error().contains("not valid JSON"), "{}", r.text());

    let r = s.post_json(
        "/v2/models/fedimdb/infer",
        &infer_body(json!([2]), json!([POSITIVE, NEGATIVE])),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (
            v["model_name"].as_str(),
            v["model_version"].as_str(),
            v["id"].as_str()
        ),
        (Some("fedimdb"), Some("1"), Some("req-1"))
    );
    let out = &v["outputs"][0];
    assert_eq!(
        (out["name"].as_str(), out["datatype"].as_str()),
        (Some("probability"), Some("FP32"))
    );
    assert_eq!(out["shape"], json!([2]));
    let p: Vec<f64> = out["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(p[0] > 0.5 && p[1] < 0.5, "{p:?}");

    // [N, 1] or [N], flat or nested data (elements are counted after flattening, as Triton
    // does; schemathesis found [N] with nested data refused), and the versioned route; no
    // Content-Type is accepted here (Triton's HTTP client sends none).
    for shape in [json!([2, 1]), json!([2])] {
        for data in [json!([POSITIVE, NEGATIVE]), json!([[POSITIVE], [NEGATIVE]])] {
            let body = infer_body(shape.clone(), data).to_string();
            let r = s.post_raw("/v2/models/fedimdb/versions/1/infer", &[], body.as_bytes());
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.json()["outputs"][0]["shape"], shape);
            let p = r.json()["outputs"][0]["data"].clone();
            assert!(
                p[0].as_f64().unwrap() > 0.5 && p[1].as_f64().unwrap() < 0.5,
                "{p}"
            );
        }
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
        (
            "unknown model",
            "/v2/models/other/infer",
            infer_body(json!([1]), json!(["a"])),
            404,
            "unknown model",
        ),
        (
            "unknown version",
            "/v2/models/fedimdb/versions/9/infer",
            infer_body(json!([1]), json!(["a"])),
            404,
            "no version",
        ),
        (
            "wrong datatype",
            infer,
            json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "FP32", "data": [1.0] }] }),
            400,
            "datatype",
        ),
        (
            "shape vs data",
            infer,
            infer_body(json!([3]), json!(["a", "b"])),
            400,
            "2 elements",
        ),
        (
            "3-d shape",
            infer,
            infer_body(json!([1, 1, 1]), json!(["a"])),
            400,
            "shape",
        ),
        (
            "[N, 2] shape",
            infer,
            infer_body(json!([1, 2]), json!(["a", "b"])),
            400,
            "shape",
        ),
        (
            "negative shape",
            infer,
            infer_body(json!([-1]), json!(["a"])),
            400,
            "shape",
        ),
        (
            "number in data",
            infer,
            infer_body(json!([2]), json!(["a", 5])),
            400,
            "element 1 is a number",
        ),
        (
            "empty text",
            infer,
            infer_body(json!([1]), json!([""])),
            400,
            "empty",
        ),
        (
            "no texts",
            infer,
            infer_body(json!([0]), json!([])),
            400,
            "no texts",
        ),
        (
            "too many",
            infer,
            infer_body(json!([4]), json!(["a", "b", "c", "d"])),
            413,
            "--max-texts",
        ),
        (
            "two inputs",
            infer,
            json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"] }, { "name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"] }] }),
            400,
            "exactly one",
        ),
        (
            "input name",
            infer,
            json!({ "inputs": [{ "name": "review", "shape": [1], "datatype": "BYTES", "data": ["a"] }] }),
            400,
            "unknown input",
        ),
        (
            "output name",
            infer,
            json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"] }], "outputs": [{ "name": "label" }] }),
            400,
            "unknown output",
        ),
        ("no inputs field", infer, json!({}), 400, "inputs"),
        // Optional fields may be left out but not null (found by schemathesis).
        (
            "null id",
            infer,
            json!({ "id": null, "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"] }] }),
            400,
            "invalid type: null",
        ),
        (
            "null outputs",
            infer,
            json!({ "outputs": null, "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"] }] }),
            400,
            "invalid type: null",
        ),
        (
            "null parameters",
            infer,
            json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"], "parameters": null }] }),
            400,
            "invalid type: null",
        ),
        (
            "nested shape vs data",
            infer,
            infer_body(json!([3]), json!([["a"], ["b"]])),
            400,
            "2 elements",
        ),
        // Objects must be objects: serde would otherwise read a struct from an array of its
        // field values.
        (
            "input as an array",
            infer,
            json!({ "inputs": [["text", [1], "BYTES", null, ["a"]]] }),
            400,
            "expected a JSON object",
        ),
        (
            "output as an array",
            infer,
            json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"] }], "outputs": [["probability"]] }),
            400,
            "expected a JSON object",
        ),
        (
            "request as an array",
            infer,
            json!([null, null, [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"] }]]),
            400,
            "expected a JSON object",
        ),
    ];
    for (what, path, body, status, msg) in cases {
        let r = s.post_json(path, &body);
        assert_eq!(r.status, status, "{what}: {}", r.text());
        assert!(r.error().contains(msg), "{what}: {}", r.error());
    }
    assert_eq!(s.get("/v2/models/other").status, 404);
    assert_eq!(s.get("/v2/models/other/ready").status, 404);
    assert_eq!(s.get("/v2/models/fedimdb/versions/2/ready").status, 404);
    let r = s.post_raw(
        infer,
        &[("Content-Type", "text/plain")],
        infer_body(json!([1]), json!(["a"])).to_string().as_bytes(),
    );
    assert_eq!(r.status, 415);
    let r = s.post_raw(infer, &[], b"{not json");
    assert_eq!(r.status, 400);
    r.error();
}

/// A request in the binary tensor extension: JSON header, then the BYTES elements as
/// 4-byte little-endian lengths and bytes.
fn binary_request(
    texts: &[&[u8]],
    size_override: Option<usize>,
    binary_output: bool,
) -> (String, Vec<u8>) {
    let mut raw = Vec::new();
    for t in texts {
        raw.extend((t.len() as u32).to_le_bytes());
        raw.extend(*t);
    }
    let size = size_override.unwrap_or(raw.len());
    let header = json!({
        "inputs": [{ "name": "text", "shape": [texts.len()], "datatype": "BYTES", "parameters": { "binary_data_size": size } }],
        "outputs": [{ "name": "probability", "parameters": { "binary_data": binary_output } }],
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(raw);
    (header.len().to_string(), body)
}

#[test]
fn binary_tensor_extension_in_and_out() {
    let s = TestServer::start(|_| {});
    let infer = "/v2/models/fedimdb/infer";
    let (len, body) = binary_request(&[POSITIVE.as_bytes(), NEGATIVE.as_bytes()], None, true);
    let r = s.post_raw(
        infer,
        &[
            ("Content-Type", "application/octet-stream"),
            ("Inference-Header-Content-Length", &len),
        ],
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (head, p) = r.binary_parts();
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
    assert!(head["outputs"][0].get("data").is_none());
    assert!(p.len() == 2 && p[0] > 0.5 && p[1] < 0.5, "{p:?}");

    // Binary in, JSON out: the same probabilities as an all-JSON request.
    let (len, body) = binary_request(&[POSITIVE.as_bytes(), NEGATIVE.as_bytes()], None, false);
    let r = s.post_raw(infer, &[("Inference-Header-Content-Length", &len)], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let json_p: Vec<f32> = r.json()["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(json_p, p);

    let cases: Vec<(&str, String, Vec<u8>, &str)> = vec![
        {
            let (l, b) = binary_request(&[b"good"], Some(3), false);
            ("size mismatch", l, b, "does not match")
        },
        {
            let (l, mut b) = binary_request(&[b"good"], None, false);
            let n = b.len();
            b[n - 4..].copy_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
            ("invalid UTF-8", l, b, "not valid UTF-8")
        },
        {
            let (_, b) = binary_request(&[b"good"], None, false);
            ("header past the end", "100000".to_owned(), b, "has only")
        },
        {
            let (_, b) = binary_request(&[b"good"], None, false);
            ("header not a number", "lots".to_owned(), b, "byte count")
        },
        {
            // The element says 9 bytes, 4 follow (binary_data_size matches what was sent).
            let mut raw = 9u32.to_le_bytes().to_vec();
            raw.extend(b"good");
            let head = json!({ "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "parameters": { "binary_data_size": raw.len() } }] }).to_string();
            let len = head.len().to_string();
            let mut b = head.into_bytes();
            b.extend(raw);
            ("truncated element", len, b, "says 9 bytes, 4 remain")
        },
    ];
    for (what, len, body, msg) in cases {
        let r = s.post_raw(infer, &[("Inference-Header-Content-Length", &len)], &body);
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert!(r.error().contains(msg), "{what}: {}", r.error());
    }
}

/// Triton's own HTTP client (PyPI `tritonclient[http]`), with its defaults (binary tensors)
/// and with JSON. `.ci/run` installs it in `$HOME/.cache/fedimdb/venv`; elsewhere the test
/// skips with a notice unless `FEDIMDB_PYTHON` names a Python that has it.
#[test]
fn triton_http_client_works_unchanged() {
    let python = std::env::var_os("FEDIMDB_PYTHON")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| std::path::Path::new(&h).join(".cache/fedimdb/venv/bin/python"))
        })
        .filter(|p| p.is_file());
    let has_client = python.as_ref().is_some_and(|p| {
        std::process::Command::new(p)
            .args(["-c", "import tritonclient.http"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let (true, Some(python)) = (has_client, python) else {
        eprintln!(
            "notice: tritonclient[http] not installed; skipping the Triton client test (.ci/run installs it)"
        );
        return;
    };
    let s = TestServer::start(|_| {});
    let script = format!(
        r#"
import numpy as np, tritonclient.http as http
c = http.InferenceServerClient("{addr}")
assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("fedimdb")
index = c.get_model_repository_index()
assert index == [{{"name": "fedimdb", "version": "1", "state": "READY", "reason": ""}}], index
texts = np.array([{pos:?}.encode(), {neg:?}.encode()], dtype=np.object_)
for binary in (True, False):
    inp = http.InferInput("text", [2], "BYTES"); inp.set_data_from_numpy(texts, binary_data=binary)
    r = c.infer("fedimdb", [inp], outputs=[http.InferRequestedOutput("probability", binary_data=binary)])
    p = r.as_numpy("probability"); assert p.shape == (2,) and p[0] > 0.5 > p[1], p
inp = http.InferInput("text", [2], "BYTES"); inp.set_data_from_numpy(texts)
p = c.infer("fedimdb", [inp]).as_numpy("probability"); assert p[0] > 0.5 > p[1], p
print("ok", p)
"#,
        addr = s.addr,
        pos = POSITIVE,
        neg = NEGATIVE
    );
    let out = std::process::Command::new(python)
        .args(["-c", &script])
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && log.contains("ok"),
        "Triton client failed:\n{log}"
    );
}
