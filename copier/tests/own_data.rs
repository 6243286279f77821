//! Bring your own labeled text: CSV, TSV, JSON Lines, Parquet and label folders, built here
//! in temp folders; a three-class toy; every bad input named and leaving nothing behind;
//! and IMDB's `--task rating`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use fedimdb::reviews::Review;
use polars::prelude::{Column, DataFrame, ParquetWriter};

/// A toy data set: `(text, label)` pairs, `per_label` of each label, texts distinct.
fn toy(labels: &[&str], per_label: usize) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for i in 0..per_label {
        for l in labels {
            v.push((
                format!("review {i} about {l}, with \"quotes\""),
                (*l).to_owned(),
            ));
        }
    }
    v
}

/// `rows` as CSV (or TSV with `sep` `\t`) with the header `text,label`, quoting every text.
fn delimited(rows: &[(String, String)], sep: char) -> String {
    let mut s = format!("text{sep}label\n");
    for (t, l) in rows {
        s.push_str(&format!("\"{}\"{sep}{l}\n", t.replace('"', "\"\"")));
    }
    s
}

fn jsonl(rows: &[(String, String)]) -> String {
    rows.iter()
        .map(|(t, l)| serde_json::json!({"text": t, "label": l, "extra": 1}).to_string() + "\n")
        .collect()
}

fn write_parquet(path: &Path, rows: &[(String, String)]) {
    let text: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    let label: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    let mut df = DataFrame::new(
        rows.len(),
        vec![
            Column::new("body".into(), text),
            Column::new("category".into(), label),
        ],
    )
    .unwrap();
    ParquetWriter::new(fs::File::create(path).unwrap())
        .finish(&mut df)
        .unwrap();
}

fn write_folders(dir: &Path, rows: &[(String, String)]) {
    for (i, (t, l)) in rows.iter().enumerate() {
        fs::create_dir_all(dir.join(l)).unwrap();
        fs::write(dir.join(l).join(format!("{i:03}.txt")), t).unwrap();
    }
}

/// Every review of the output, shards then test, as (text, label name).
fn labeled(root: &Path) -> (Vec<(String, String)>, DataOut) {
    let out = read_output(root);
    let name = |r: &Review| out.manifest.labels[usize::from(r.label)].clone();
    let all = out
        .shards
        .iter()
        .flatten()
        .chain(&out.test)
        .map(|r| (r.text.clone(), name(r)))
        .collect();
    (all, out)
}

/// Checks what every format must give for `rows`: all reviews once, labels named, counts
/// per label in the manifest equal to the files'.
fn check_output(root: &Path, rows: &[(String, String)], labels: &[&str]) -> DataOut {
    let (mut got, out) = labeled(root);
    let mut want = rows.to_vec();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(out.manifest.labels, labels);
    for (entry, reviews) in out
        .manifest
        .shards
        .iter()
        .chain(std::iter::once(&out.manifest.test))
        .zip(out.shards.iter().chain(std::iter::once(&out.test)))
    {
        let counts = fedimdb::dataset::label_counts(reviews, labels.len());
        assert_eq!(entry.label_counts, counts, "{}", entry.file);
        assert_eq!(entry.rows, reviews.len());
        assert!(reviews.iter().all(|r| r.rating == 0));
    }
    out
}

#[test]
fn csv_tsv_jsonl_parquet_and_folders_give_the_same_reviews() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let rows = toy(&["spam", "ham"], 20);
    let test = toy(&["ham", "spam"], 3);
    fs::write(t.join("d.csv"), delimited(&rows, ',')).unwrap();
    fs::write(t.join("test.csv"), delimited(&test, ',')).unwrap();
    fs::write(t.join("d.tsv"), delimited(&rows, '\t')).unwrap();
    fs::write(t.join("d.jsonl"), jsonl(&rows)).unwrap();
    write_parquet(&t.join("d.parquet"), &rows);
    write_folders(&t.join("folders"), &rows);

    // With --test: every review of both files, ham = 0, spam = 1 (byte order).
    ok(shard(
        &t.join("d.csv"),
        &t.join("csv"),
        3,
        &["--test", s(&t.join("test.csv"))],
    ));
    let all: Vec<_> = rows.iter().chain(&test).cloned().collect();
    let out = check_output(&t.join("csv"), &all, &["ham", "spam"]);
    assert_eq!(out.manifest.test.label_counts, [3, 3]);
    assert_eq!(
        (out.manifest.test.positive, out.manifest.test.negative),
        (Some(3), Some(3))
    );
    assert_eq!(out.manifest.source.kind, "csv");
    assert_eq!(out.manifest.test_source.as_ref().unwrap().kind, "csv");
    assert_eq!(out.manifest.text_column.as_deref(), Some("text"));
    // Ids say where each review was: line 2 is the first record.
    assert!(
        out.test.iter().any(|r| r.id == "test/2"),
        "{:?}",
        out.test[0].id
    );
    // Shards are stratified: 40 reviews over 3 shards, each label within one.
    for e in &out.manifest.shards {
        assert!((6..=7).contains(&e.label_counts[0]), "{:?}", e.label_counts);
    }

    // With --test-fraction: the same split, whatever the format.
    let fraction = ["--test-fraction", "0.25"];
    let mut splits = Vec::new();
    for (src, extra) in [
        ("d.csv", &[][..]),
        ("d.tsv", &[][..]),
        ("d.jsonl", &[][..]),
        (
            "d.parquet",
            &["--text-column", "body", "--label-column", "category"][..],
        ),
        ("folders", &[][..]),
    ] {
        let root = t.join(format!("out-{src}"));
        let mut args = fraction.to_vec();
        args.extend_from_slice(extra);
        ok(shard(&t.join(src), &root, 2, &args));
        let out = check_output(&root, &rows, &["ham", "spam"]);
        assert_eq!(out.manifest.test.label_counts, [5, 5], "{src}");
        assert_eq!(out.manifest.test_fraction, Some(0.25));
        let mut test: Vec<String> = out.test.iter().map(|r| r.text.clone()).collect();
        test.sort();
        splits.push(test);
        // A re-run is a no-op.
        let again = ok(shard(&t.join(src), &root, 2, &args));
        assert!(again.contains("already done"), "{src}: {again}");
    }
    // Folders are read in (label, file) order, the files in record order: only the folder
    // source orders its reviews differently, so the others hold out the same reviews.
    assert!(splits[..4].windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn a_three_class_toy_is_sharded_per_label() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let rows = toy(&["red", "green", "blue"], 30);
    fs::write(t.join("colors.jsonl"), jsonl(&rows)).unwrap();
    let root = t.join("iid");
    ok(shard(
        &t.join("colors.jsonl"),
        &root,
        4,
        &["--test-fraction", "0.2"],
    ));
    let out = check_output(&root, &rows, &["blue", "green", "red"]);
    assert_eq!(out.manifest.test.label_counts, [6, 6, 6]);
    assert_eq!(out.manifest.test.positive, None);
    for c in 0..3 {
        let per_shard: Vec<usize> = out
            .manifest
            .shards
            .iter()
            .map(|e| e.label_counts[c])
            .collect();
        let spread = per_shard.iter().max().unwrap() - per_shard.iter().min().unwrap();
        assert!(spread <= 1, "class {c}: {per_shard:?}");
        assert_eq!(per_shard.iter().sum::<usize>(), 24);
    }
    let json = fs::read_to_string(root.join("data/manifest.json")).unwrap();
    assert!(!json.contains("\"positive\""), "{json}");

    let root = t.join("dirichlet");
    ok(shard(
        &t.join("colors.jsonl"),
        &root,
        3,
        &[
            "--test-fraction",
            "0.2",
            "--partition",
            "dirichlet",
            "--alpha",
            "0.3",
            "--min-shard",
            "4",
        ],
    ));
    let out = check_output(&root, &rows, &["blue", "green", "red"]);
    assert!(out.manifest.shards.iter().all(|e| e.rows >= 4));
}

#[test]
fn labels_that_are_integers_are_ordered_by_value() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let rows = toy(&["10", "2", "1"], 4);
    fs::write(t.join("n.csv"), delimited(&rows, ',')).unwrap();
    ok(shard(
        &t.join("n.csv"),
        &t.join("r"),
        1,
        &["--test-fraction", "0.25"],
    ));
    assert_eq!(read_output(&t.join("r")).manifest.labels, ["1", "2", "10"]);
}

/// The copier refuses `source` with `extra` flags, naming every needle, and writes nothing.
fn refuses(source: &Path, extra: &[&str], needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    fails(shard(source, &root, 2, extra), needles);
    assert!(
        !root.join("data").exists(),
        "output left behind for {source:?}"
    );
}

/// Writes `bytes` to `dir/name`.
fn file(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn bad_input_is_named_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let frac = &["--test-fraction", "0.5"][..];
    let good = delimited(&toy(&["a", "b"], 3), ',');

    // A missing column, in each table format.
    let csv = file(t, "good.csv", &good);
    refuses(
        &csv,
        &["--test-fraction", "0.5", "--text-column", "body"],
        &["good.csv: no column \"body\" (the --text-column); its columns are \"text\", \"label\""],
    );
    let jl = file(t, "nolabel.jsonl", "{\"text\": \"x\", \"y\": 1}\n");
    refuses(
        &jl,
        frac,
        &["nolabel.jsonl line 1: no key \"label\" (the --label-column); its keys are \"y\""],
    );
    let pq = t.join("p.parquet");
    write_parquet(&pq, &toy(&["a", "b"], 2));
    refuses(
        &pq,
        frac,
        &["p.parquet: no column \"text\"", "\"body\", \"category\""],
    );

    // An empty text, named by line, row or file.
    let csv = file(t, "empty.csv", format!("{good}\"  \",b\n"));
    refuses(&csv, frac, &["empty.csv line 8: the text is empty"]);
    let jl = file(
        t,
        "empty.jsonl",
        "{\"text\": \"x\", \"label\": \"a\"}\n{\"text\": \"\", \"label\": \"b\"}\n",
    );
    refuses(&jl, frac, &["empty.jsonl line 2: the text is empty"]);
    let dir = t.join("emptyfolder");
    write_folders(&dir, &toy(&["a", "b"], 2));
    fs::write(dir.join("b/zz.txt"), "").unwrap();
    refuses(&dir, frac, &["b/zz.txt: the text is empty"]);

    // A single label.
    let csv = file(t, "one.csv", delimited(&toy(&["spam"], 4), ','));
    refuses(
        &csv,
        frac,
        &["one.csv has a single label, \"spam\", on all its 4 reviews"],
    );

    // A test label not in training.
    let test = file(t, "test.csv", delimited(&toy(&["a", "c"], 1), ','));
    refuses(
        &file(t, "train.csv", &good),
        &["--test", s(&test)],
        &[
            "test.csv line 3: label \"c\" is not among the training labels of",
            "(a, b)",
        ],
    );

    // Not UTF-8, named by line (or file).
    let mut bytes = good.clone().into_bytes();
    bytes.extend_from_slice(b"caf\xe9,a\n");
    refuses(
        &file(t, "latin1.csv", &bytes),
        frac,
        &["latin1.csv line 8: not valid UTF-8"],
    );
    refuses(
        &file(
            t,
            "latin1.jsonl",
            b"{\"text\": \"ok\", \"label\": 1}\n{\"text\": \"caf\xe9\", \"label\": 2}\n",
        ),
        frac,
        &["latin1.jsonl line 2: not valid UTF-8"],
    );
    let dir = t.join("latin1folder");
    write_folders(&dir, &toy(&["a", "b"], 2));
    fs::write(dir.join("a/bad.txt"), b"caf\xe9").unwrap();
    refuses(
        &dir,
        frac,
        &["a/bad.txt: not valid UTF-8 (bad byte at offset 3)"],
    );

    // Malformed lines, named by number.
    refuses(
        &file(t, "ragged.csv", format!("{good}x,a,extra\n")),
        frac,
        &["ragged.csv line 8 has 3 fields, the header (line 1) has 2"],
    );
    refuses(
        &file(t, "open.csv", format!("{good}\"never closed,a\n")),
        frac,
        &["open.csv line 8: a quoted field is never closed"],
    );
    refuses(
        &file(t, "ragged.tsv", "text\tlabel\na\tb\tc\n"),
        frac,
        &["ragged.tsv line 2 has 3 fields"],
    );
    refuses(
        &file(
            t,
            "bad.jsonl",
            "{\"text\": \"x\", \"label\": \"a\"}\n{\"text\": \n",
        ),
        frac,
        &["bad.jsonl line 2: not a JSON object"],
    );

    // Flags that do not fit the source, before anything is read.
    refuses(
        &csv,
        &[],
        &["has no test split: pass --test SOURCE", "--test-fraction"],
    );
    refuses(
        &csv,
        &["--test-fraction", "1"],
        &["--test-fraction must be between 0 and 1"],
    );
    refuses(
        &csv,
        &["--test-fraction", "0.5", "--task", "rating"],
        &["--task rating needs the IMDB archive"],
    );
    let (_keep, archive) = small_archive();
    refuses(
        &archive,
        &["--test-fraction", "0.2"],
        &["has its own test split"],
    );
    refuses(
        &archive,
        &["--text-column", "t"],
        &["--text-column applies to CSV, TSV, JSON Lines and Parquet"],
    );
}

#[test]
fn rating_task_makes_eight_classes_from_the_file_names() {
    let (tmp, archive) = small_archive();
    let root = tmp.path().join("rating");
    ok(shard(&archive, &root, 2, &["--task", "rating"]));
    let out = read_output(&root);
    assert_eq!(
        out.manifest.labels,
        ["1", "2", "3", "4", "7", "8", "9", "10"]
    );
    assert_eq!(out.manifest.task, Some(fedimdb::labels::Task::Rating));
    for r in out.shards.iter().flatten().chain(&out.test) {
        assert_eq!(
            out.manifest.labels[usize::from(r.label)],
            r.rating.to_string(),
            "{}",
            r.id
        );
    }
    // small_dataset: ratings cycle 7,8,9,10 over 12 pos (plus one 10) and 1,2,3,4 over 12
    // neg (plus one 2) training reviews; 6 and 6 test reviews.
    let train: Vec<usize> = (0..8)
        .map(|c| out.manifest.shards.iter().map(|e| e.label_counts[c]).sum())
        .collect();
    assert_eq!(train, [3, 4, 3, 3, 3, 3, 3, 4]);
    assert_eq!(out.manifest.test.label_counts, [2, 2, 1, 1, 2, 2, 1, 1]);

    // The same source with --task sentiment is other data: refused without --force.
    fails(
        shard(&archive, &root, 2, &[]),
        &["task rating → sentiment", "--force"],
    );
    // Sentiment is today's output, byte for byte.
    let a = tmp.path().join("a");
    ok(shard(&archive, &a, 2, &["--task", "sentiment"]));
    let b = tmp.path().join("b");
    ok(shard(&archive, &b, 2, &[]));
    assert_eq!(data_bytes(&a), data_bytes(&b));
    assert_eq!(read_output(&b).manifest.labels, ["neg", "pos"]);
}

#[test]
fn rating_task_on_the_shared_archive_counts_the_known_ratings() {
    let Some(archive) = std::env::var_os("FEDIMDB_ARCHIVE")
        .map(PathBuf::from)
        .or_else(|| {
            let p = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/data/aclImdb-labeled.tar.gz");
            p.is_file().then_some(p)
        })
    else {
        eprintln!("SKIPPED: the shared archive is absent (set FEDIMDB_ARCHIVE)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    ok(shard(&archive, tmp.path(), 5, &["--task", "rating"]));
    let m = read_output(tmp.path()).manifest;
    let train: Vec<usize> = (0..8)
        .map(|c| m.shards.iter().map(|e| e.label_counts[c]).sum())
        .collect();
    // Maas et al.'s counts per star rating, 1–4 and 7–10.
    assert_eq!(train, [5100, 2284, 2420, 2696, 2496, 3009, 2263, 4732]);
    assert_eq!(
        m.test.label_counts,
        [5022, 2302, 2541, 2635, 2307, 2850, 2344, 4999]
    );
}

#[test]
fn imdb_as_csv_gives_the_archive_s_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (_keep, archive) = small_archive();
    let from_archive = t.join("archive");
    ok(shard(&archive, &from_archive, 3, &[]));
    let want = read_output(&from_archive);
    // The archive's reviews in canonical order (neg then pos, by number) as CSV rows.
    let csv_of = |reviews: &[Review]| -> String {
        let mut sorted: Vec<&Review> = reviews.iter().collect();
        sorted.sort_by_key(|r| {
            let (folder, n) = r.id.rsplit_once('/').unwrap();
            (folder.to_owned(), n.parse::<u64>().unwrap())
        });
        let rows: Vec<(String, String)> = sorted
            .iter()
            .map(|r| {
                (
                    r.text.clone(),
                    ["neg", "pos"][usize::from(r.label)].to_owned(),
                )
            })
            .collect();
        delimited(&rows, ',')
    };
    let train: Vec<Review> = want.shards.iter().flatten().cloned().collect();
    fs::write(t.join("train.csv"), csv_of(&train)).unwrap();
    fs::write(t.join("test.csv"), csv_of(&want.test)).unwrap();
    let from_csv = t.join("csv");
    ok(shard(
        &t.join("train.csv"),
        &from_csv,
        3,
        &["--test", s(&t.join("test.csv"))],
    ));
    let got = read_output(&from_csv);
    let strip = |rs: &[Review]| -> Vec<(String, u8)> {
        rs.iter().map(|r| (r.text.clone(), r.label)).collect()
    };
    for (a, b) in want.shards.iter().zip(&got.shards) {
        assert_eq!(strip(a), strip(b));
    }
    assert_eq!(got.manifest.labels, ["neg", "pos"]);
    let counts = |m: &fedimdb::manifest::DataManifest| -> Vec<Vec<usize>> {
        m.shards
            .iter()
            .chain(std::iter::once(&m.test))
            .map(|e| e.label_counts.clone())
            .collect()
    };
    assert_eq!(counts(&want.manifest), counts(&got.manifest));
}
