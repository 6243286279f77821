//! Helpers shared by the integration tests: a small IMDB-shaped dataset, archives and
//! folders made from it ([`archive`]), and running the built `copier` binary.
#![allow(dead_code)]

mod archive;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[allow(unused_imports)]
pub use archive::{Entry, write_archive, write_folder};
use fedimdb::manifest::DataManifest;
use fedimdb::reviews::{Review, read_parquet};

/// A small dataset in the official layout: 12 positive and 12 negative training reviews,
/// 6 and 6 test reviews, one review with non-ASCII text, and the non-review files the
/// official archive has (which must be skipped).
pub fn small_dataset() -> Vec<Entry> {
    let mut e: Vec<Entry> = Vec::new();
    let ratings_pos = [7, 8, 9, 10];
    let ratings_neg = [1, 2, 3, 4];
    for i in 0..12 {
        e.push((
            format!("train/pos/{i}_{}.txt", ratings_pos[i % 4]),
            format!("great film number {i}").into_bytes(),
        ));
        e.push((
            format!("train/neg/{}_{}.txt", 100 + i, ratings_neg[i % 4]),
            format!("awful film {i}<br /><br />really").into_bytes(),
        ));
    }
    for i in 0..6 {
        e.push((
            format!("test/pos/{i}_{}.txt", ratings_pos[i % 4]),
            format!("loved test {i}").into_bytes(),
        ));
        e.push((
            format!("test/neg/{i}_{}.txt", ratings_neg[i % 4]),
            format!("hated test {i}").into_bytes(),
        ));
    }
    // Non-ASCII: accents, CJK, an emoji.
    e.push((
        "train/pos/12_10.txt".into(),
        "Très bien — 素晴らしい 🎬".as_bytes().to_vec(),
    ));
    e.push(("train/neg/112_2.txt".into(), b"meh".to_vec()));
    // Files the copier must skip.
    e.push(("README".into(), b"Large Movie Review Dataset v1.0".to_vec()));
    e.push(("imdb.vocab".into(), b"the\nand\n".to_vec()));
    e.push(("train/labeledBow.feat".into(), b"0:9 1:1\n".to_vec()));
    e.push(("train/unsup/0_0.txt".into(), b"unlabeled".to_vec()));
    e.push((
        "train/urls_pos.txt".into(),
        b"http://www.imdb.com/title/tt0000001/usercomments\n".to_vec(),
    ));
    e
}

/// Number of training and test reviews in [`small_dataset`].
pub const SMALL_TRAIN: usize = 26;
pub const SMALL_TEST: usize = 12;

/// A temp folder holding [`small_dataset`] as the archive `imdb.tar.gz`, and that archive.
pub fn small_archive() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("imdb.tar.gz");
    write_archive(&archive, &small_dataset());
    (tmp, archive)
}

/// Runs `copier --source SOURCE --out ROOT --workers N` with `extra` arguments.
pub fn shard(source: &Path, root: &Path, workers: usize, extra: &[&str]) -> Output {
    let workers = workers.to_string();
    let mut args = vec![
        "--source",
        s(source),
        "--out",
        s(root),
        "--workers",
        &workers,
    ];
    args.extend_from_slice(extra);
    copier(&args)
}

/// Runs the built binary with a clean environment for the things it reads.
pub fn copier(args: &[&str]) -> Output {
    copier_cmd().args(args).output().unwrap()
}

pub fn copier_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_copier"));
    for v in [
        "FEDIMDB_SOURCE",
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        c.env_remove(v);
    }
    c.env("RUST_LOG", "info");
    c
}

/// stdout and stderr of a run, for assertions and failure messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts the run succeeded, showing its output otherwise.
pub fn ok(out: Output) -> String {
    let t = text(&out);
    assert!(out.status.success(), "copier failed: {t}");
    t
}

/// Asserts the run failed with a non-zero exit code and its output mentions every needle.
pub fn fails(out: Output, needles: &[&str]) -> String {
    let t = text(&out);
    assert!(!out.status.success(), "copier should have failed: {t}");
    for n in needles {
        assert!(t.contains(n), "output does not mention {n:?}: {t}");
    }
    t
}

/// Names of the files in a folder (empty if the folder does not exist), sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// A root's manifest and the reviews of every file it lists.
pub struct DataOut {
    pub manifest: DataManifest,
    pub shards: Vec<Vec<Review>>,
    pub test: Vec<Review>,
}

/// Reads the manifest and every file it lists.
pub fn read_output(root: &Path) -> DataOut {
    let data = root.join("data");
    let manifest = DataManifest::read(&data.join("manifest.json")).unwrap();
    let shards = manifest
        .shards
        .iter()
        .map(|s| read_parquet(&data.join(&s.file)).unwrap())
        .collect();
    let test = read_parquet(&data.join(&manifest.test.file)).unwrap();
    DataOut {
        manifest,
        shards,
        test,
    }
}

/// The bytes of every file in `root/data` except the manifest, by name.
pub fn data_bytes(root: &Path) -> Vec<(String, Vec<u8>)> {
    let data = root.join("data");
    names(&data)
        .into_iter()
        .filter(|n| n != "manifest.json")
        .map(|n| {
            let b = fs::read(data.join(&n)).unwrap();
            (n, b)
        })
        .collect()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
