//! Learning under label skew, through the real binaries on real reviews: a split where each
//! worker holds almost only one label. Plain FedAvg (`--algorithm fedavg`) drifts with its
//! workers and falls far below centralized training; the default (SCAFFOLD from the
//! naive-Bayes start, with the exact gradients there from its gradient round, and the
//! server's Adam step) stays close to it, though it spends one of the three rounds on the
//! gradients. Deterministic: same seeds, same bytes.

mod common;

use common::{bin, real_subset, run, write_archive};
use serde_json::Value;

/// Test accuracy of `pipeline local` with `flags` on `archive`, in percent.
fn accuracy(archive: &std::path::Path, dir: &std::path::Path, name: &str, flags: &[&str]) -> f64 {
    let root = dir.join(name);
    let report = dir.join(format!("{name}.json"));
    let (out, log) = run(bin("pipeline")
        .args(["local", "--rounds", "3", "--hash-bits", "18", "--jobs", "2"])
        .args(flags)
        .arg("--source")
        .arg(archive)
        .arg("--root")
        .arg(&root)
        .arg("--report")
        .arg(&report));
    assert!(out.status.success(), "pipeline {flags:?} failed:\n{log}");
    let r: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    r["test_accuracy"].as_f64().unwrap() * 100.0
}

#[test]
fn scaffold_holds_under_label_skew_where_fedavg_fails() {
    let Some(entries) = real_subset(1000) else {
        eprintln!(
            "note: shared archive absent; skipping the label-skew test (it needs real reviews)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("skew.tar.gz");
    write_archive(&archive, &entries);
    let skew = [
        "--workers",
        "4",
        "--partition",
        "dirichlet",
        "--alpha",
        "0.1",
    ];
    let centralized = accuracy(&archive, dir.path(), "central", &["--workers", "1"]);
    let fedavg = accuracy(
        &archive,
        dir.path(),
        "fedavg",
        &[&skew[..], &["--algorithm", "fedavg"]].concat(),
    );
    let default = accuracy(&archive, dir.path(), "default", &skew);
    eprintln!(
        "centralized {centralized:.2}%, skewed FedAvg {fedavg:.2}%, skewed default {default:.2}%"
    );
    assert!(
        centralized > 75.0,
        "centralized training itself is broken: {centralized:.2}%"
    );
    assert!(
        fedavg < centralized - 5.0,
        "plain FedAvg was expected to fail on this split: {fedavg:.2}% vs {centralized:.2}%"
    );
    assert!(
        default > centralized - 2.0,
        "the default lost {:.2} points to centralized",
        centralized - default
    );
    // The same run again gives the same model, bit for bit.
    let again = accuracy(&archive, dir.path(), "default-again", &skew);
    assert_eq!(again, default);
    let sha = |name: &str| {
        fedimdb::digest::sha256_file(&dir.path().join(name).join("model/latest.safetensors"))
            .unwrap()
    };
    assert_eq!(sha("default"), sha("default-again"));
}
