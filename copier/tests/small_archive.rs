//! The copier on a small archive the test builds itself: outputs, manifest, coverage,
//! determinism, idempotence, refusal and `--force`, and folder/archive equivalence.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use common::*;
use fedimdb::manifest::Partition;
use fedimdb::reviews::{NEGATIVE, POSITIVE};

/// Ids of all reviews in the training shards, asserting none repeats.
fn shard_ids(out: &DataOut) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for r in out.shards.iter().flatten() {
        assert!(ids.insert(r.id.clone()), "{} is in two shards", r.id);
    }
    ids
}

fn expected_ids(prefix: &str) -> BTreeSet<String> {
    small_dataset()
        .into_iter()
        .filter_map(|(name, _)| {
            let rest = name.strip_prefix(prefix)?;
            let (folder, file) = rest.split_once('/')?;
            if folder != "pos" && folder != "neg" {
                return None;
            }
            Some(format!(
                "{prefix}{folder}/{}",
                file.split('_').next().unwrap()
            ))
        })
        .collect()
}

#[test]
fn writes_shards_test_set_and_manifest() {
    let (tmp, archive) = small_archive();
    let root = tmp.path().join("run");
    let log = ok(shard(&archive, &root, 3, &[]));
    assert!(log.contains("wrote 3 iid shards"), "{log}");

    assert_eq!(
        names(&root.join("data")),
        [
            "manifest.json",
            "shard-00000.parquet",
            "shard-00001.parquet",
            "shard-00002.parquet",
            "test.parquet"
        ]
    );
    let out = read_output(&root);
    let m = &out.manifest;
    assert_eq!(
        (m.workers, m.partition, m.alpha, m.seed),
        (3, Partition::Iid, None, 42)
    );
    assert_eq!(m.tool, format!("copier {}", fedimdb::VERSION));
    assert_eq!(m.source.kind, "archive");
    assert_eq!(m.source.path, s(&archive));
    assert_eq!(
        m.source.sha256,
        fedimdb::digest::sha256_file(&archive).unwrap()
    );
    let raw = fs::read_to_string(root.join("data/manifest.json")).unwrap();
    assert!(raw.contains("\"alpha\": null"), "{raw}");

    // Each entry describes its file.
    for (entry, reviews) in m
        .shards
        .iter()
        .chain([&m.test])
        .zip(out.shards.iter().chain([&out.test]))
    {
        assert_eq!(entry.rows, reviews.len());
        assert_eq!(
            entry.positive,
            Some(reviews.iter().filter(|r| r.label == POSITIVE).count())
        );
        assert_eq!(
            entry.negative,
            Some(reviews.iter().filter(|r| r.label == NEGATIVE).count())
        );
        assert_eq!(
            entry.sha256,
            fedimdb::digest::sha256_file(&root.join("data").join(&entry.file)).unwrap()
        );
    }
    // Sizes within one; labels within one (13 positive, 13 negative training reviews).
    let sizes: Vec<usize> = m.shards.iter().map(|e| e.rows).collect();
    assert_eq!(sizes.iter().sum::<usize>(), SMALL_TRAIN);
    assert!(
        sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
        "{sizes:?}"
    );
    let pos: Vec<usize> = m.shards.iter().map(|e| e.positive.unwrap()).collect();
    assert!(
        pos.iter().max().unwrap() - pos.iter().min().unwrap() <= 1,
        "{pos:?}"
    );

    // Every training review exactly once in the shards, every test review in test only.
    assert_eq!(shard_ids(&out), expected_ids("train/"));
    let test_ids: BTreeSet<String> = out.test.iter().map(|r| r.id.clone()).collect();
    assert_eq!(test_ids, expected_ids("test/"));
    assert_eq!(
        (m.test.rows, m.test.positive, m.test.negative),
        (SMALL_TEST, Some(6), Some(6))
    );

    // Ratings, labels and text survive, non-ASCII included.
    let all: Vec<_> = out.shards.iter().flatten().chain(&out.test).collect();
    let special = all.iter().find(|r| r.id == "train/pos/12").unwrap();
    assert_eq!(
        (special.rating, special.label, special.text.as_str()),
        (10, POSITIVE, "Très bien — 素晴らしい 🎬")
    );
    let neg = all.iter().find(|r| r.id == "train/neg/101").unwrap();
    assert_eq!(
        (neg.rating, neg.label, neg.text.as_str()),
        (2, NEGATIVE, "awful film 1<br /><br />really")
    );
    assert!(all.iter().all(|r| (r.label == POSITIVE) == (r.rating >= 7)));
}

#[test]
fn rerun_is_a_no_op_and_other_arguments_need_force() {
    let (tmp, archive) = small_archive();
    let root = tmp.path().join("run");
    ok(shard(&archive, &root, 3, &[]));
    let manifest = root.join("data/manifest.json");
    let before = (
        fs::read(&manifest).unwrap(),
        fs::metadata(&manifest).unwrap().modified().unwrap(),
        data_bytes(&root),
    );

    let log = ok(shard(&archive, &root, 3, &[]));
    assert!(log.contains("already done"), "{log}");
    let after = (
        fs::read(&manifest).unwrap(),
        fs::metadata(&manifest).unwrap().modified().unwrap(),
        data_bytes(&root),
    );
    assert!(before == after, "a no-op run changed files");

    // Other settings: refused, naming the differences, nothing changed.
    let log = fails(
        shard(&archive, &root, 2, &["--seed", "7"]),
        &["workers 3 → 2", "seed 42 → 7", "--force"],
    );
    assert!(!log.contains("wrote"), "{log}");
    let log = fails(
        shard(&archive, &root, 3, &["--partition", "dirichlet"]),
        &["partition iid → dirichlet", "alpha none → 0.5"],
    );
    assert!(log.contains("--force"));
    assert!(data_bytes(&root) == before.2);

    // Another source with the same settings: refused too.
    let mut other = small_dataset();
    other[0].1 = b"a different review".to_vec();
    let archive2 = tmp.path().join("other.tar.gz");
    write_archive(&archive2, &other);
    fails(
        shard(&archive2, &root, 3, &[]),
        &["another source", "--force"],
    );

    // --force with fewer workers: rewritten, the extra shard removed.
    ok(shard(&archive, &root, 2, &["--force"]));
    assert_eq!(
        names(&root.join("data")),
        [
            "manifest.json",
            "shard-00000.parquet",
            "shard-00001.parquet",
            "test.parquet"
        ]
    );
    let out = read_output(&root);
    assert_eq!(out.manifest.workers, 2);
    assert_eq!(shard_ids(&out), expected_ids("train/"));
}

#[test]
fn same_seed_gives_identical_bytes_and_other_seeds_differ() {
    let (tmp, archive) = small_archive();
    let run = |name: &str, extra: &[&str]| {
        let root = tmp.path().join(name);
        ok(shard(&archive, &root, 4, extra));
        root
    };
    let a = run("a", &[]);
    let b = run("b", &[]);
    assert!(
        data_bytes(&a) == data_bytes(&b),
        "same arguments gave different shards"
    );
    assert_eq!(
        fs::read(a.join("data/manifest.json")).unwrap(),
        fs::read(b.join("data/manifest.json")).unwrap()
    );
    let c = run("c", &["--seed", "43"]);
    assert!(
        data_bytes(&a) != data_bytes(&c),
        "another seed gave the same shards"
    );
    // The test set does not depend on the seed or the partition.
    assert_eq!(
        fs::read(a.join("data/test.parquet")).unwrap(),
        fs::read(c.join("data/test.parquet")).unwrap()
    );
}

#[test]
fn folder_archive_and_entry_order_give_identical_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let entries = small_dataset();
    let archive = tmp.path().join("imdb.tar.gz");
    write_archive(&archive, &entries);
    // Same files, another order in the archive.
    let mut reversed = entries.clone();
    reversed.reverse();
    let archive_rev = tmp.path().join("reversed.tar.gz");
    write_archive(&archive_rev, &reversed);
    // Test entries, then training entries, then more test entries: the test set looks
    // complete after the first block (the copier starts encoding it then) but is not.
    let (test, train): (Vec<Entry>, Vec<Entry>) = entries
        .iter()
        .cloned()
        .partition(|(n, _)| n.starts_with("test/"));
    let mut interleaved = test[..4].to_vec();
    interleaved.extend(train);
    interleaved.extend_from_slice(&test[4..]);
    let archive_mixed = tmp.path().join("interleaved.tar.gz");
    write_archive(&archive_mixed, &interleaved);
    let folder = tmp.path().join("unpacked");
    write_folder(&folder, &entries);

    let dirichlet = ["--partition", "dirichlet", "--alpha", "1"];
    let run = |name: &str, source: &Path| {
        let root = tmp.path().join(name);
        ok(shard(source, &root, 3, &dirichlet));
        root
    };
    let a = run("from-archive", &archive);
    let reference = data_bytes(&a);
    assert!(
        data_bytes(&run("from-interleaved", &archive_mixed)) == reference,
        "a test split interrupted by training entries changed the output"
    );
    assert_eq!(reference.len(), 4);
    assert!(
        data_bytes(&run("from-reversed", &archive_rev)) == reference,
        "archive order changed the shards"
    );
    let f = run("from-folder", &folder);
    assert!(
        data_bytes(&f) == reference,
        "folder and archive gave different shards"
    );
    assert!(data_bytes(&run("from-aclimdb", &folder.join("aclImdb"))) == reference);

    let m = read_output(&f).manifest;
    assert_eq!(m.source.kind, "folder");
    assert_eq!(m.source.sha256.len(), 64);
    assert_eq!((m.partition, m.alpha), (Partition::Dirichlet, Some(1.0)));

    // A folder source is also recognised on a re-run (its digest is stable).
    let log = ok(shard(&folder, &f, 3, &dirichlet));
    assert!(log.contains("already done"), "{log}");
}

#[test]
fn dirichlet_shards_cover_everything_once_and_none_is_empty() {
    let (tmp, archive) = small_archive();
    let root = tmp.path().join("run");
    ok(copier(&[
        "--source",
        s(&archive),
        "--savedir",
        s(&root),
        "--n_container",
        "5",
        "--partition",
        "dirichlet",
        "--alpha",
        "0.3",
        "--seed",
        "1",
    ]));
    let out = read_output(&root);
    assert_eq!(
        (out.manifest.workers, out.manifest.alpha, out.manifest.seed),
        (5, Some(0.3), 1)
    );
    assert!(out.shards.iter().all(|s| !s.is_empty()));
    assert_eq!(shard_ids(&out), expected_ids("train/"));
}

#[test]
fn interrupted_or_damaged_output_is_rewritten() {
    let (tmp, archive) = small_archive();
    let root = tmp.path().join("run");
    let run = || ok(shard(&archive, &root, 3, &[]));
    run();
    let good = data_bytes(&root);

    // A damaged shard under a matching manifest: detected and rewritten.
    fs::write(root.join("data/shard-00001.parquet"), b"garbage").unwrap();
    let log = run();
    assert!(
        log.contains("shard-00001.parquet does not match its checksum"),
        "{log}"
    );
    assert!(log.contains("does not match its manifest"), "{log}");
    assert!(data_bytes(&root) == good);

    // An interrupted run: shards (one missing), a temp file, an extra shard, no manifest.
    fs::remove_file(root.join("data/manifest.json")).unwrap();
    fs::remove_file(root.join("data/shard-00002.parquet")).unwrap();
    fs::write(root.join("data/.shard-00002.parquet.tmp-99-0"), b"partial").unwrap();
    fs::write(root.join("data/shard-00007.parquet"), b"old").unwrap();
    let log = run();
    assert!(log.contains("wrote 3 iid shards"), "{log}");
    assert!(data_bytes(&root) == good);
}

#[test]
fn source_can_come_from_the_environment() {
    let (tmp, archive) = small_archive();
    let root = tmp.path().join("run");
    let out = copier_cmd()
        .env("FEDIMDB_SOURCE", &archive)
        .args(["--out", s(&root), "--workers", "2"])
        .output()
        .unwrap();
    ok(out);
    assert_eq!(read_output(&root).manifest.source.path, s(&archive));
}
