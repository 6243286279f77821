//! The page in a real browser: headless Chromium driven over the W3C WebDriver protocol
//! (spoken directly to chromedriver as JSON over HTTP, no client crate) types a review,
//! predicts with the button and with Ctrl+Enter, and reads the verdict, the highlighted
//! words and the model panel. Skips with a notice when chromium or chromedriver is not
//! installed (CI installs both: see .ci/run).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{NEGATIVE, POSITIVE, TestServer};
use serde_json::{Value, json};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names
        .iter()
        .flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// Kills chromedriver however the test ends, even if it fails before a session exists.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Driver {
    addr: SocketAddr,
    _child: KillOnDrop,
    session: String,
    _profile: tempfile::TempDir,
}

impl Driver {
    /// A browser session on the page the server at `addr` serves.
    fn open(chromium: &PathBuf, chromedriver: &PathBuf, addr: SocketAddr) -> Self {
        let d = Self::start(chromium, chromedriver);
        d.cmd(
            "POST",
            "/url",
            Some(&json!({ "url": format!("http://{addr}/") })),
        );
        d
    }

    fn start(chromium: &PathBuf, chromedriver: &PathBuf) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let child = KillOnDrop(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // While it starts, chromedriver may accept a connection and then reset it:
            // that is "not ready yet", not a failure.
            let status = common::try_request(addr, "GET", "/status", &[], b"")
                .ok()
                .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok());
            if status.is_some_and(|v| v["value"]["ready"] == true) {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,900",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let caps = json!({ "capabilities": { "alwaysMatch": { "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args } } } });
        let v = call(addr, "POST", "/session", Some(&caps));
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_owned();
        Self {
            addr,
            _child: child,
            session,
            _profile: profile,
        }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let v = call(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        );
        assert!(v["value"].get("error").is_none(), "{method} {path}: {v}");
        v["value"].clone()
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(&json!({ "using": "css selector", "value": css })),
        );
        v[ELEMENT].as_str().unwrap().to_owned()
    }

    fn text(&self, css: &str) -> String {
        let id = self.find(css);
        self.cmd("GET", &format!("/element/{id}/text"), None)
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    fn wait_text(&self, css: &str, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let t = self.text(css);
            if cond(&t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {what}; {css} says {t:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = call(
            self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        // `_child` is killed when it drops, after this.
    }
}

fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Value {
    // WebDriver POSTs always carry a JSON object, if only `{}`.
    let body = body.map(|b| b.to_string()).unwrap_or_else(|| {
        if method == "POST" {
            "{}".into()
        } else {
            String::new()
        }
    });
    let headers: &[(&str, &str)] = if body.is_empty() {
        &[]
    } else {
        &[("Content-Type", "application/json")]
    };
    let r = common::request(addr, method, path, headers, body.as_bytes());
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

/// Chromium and chromedriver, or a notice and `None`.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let (Some(chromium), Some(chromedriver)) = (
        find_program(&["chromium", "chromium-browser", "google-chrome"]),
        find_program(&["chromedriver"]),
    ) else {
        eprintln!(
            "NOTICE: skipping the browser test: chromium and chromedriver are not both installed (apt-get install chromium chromium-driver)"
        );
        return None;
    };
    Some((chromium, chromedriver))
}

#[test]
fn page_predicts_in_a_real_browser() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let s = TestServer::start(|_| {});
    let d = Driver::open(&chromium, &chromedriver, s.addr);

    // The model panel fills in from /api/model.
    let facts = d.wait_text("#model-facts", "the model panel", |t| t.contains("Workers"));
    assert!(facts.contains("iid"), "{facts}");
    assert!(!d.find("#chart svg").is_empty());

    // Type a review, click Predict.
    let review = d.find("#review");
    d.cmd(
        "POST",
        &format!("/element/{review}/value"),
        Some(&json!({ "text": POSITIVE })),
    );
    let predict = d.find("#predict");
    d.cmd("POST", &format!("/element/{predict}/click"), None);
    let verdict = d.wait_text("#verdict", "a positive verdict", |t| t.contains("Positive"));
    assert!(verdict.contains('%'), "{verdict}");
    let marks = d.cmd(
        "POST",
        "/elements",
        Some(&json!({ "using": "css selector", "value": "#highlighted mark" })),
    );
    assert!(
        !marks.as_array().unwrap().is_empty(),
        "no highlighted words"
    );
    assert!(
        d.text("#top-pos").contains("wonderful")
            || d.text("#top-pos").contains("loved")
            || d.text("#top-pos").contains("great")
    );

    // Replace it with a negative review and predict from the keyboard: Ctrl+Enter.
    d.cmd("POST", &format!("/element/{review}/clear"), None);
    let keys = format!("{NEGATIVE}\u{E009}\u{E007}\u{E000}");
    d.cmd(
        "POST",
        &format!("/element/{review}/value"),
        Some(&json!({ "text": keys })),
    );
    d.wait_text("#verdict", "a negative verdict", |t| t.contains("Negative"));

    // The sample button fills in a test review.
    let sample = d.find("#sample");
    d.cmd("POST", &format!("/element/{sample}/click"), None);
    d.wait_text("#verdict", "the sample notice", |t| {
        t.contains("Sample review")
    });
    let value = d.cmd("GET", &format!("/element/{review}/property/value"), None);
    assert!(
        [POSITIVE, NEGATIVE].contains(&value.as_str().unwrap()),
        "{value}"
    );
}

/// A 3-class model's page: its task and labels, the top classes with their probabilities,
/// and the words toward each.
#[test]
fn page_shows_the_top_classes_of_a_k_class_model() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    let s = TestServer::start_tickets(|_| {});
    let d = Driver::open(&chromium, &chromedriver, s.addr);
    let facts = d.wait_text("#model-facts", "the model panel", |t| t.contains("Workers"));
    assert!(
        facts.contains(common::TICKET_TASK) && facts.contains("bug, feature, question"),
        "{facts}"
    );
    assert!(
        d.text("header")
            .contains("which of bug, feature or question")
    );

    let review = d.find("#review");
    d.cmd(
        "POST",
        &format!("/element/{review}/value"),
        Some(&json!({ "text": common::BUG })),
    );
    let predict = d.find("#predict");
    d.cmd("POST", &format!("/element/{predict}/click"), None);
    let verdict = d.wait_text("#verdict", "a bug verdict", |t| t.starts_with("Bug"));
    // The three classes, each with its probability.
    for label in common::TICKET_LABELS {
        assert!(verdict.contains(label), "{verdict}");
    }
    assert_eq!(verdict.matches('%').count(), 4, "{verdict}");
    let words = d.text("#words");
    assert!(words.contains("Pushed toward bug"), "{words}");
    assert!(words.contains("Pushed toward question"), "{words}");
    assert!(!d.text("#top-class-0").is_empty());

    let sample = d.find("#sample");
    assert_eq!(d.text("#sample"), "Sample text");
    d.cmd("POST", &format!("/element/{sample}/click"), None);
    let notice = d.wait_text("#verdict", "the sample notice", |t| {
        t.contains("Sample text")
    });
    assert!(!notice.contains("rated"), "{notice}");
    assert!(
        common::TICKET_LABELS
            .iter()
            .any(|l| notice.contains(&format!("labelled {l}"))),
        "{notice}"
    );
}
