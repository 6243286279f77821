//! Your own labeled text through the whole workflow: IMDB converted to CSV trains to the
//! archive's accuracy, a 2-label source with other names (spam/ham) trains end to end, and
//! a three-label source (bug/feature/question tickets) trains a K-class model: through
//! `pipeline local` with each link, each aggregation strategy, a quorum that goes on
//! without a failed trainer, a resumed re-run and a second run giving the same model. IMDB's
//! 8-class rating task is no longer refused.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

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
    std::fs::write(d.join("train.csv"), to_csv(&canonical(&entries, "train"))).unwrap();
    std::fs::write(d.join("test.csv"), to_csv(&canonical(&entries, "test"))).unwrap();

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
    std::fs::write(d.join("mail.csv"), to_csv(&rows)).unwrap();
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

/// Training flags of the three-class toy runs: short rounds on 2^12 buckets, a fifth of the
/// tickets held out for the test set.
const TOY: &[&str] = &[
    "--epochs",
    "2",
    "--hash-bits",
    "12",
    "--test-fraction",
    "0.2",
];

/// The lowest test accuracy the toy tickets must reach (chance is 1/3; the runs reach
/// about 0.97).
const TOY_ACCURACY: f64 = 0.85;

/// Writes `dir/tickets.csv` ([`tickets`]`(100)`: 300 tickets) and returns it.
fn tickets_csv(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tickets.csv");
    std::fs::write(&path, to_csv(&tickets(100))).unwrap();
    path
}

/// `pipeline local` of the toy `source` into `root` with [`TOY`] and `extra`, which must
/// succeed; returns its `--report` and stdout.
fn toy_run(source: &Path, root: &Path, extra: &[&str]) -> (Value, String) {
    let path = root.with_extension("report.json");
    let (out, _) = run_ok(
        pipeline(source, root, TOY)
            .args(extra)
            .arg("--report")
            .arg(&path),
    );
    (
        report(&path),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Checks a three-class toy run's outcome: its accuracy, the published card's labels, the
/// model file's 3 rows, macro-F1 in every round's report; returns the final accuracy.
fn assert_three_class_model(root: &Path, run: &Value, what: &str) -> f64 {
    let accuracy = run["test_accuracy"].as_f64().unwrap();
    assert!(
        accuracy > TOY_ACCURACY,
        "{what}: test accuracy {accuracy}: {run}"
    );
    let layout = fedimdb::layout::Layout::new(root);
    let card: Value =
        serde_json::from_slice(&std::fs::read(layout.latest_card()).unwrap()).unwrap();
    assert_eq!(
        card["labels"],
        serde_json::json!(TICKET_LABELS),
        "{what}: {card}"
    );
    let ck = fedimdb::checkpoint::Checkpoint::load(&layout.latest_model()).unwrap();
    assert_eq!(ck.header.config.classes, 3, "{what}");
    assert_eq!(ck.header.config.rows(), 3, "{what}");
    assert_eq!(ck.tensors[fedimdb::model::BIAS].len(), 3, "{what}");
    assert_eq!(ck.tensors[fedimdb::model::WEIGHT].len(), 3 << 12, "{what}");
    let header_card = ck.header.card.expect("the model file's card");
    assert_eq!(header_card.labels, TICKET_LABELS, "{what}");
    // Every round's report (and the run's) has the macro-F1 of its model; trained rounds
    // score well on it.
    for round in 0..=ROUNDS {
        let r = report(&layout.round_report(round));
        let f1 = r["test"]["macro_f1"].as_f64();
        assert!(f1.is_some(), "{what}: round {round}: {r}");
        if round == 0 {
            // The statistics round's model is untrained (zero weights, the classes' prior
            // biases): chance on the balanced test set.
            let a = r["test"]["accuracy"].as_f64().unwrap();
            assert!(a < 0.5, "{what}: round 0 accuracy {a}");
        }
        if round == ROUNDS {
            assert!(f1.unwrap() > TOY_ACCURACY - 0.05, "{what}: {r}");
        }
    }
    assert!(
        run["test"]["macro_f1"].as_f64().unwrap() > TOY_ACCURACY - 0.05,
        "{what}: {run}"
    );
    accuracy
}

#[test]
fn three_labels_train_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let source = tickets_csv(d);
    let root = d.join("vol");
    let (run, _) = toy_run(&source, &root, &[]);
    let manifest = fedimdb::manifest::DataManifest::read(&root.join("data/manifest.json")).unwrap();
    assert_eq!(manifest.labels, TICKET_LABELS);
    assert_eq!(manifest.test.label_counts, [20, 20, 20]);
    let sharded: Vec<usize> = (0..3)
        .map(|c| manifest.shards.iter().map(|e| e.label_counts[c]).sum())
        .collect();
    assert_eq!(sharded, [80, 80, 80]);
    let accuracy = assert_three_class_model(&root, &run, "one-vs-rest");
    eprintln!("three labels, one-vs-rest: test accuracy {accuracy}");
    let card: Value = serde_json::from_slice(
        &std::fs::read(fedimdb::layout::Layout::new(&root).latest_card()).unwrap(),
    )
    .unwrap();
    assert_eq!(card["task"], "tickets.csv", "{card}");
    let ck = fedimdb::checkpoint::Checkpoint::load(&root.join("model/latest.safetensors")).unwrap();
    assert_eq!(
        ck.header.config.multiclass,
        Some(fedimdb::model::Multiclass::OneVsRest),
        "one-vs-rest is the default link"
    );
}

/// `--multiclass softmax` trains the toy too (read from JSON lines this time), and so do the
/// robust strategies, median and trimmed mean, with either link.
#[test]
fn three_labels_train_softmax_and_with_every_strategy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let jsonl = d.join("tickets.jsonl");
    std::fs::write(&jsonl, to_jsonl(&tickets(100))).unwrap();
    let csv = tickets_csv(d);
    for (source, name, extra) in [
        (&jsonl, "softmax", &["--multiclass", "softmax"][..]),
        (&csv, "median", &["--strategy", "median"][..]),
        (
            &csv,
            "trimmed",
            &["--strategy", "trimmed-mean", "--trim", "0.2"][..],
        ),
        (
            &jsonl,
            "softmax-median",
            &["--multiclass", "softmax", "--strategy", "median"][..],
        ),
    ] {
        let root = d.join(name);
        let (run, _) = toy_run(source, &root, extra);
        let accuracy = assert_three_class_model(&root, &run, name);
        eprintln!("three labels, {name}: test accuracy {accuracy}");
        let ck =
            fedimdb::checkpoint::Checkpoint::load(&root.join("model/latest.safetensors")).unwrap();
        let link = if name.starts_with("softmax") {
            fedimdb::model::Multiclass::Softmax
        } else {
            fedimdb::model::Multiclass::OneVsRest
        };
        assert_eq!(ck.header.config.multiclass, Some(link), "{name}");
        if let Some(strategy) = extra.iter().position(|a| *a == "--strategy") {
            let r = report(&fedimdb::layout::Layout::new(&root).round_report(ROUNDS));
            let expected = if extra[strategy + 1] == "median" {
                "median"
            } else {
                "trimmed-mean(0.2)"
            };
            assert_eq!(r["strategy"], expected, "{r}");
        }
    }
}

/// K classes under a quorum (a trainer of round 1 dies; the round goes on without it), a
/// re-run that keeps every verified step, and two runs with the same seed publishing the
/// same model file, byte for byte.
#[test]
fn three_labels_under_a_quorum_resume_and_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let source = tickets_csv(d);
    let all: Vec<u32> = (0..=ROUNDS).collect();

    // The quorum: the trainer of round 1, shard 2, dies after writing its update.
    let quorum = d.join("quorum");
    let (out, log) = run(pipeline(&source, &quorum, TOY)
        .args(["--min-workers", "2"])
        .env(fedimdb::fault::ENV, "trainer:1:2:update-written"));
    assert!(out.status.success(), "{log}");
    let layout = fedimdb::layout::Layout::new(&quorum);
    let r1 = report(&layout.round_report(1));
    assert_eq!(r1["missing"], serde_json::json!([2]), "{log}");
    let model = std::fs::read(layout.latest_model()).unwrap();
    let (again, stdout) = toy_run(&source, &quorum, &["--min-workers", "2"]);
    assert_eq!(kept_rounds(&stdout), all, "{stdout}");
    assert!(
        stdout.contains("(no update: left out under the quorum)"),
        "{stdout}"
    );
    assert_eq!(std::fs::read(layout.latest_model()).unwrap(), model);
    assert_three_class_model(&quorum, &again, "quorum");

    // Two clean runs with the same seed, and a re-run of the first.
    let (a, b) = (d.join("a"), d.join("b"));
    let seed = ["--seed", "7"];
    let (first, _) = toy_run(&source, &a, &seed);
    assert_three_class_model(&a, &first, "seed 7");
    let (second, _) = toy_run(&source, &b, &seed);
    let (la, lb) = (
        fedimdb::layout::Layout::new(&a),
        fedimdb::layout::Layout::new(&b),
    );
    let bytes = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    assert!(
        bytes(la.latest_model()) == bytes(lb.latest_model()),
        "two runs with the same seed published different model files"
    );
    assert!(bytes(la.global_model(ROUNDS)) == bytes(lb.global_model(ROUNDS)));
    assert_eq!(first["test"], second["test"]);
    let published = bytes(la.latest_model());
    let (out, log) = run_ok(&mut pipeline(&source, &a, &[TOY, &seed[..]].concat()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(kept_rounds(&stdout), all, "{log}");
    assert!(log.contains("up to date"), "{log}");
    assert!(
        bytes(la.latest_model()) == published,
        "the re-run changed the model"
    );
}

/// IMDB's 8-class rating task (the star rating in each review's file name) trains: a tiny
/// archive, one short round.
#[test]
fn the_rating_task_trains_an_eight_class_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let archive = synthetic_archive(d, 20);
    let root = d.join("vol");
    run_ok(&mut pipeline(
        &archive,
        &root,
        &["--task", "rating", "--epochs", "1", "--hash-bits", "12"],
    ));
    let layout = fedimdb::layout::Layout::new(&root);
    let card: Value =
        serde_json::from_slice(&std::fs::read(layout.latest_card()).unwrap()).unwrap();
    assert_eq!(
        card["labels"],
        serde_json::json!(["1", "2", "3", "4", "7", "8", "9", "10"]),
        "{card}"
    );
    assert_eq!(card["task"], "IMDB rating", "{card}");
    let ck = fedimdb::checkpoint::Checkpoint::load(&layout.latest_model()).unwrap();
    assert_eq!(ck.tensors[fedimdb::model::BIAS].len(), 8);
    assert!(report(&layout.round_report(ROUNDS))["test"]["macro_f1"].is_number());
}

/// IMDB's rating task on the shared archive, all 50,000 real reviews: 3 workers and 2 rounds
/// of a small model (2^16 buckets, 3,000 steps) already beat the largest rating's share of
/// the test set (about 20%) by far, and the card and reports speak of the eight ratings.
#[test]
fn the_rating_task_on_the_shared_archive_learns_the_eight_ratings() {
    let Some(archive) = shared_archive() else {
        eprintln!("skipped: the shared archive ../shared/data/aclImdb-labeled.tar.gz is absent");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("vol");
    run_ok(&mut pipeline(
        &archive,
        &root,
        &["--task", "rating", "--hash-bits", "16", "--steps", "3000"],
    ));
    let layout = fedimdb::layout::Layout::new(&root);
    let test = &report(&layout.round_report(ROUNDS))["test"];
    let (accuracy, macro_f1) = (
        test["accuracy"].as_f64().unwrap(),
        test["macro_f1"].as_f64().unwrap(),
    );
    assert_eq!(test["samples"], 25_000, "{test}");
    // The most common rating (1 star) is a fifth of the test set: a model that had not
    // learned would predict it alone, at 0.20 accuracy and a macro-F1 of about 0.04 (one
    // class's F1 of 0.33, over eight), and one that mixed up the classes' rows lower still.
    // This small, short run reaches about 0.36 and 0.14.
    assert!(accuracy > 0.3, "{test}");
    assert!(macro_f1 > 0.1 && macro_f1 < accuracy, "{test}");
    let card: Value =
        serde_json::from_slice(&std::fs::read(layout.latest_card()).unwrap()).unwrap();
    assert_eq!(card["task"], "IMDB rating", "{card}");
    assert_eq!(card["labels"].as_array().unwrap().len(), 8, "{card}");
}
