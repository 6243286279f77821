//! Models of K classes, and the class fields every model gained: label names from the model
//! card in `/api/predict`, the Open Inference Protocol's `[N, K]` output and metadata, and
//! the page's wording. Two-class models keep every field they had (the other tests).

mod common;

use common::{BUG, FEATURE, NEGATIVE, POSITIVE, QUESTION, TICKET_LABELS, TICKET_TASK, TestServer};
use serde_json::{Value, json};

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The `probabilities` of a prediction: checked to be one per label, in class order, summing
/// to one; returned as numbers.
fn probabilities(p: &Value, labels: &[&str]) -> Vec<f64> {
    let probs = p["probabilities"].as_array().unwrap();
    assert_eq!(common::strs(&p["probabilities"], "label"), labels, "{p}");
    let ps: Vec<f64> = probs.iter().map(|c| f(&c["probability"])).collect();
    assert!((ps.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{ps:?}");
    assert!(ps.iter().all(|&x| (0.0..=1.0).contains(&x)), "{ps:?}");
    ps
}

#[test]
fn three_class_predict_names_every_class_and_its_words() {
    let s = TestServer::start_tickets(|_| {});
    let r = s.post_json(
        "/api/predict",
        &json!({ "texts": [BUG, FEATURE, QUESTION], "highlight": true }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(common::strs(&v["predictions"], "label"), TICKET_LABELS);
    assert_eq!(
        common::strs(&v["predictions"], "class_label"),
        TICKET_LABELS
    );
    for (k, p) in preds.iter().enumerate() {
        assert_eq!(p["class"], k, "{p}");
        let ps = probabilities(p, &TICKET_LABELS);
        // The predicted class is the most probable, and `probability` is its probability.
        assert!(ps.iter().all(|&x| x <= ps[k]), "{ps:?}");
        assert!((f(&p["probability"]) - ps[k]).abs() < 1e-6);
        // The two-class fields are not there.
        for field in ["logit", "top_positive", "top_negative"] {
            assert!(p.get(field).is_none(), "{field} in {p}");
        }
        // All three classes (the default is 3), most probable first, each with its words.
        let top = p["top_classes"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{p}");
        assert_eq!(top[0]["class"], k);
        assert_eq!(top[0]["label"], TICKET_LABELS[k]);
        for pair in top.windows(2) {
            assert!(f(&pair[0]["probability"]) >= f(&pair[1]["probability"]));
        }
        for c in top {
            let class = c["class"].as_u64().unwrap() as usize;
            assert_eq!(c["label"], TICKET_LABELS[class]);
            assert!((f(&c["probability"]) - ps[class]).abs() < 1e-6);
            let words = c["words"].as_array().unwrap();
            assert!(words.len() <= 5);
            assert!(words.iter().all(|w| f(&w["weight"]) > 0.0), "{c}");
        }
        assert!(!p["highlight"].as_array().unwrap().is_empty());
    }
    // The words that decided are the class's own.
    let words = |p: &Value| common::strs(&p["top_classes"][0]["words"], "text").join(" ");
    let bug = words(&preds[0]);
    assert!(
        ["crashes", "error", "broken", "save"]
            .iter()
            .any(|w| bug.contains(w)),
        "{bug}"
    );
    let question = words(&preds[2]);
    assert!(
        ["how", "where", "password", "settings", "find"]
            .iter()
            .any(|w| question.contains(w)),
        "{question}"
    );

    // Fewer classes, fewer words, or none.
    let v = s
        .post_json(
            "/api/predict",
            &json!({ "text": FEATURE, "top_classes": 1, "top_k": 2 }),
        )
        .json();
    let top = v["predictions"][0]["top_classes"].as_array().unwrap();
    assert_eq!(top.len(), 1);
    assert_eq!(top[0]["label"], "feature");
    assert!(top[0]["words"].as_array().unwrap().len() <= 2);
    let v = s
        .post_json("/api/predict", &json!({ "text": FEATURE, "top_k": 0 }))
        .json();
    let p = &v["predictions"][0];
    assert!(p["top_classes"].as_array().unwrap().is_empty(), "{p}");
    assert_eq!(p["label"], "feature");
    probabilities(p, &TICKET_LABELS);
    let r = s.post_json(
        "/api/predict",
        &json!({ "text": FEATURE, "top_classes": 1000 }),
    );
    assert_eq!(r.status, 400);
    assert!(r.error().contains("top_classes"), "{}", r.text());
}

#[test]
fn three_class_open_inference_protocol_is_n_by_k() {
    let s = TestServer::start_tickets(|_| {});
    let m = s.get("/v2/models/fedimdb").json();
    assert_eq!(m["parameters"]["labels"], json!(TICKET_LABELS));
    assert_eq!(m["parameters"]["task"], TICKET_TASK);
    assert_eq!(m["parameters"]["classes"], 3);
    let outputs = m["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "{m}");
    assert_eq!(outputs[0]["name"], "probabilities");
    assert_eq!(outputs[0]["shape"], json!([-1, 3]));
    assert_eq!(outputs[0]["parameters"]["labels"], json!(TICKET_LABELS));

    let infer = "/v2/models/fedimdb/infer";
    let texts = json!([BUG, FEATURE, QUESTION, BUG]);
    let r = s.post_json(
        infer,
        &json!({ "inputs": [{ "name": "text", "shape": [4], "datatype": "BYTES", "data": texts }] }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let out = &r.json()["outputs"];
    assert_eq!(out.as_array().unwrap().len(), 1);
    assert_eq!(out[0]["name"], "probabilities");
    assert_eq!(out[0]["datatype"], "FP32");
    assert_eq!(out[0]["shape"], json!([4, 3]));
    let data: Vec<f64> = out[0]["data"].as_array().unwrap().iter().map(f).collect();
    assert_eq!(data.len(), 12);
    for (i, row) in data.chunks(3).enumerate() {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{row:?}");
        let best = (0..3).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
        assert_eq!(best, [0, 1, 2, 0][i], "row {i}: {row:?}");
    }

    // By name, [N, 1] input, binary output: 2 × 3 little-endian f32s after the JSON.
    let body = json!({
        "inputs": [{ "name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [[FEATURE], [QUESTION]] }],
        "outputs": [{ "name": "probabilities", "parameters": { "binary_data": true } }],
    });
    let r = s.post_json(infer, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let (head, raw) = r.binary_parts();
    assert_eq!(head["outputs"][0]["shape"], json!([2, 3]));
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 24);
    assert_eq!(raw.len(), 6);
    assert!(raw[1] > raw[0] && raw[1] > raw[2], "{raw:?}");
    assert!(raw[5] > raw[3] && raw[5] > raw[4], "{raw:?}");

    // The two-class output does not exist here: a 400 that says what to ask for.
    let r = s.post_json(
        infer,
        &json!({
            "inputs": [{ "name": "text", "shape": [1], "datatype": "BYTES", "data": [BUG] }],
            "outputs": [{ "name": "probability" }],
        }),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.error().contains("probabilities"), "{}", r.text());
}

#[test]
fn three_class_page_model_info_and_samples_use_the_card() {
    let s = TestServer::start_tickets(|_| {});
    let m = s.get("/api/model").json();
    assert_eq!(m["task"], TICKET_TASK);
    assert_eq!(m["labels"], json!(TICKET_LABELS));
    assert_eq!(m["classes"], 3);
    assert_eq!(m["multiclass"], "softmax");

    let html = s.get_text("/", "text/html");
    common::assert_contains_all(
        "the page",
        &html,
        &[
            "<title>fedimdb — support tickets</title>",
            "support tickets: which of bug, feature or question fits a text?",
            "data-task=\"support tickets\"",
            "<label for=\"review\">Text</label>",
            "Sample text",
        ],
    );
    assert!(!html.contains("{{"), "an unfilled place in the page");
    assert!(
        !html.to_lowercase().contains("movie review"),
        "a support-ticket page speaks of movie reviews"
    );

    for _ in 0..5 {
        let r = s.get("/api/sample");
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let k = v["class"].as_u64().unwrap() as usize;
        assert_eq!(v["label"], TICKET_LABELS[k], "{v}");
        assert_eq!(v["class_label"], TICKET_LABELS[k], "{v}");
        assert_eq!(v["rating"], 0);
    }
}

/// A two-class model answers what it always did, and the new fields beside.
#[test]
fn binary_models_keep_their_fields_and_gain_the_class_ones() {
    let s = TestServer::start(|_| {});
    let v = s
        .post_json("/api/predict", &json!({ "texts": [POSITIVE, NEGATIVE] }))
        .json();
    let labels = ["neg", "pos"];
    for (p, (label, class)) in v["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .zip([("positive", 1), ("negative", 0)])
    {
        assert_eq!(p["label"], label);
        assert_eq!(p["class"], class);
        assert_eq!(p["class_label"], labels[class]);
        let ps = probabilities(p, &labels);
        // `probability` is still the probability of positive, `logit` still there.
        assert!((f(&p["probability"]) - ps[1]).abs() < 1e-6);
        assert!(p["logit"].is_number());
        // top_positive is class 1's words, top_negative class 0's with their sign.
        let top = p["top_classes"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0]["class"], class);
        let pos = top.iter().find(|c| c["class"] == 1).unwrap();
        let neg = top.iter().find(|c| c["class"] == 0).unwrap();
        assert_eq!(pos["words"], p["top_positive"]);
        let flipped: Vec<f64> = neg["words"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| -f(&w["weight"]))
            .collect();
        let negative: Vec<f64> = p["top_negative"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| f(&w["weight"]))
            .collect();
        assert_eq!(flipped, negative);
        assert_eq!(
            common::strs(&neg["words"], "text"),
            common::strs(&p["top_negative"], "text")
        );
    }

    // Model info and metadata carry the (default) labels and task.
    let m = s.get("/api/model").json();
    assert_eq!(m["task"], "IMDB sentiment");
    assert_eq!(m["labels"], json!(labels));
    assert_eq!(m["classes"], 2);
    assert!(m.get("multiclass").is_none());
    let md = s.get("/v2/models/fedimdb").json();
    assert_eq!(md["parameters"]["labels"], json!(labels));
    let names: Vec<&str> = common::strs(&md["outputs"], "name");
    assert_eq!(names, ["probability", "probabilities"]);
    assert_eq!(md["outputs"][1]["shape"], json!([-1, 2]));

    // v2: `probability` by default, `probabilities` [N, 2] when asked, both in order.
    let infer = "/v2/models/fedimdb/infer";
    let input = json!([{ "name": "text", "shape": [2], "datatype": "BYTES", "data": [POSITIVE, NEGATIVE] }]);
    let out = s.post_json(infer, &json!({ "inputs": input })).json()["outputs"].clone();
    assert_eq!(common::strs(&out, "name"), ["probability"]);
    let r = s.post_json(
        infer,
        &json!({ "inputs": input, "outputs": [{ "name": "probability" }, { "name": "probabilities" }] }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let out = r.json()["outputs"].clone();
    assert_eq!(common::strs(&out, "name"), ["probability", "probabilities"]);
    assert_eq!(out[1]["shape"], json!([2, 2]));
    let one: Vec<f64> = out[0]["data"].as_array().unwrap().iter().map(f).collect();
    let two: Vec<f64> = out[1]["data"].as_array().unwrap().iter().map(f).collect();
    for i in 0..2 {
        assert!((two[2 * i + 1] - one[i]).abs() < 1e-6, "{one:?} {two:?}");
        assert!((two[2 * i] + two[2 * i + 1] - 1.0).abs() < 1e-6);
    }
    // Binary data of two outputs: each one's f32s, in the order of `outputs`.
    let r = s.post_json(
        infer,
        &json!({ "inputs": input, "parameters": { "binary_data_output": true }, "outputs": [{ "name": "probabilities" }, { "name": "probability", "parameters": { "binary_data": false } }] }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let (head, raw) = r.binary_parts();
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 16);
    assert_eq!(head["outputs"][1]["data"].as_array().unwrap().len(), 2);
    assert_eq!(
        raw.len(),
        4,
        "16 bytes: the four probabilities, nothing after"
    );
    let r = s.post_json(
        infer,
        &json!({ "inputs": input, "outputs": [{ "name": "probabilities" }, { "name": "probabilities" }] }),
    );
    assert_eq!(r.status, 400, "{}", r.text());

    // The page still speaks of movie reviews, positive and negative.
    let html = s.get_text("/", "text/html");
    common::assert_contains_all(
        "the page",
        &html,
        &[
            "<title>fedimdb — movie review sentiment</title>",
            "Is a movie review positive or negative?",
            "<label for=\"review\">Review text</label>",
            "Sample review",
        ],
    );
    let v = s.get("/api/sample").json();
    let k = v["class"].as_u64().unwrap() as usize;
    assert_eq!(v["label"], ["negative", "positive"][k]);
    assert_eq!(v["class_label"], labels[k]);
}

/// A binary model file of format 1 (written before K classes) still serves as IMDB
/// sentiment, and a K-class file served with `--model` (no published card) takes its labels
/// and task from its own header.
#[test]
fn format_1_binary_files_and_k_class_files_without_a_published_card() {
    let root = tempfile::tempdir().unwrap();
    let mut old = common::tiny_model(1, 1.0);
    old.header.format_version = fedimdb::checkpoint::FORMAT_VERSION_BINARY;
    common::publish(root.path(), &old);
    let s = TestServer::start_on(root, |_| {});
    let v = s
        .post_json("/api/predict", &json!({ "text": POSITIVE }))
        .json();
    let p = &v["predictions"][0];
    assert_eq!(
        (p["label"].as_str(), p["class_label"].as_str()),
        (Some("positive"), Some("pos"))
    );
    probabilities(p, &["neg", "pos"]);
    assert_eq!(s.get("/api/model").json()["task"], "IMDB sentiment");
    drop(s);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tickets.safetensors");
    common::ticket_model(4, 1.0).save(&path).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut c = server::Config::new(server::ModelSource::File(path));
    c.listen = "127.0.0.1:0".parse().unwrap();
    let srv = rt.block_on(server::start(c)).unwrap();
    let m = common::request(srv.addr, "GET", "/api/model", &[], b"").json();
    assert_eq!(m["labels"], json!(TICKET_LABELS));
    assert_eq!(m["task"], TICKET_TASK);
    let body = json!({ "text": QUESTION }).to_string();
    let r = common::request(
        srv.addr,
        "POST",
        "/api/predict",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    );
    assert_eq!(r.json()["predictions"][0]["label"], "question");
    rt.block_on(srv.stop()).unwrap();
}
