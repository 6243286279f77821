//! The whole workflow on a reduced dataset: pipeline local drives copier, trainers and
//! aggregator as processes; the result is checked file by file and number by number.

mod common;

use common::{
    aggregator, bin, pipeline, run_ok, small_archive, step, synthetic_archive, synthetic_volume,
    temp_files,
};
use fedimdb::checkpoint::{Checkpoint, Kind};
use fedimdb::dataset::{featurize_all, load_reviews};
use fedimdb::layout::Layout;
use fedimdb::metrics::Metrics;
use serde_json::Value;

#[test]
fn reduced_pipeline_run_learns_and_publishes_a_consistent_model() {
    let dir = tempfile::tempdir().unwrap();
    // A few thousand real reviews when the shared archive is here, made-up ones otherwise:
    // the number of training reviews, and the accuracy the run must beat.
    let (archive, real) = small_archive(dir.path(), 750, 200);
    let (train_reviews, floor) = if real { (1500, 0.75) } else { (400, 0.95) };
    let root = dir.path().join("vol");
    let report_path = dir.path().join("report.json");
    let (out, _) = run_ok(
        pipeline(&archive, &root, &["--epochs", "4", "--hash-bits", "18"])
            .arg("--report")
            .arg(&report_path),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("round 2: training")
            && stdout.contains("global model (fedavg): test accuracy"),
        "{stdout}"
    );

    let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(
        rounds.len(),
        3,
        "statistics round + 2 training rounds: {report}"
    );
    let first = rounds[0]["test_accuracy"].as_f64().unwrap();
    let last = report["test_accuracy"].as_f64().unwrap();
    // Round 0's model is the naive-Bayes classifier scaled down: already far above the 0.5
    // of one class, and the gradient round (round 1, no steps) leaves it where it is.
    assert!(
        first > 0.6 && first < last,
        "round 0's starting model scored {first}, the final one {last}"
    );
    assert_eq!(rounds[1]["test_accuracy"].as_f64().unwrap(), first);
    // Its aggregator finds the combined model equal to round 0's bit for bit and keeps round
    // 0's verified metrics, all of them, instead of scoring the test set again.
    let layout = Layout::new(&root);
    let reports = [0, 1].map(|r| fedimdb::verify::read_round_report(&layout, r).unwrap());
    assert_eq!(reports[1].test, reports[0].test);
    let log = std::fs::read_to_string(root.join("logs/round-0001-aggregator.log")).unwrap();
    assert!(
        log.contains("bit for bit") && !log.contains("evaluated on the test set"),
        "{log}"
    );
    assert!(
        stdout.contains("round 1: gradients at the starting model (no steps)"),
        "{stdout}"
    );
    assert!(
        last > floor,
        "final test accuracy {last} is not above {floor}"
    );
    assert_eq!(last, rounds[2]["test_accuracy"].as_f64().unwrap());
    // The round table `pipeline k8s` prints too: a header, then one row per round with
    // what the trainers and the aggregator did and the test accuracy.
    let table: Vec<&str> = stdout
        .split("\nrounds:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no round table in:\n{stdout}"))
        .lines()
        .collect();
    assert!(
        table[0].trim_start().starts_with("round  trainers"),
        "{stdout}"
    );
    let row = table[3].split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        row.starts_with(&format!(
            "2 {w}/{w} computed computed {:.2}%",
            last * 100.0,
            w = common::WORKERS
        )),
        "row of round 2: {row}"
    );
    assert!(table[4].starts_with("done: test accuracy"), "{stdout}");
    assert!(report["seconds_total"].as_f64().unwrap() > 0.0);

    for f in [
        layout.shard(0),
        layout.shard(2),
        layout.test_set(),
        layout.data_manifest(),
        layout.global_model(2),
        layout.round_report(2),
    ] {
        assert!(f.is_file(), "{} missing", f.display());
    }
    assert!(!layout.shard(3).exists());
    assert!(
        temp_files(&root).is_empty(),
        "temporary files left: {:?}",
        temp_files(&root)
    );

    // The published model is the round-2 global model, its card says so, and scoring the
    // test set with it here reproduces the aggregator's figure exactly.
    let latest = Checkpoint::load_kind(&layout.latest_model(), Kind::Model).unwrap();
    let global = Checkpoint::load_kind(&layout.global_model(2), Kind::Model).unwrap();
    assert_eq!(latest.sha256, global.sha256);
    let card: Value =
        serde_json::from_slice(&std::fs::read(layout.latest_card()).unwrap()).unwrap();
    assert_eq!(card["round"], 2);
    assert_eq!(card["sha256"], latest.sha256.as_str());
    assert_eq!(card["history"].as_array().unwrap().len(), 3);
    let model = latest.clone().into_model().unwrap();
    let test = load_reviews(&layout.test_set(), None).unwrap();
    let data = featurize_all(&test, model.config.featurizer);
    let scorer = model.scorer();
    let probs: Vec<f32> = data
        .features
        .iter()
        .flat_map(|f| scorer.probabilities(f))
        .collect();
    let m = Metrics::of_classes(&probs, 2, &data.labels);
    assert_eq!(m.accuracy, last);
    assert_eq!(
        latest.header.samples, train_reviews,
        "the model counts every training review once"
    );
}

#[test]
fn original_forms_train_loose_files_and_average_them() {
    let dir = tempfile::tempdir().unwrap();
    let archive = synthetic_archive(dir.path(), 60);
    let root = dir.path().join("vol");
    run_ok(
        bin("copier")
            .arg("--n_container")
            .arg("2")
            .arg("--source")
            .arg(&archive)
            .arg("--savedir")
            .arg(&root),
    );
    let layout = Layout::new(&root);
    let workers = dir.path().join("workers");
    for i in 0..2 {
        run_ok(
            bin("trainer")
                .arg("--data")
                .arg(layout.shard(i))
                .args(["--epoch", "3", "--batch", "1", "--hash-bits", "14"])
                .arg("--savemodel")
                .arg(workers.join(format!("w{i}.safetensors"))),
        );
    }
    let avg = dir.path().join("avg.safetensors");
    let (out, _) = run_ok(
        bin("aggregator")
            .arg("--dir")
            .arg(&workers)
            .arg("--savefile")
            .arg(&avg)
            .arg("--test")
            .arg(layout.test_set()),
    );
    let metrics: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(metrics["accuracy"].as_f64().unwrap() > 0.9, "{metrics}");
    let ck = Checkpoint::load_kind(&avg, Kind::Model).unwrap();
    assert_eq!(ck.header.samples, 120, "both shards' samples are counted");
}

#[test]
fn same_seed_gives_byte_identical_updates() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_volume(dir.path(), 40, 2);
    let layout = Layout::new(&root);
    // The shard from the variable Kubernetes Indexed Jobs set, not from --shard.
    let train = |round: u32, shard: usize| {
        run_ok(
            step("trainer", &root, round)
                .args(["--hash-bits", "12"])
                .env("JOB_COMPLETION_INDEX", shard.to_string()),
        );
    };
    let aggregate = |round: u32| {
        run_ok(&mut aggregator(&root, round));
    };
    train(0, 0);
    train(0, 1);
    aggregate(0);
    train(1, 1);
    let first = std::fs::read(layout.update(1, 1)).unwrap();
    train(1, 1);
    assert_eq!(first, std::fs::read(layout.update(1, 1)).unwrap());
    train(1, 0);
    aggregate(1);
    let g1 = std::fs::read(layout.global_model(1)).unwrap();
    aggregate(1);
    assert_eq!(
        g1,
        std::fs::read(layout.global_model(1)).unwrap(),
        "aggregation is deterministic"
    );
    // A process given both shards (as `pipeline local` groups its workers) shares the global
    // model and control variate between them, and writes each update to the same bytes as a
    // process per shard, whatever the order. Round 2 is the first to use the control.
    train(2, 0);
    train(2, 1);
    let read = |shard| {
        (
            std::fs::read(layout.update(2, shard)).unwrap(),
            std::fs::read(layout.update_report(2, shard)).unwrap(),
        )
    };
    let apart = [read(0), read(1)];
    for shard in 0..2 {
        std::fs::remove_file(layout.update(2, shard)).unwrap();
        std::fs::remove_file(layout.update_report(2, shard)).unwrap();
    }
    run_ok(step("trainer", &root, 2).args(["--hash-bits", "12", "--shard", "1,0"]));
    let together = [read(0), read(1)];
    for (shard, (a, t)) in apart.iter().zip(&together).enumerate() {
        assert_eq!(a.0, t.0, "the update of shard {shard}");
        // The same report but for the times it records.
        let report = |bytes: &[u8]| {
            let mut v: Value = serde_json::from_slice(bytes).unwrap();
            v["seconds"] = Value::Null;
            for epoch in v["epochs"].as_array_mut().unwrap() {
                epoch["seconds"] = Value::Null;
            }
            v
        };
        assert_eq!(report(&a.1), report(&t.1), "the report of shard {shard}");
    }
}
