//! Damaged files on the volume: each reader checks what it reads against the checksum its
//! writer recorded, names the file that does not match, and writes nothing; a re-run of the
//! pipeline then redoes exactly the damaged steps and gets the original bytes back.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    KEEP_ALL, QUICK, aggregator, kept_rounds, pipeline, run, run_ok, small_archive, trainer,
};
use fedimdb::digest::sha256_file;
use fedimdb::layout::Layout;

struct Volume {
    _dir: tempfile::TempDir,
    archive: PathBuf,
    root: PathBuf,
    layout: Layout,
}

impl Volume {
    /// Every round keeps its files (`--keep-rounds all`): the tests damage old rounds.
    fn pipeline(&self) -> Command {
        pipeline(&self.archive, &self.root, &[QUICK, KEEP_ALL].concat())
    }

    fn trainer(&self, round: u32, shard: usize) -> Command {
        let mut c = trainer(&self.root, round, shard);
        c.args(["--epochs", "2"]);
        c
    }

    fn aggregator(&self, round: u32) -> Command {
        let mut c = aggregator(&self.root, round);
        c.args(KEEP_ALL);
        c
    }

    /// sha256 of every file under the root but logs, reports and the lock.
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.root.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if p.is_dir() {
                    if name != "logs" {
                        stack.push(p);
                    }
                } else if name.ends_with(".safetensors") || name.ends_with(".parquet") {
                    out.insert(
                        p.strip_prefix(&self.root).unwrap().to_path_buf(),
                        sha256_file(&p).unwrap(),
                    );
                }
            }
        }
        out
    }
}

fn volume() -> Volume {
    let dir = tempfile::tempdir().unwrap();
    let (archive, _) = small_archive(dir.path(), 300, 150);
    let root = dir.path().join("vol");
    let v = Volume {
        layout: Layout::new(&root),
        _dir: dir,
        archive,
        root,
    };
    let (out, log) = run(&mut v.pipeline());
    assert!(out.status.success(), "the first run failed:\n{log}");
    v
}

/// Runs `cmd`, which must fail mentioning every one of `needles`, and must not have
/// changed any output on the volume.
fn refused(v: &Volume, cmd: &mut Command, needles: &[&str]) {
    let before = v.snapshot();
    let (out, log) = run(cmd);
    assert!(
        !out.status.success(),
        "a damaged input was consumed without complaint:\n{log}"
    );
    for n in needles {
        assert!(log.contains(n), "the error does not mention {n:?}:\n{log}");
    }
    assert_eq!(
        v.snapshot(),
        before,
        "a step that refused its input still changed the volume"
    );
}

/// Damages `path` with `damage`, checks that `cmd` [`refused`] it naming `needles`, and puts
/// the good bytes back.
fn refused_damaged(
    v: &Volume,
    path: &Path,
    damage: fn(&Path),
    cmd: &mut Command,
    needles: &[&str],
) {
    let good = std::fs::read(path).unwrap();
    damage(path);
    refused(v, cmd, needles);
    std::fs::write(path, good).unwrap();
}

/// [`swap`]s `a` and `b`, checks that `cmd` [`refused`] them naming `needles`, and swaps
/// them back.
fn refused_swapped(v: &Volume, a: &Path, b: &Path, cmd: &mut Command, needles: &[&str]) {
    swap(a, b);
    refused(v, cmd, needles);
    swap(a, b);
}

fn flip_byte_near_end(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

fn truncate(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..bytes.len() * 2 / 3]).unwrap();
}

fn swap(a: &Path, b: &Path) {
    let tmp = a.with_extension("swap");
    std::fs::rename(a, &tmp).unwrap();
    std::fs::rename(b, a).unwrap();
    std::fs::rename(&tmp, b).unwrap();
}

#[test]
fn damaged_files_are_named_and_never_consumed() {
    let v = volume();
    let l = &v.layout;

    // A truncated shard: the trainer refuses it against the data manifest.
    refused_damaged(
        &v,
        &l.shard(1),
        truncate,
        &mut v.trainer(1, 1),
        &["shard-00001.parquet", "sha256"],
    );

    // A corrupted test set: the aggregator refuses it.
    refused_damaged(
        &v,
        &l.test_set(),
        flip_byte_near_end,
        &mut v.aggregator(2),
        &["test.parquet", "sha256"],
    );

    // A worker update changed after it was written (same size, one bit).
    refused_damaged(
        &v,
        &l.update(1, 0),
        flip_byte_near_end,
        &mut v.aggregator(1),
        &[
            "round-0001/updates/shard-00000.safetensors does not match its checksum",
            "shard-00000.json records",
        ],
    );

    // Two workers' updates swapped, and two workers' reports swapped.
    let swaps = [
        (
            Layout::update as fn(&Layout, u32, usize) -> PathBuf,
            "shard-00000.safetensors does not match its checksum",
        ),
        (
            Layout::update_report,
            "shard-00000.json is the report of round 1 shard 1, not of round 1 shard 0",
        ),
    ];
    for (file, why) in swaps {
        refused_swapped(
            &v,
            &file(l, 1, 0),
            &file(l, 1, 1),
            &mut v.aggregator(1),
            &[why],
        );
    }

    // The server optimizer's moments changed after they were written: the next round's
    // aggregator refuses to step from them.
    refused_damaged(
        &v,
        &l.moments(1),
        flip_byte_near_end,
        &mut v.aggregator(2),
        &[
            "round-0001/moments.safetensors does not match its checksum",
            "round-0001/report.json records",
        ],
    );

    // A truncated global model: the next round's trainers refuse to start from it.
    truncate(&l.global_model(1));
    refused(
        &v,
        &mut v.trainer(2, 0),
        &[
            "global model of round 1 is missing or damaged",
            "round-0001/global.safetensors",
        ],
    );
    // Global models of two rounds swapped: caught by the report's checksum.
    let good = std::fs::read(l.global_model(0)).unwrap();
    std::fs::write(l.global_model(1), &good).unwrap();
    refused(
        &v,
        &mut v.trainer(2, 0),
        &[
            "round-0001/global.safetensors does not match its checksum",
            "round-0001/report.json records",
        ],
    );
}

#[test]
fn a_rerun_repairs_exactly_the_damaged_steps() {
    let v = volume();
    let l = &v.layout;
    let want = v.snapshot();

    truncate(&l.shard(2)); // the copier rewrites it; the updates made from it still verify
    flip_byte_near_end(&l.update(2, 1)); // that worker trains again
    truncate(&l.global_model(1)); // round 1 is aggregated again
    flip_byte_near_end(&l.moments(1)); // (which also writes its moments again)
    flip_byte_near_end(&l.latest_model()); // published again
    let (out, _) = run_ok(&mut v.pipeline());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let kept = kept_rounds(&stdout);
    assert!(
        kept.contains(&0) && !kept.contains(&1),
        "round 0 should be kept and round 1 aggregated again:\n{stdout}"
    );
    assert!(
        stdout
            .contains("round 2: kept the verified updates of shards [0, 2], computing the other 1"),
        "{stdout}"
    );
    assert_eq!(
        v.snapshot(),
        want,
        "the repaired volume differs from the original"
    );
    let copier_log = std::fs::read_to_string(v.root.join("logs/copier.log")).unwrap();
    assert!(
        copier_log.contains("shard-00002.parquet does not match its checksum")
            && copier_log.contains("manifest.json records"),
        "the copier did not say what it found:\n{copier_log}"
    );
}
