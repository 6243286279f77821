//! Every kind of bad input fails with a message naming the problem, a non-zero exit code,
//! and no output: no data files, no manifest, no temporary files.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

use common::*;

/// Runs the copier from `source` into `root` with `extra` arguments, expects failure with
/// all `needles` in the message, and checks that `root` received nothing.
fn refuses(source: &Path, root: &Path, extra: &[&str], needles: &[&str]) {
    let mut args = vec!["--source", s(source), "--out", s(root)];
    if !extra.contains(&"--workers") {
        args.extend(["--workers", "2"]);
    }
    args.extend_from_slice(extra);
    let out = copier(&args);
    if out.status.code() == Some(2) {
        panic!(
            "clap rejected the arguments instead of the copier: {}",
            text(&out)
        );
    }
    fails(out, needles);
    assert_no_output(root);
}

/// [`refuses`] `source` with the default arguments, into `tmp/run`.
fn refuses_source(tmp: &Path, source: &Path, needles: &[&str]) {
    refuses(source, &tmp.join("run"), &[], needles);
}

/// [`refuses_source`] a file `tmp/name` holding `bytes`.
fn refuses_file(tmp: &Path, name: &str, bytes: &[u8], needles: &[&str]) {
    let src = tmp.join(name);
    fs::write(&src, bytes).unwrap();
    refuses_source(tmp, &src, needles);
}

fn assert_no_output(root: &Path) {
    let left = names(&root.join("data"));
    assert!(
        left.is_empty(),
        "files left behind in {}: {left:?}",
        root.display()
    );
    assert!(!root.join("data").exists(), "data folder left behind");
}

/// An archive of `entries` in a temp folder.
fn archive_of(tmp: &Path, name: &str, entries: &[Entry]) -> PathBuf {
    let p = tmp.join(name);
    write_archive(&p, entries);
    p
}

#[test]
fn missing_source() {
    let (tmp, _) = small_archive();
    let root = tmp.path().join("run");
    refuses(
        &tmp.path().join("nope.tar.gz"),
        &root,
        &[],
        &["nope.tar.gz", "cannot be opened", "copier download"],
    );
    assert!(!root.exists());
}

#[test]
fn not_gzip() {
    let (tmp, _) = small_archive();
    refuses_file(
        tmp.path(),
        "plain.tar.gz",
        b"this is not a gzip file at all",
        &["plain.tar.gz", "not a gzip file"],
    );
    refuses_file(
        tmp.path(),
        "empty.tar.gz",
        b"",
        &["empty.tar.gz", "not a gzip file"],
    );
}

#[test]
fn truncated_archive() {
    let (tmp, archive) = small_archive();
    let bytes = fs::read(&archive).unwrap();
    // Cut in the middle, and cut only the gzip trailer (CRC and length).
    for (name, keep) in [
        ("half.tar.gz", bytes.len() / 2),
        ("no-trailer.tar.gz", bytes.len() - 4),
    ] {
        refuses_file(
            tmp.path(),
            name,
            &bytes[..keep],
            &[name, "truncated or corrupt"],
        );
    }
}

#[test]
fn gzip_that_is_not_a_tar() {
    let (tmp, _) = small_archive();
    let src = tmp.path().join("text.gz");
    let mut gz = GzEncoder::new(fs::File::create(&src).unwrap(), Compression::default());
    gz.write_all(&b"just some text, not a tar archive\n".repeat(40))
        .unwrap();
    gz.finish().unwrap();
    refuses_source(
        tmp.path(),
        &src,
        &["text.gz", "at its first entry", "truncated or corrupt"],
    );
}

#[test]
fn corrupt_gzip_data() {
    let (tmp, archive) = small_archive();
    let mut bytes = fs::read(&archive).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    refuses_file(
        tmp.path(),
        "flipped.tar.gz",
        &bytes,
        &["flipped.tar.gz", "truncated or corrupt"],
    );
}

#[test]
fn missing_review_folders_are_named() {
    let (tmp, _) = small_archive();
    let entries: Vec<Entry> = small_dataset()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("train/neg/") && !n.starts_with("test/pos/"))
        .collect();
    let src = archive_of(tmp.path(), "partial.tar.gz", &entries);
    refuses_source(
        tmp.path(),
        &src,
        &[
            "partial.tar.gz",
            "no reviews in aclImdb/train/neg, aclImdb/test/pos",
        ],
    );

    // A gzip tar of something else entirely.
    let src = archive_of(
        tmp.path(),
        "other.tar.gz",
        &[("notes.txt".into(), b"hello".to_vec())],
    );
    refuses_source(
        tmp.path(),
        &src,
        &["aclImdb/train/pos, aclImdb/train/neg, aclImdb/test/pos, aclImdb/test/neg"],
    );

    // The same check for folders.
    let folder = tmp.path().join("folder");
    write_folder(&folder, &entries);
    refuses_source(
        tmp.path(),
        &folder,
        &["no reviews in aclImdb/train/neg, aclImdb/test/pos"],
    );
}

#[test]
fn invalid_utf8_review_is_named() {
    let (tmp, _) = small_archive();
    let mut entries = small_dataset();
    entries.push(("train/neg/200_3.txt".into(), b"caf\xe9 latin-1".to_vec()));
    let src = archive_of(tmp.path(), "latin1.tar.gz", &entries);
    refuses_source(
        tmp.path(),
        &src,
        &["aclImdb/train/neg/200_3.txt", "not valid UTF-8"],
    );
    let folder = tmp.path().join("folder");
    write_folder(&folder, &entries);
    refuses_source(
        tmp.path(),
        &folder,
        &["train/neg/200_3.txt", "not valid UTF-8"],
    );
}

#[test]
fn bad_ratings_and_names_are_named() {
    let (tmp, _) = small_archive();
    for (i, (file, needle)) in [
        ("train/pos/300_3.txt", "rating 3 in a pos/ folder"),
        ("test/neg/300_9.txt", "rating 9 in a neg/ folder"),
        ("train/neg/300_0.txt", "outside 1..=10"),
        ("train/pos/review.txt", "ID_RATING.txt"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut entries = small_dataset();
        entries.push((file.into(), b"text".to_vec()));
        let src = archive_of(tmp.path(), &format!("bad{i}.tar.gz"), &entries);
        refuses_source(tmp.path(), &src, &[&format!("aclImdb/{file}"), needle]);
    }
}

#[test]
fn bad_worker_counts() {
    let (tmp, archive) = small_archive();
    let root = tmp.path().join("run");
    refuses(
        &archive,
        &root,
        &["--workers", "0"],
        &["--workers must be at least 1"],
    );
    refuses(
        &archive,
        &root,
        &["--workers", "27"],
        &["--workers 27 is more than the 26 training reviews"],
    );
    refuses(
        &archive,
        &root,
        &["--workers", "27", "--partition", "dirichlet"],
        &["more than the 26 training reviews"],
    );
}

#[test]
fn bad_alphas() {
    let (tmp, archive) = small_archive();
    let root = tmp.path().join("run");
    for a in ["0", "-1", "NaN", "inf"] {
        refuses(
            &archive,
            &root,
            &["--partition", "dirichlet", &format!("--alpha={a}")],
            &["--alpha must be a positive finite number"],
        );
    }
    // Without a floor, a Dirichlet draw that cannot fill every shard.
    refuses(
        &archive,
        &root,
        &[
            "--workers",
            "26",
            "--partition",
            "dirichlet",
            "--alpha",
            "0.001",
            "--min-shard",
            "0",
        ],
        &["raise --alpha", "lower --workers"],
    );
}

#[test]
fn unwritable_output() {
    let (tmp, archive) = small_archive();
    // --out below a regular file.
    let file = tmp.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    fails(
        shard(&archive, &file.join("run"), 2, &[]),
        &["cannot create the output folder", "a-file"],
    );
    assert_eq!(fs::read(&file).unwrap(), b"x");

    // data/ exists as a file.
    let root = tmp.path().join("run");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("data"), b"x").unwrap();
    fails(
        shard(&archive, &root, 2, &[]),
        &["cannot create the output folder"],
    );
    assert_eq!(names(&root), ["data"]);

    // Fails part-way: a shard name is taken by a folder, so that shard cannot be renamed
    // into place after the test set and other shards were written. They must be removed.
    let root = tmp.path().join("run2");
    fs::create_dir_all(root.join("data/shard-00001.parquet/inside")).unwrap();
    fails(shard(&archive, &root, 3, &[]), &["shard-00001.parquet"]);
    assert_eq!(
        names(&root.join("data")),
        ["shard-00001.parquet"],
        "written files were not removed"
    );
}

#[test]
fn bad_input_does_not_create_the_output_folder() {
    let (tmp, archive) = small_archive();
    let fresh = tmp.path().join("x/y/z");
    refuses(
        &tmp.path().join("missing.tar.gz"),
        &fresh,
        &[],
        &["cannot be opened"],
    );
    refuses(&archive, &fresh, &["--workers", "0"], &["at least 1"]);
    assert!(!tmp.path().join("x").exists());
}
