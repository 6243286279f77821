//! Bad input to trainer and aggregator: each case must fail with a message that names the
//! problem, exit non-zero, and leave no output a later step could take for real.

mod common;

use std::path::{Path, PathBuf};

use common::{aggregator, bin, run, run_ok, step, synthetic_volume, temp_files, trainer};
use fedimdb::checkpoint::{Checkpoint, Kind};
use fedimdb::digest::sha256_file;
use fedimdb::layout::Layout;
use serde_json::Value;

/// A volume with 2 shards of made-up reviews, round 0 aggregated (so round 1 can train).
struct Volume {
    _dir: tempfile::TempDir,
    root: PathBuf,
    layout: Layout,
}

impl Volume {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = synthetic_volume(dir.path(), 30, 2);
        let v = Volume {
            layout: Layout::new(&root),
            root,
            _dir: dir,
        };
        v.ok(v.trainer(0, 0, &[]));
        v.ok(v.trainer(0, 1, &[]));
        v.ok(v.aggregator(0, &[]));
        v
    }

    fn trainer(&self, round: u32, shard: usize, extra: &[&str]) -> (std::process::Output, String) {
        run(trainer(&self.root, round, shard)
            .args(["--hash-bits", "12"])
            .args(extra))
    }

    /// The trainer of `shards` (`--shard I,J,…`) in one process.
    fn trainer_of(
        &self,
        round: u32,
        shards: &str,
        extra: &[&str],
    ) -> (std::process::Output, String) {
        run(step("trainer", &self.root, round)
            .args(["--hash-bits", "12", "--shard", shards])
            .args(extra))
    }

    fn aggregator(&self, round: u32, extra: &[&str]) -> (std::process::Output, String) {
        run(aggregator(&self.root, round).args(extra))
    }

    /// Records the current checksum of worker `shard`'s update in its report, as a worker
    /// that writes a bad update *consistently* would: the checks behind the checksum
    /// must catch it then.
    fn reseal_update(&self, round: u32, shard: usize) {
        let path = self.layout.update_report(round, shard);
        let mut report: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        report["sha256"] = sha256_file(&self.layout.update(round, shard))
            .unwrap()
            .into();
        std::fs::write(&path, serde_json::to_vec(&report).unwrap()).unwrap();
    }

    /// The same for a global model and its round report (made from round 0's if missing).
    fn reseal_global(&self, round: u32) {
        let path = self.layout.round_report(round);
        let from = if path.exists() {
            path.clone()
        } else {
            self.layout.round_report(0)
        };
        let mut report: Value = serde_json::from_slice(&std::fs::read(from).unwrap()).unwrap();
        report["round"] = round.into();
        report["model_sha256"] = sha256_file(&self.layout.global_model(round))
            .unwrap()
            .into();
        std::fs::write(&path, serde_json::to_vec(&report).unwrap()).unwrap();
    }

    fn ok(&self, (out, log): (std::process::Output, String)) {
        assert!(out.status.success(), "expected success:\n{log}");
    }

    /// Asserts failure with a message containing every `needle`, and no temporary files.
    fn fails(&self, (out, log): (std::process::Output, String), needles: &[&str]) {
        assert!(
            !out.status.success(),
            "expected failure, got success:\n{log}"
        );
        assert_eq!(
            out.status.code(),
            Some(if log.contains("Usage:") { 2 } else { 1 }),
            "{log}"
        );
        for n in needles {
            assert!(log.contains(n), "message lacks {n:?}:\n{log}");
        }
        assert!(
            temp_files(&self.root).is_empty(),
            "temporary files left: {:?}",
            temp_files(&self.root)
        );
    }
}

#[test]
fn trainer_refuses_bad_hyper_parameters_and_writes_nothing() {
    let v = Volume::new();
    for (flag, value, needle) in [
        ("--epochs", "0", "--epochs must be at least 1"),
        ("--batch", "0", "--batch must be at least 1"),
        ("--lr", "0", "--lr must be a positive number"),
        ("--lr", "-2", "--lr must be a positive number"),
        ("--device", "tpu", "unknown --device `tpu`"),
    ] {
        v.fails(v.trainer(1, 0, &[flag, value]), &[needle]);
    }
    assert!(!v.layout.update(1, 0).exists());
}

#[cfg(not(feature = "cuda"))]
#[test]
fn trainer_says_what_cuda_needs() {
    let v = Volume::new();
    v.fails(
        v.trainer(1, 0, &["--device", "cuda"]),
        &["built without the `cuda` feature", "--features cuda"],
    );
}

#[test]
fn trainer_refuses_a_shard_outside_the_manifest_or_a_missing_index() {
    let v = Volume::new();
    v.fails(
        v.trainer(1, 2, &[]),
        &["shard index 2 is outside the manifest", "2 shards"],
    );
    v.fails(
        run(&mut step("trainer", &v.root, 1)),
        &["no shard index", "JOB_COMPLETION_INDEX"],
    );
}

#[test]
fn a_trainer_of_several_shards_names_the_one_that_failed_and_keeps_those_before() {
    let v = Volume::new();
    v.fails(
        v.trainer_of(1, "0,1,0", &[]),
        &["--shard lists shard 0 twice"],
    );
    v.fails(
        run(step("trainer", &v.root, 1)
            .args(["--hash-bits", "12", "--shard", "0,1"])
            .env(fedimdb::outcome::ENV, v.root.join("outcome.json"))),
        &[
            "FEDIMDB_OUTCOME_FILE",
            "--shard lists 2 shards",
            "its own trainer process",
        ],
    );
    assert!(!v.layout.update(1, 0).exists() && !v.root.join("outcome.json").exists());
    // Shard 0 is trained and written; shard 2 does not exist; shard 1 is never started.
    v.fails(
        v.trainer_of(1, "0,2,1", &[]),
        &[
            "round 1, shard 2 failed",
            "shard index 2 is outside the manifest",
        ],
    );
    assert!(v.layout.update_report(1, 0).exists());
    fedimdb::verify::load_update(&v.layout, 1, 0, Kind::Update).unwrap();
    assert!(!v.layout.update(1, 1).exists());
}

#[test]
fn trainer_names_a_damaged_or_missing_shard() {
    let v = Volume::new();
    let shard = v.layout.shard(1);
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&shard, &bytes).unwrap();
    v.fails(
        v.trainer(1, 1, &[]),
        &[
            "shard-00001.parquet does not match its checksum",
            "data/manifest.json records",
        ],
    );
    std::fs::remove_file(&shard).unwrap();
    v.fails(v.trainer(1, 1, &[]), &["shard-00001.parquet"]);
    assert!(!v.layout.update(1, 1).exists());
}

#[test]
fn trainer_refuses_a_review_file_of_the_wrong_schema() {
    use polars::prelude::{Column, DataFrame, ParquetWriter};
    let v = Volume::new();
    let bad = v.root.join("wrong.parquet");
    let mut df = DataFrame::new(
        1,
        vec![
            Column::new("review".into(), ["great"]),
            Column::new("stars".into(), [9u8]),
        ],
    )
    .unwrap();
    ParquetWriter::new(std::fs::File::create(&bad).unwrap())
        .finish(&mut df)
        .unwrap();
    let out = v.root.join("m.safetensors");
    let (o, log) = run(bin("trainer")
        .arg("--data")
        .arg(&bad)
        .arg("--savemodel")
        .arg(&out)
        .args(["--hash-bits", "12"]));
    v.fails((o, log), &["wrong.parquet", "columns are"]);
    assert!(!out.exists());
}

#[test]
fn trainer_names_a_missing_damaged_or_mismatched_global_model() {
    let v = Volume::new();
    v.fails(
        v.trainer(2, 0, &[]),
        &[
            "global model of round 1 is missing or damaged",
            "round-0001",
        ],
    );

    let global = v.layout.global_model(0);
    let good = std::fs::read(&global).unwrap();
    std::fs::write(&global, &good[..good.len() / 2]).unwrap();
    // The checksum is checked before the bytes are parsed, so a truncated file is named as such.
    v.fails(
        v.trainer(1, 0, &[]),
        &[
            "round-0000/global.safetensors does not match its checksum",
            "truncated, damaged or replaced",
        ],
    );

    // A worker update where the global model should be.
    std::fs::write(&global, &good).unwrap();
    v.ok(v.trainer(1, 0, &[]));
    std::fs::copy(v.layout.update(1, 0), v.layout.global_model(1)).unwrap();
    v.fails(
        v.trainer(2, 0, &[]),
        &["round 1 has no readable report", "re-run its aggregator"],
    );
    v.reseal_global(1);
    v.fails(
        v.trainer(2, 0, &[]),
        &["round-0001/global.safetensors is a Update file, expected kind Model"],
    );
}

#[test]
fn trainer_fails_on_divergence_and_never_writes_a_nan_model() {
    let v = Volume::new();
    // FedAvg: SCAFFOLD's round 1 is its gradient round, which takes no steps to diverge.
    v.fails(
        v.trainer(1, 0, &["--algorithm", "fedavg", "--lr", "3e38"]),
        &["training diverged", "Lower --lr"],
    );
    assert!(!v.layout.update(1, 0).exists());
    assert!(!v.layout.update_report(1, 0).exists());
}

#[test]
fn aggregator_names_missing_updates_and_empty_rounds() {
    let v = Volume::new();
    v.fails(
        v.aggregator(1, &[]),
        &["no worker updates in", "round-0001/updates"],
    );
    v.ok(v.trainer(1, 0, &[]));
    v.fails(
        v.aggregator(1, &[]),
        &[
            "round 1 has 1 of 2 expected worker updates",
            "missing",
            "shard-00001.safetensors",
        ],
    );
    assert!(!v.layout.global_model(1).exists());
    v.fails(
        v.aggregator(1, &["--expect", "3"]),
        &["--expect 3 is more than the 2 shards"],
    );
}

#[test]
fn aggregator_refuses_duplicates_foreign_and_non_finite_updates() {
    let v = Volume::new();
    v.ok(v.trainer(1, 0, &[]));
    v.ok(v.trainer(1, 1, &[]));
    let (u0, u1) = (v.layout.update(1, 0), v.layout.update(1, 1));
    let good1 = std::fs::read(&u1).unwrap();

    std::fs::copy(&u0, &u1).unwrap();
    v.fails(
        v.aggregator(1, &[]),
        &[
            "shard-00001.safetensors does not match its checksum",
            "shard-00001.json records",
        ],
    );
    v.reseal_update(1, 1);
    v.fails(
        v.aggregator(1, &[]),
        &[
            "refusing",
            "shard-00001.safetensors",
            "duplicate of",
            "shard-00000.safetensors",
        ],
    );

    // An update whose values are not finite: patch the first value of the data section (an
    // f32: safetensors orders same-size tensors by name, `grad.bias` first) to NaN.
    let mut nan = good1.clone();
    let data = 8 + u64::from_le_bytes(nan[..8].try_into().unwrap()) as usize;
    nan[data..data + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&u1, &nan).unwrap();
    v.reseal_update(1, 1);
    v.fails(
        v.aggregator(1, &[]),
        &["shard-00001.safetensors", "non-finite"],
    );

    // An update trained from another global model.
    std::fs::write(&u1, &good1).unwrap();
    v.reseal_update(1, 1);
    let global = v.layout.global_model(0);
    let mut g = Checkpoint::load_kind(&global, Kind::Model).unwrap();
    g.tensors.get_mut("linear.bias").unwrap()[0] += 1.0;
    g.save(&global).unwrap();
    v.fails(
        v.aggregator(1, &[]),
        &["round-0000/global.safetensors does not match its checksum"],
    );
    v.reseal_global(0);
    v.fails(
        v.aggregator(1, &[]),
        &[
            "refusing",
            "trained from another global model",
            "round-0000/global.safetensors",
        ],
    );
    assert!(!v.layout.global_model(1).exists());
}

#[test]
fn aggregator_refuses_updates_of_another_config() {
    let v = Volume::new();
    run_ok(trainer(&v.root, 0, 1).args(["--hash-bits", "13"]));
    v.fails(
        v.aggregator(0, &[]),
        &[
            "refusing",
            "shard-00001.safetensors",
            "model config",
            "differs",
        ],
    );
}

#[test]
fn aggregator_original_form_refuses_an_empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (out, log) = run(bin("aggregator")
        .arg("--dir")
        .arg(dir.path())
        .arg("--savefile")
        .arg(dir.path().join("o.safetensors")));
    assert!(!out.status.success());
    assert!(log.contains("no model files"), "{log}");
    assert!(!Path::new(&dir.path().join("o.safetensors")).exists());
}

#[test]
fn volume_commands_without_data_say_to_run_the_copier() {
    let dir = tempfile::tempdir().unwrap();
    for mut cmd in [trainer(dir.path(), 0, 0), aggregator(dir.path(), 0)] {
        let (out, log) = run(&mut cmd);
        assert!(
            !out.status.success() && log.contains("run the copier first"),
            "{log}"
        );
    }
}
