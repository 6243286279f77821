//! The aggregator binary on a small hand-made volume: the quorum (`--min-workers`), the
//! strategies' exact results, the server optimizer's step on top of them, and the flags that
//! go together or not.
//!
//! The volume has three shards of 2, 3 and 5 reviews (as the data manifest says), a tiny
//! test set, round 0 aggregated from made-up counts, and round 1 updates whose weights are
//! chosen so that every strategy's result is known exactly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fedimdb::checkpoint::{Checkpoint, Header, Kind};
use fedimdb::digest::sha256_file;
use fedimdb::layout::Layout;
use fedimdb::model::{ClassCounts, ModelConfig};
use fedimdb::reviews::{Review, write_parquet};
use fedimdb::server_optimizer::{BETA1, BETA2, DEFAULT_LR, DEFAULT_TAU, Moments};
use fedimdb::train::{Algorithm, TrainArgs};
use serde_json::{Value, json};

const ROWS: [u64; 3] = [2, 3, 5];
/// Round-1 biases of the three workers; the weights are `bias · (1 + index mod 7)`.
const BIAS: [f32; 3] = [1.0, 2.0, 30.0];

fn config() -> ModelConfig {
    let mut c = ModelConfig::default();
    c.featurizer.hash_bits = 10;
    c
}

struct Volume {
    _dir: tempfile::TempDir,
    root: PathBuf,
    layout: Layout,
}

impl Volume {
    /// Data, round 0 aggregated, and round 1's updates of `shards`.
    fn new(shards: &[usize]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("vol");
        let layout = Layout::new(&root);
        std::fs::create_dir_all(layout.data_dir()).unwrap();
        let test: Vec<Review> = ["a great film", "wonderful", "dull and boring", "awful"]
            .iter()
            .enumerate()
            .map(|(i, t)| Review {
                id: format!("test/x/{i}"),
                rating: if i < 2 { 9 } else { 2 },
                label: u8::from(i < 2),
                text: t.to_string(),
            })
            .collect();
        write_parquet(&layout.test_set(), &test).unwrap();
        let entry = |file: &str, rows: u64, sha: String| json!({"file": file, "rows": rows, "positive": rows / 2, "negative": rows - rows / 2, "sha256": sha});
        let manifest = json!({
            "format_version": fedimdb::manifest::MANIFEST_VERSION,
            "tool": "hand-made",
            "source": {"path": "none", "kind": "folder", "sha256": "0"},
            "workers": ROWS.len(),
            "partition": "iid",
            "alpha": null,
            "seed": 42,
            "shards": ROWS.iter().enumerate().map(|(i, &r)| entry(&Layout::shard_file_name(i), r, "0".repeat(64))).collect::<Vec<_>>(),
            "test": entry("test.parquet", 4, sha256_file(&layout.test_set()).unwrap()),
        });
        std::fs::write(
            layout.data_manifest(),
            serde_json::to_vec_pretty(&manifest).unwrap(),
        )
        .unwrap();
        let v = Volume {
            _dir: dir,
            root,
            layout,
        };

        let dim = config().dim();
        for (shard, &rows) in ROWS.iter().enumerate() {
            let pos = rows / 2;
            let counts = ClassCounts {
                counts: vec![
                    (0..dim).map(|j| ((j + 2 * shard) % 4) as f32).collect(),
                    (0..dim).map(|j| ((j + shard) % 3) as f32).collect(),
                ],
                scaled: vec![
                    (0..dim)
                        .map(|j| ((j + 2 * shard) % 4) as f32 * 0.5)
                        .collect(),
                    (0..dim).map(|j| ((j + shard) % 3) as f32 * 0.5).collect(),
                ],
                docs: vec![rows - pos, pos],
            };
            let mut h = Header::new(Kind::Stats, config(), 0);
            h.shard = Some(shard);
            v.write_update(0, shard, Checkpoint::from_counts(&counts, h));
        }
        ok(v.aggregator(0, &[]));
        let base = Checkpoint::load_kind(&v.layout.global_model(0), Kind::Model)
            .unwrap()
            .sha256;
        for &shard in shards {
            let mut h = Header::new(Kind::Update, config(), 1);
            h.shard = Some(shard);
            h.samples = ROWS[shard];
            h.base_sha256 = Some(base.clone());
            // Plain FedAvg workers (no correction) that touched every bucket: the aggregator
            // combines exactly these weights.
            h.train = Some(
                TrainArgs {
                    algorithm: Algorithm::FedAvg,
                    ..Default::default()
                }
                .config(1, shard, 2),
            );
            let b = BIAS[shard];
            let weight = (0..dim).map(|j| b * (1 + j % 7) as f32).collect();
            v.write_update(
                1,
                shard,
                Checkpoint::update(
                    h,
                    (0..dim as u32).collect(),
                    weight,
                    vec![b],
                    vec![0.0; dim],
                    vec![0.0],
                ),
            );
        }
        v
    }

    /// Writes an update and its report (with the update's checksum), as a trainer does.
    fn write_update(&self, round: u32, shard: usize, ck: Checkpoint) {
        let sha = ck.save(&self.layout.update(round, shard)).unwrap();
        let report = json!({
            "round": round, "shard": shard, "kind": if round == 0 { "stats" } else { "update" },
            "samples": ck.header.samples, "positive": ck.header.samples / 2, "device": "cpu",
            "train": null, "epochs": [], "seconds": 0.0, "sha256": sha, "version": fedimdb::VERSION,
        });
        std::fs::write(
            self.layout.update_report(round, shard),
            serde_json::to_vec(&report).unwrap(),
        )
        .unwrap();
    }

    fn aggregator(&self, round: u32, args: &[&str]) -> (Output, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_aggregator"))
            .arg("--root")
            .arg(&self.root)
            .args(["--round", &round.to_string()])
            .args(args)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        (out, log)
    }

    fn report(&self, round: u32) -> Value {
        serde_json::from_slice(&std::fs::read(self.layout.round_report(round)).unwrap()).unwrap()
    }

    fn global(&self, round: u32) -> Checkpoint {
        Checkpoint::load_kind(&self.layout.global_model(round), Kind::Model).unwrap()
    }
}

fn ok((out, log): (Output, String)) -> String {
    assert!(out.status.success(), "expected success:\n{log}");
    log
}

fn fails((out, log): (Output, String), code: i32, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(code), "{log}");
    for n in needles {
        assert!(log.contains(n), "message lacks {n:?}:\n{log}");
    }
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn quorum_aggregates_the_present_updates_and_names_the_missing_ones() {
    let v = Volume::new(&[0, 2]);
    let missing = name(&v.layout.update(1, 1));
    assert_eq!(missing, "shard-00001.safetensors");

    // All are required unless said otherwise.
    fails(
        v.aggregator(1, &[]),
        1,
        &[
            "round 1 has 2 of 3 expected worker updates",
            "quorum of 3",
            &missing,
        ],
    );
    fails(
        v.aggregator(1, &["--min-workers", "3"]),
        1,
        &["fewer than the quorum of 3 (--min-workers)", &missing],
    );
    assert!(!v.layout.global_model(1).exists());

    // At least 2: the two present updates, weighted by their own sample counts (taken as
    // they are: the server step has its own test).
    let log = ok(v.aggregator(1, &["--min-workers", "2", "--server-optimizer", "none"]));
    assert!(
        log.contains("aggregating 2 of 3 worker updates") && log.contains(&missing),
        "{log}"
    );
    let report = v.report(1);
    assert_eq!(report["shards"], json!([0, 2]));
    assert_eq!(report["missing"], json!([1]));
    assert_eq!(report["samples"], json!([2, 5]));
    assert_eq!(report["strategy"], "fedavg");
    let g = v.global(1);
    let expect = ((2.0 * 1.0 + 5.0 * 30.0) / 7.0) as f32;
    assert_eq!(g.tensor("linear.bias"), [expect]);
    assert_eq!(
        g.tensor("linear.weight")[3],
        ((2.0 * 4.0 + 5.0 * 120.0) / 7.0) as f32
    );
    assert_eq!(
        g.header.samples, 7,
        "the model counts the reviews behind it"
    );
    let card: Value =
        serde_json::from_slice(&std::fs::read(v.layout.latest_card()).unwrap()).unwrap();
    assert_eq!(card["round"], 1);

    // The old name still works, and names itself in messages.
    ok(v.aggregator(1, &["--expect", "2"]));
    fails(
        v.aggregator(1, &["--expect", "4"]),
        1,
        &["--expect 4 is more than the 3 shards"],
    );
    fails(
        v.aggregator(1, &["--min-workers", "4"]),
        1,
        &["--min-workers 4 is more than the 3 shards in the data manifest"],
    );
    fails(
        v.aggregator(1, &["--min-workers", "0"]),
        2,
        &["--min-workers", "at least 1"],
    );
    fails(
        v.aggregator(1, &["--min-workers", "two"]),
        2,
        &["--min-workers", "not a whole number"],
    );
    fails(
        v.aggregator(1, &["--min-workers", "2", "--expect", "2"]),
        2,
        &["--expect", "cannot be used with"],
    );

    // With every update present, nothing is missing.
    let v = Volume::new(&[0, 1, 2]);
    ok(v.aggregator(1, &["--min-workers", "2"]));
    assert_eq!(v.report(1)["missing"], json!([]));
}

#[test]
fn strategies_give_their_exact_results_and_say_so_in_the_report() {
    let v = Volume::new(&[0, 1, 2]);
    let dim = config().dim();
    // `value(k)`: the expected result where worker i's values are `BIAS[i] · k` (k = 1 for
    // the bias, 1 + j mod 7 for weight j).
    let check = |args: &[&str], label: &str, value: &dyn Fn(f64) -> f64| {
        ok(v.aggregator(1, &[args, &["--server-optimizer", "none"]].concat()));
        assert_eq!(v.report(1)["strategy"], label, "{args:?}");
        let g = v.global(1);
        assert_eq!(g.tensor("linear.bias"), [value(1.0) as f32], "{args:?}");
        let w = g.tensor("linear.weight");
        for j in [0, 1, 6, 7, 100, dim - 1] {
            assert_eq!(
                w[j],
                value((1 + j % 7) as f64) as f32,
                "{args:?} weight {j}"
            );
        }
        // The naive-Bayes ratio of round 0 is carried over unchanged.
        assert_eq!(g.tensor("nb.ratio"), v.global(0).tensor("nb.ratio"));
        std::fs::read(v.layout.global_model(1)).unwrap()
    };
    // FedAvg weights by the shards' 2, 3 and 5 reviews.
    check(&[], "fedavg", &|k| {
        (2.0 * 1.0 * k + 3.0 * 2.0 * k + 5.0 * 30.0 * k) / 10.0
    });
    // The median ignores the outlier 30 and the sample counts.
    let median = check(&["--strategy", "median"], "median", &|k| 2.0 * k);
    // Three values: floor(0.2 · 3) = 0 cut, the plain unweighted mean.
    check(&["--strategy", "trimmed-mean"], "trimmed-mean(0.2)", &|k| {
        11.0 * k
    });
    // floor(0.34 · 3) = 1 cut from each end: the middle value.
    let trimmed = check(
        &["--strategy", "trimmed-mean", "--trim", "0.34"],
        "trimmed-mean(0.34)",
        &|k| 2.0 * k,
    );
    check(
        &["--strategy", "trimmed-mean", "--trim", "0"],
        "trimmed-mean(0)",
        &|k| 11.0 * k,
    );
    // Same inputs, same arguments: the same bytes.
    assert_eq!(
        check(&["--strategy", "median"], "median", &|k| 2.0 * k),
        median
    );
    assert_eq!(
        check(
            &["--strategy", "trimmed-mean", "--trim", "0.34"],
            "trimmed-mean(0.34)",
            &|k| 2.0 * k
        ),
        trimmed
    );
}

#[test]
fn the_server_adam_step_moves_from_the_combined_weights_and_keeps_its_moments() {
    let v = Volume::new(&[0, 1, 2]);
    let dim = config().dim();
    let fedavg = |k: f64| (2.0 * 1.0 * k + 3.0 * 2.0 * k + 5.0 * 30.0 * k) / 10.0;
    for (args, label) in [
        (vec![], "adam(lr=30,tau=1.5)"),
        (
            vec!["--server-lr", "10", "--server-tau", "1"],
            "adam(lr=10,tau=1)",
        ),
        (vec!["--strategy", "median"], "adam(lr=30,tau=1.5)"),
    ] {
        let (lr, tau) = if label.contains("lr=10") {
            (10.0, 1.0)
        } else {
            (DEFAULT_LR, DEFAULT_TAU)
        };
        let median = args.contains(&"median");
        ok(v.aggregator(1, &args));
        let report = v.report(1);
        assert_eq!(report["server_optimizer"], label, "{args:?}");
        // Round 1 starts from round 0's weights and zero moments: with Δ the combined
        // weight's displacement, m = 0.1 Δ, v = 0.01 Δ², and the weight moves by
        // η·m / (√v + τ). The bias moves by its combined displacement times the square of
        // the workers' agreement on it, which is 1 here: every worker moves it up, and the
        // spread of their moves, combined by the rule (the weighted mean for FedAvg, the
        // median for the median: the outlier's move of 30 stays out), is the combined move
        // itself.
        let combined = |k: f64| if median { 2.0 * k } else { fedavg(k) } as f32;
        let g = v.global(1);
        let start = v.global(0).tensor("linear.weight").to_vec();
        let b0 = v.global(0).tensor("linear.bias")[0];
        assert!(
            BIAS.iter().all(|&b| b > b0),
            "every worker moves the bias up"
        );
        let bias = g.tensor("linear.bias")[0];
        assert!(
            (bias - combined(1.0)).abs() <= 1e-6 * combined(1.0).abs(),
            "{args:?} bias: {bias} vs {}",
            combined(1.0)
        );
        let w = g.tensor("linear.weight");
        for j in [0, 1, 6, 100, dim - 1] {
            let d = combined((1 + j % 7) as f64) - start[j];
            let (m, s) = (0.1 * d, 0.01 * d * d);
            let want = start[j] + lr * m / (s.sqrt() + tau);
            assert!(
                (w[j] - want).abs() <= 1e-5 * want.abs(),
                "{args:?} weight {j}: {} vs {want}",
                w[j]
            );
        }
        // The moments are on the volume, recorded in the report, and hold m and v.
        let path = v.layout.moments(1);
        let sha = sha256_file(&path).unwrap();
        assert_eq!(report["moments_sha256"], sha.as_str());
        let moments =
            Moments::from_checkpoint(Checkpoint::load_kind(&path, Kind::Moments).unwrap()).unwrap();
        let d = combined(1.0) - start[0];
        assert_eq!(moments.first[0], (1.0 - BETA1) * d);
        assert_eq!(moments.second[0], (1.0 - BETA2) * d * d);
    }
    // Without a server optimizer there are no moments, and a resumed round made with another
    // optimizer is made again.
    ok(v.aggregator(1, &["--server-optimizer", "none"]));
    let report = v.report(1);
    assert_eq!(report["server_optimizer"], "none");
    assert!(report.get("moments_sha256").is_none(), "{report}");
    let log = ok(v.aggregator(1, &["--resume"]));
    assert!(
        log.contains("made with server optimizer none, not adam(lr=30,tau=1.5)"),
        "{log}"
    );
    assert_eq!(v.report(1)["server_optimizer"], "adam(lr=30,tau=1.5)");
    let log = ok(v.aggregator(1, &["--resume"]));
    assert!(log.contains("up to date"), "{log}");
    // Bad values are refused by name.
    fails(
        v.aggregator(1, &["--server-lr", "0"]),
        2,
        &["--server-lr", "above 0"],
    );
    fails(
        v.aggregator(1, &["--server-optimizer", "none", "--server-tau", "2"]),
        2,
        &["--server-lr and --server-tau only apply to --server-optimizer adam"],
    );
}

#[test]
fn trim_goes_with_trimmed_mean_only_and_must_leave_values() {
    let v = Volume::new(&[0, 1, 2]);
    fails(
        v.aggregator(1, &["--trim", "0.1"]),
        2,
        &["--trim only applies to --strategy trimmed-mean, not fedavg"],
    );
    fails(
        v.aggregator(1, &["--strategy", "median", "--trim", "0.1"]),
        2,
        &["not median"],
    );
    for bad in ["0.5", "0.9", "-0.1", "nan"] {
        fails(
            v.aggregator(1, &["--strategy", "trimmed-mean", "--trim", bad]),
            2,
            &["--trim", "below 0.5"],
        );
    }
    fails(
        v.aggregator(1, &["--strategy", "trimmed", "--trim", "0.1"]),
        2,
        &["--strategy", "trimmed-mean"],
    );
    assert!(!v.layout.global_model(1).exists());
}

#[test]
fn round_zero_sums_counts_whatever_the_strategy() {
    let v = Volume::new(&[]);
    let summed = std::fs::read(v.layout.global_model(0)).unwrap();
    for args in [
        &["--strategy", "median"][..],
        &["--strategy", "trimmed-mean", "--trim", "0.3"],
    ] {
        let log = ok(v.aggregator(0, args));
        assert!(
            log.contains("round 0 sums the workers' feature counts"),
            "{log}"
        );
        assert_eq!(v.report(0)["strategy"], "sum");
        assert_eq!(
            std::fs::read(v.layout.global_model(0)).unwrap(),
            summed,
            "{args:?}"
        );
    }
}
