//! The copier on the real labeled IMDB archive (`shared/data/aclImdb-labeled.tar.gz`, or
//! `$FEDIMDB_ARCHIVE`): 5 IID shards of 5,000 reviews each and the 25,000 test reviews.
//! Skipped, with a notice, where the archive is absent.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;

use common::*;

fn archive() -> Option<PathBuf> {
    let p = std::env::var_os("FEDIMDB_ARCHIVE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/data/aclImdb-labeled.tar.gz")
        });
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: {} not found (set FEDIMDB_ARCHIVE to the IMDB archive to run this test)",
            p.display()
        );
        None
    }
}

#[test]
fn full_archive_into_five_iid_shards() {
    let Some(archive) = archive() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    ok(shard(&archive, &root, 5, &[]));

    let out = read_output(&root);
    let m = &out.manifest;
    assert_eq!(
        m.source.sha256,
        fedimdb::digest::sha256_file(&archive).unwrap()
    );
    for e in &m.shards {
        assert_eq!(
            (e.rows, e.positive, e.negative),
            (5000, Some(2500), Some(2500)),
            "{}",
            e.file
        );
    }
    assert_eq!(m.train_rows(), 25_000);
    assert_eq!(
        (m.test.rows, m.test.positive, m.test.negative),
        (25_000, Some(12_500), Some(12_500))
    );

    let mut ids = HashSet::new();
    for r in out.shards.iter().flatten() {
        assert!(r.id.starts_with("train/"), "{}", r.id);
        assert!(ids.insert(r.id.as_str()), "{} is in two shards", r.id);
        assert!(
            (r.label == 1 && r.rating >= 7) || (r.label == 0 && r.rating <= 4),
            "{}",
            r.id
        );
    }
    assert_eq!(ids.len(), 25_000);
    let test_ids: HashSet<&str> = out.test.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(test_ids.len(), 25_000);
    assert!(test_ids.iter().all(|id| id.starts_with("test/")));
}
