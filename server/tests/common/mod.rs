//! Helpers for the server tests: small models on a temporary volume, an in-process server on
//! 127.0.0.1:0, and a tiny HTTP/1.1 client over `TcpStream` (full control over bytes,
//! headers and timing, which the bad-input tests need; no client crate required).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use fedimdb::checkpoint::{Checkpoint, Header, Kind, ModelCard, RoundPoint};
use fedimdb::featurize::Featurizer;
use fedimdb::layout::Layout;
use fedimdb::model::{BIAS, ClassCounts, Model, ModelConfig, Multiclass, NB_RATIO, WEIGHT};
use fedimdb::reviews::Review;
use serde_json::Value;

pub const POSITIVE: &str =
    "A wonderful, moving film. I loved the great acting and the superb story!";
pub const NEGATIVE: &str = "An awful, boring film. I hated the terrible acting and the dull story.";

/// The 3-class test model's labels (class order), task, and one text of each class.
pub const TICKET_LABELS: [&str; 3] = ["bug", "feature", "question"];
pub const TICKET_TASK: &str = "support tickets";
pub const BUG: &str = "The app crashes with an error every time I click save. Broken!";
pub const FEATURE: &str = "Please add a dark mode option; support for export would be nice too.";
pub const QUESTION: &str = "How do I change my password? Where can I find the settings?";

/// A small naive-Bayes model (weights `scale`) counted from made-up reviews, as a model
/// file of round `round`.
pub fn tiny_model(round: u32, scale: f32) -> Checkpoint {
    model_file(ModelConfig::with_buckets(14, 2), round, scale)
}

/// A model file of round `round` with config `cfg`: naive-Bayes ratios counted from six
/// made-up reviews, every weight `weight` (negative: the model calls positive reviews
/// negative), bias 0.
pub fn model_file(cfg: ModelConfig, round: u32, weight: f32) -> Checkpoint {
    let mut f = Featurizer::new(cfg.featurizer);
    let pos = [
        "wonderful great film loved it",
        "superb moving story great acting",
        "loved this brilliant film",
    ];
    let neg = [
        "awful boring film hated it",
        "terrible dull story bad acting",
        "hated this waste of a film",
    ];
    let docs: Vec<Vec<u32>> = pos.iter().chain(&neg).map(|t| f.features(t)).collect();
    let counts = ClassCounts::count(2, cfg.dim(), &docs, &[1, 1, 1, 0, 0, 0]);
    let mut header = Header::new(Kind::Model, cfg, round);
    header.samples = 6;
    header.card = Some(card(round));
    let tensors = BTreeMap::from([
        (WEIGHT.to_owned(), vec![weight; cfg.dim()].into()),
        (BIAS.to_owned(), vec![0.0].into()),
        (
            NB_RATIO.to_owned(),
            counts.nb_ratio(cfg.nb_smoothing).into(),
        ),
    ]);
    Checkpoint {
        header,
        tensors,
        index: Vec::new(),
        sha256: String::new(),
    }
}

/// A 3-class model (softmax) of round `round`, labels [`TICKET_LABELS`], task
/// [`TICKET_TASK`]: naive-Bayes ratios counted from nine made-up support tickets, every
/// weight `weight`, the class prior as bias.
pub fn ticket_model(round: u32, weight: f32) -> Checkpoint {
    let cfg = ModelConfig::with_buckets(14, 2).with_classes(3, Multiclass::Softmax);
    let mut f = Featurizer::new(cfg.featurizer);
    let tickets = [
        ("the app crashes with an error when i click save", 0),
        (
            "crash on startup with a stack trace and an error message",
            0,
        ),
        ("the save button is broken and throws an exception", 0),
        ("please add a dark mode option", 1),
        ("it would be nice to support export to csv", 1),
        ("feature request: add keyboard shortcuts please", 1),
        ("how do i change my password?", 2),
        ("where can i find the settings?", 2),
        (
            "what is the difference between the plans? how do i upgrade?",
            2,
        ),
    ];
    let docs: Vec<Vec<u32>> = tickets.iter().map(|(t, _)| f.features(t)).collect();
    let labels: Vec<u8> = tickets.iter().map(|&(_, y)| y).collect();
    let counts = ClassCounts::count(3, cfg.dim(), &docs, &labels);
    let mut model = Model::from_counts(cfg, &counts);
    model.weight.fill(weight);
    let mut header = Header::new(Kind::Model, cfg, round);
    header.samples = tickets.len() as u64;
    header.card = Some(ModelCard {
        labels: TICKET_LABELS.map(str::to_owned).to_vec(),
        task: Some(TICKET_TASK.to_owned()),
        train_samples: tickets.len() as u64,
        ..card(round)
    });
    Checkpoint::from_model(model, header)
}

pub fn card(round: u32) -> ModelCard {
    ModelCard {
        workers: 2,
        partition: fedimdb::manifest::Partition::Iid,
        alpha: None,
        train_samples: 6,
        history: (1..=round.max(1))
            .map(|r| RoundPoint {
                round: r,
                test_accuracy: 0.7 + 0.01 * r as f64,
            })
            .collect(),
        metrics: BTreeMap::from([("accuracy".to_owned(), 0.7 + 0.01 * round as f64)]),
        ..ModelCard::default()
    }
}

/// Publishes a model the way the aggregator does: the model file, then the card naming its
/// sha256, both written atomically.
pub fn publish(root: &Path, ck: &Checkpoint) -> String {
    let layout = Layout::new(root);
    std::fs::create_dir_all(layout.model_dir()).unwrap();
    let sha = ck.save(&layout.latest_model()).unwrap();
    match &ck.header.card {
        // A card that names labels or a task is the model's own (K classes); the binary test
        // models are published with the plain card of their round, as always.
        Some(c) if !c.labels.is_empty() || c.task.is_some() => {
            write_card_of(root, c.clone(), ck.header.round, &sha)
        }
        _ => write_card(root, ck.header.round, &sha),
    }
    sha
}

/// Writes `model/latest.json` (atomically) for a model of `round` whose file has `sha256`:
/// after the model file, the aggregator's last step of publishing.
pub fn write_card(root: &Path, round: u32, sha256: &str) {
    write_card_of(root, card(round), round, sha256)
}

/// Writes `model/latest.json` (atomically): `card`, published for a model of `round` whose
/// file has `sha256`.
pub fn write_card_of(root: &Path, card: ModelCard, round: u32, sha256: &str) {
    let card = ModelCard {
        published: Some(fedimdb::checkpoint::Publication {
            round,
            sha256: sha256.to_owned(),
            trained_at: "2026-01-02T03:04:05Z".into(),
        }),
        ..card
    };
    fedimdb::atomic::write_json_atomic(&Layout::new(root).latest_card(), &card).unwrap();
}

/// Writes a small test set for `/api/sample`.
pub fn write_test_set(root: &Path) {
    let layout = Layout::new(root);
    std::fs::create_dir_all(layout.data_dir()).unwrap();
    let reviews = vec![
        Review {
            id: "test/pos/1_9".into(),
            rating: 9,
            label: 1,
            text: POSITIVE.into(),
        },
        Review {
            id: "test/neg/2_2".into(),
            rating: 2,
            label: 0,
            text: NEGATIVE.into(),
        },
    ];
    fedimdb::reviews::write_parquet(&layout.test_set(), &reviews).unwrap();
}

/// Writes a small test set of tickets (no ratings) for `/api/sample`.
pub fn write_ticket_test_set(root: &Path) {
    let layout = Layout::new(root);
    std::fs::create_dir_all(layout.data_dir()).unwrap();
    let reviews = [BUG, FEATURE, QUESTION]
        .iter()
        .enumerate()
        .map(|(k, t)| Review {
            id: format!("test/{k}"),
            rating: 0,
            label: k as u8,
            text: (*t).into(),
        })
        .collect::<Vec<_>>();
    fedimdb::reviews::write_parquet(&layout.test_set(), &reviews).unwrap();
}

/// A server running in-process on 127.0.0.1:0 over a temporary root.
pub struct TestServer {
    pub addr: SocketAddr,
    pub root: tempfile::TempDir,
    server: Option<server::Server>,
    rt: tokio::runtime::Runtime,
}

impl TestServer {
    /// A root holding a published tiny model (round 1) and a test set, served with
    /// `adjust` applied to the default config.
    pub fn start(adjust: impl FnOnce(&mut server::Config)) -> Self {
        let root = tempfile::tempdir().unwrap();
        publish(root.path(), &tiny_model(1, 1.0));
        write_test_set(root.path());
        Self::start_on(root, adjust)
    }

    /// A root holding the published 3-class [`ticket_model`] (round 1) and a test set of
    /// tickets.
    pub fn start_tickets(adjust: impl FnOnce(&mut server::Config)) -> Self {
        let root = tempfile::tempdir().unwrap();
        publish(root.path(), &ticket_model(1, 1.0));
        write_ticket_test_set(root.path());
        Self::start_on(root, adjust)
    }

    pub fn start_on(root: tempfile::TempDir, adjust: impl FnOnce(&mut server::Config)) -> Self {
        let mut config = server::Config::new(server::ModelSource::Root(root.path().to_path_buf()));
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.workers = 2;
        config.poll_ms = 50;
        adjust(&mut config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = rt.block_on(server::start(config)).expect("server starts");
        Self {
            addr: server.addr,
            root,
            server: Some(server),
            rt,
        }
    }

    pub fn state(&self) -> &std::sync::Arc<server::AppState> {
        &self.server.as_ref().unwrap().state
    }

    pub fn get(&self, path: &str) -> Resp {
        request(self.addr, "GET", path, &[], b"")
    }

    /// GET `path`, which must answer 200 with a body of `content_type`: the body.
    pub fn get_text(&self, path: &str, content_type: &str) -> String {
        let r = self.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        let got = r.header("content-type").unwrap_or_default();
        assert!(
            got.starts_with(content_type),
            "GET {path}: content type {got:?}"
        );
        r.text()
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Resp {
        request(
            self.addr,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    pub fn post_raw(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        request(self.addr, "POST", path, headers, body)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = self.rt.block_on(s.stop());
        }
    }
}

/// Asserts that `text` (`what`) contains every one of `needles`.
pub fn assert_contains_all(what: &str, text: &str, needles: &[&str]) {
    for needle in needles {
        assert!(text.contains(needle), "{what} lacks {needle}:\n{text}");
    }
}

/// The string `field` of every element of the JSON array `array`.
pub fn strs<'a>(array: &'a Value, field: &str) -> Vec<&'a str> {
    let items = array
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {array}"));
    items
        .iter()
        .map(|x| {
            x[field]
                .as_str()
                .unwrap_or_else(|| panic!("no string {field:?} in {x}"))
        })
        .collect()
}

/// A response: status, lower-cased headers, body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// A binary Open Inference Protocol answer: its JSON part (`Inference-Header-Content-Length`
    /// bytes) and the little-endian f32 values after it.
    pub fn binary_parts(&self) -> (Value, Vec<f32>) {
        let len: usize = self
            .header("inference-header-content-length")
            .expect("binary response header")
            .parse()
            .unwrap();
        let head = serde_json::from_slice(&self.body[..len]).unwrap();
        let rest = &self.body[len..];
        assert_eq!(rest.len() % 4, 0, "binary data of whole f32s");
        let values = rest
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (head, values)
    }
    /// The `error` message of a JSON error body (asserting there is one).
    pub fn error(&self) -> String {
        let v = self.json();
        v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message in {v}"))
            .to_owned()
    }
}

/// The bytes of one HTTP/1.1 request (with `Connection: close` if `close`).
pub fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if close {
        head += "Connection: close\r\n";
    }
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    head += "\r\n";
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    try_request(addr, method, path, headers, body).unwrap()
}

/// [`request`], with a connection that fails (refused, reset) an `Err` instead of a panic:
/// for polling a server that is still starting.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(&request_bytes(addr, method, path, headers, body, true))?;
    try_read_response(&mut s)
}

/// Where the head of a response ends (its `\r\n\r\n`), and its Content-Length if it has
/// one, once `raw` holds the whole head.
pub fn response_head(raw: &[u8]) -> Option<(usize, Option<usize>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    Some((end, length))
}

/// Reads one whole response: up to its Content-Length, else the end of a chunked body, else
/// until the peer closes (some servers, e.g. chromedriver, keep the connection open even
/// after `Connection: close`).
pub fn read_response(s: &mut TcpStream) -> Resp {
    try_read_response(s).unwrap()
}

/// [`read_response`], with a failed read an `Err`.
pub fn try_read_response(s: &mut TcpStream) -> std::io::Result<Resp> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        if let Some((end, length)) = response_head(&raw) {
            if let Some(n) = length
                && raw.len() >= end + 4 + n
            {
                break;
            }
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            if head.contains("transfer-encoding: chunked")
                && raw[end + 4..].windows(5).any(|w| w == b"0\r\n\r\n")
            {
                break;
            }
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    Ok(parse_response(&raw))
}

/// Parses one whole response, de-chunking a chunked body.
pub fn parse_response(raw: &[u8]) -> Resp {
    try_parse_response(raw).unwrap_or_else(|e| panic!("{e}"))
}

/// [`parse_response`], with every defect an `Err` instead of a panic.
pub fn try_parse_response(raw: &[u8]) -> Result<Resp, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no header end in {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&b[..nl]);
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[nl + 2 + size + 2..];
    }
    out
}
