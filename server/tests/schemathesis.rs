//! Schemathesis (PyPI `schemathesis`, 4.x) against the real `server` binary's `/openapi.json`:
//! property-based requests generated from the document (valid ones, and invalid ones that
//! must be refused), every response checked against it. Zero findings are allowed: no 5xx, no
//! response off its schema, no undocumented status code, content type or header, no invalid
//! request accepted, no valid one refused.
//!
//! `.ci/run` installs schemathesis in `$HOME/.cache/fedimdb/venv`; elsewhere the tests skip
//! with a notice unless `FEDIMDB_PYTHON` names a Python that has it.
//! `FEDIMDB_SCHEMATHESIS_EXAMPLES` (default 300 per operation and phase, a fifth of that in the
//! run without a model) and `FEDIMDB_SCHEMATHESIS_SEED` (default 1) change the run; the seed
//! is fixed so that CI is reproducible (about a minute on two cores).

mod common;
#[path = "common/process.rs"]
mod process;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use process::ServerProcess;

/// Every operation in `static/openapi.json` (a test in `api.rs` checks it matches the router).
const OPERATIONS: usize = 16;

/// Checks that cannot hold for one part of the API, each with the reason. Everything else
/// runs: `schemathesis run` without `--checks` runs every check, and a `--checks` option
/// would override this file.
const CONFIG: &str = r#"
# negative_data_rejection: a request the schema forbids must be refused. Refusals are 4xx,
# but the check's default list lacks 413, the documented answer to more than --max-texts texts
# (the schema's maxItems) or a body over the size limit; 413 is added to its defaults, as a
# refusal. (5xx stays in the list as in the defaults: not_a_server_error fails those.)
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

[[operations]]
include-path-regex = "/infer$"
# positive_data_acceptance asks that every request the schema allows be accepted. An Open
# Inference Protocol infer request has a rule JSON Schema cannot state: the number of texts in
# `data` must equal the shape's first dimension (and a second dimension must be 1), so a
# schema-valid body with shape [2] and one text is rightly refused with 400. The check is off
# for the two infer operations only; negative_data_rejection and the response checks still
# run on them, and tests/v2.rs covers the shape rules.
checks.positive_data_acceptance.enabled = false
"#;

/// Before the first model is published every route that needs a model answers 503 with
/// `Retry-After` (documented per route, and the readiness contract KServe servers follow), which
/// not_a_server_error would count as a server error; in that run, and only there, 503 is expected.
const CONFIG_NO_MODEL: &str = r#"
[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "503"]
"#;

/// The Python with schemathesis 4.x, or `None` after printing why the test skips.
fn python() -> Option<PathBuf> {
    let python = std::env::var_os("FEDIMDB_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/fedimdb/venv/bin/python"))
        })
        .filter(|p| p.is_file());
    let version = python.as_ref().and_then(|p| {
        let out = Command::new(p)
            .args(["-c", "import schemathesis; print(schemathesis.__version__)"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    match (python, version) {
        (Some(p), Some(v))
            if v.split('.')
                .next()
                .and_then(|m| m.parse::<u32>().ok())
                .is_some_and(|m| m >= 4) =>
        {
            Some(p)
        }
        (_, Some(v)) => {
            eprintln!(
                "SKIP: schemathesis {v} is installed, these tests need 4.x (.ci/run installs it)"
            );
            None
        }
        _ => {
            eprintln!(
                "SKIP: schemathesis is not installed; skipping the schemathesis tests (.ci/run installs it in $HOME/.cache/fedimdb/venv)"
            );
            None
        }
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs schemathesis against the server on `root` and asserts it found nothing.
fn run(python: &Path, root: &Path, config: &str, examples: u64, serving: bool) {
    let what = if serving {
        "model serving"
    } else {
        "no model yet"
    };
    let work = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(root, work.path().join("server.log"), &[]);
    std::fs::write(work.path().join("schemathesis.toml"), config).unwrap();
    let seed = env_or("FEDIMDB_SCHEMATHESIS_SEED", 1);
    let t = Instant::now();
    // In a temporary folder: schemathesis and hypothesis keep caches in the working folder.
    let out = Command::new(python)
        .current_dir(work.path())
        .args([
            "-m",
            "schemathesis.cli",
            "--config-file",
            "schemathesis.toml",
            "run",
        ])
        .arg(format!("http://{}/openapi.json", server.addr))
        .args([
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--max-examples",
            &examples.to_string(),
        ])
        .args([
            "--seed",
            &seed.to_string(),
            "--generation-database",
            "none",
            "--request-timeout",
            "30",
        ])
        .args(["--continue-on-failure", "--no-color"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let seconds = t.elapsed().as_secs_f64();
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let closing = log
        .lines()
        .rev()
        .find(|l| l.starts_with("===="))
        .unwrap_or_default()
        .to_owned();
    let summary = |label: &str| {
        log.lines()
            .skip_while(|l| !l.trim_start().starts_with(label))
            .nth(1)
            .map(|l| l.trim().to_owned())
    };
    let cases = summary("Test cases:").unwrap_or_default();
    let tested = summary("API Operations:").and_then(|_| {
        log.lines()
            .find_map(|l| l.trim().strip_prefix("Tested: "))
            .map(str::to_owned)
    });
    println!(
        "schemathesis ({what}): {} operations tested, test cases: {cases}, {seconds:.1} s (--max-examples {examples}, --seed {seed})",
        tested.as_deref().unwrap_or("?")
    );
    assert!(
        // The closing line reads "No issues found in …", or "N warnings in …" when schemathesis
        // has advice (such as "operations repeatedly returned 404" for unknown model names);
        // failures and errors make it exit non-zero and are named there too.
        out.status.success()
            && closing.contains(" in ")
            && !closing.contains("failure")
            && !closing.contains("error"),
        "schemathesis found problems ({what}, exit {}):\n{log}\n--- server log ---\n{}",
        out.status,
        server.log_text()
    );
    assert_eq!(
        tested.as_deref(),
        Some(OPERATIONS.to_string().as_str()),
        "not every operation was tested:\n{log}"
    );
    let server_log = server.log_text();
    assert!(
        !server_log.contains("panicked"),
        "the server panicked:\n{server_log}"
    );
    // A 5xx is logged as "request failed"; with a model serving there must be none.
    assert!(
        !serving || !server_log.contains("request failed"),
        "the server logged a failed request:\n{server_log}"
    );
}

#[test]
fn schemathesis_finds_nothing_against_a_serving_model() {
    let Some(python) = python() else { return };
    let root = tempfile::tempdir().unwrap();
    common::publish(root.path(), &common::tiny_model(1, 1.0));
    common::write_test_set(root.path());
    run(
        &python,
        root.path(),
        CONFIG,
        env_or("FEDIMDB_SCHEMATHESIS_EXAMPLES", 300),
        true,
    );
}

#[test]
fn schemathesis_finds_nothing_before_a_model_is_published() {
    let Some(python) = python() else { return };
    let root = tempfile::tempdir().unwrap();
    let examples = env_or("FEDIMDB_SCHEMATHESIS_EXAMPLES", 300).div_ceil(5);
    run(
        &python,
        root.path(),
        &format!("{CONFIG}\n{CONFIG_NO_MODEL}"),
        examples,
        false,
    );
}
