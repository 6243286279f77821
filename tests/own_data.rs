//! Your own labeled text through the whole workflow: IMDB converted to CSV trains to the
//! archive's accuracy, a 2-label source with other names (spam/ham) trains end to end, and
//! data with more than two labels is sharded but refused, with one message, by every step
//! that trains or serves (the K-class model is not built yet).

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// `rows` as CSV with the header `text,label`, every text quoted.
fn csv(rows: &[(String, &str)]) -> String {
    let mut s = "text,label\n".to_owned();
    for (t, l) in rows {
        s.push_str(&format!("\"{}\",{l}\n", t.replace('"', "\"\"")));
    }
    s
}

/// The `split` reviews of `entries` in the copier's canonical order (neg then pos, by
/// number), labeled `neg`/`pos`.
fn canonical<'a>(entries: &'a [Entry], split: &str) -> Vec<(String, &'a str)> {
    let mut v: Vec<(&str, u64, String)> = entries
        .iter()
        .filter_map(|(name, bytes)| {
            let mut parts = name.split('/');
            let (s, folder, file) = (parts.next()?, parts.next()?, parts.next()?);
            let number = file.split('_').next()?.parse().ok()?;
            (s == split).then(|| (folder, number, String::from_utf8(bytes.clone()).unwrap()))
        })
        .collect();
    v.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    v.into_iter()
        .map(|(folder, _, text)| (text, if folder == "pos" { "pos" } else { "neg" }))
        .collect()
}

fn report(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The accuracy of each round of a run's report.
fn accuracies(report: &Value) -> Vec<f64> {
    report["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["test_accuracy"].as_f64().unwrap())
        .collect()
}

#[test]
fn imdb_as_csv_trains_to_the_archive_s_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let entries = synthetic(60);
    let archive = d.join("imdb.tar.gz");
    write_archive(&archive, &entries);
    std::fs::write(d.join("train.csv"), csv(&canonical(&entries, "train"))).unwrap();
    std::fs::write(d.join("test.csv"), csv(&canonical(&entries, "test"))).unwrap();

    let run = |source: &Path, name: &str, extra: &[&str]| -> Value {
        let path = d.join(format!("{name}.json"));
        run_ok(
            pipeline(source, &d.join(name), QUICK)
                .args(extra)
                .arg("--report")
                .arg(&path),
        );
        report(&path)
    };
    let from_archive = run(&archive, "archive", &[]);
    let test = d.join("test.csv");
    let from_csv = run(
        &d.join("train.csv"),
        "csv",
        &["--test", test.to_str().unwrap()],
    );
    // The same reviews in the same shards with the same labels: the same model, so the
    // same accuracy in every round, to the last bit.
    assert_eq!(accuracies(&from_archive), accuracies(&from_csv));
    assert_eq!(from_archive["test"], from_csv["test"]);
    assert!(
        from_csv["test_accuracy"].as_f64().unwrap() > 0.9,
        "{from_csv}"
    );
}

#[test]
fn two_labels_of_any_name_train_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // spam/ham: class 1 is "spam" (byte order), the label the model's probability is about.
    let rows: Vec<(String, &str)> = canonical(&synthetic(40), "train")
        .into_iter()
        .map(|(t, l)| (t, if l == "pos" { "spam" } else { "ham" }))
        .collect();
    std::fs::write(d.join("mail.csv"), csv(&rows)).unwrap();
    let root = d.join("vol");
    let path = d.join("report.json");
    run_ok(
        pipeline(&d.join("mail.csv"), &root, QUICK)
            .args(["--test-fraction", "0.25", "--report"])
            .arg(&path),
    );
    let manifest = fedimdb::manifest::DataManifest::read(&root.join("data/manifest.json")).unwrap();
    assert_eq!(manifest.labels, ["ham", "spam"]);
    assert_eq!(manifest.test.label_counts, [10, 10]);
    assert!(report(&path)["test_accuracy"].as_f64().unwrap() > 0.9);
}

#[test]
fn three_labels_are_sharded_then_refused_by_every_training_step() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rows: Vec<(String, &str)> = (0..30)
        .map(|i| (format!("text {i}"), ["red", "green", "blue"][i % 3]))
        .collect();
    let source = d.join("colors.csv");
    std::fs::write(&source, csv(&rows)).unwrap();
    let root = d.join("vol");
    run_ok(
        bin("copier")
            .arg("--source")
            .arg(&source)
            .arg("--out")
            .arg(&root)
            .args(["--workers", "2", "--test-fraction", "0.2"]),
    );
    let manifest = fedimdb::manifest::DataManifest::read(&root.join("data/manifest.json")).unwrap();
    assert_eq!(manifest.labels, ["blue", "green", "red"]);
    assert_eq!(manifest.test.label_counts, [2, 2, 2]);
    let sharded: Vec<usize> = (0..3)
        .map(|c| manifest.shards.iter().map(|e| e.label_counts[c]).sum())
        .collect();
    assert_eq!(sharded, [8, 8, 8]);

    let message = [
        "has 3 labels (blue, green, red)",
        "K-class model is not built yet",
    ];
    let refused = |cmd: &mut std::process::Command, who: &str| {
        let (out, log) = run(cmd);
        assert!(!out.status.success(), "{who} accepted 3 labels: {log}");
        for m in message {
            assert!(log.contains(m), "{who}: {log}");
        }
    };
    refused(&mut trainer(&root, 0, 0), "trainer");
    refused(&mut aggregator(&root, 0), "aggregator");
    refused(bin("server").arg("--root").arg(&root), "server");
    refused(
        &mut pipeline(&source, &d.join("p"), &["--test-fraction", "0.2"]),
        "pipeline local",
    );
    assert!(!d.join("p/rounds").exists(), "no trainer started");
    // The loose form reads a shard without a manifest: the same refusal.
    let shard = root.join("data/shard-00000.parquet");
    let (out, log) = run(bin("trainer")
        .arg("--data")
        .arg(&shard)
        .args(["--epoch", "1", "--batch", "1", "--savemodel"])
        .arg(d.join("m.safetensors")));
    assert!(
        !out.status.success() && log.contains("K-class model is not built yet"),
        "{log}"
    );
    // IMDB's rating task is refused by the pipeline before anything runs.
    let (out, log) = run(&mut pipeline(&source, &d.join("r"), &["--task", "rating"]));
    assert!(
        !out.status.success() && log.contains("--task rating has 8 labels"),
        "{log}"
    );
    assert!(!d.join("r/data").exists());
}
