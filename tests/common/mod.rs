//! Helpers for the system tests: locating the built binaries, the commands of a run, and
//! making small archives (written as the copier's own tests write theirs).
#![allow(dead_code)]

#[path = "../../copier/tests/common/archive.rs"]
mod archive;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[allow(unused_imports)]
pub use archive::{Entry, write_archive};

/// `target/release` (or `target/debug`): the folder holding this test's executable's
/// parent, where `cargo test --workspace` also puts the binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// A command for a workspace binary; fails clearly when it was not built.
pub fn bin(name: &str) -> Command {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (`make test` runs `cargo build --release --workspace` before the tests)",
        path.display()
    );
    let mut c = Command::new(path);
    c.env_remove("JOB_COMPLETION_INDEX")
        .env("FEDIMDB_BIN_DIR", bin_dir());
    c
}

/// Runs a command and returns its output, with stderr as text for assertions.
pub fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().expect("binary starts");
    let err =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out, err)
}

/// [`run`]s a command that must succeed; otherwise fails naming the command, with its log.
pub fn run_ok(cmd: &mut Command) -> (Output, String) {
    let (out, log) = run(cmd);
    if !out.status.success() {
        let program = Path::new(cmd.get_program()).file_name().unwrap_or_default();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        panic!(
            "{} {} failed:\n{log}",
            program.to_string_lossy(),
            args.join(" ")
        );
    }
    (out, log)
}

/// The rounds a `pipeline local` run kept as verified on disk (its lines `round R: …,
/// verified on disk, kept`), in order; every other round was computed.
pub fn kept_rounds(stdout: &str) -> Vec<u32> {
    stdout
        .lines()
        .filter(|l| l.ends_with(", verified on disk, kept"))
        .filter_map(|l| l.strip_prefix("round ")?.split(':').next()?.parse().ok())
        .collect()
}

/// `NAME --root ROOT --round R`: the step of round R of a volume (`trainer`, `aggregator`).
pub fn step(name: &str, root: &Path, round: u32) -> Command {
    let mut c = bin(name);
    c.arg("--root")
        .arg(root)
        .args(["--round", &round.to_string()]);
    c
}

/// `trainer --root ROOT --round R --shard I`.
pub fn trainer(root: &Path, round: u32, shard: usize) -> Command {
    let mut c = step("trainer", root, round);
    c.args(["--shard", &shard.to_string()]);
    c
}

/// `aggregator --root ROOT --round R`.
pub fn aggregator(root: &Path, round: u32) -> Command {
    step("aggregator", root, round)
}

/// Runs `copier --source ARCHIVE --out ROOT --workers N`, which must succeed.
pub fn shard(archive: &Path, root: &Path, workers: usize) {
    run_ok(
        bin("copier")
            .args(["--workers", &workers.to_string(), "--source"])
            .arg(archive)
            .arg("--out")
            .arg(root),
    );
}

/// Workers and training rounds of the small pipeline runs ([`pipeline`]).
pub const WORKERS: usize = 3;
pub const ROUNDS: u32 = 2;

/// Training flags for [`pipeline`] where only the bytes matter, not the accuracy (the crash
/// and corruption tests): short rounds on 2^16 buckets.
pub const QUICK: &[&str] = &["--epochs", "2", "--hash-bits", "16"];

/// The retention flag of the tests that read or damage the files of old rounds: keep them.
pub const KEEP_ALL: &[&str] = &["--keep-rounds", "all"];

/// `pipeline local --source ARCHIVE --root ROOT` as the small system tests run it:
/// [`WORKERS`] workers, [`ROUNDS`] training rounds, two trainers at a time, and `flags`.
pub fn pipeline(archive: &Path, root: &Path, flags: &[&str]) -> Command {
    let mut c = bin("pipeline");
    c.args([
        "local",
        "--workers",
        &WORKERS.to_string(),
        "--rounds",
        &ROUNDS.to_string(),
        "--jobs",
        "2",
    ])
    .args(flags)
    .arg("--source")
    .arg(archive)
    .arg("--root")
    .arg(root);
    c
}

/// A seeded stream of draws below `n` (a linear congruential generator: the tests' data
/// must not change with a random-number crate's version).
pub fn draws(seed: u64) -> impl FnMut(usize) -> usize {
    let mut state = seed;
    move |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    }
}

/// The shared IMDB archive, if this checkout has `../shared` beside it.
pub fn shared_archive() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FEDIMDB_ARCHIVE") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/aclImdb-labeled.tar.gz");
    p.is_file().then_some(p)
}

/// The first `per_folder` reviews of each of train/pos, train/neg, test/pos, test/neg of
/// the shared archive: real reviews, few enough for a test.
pub fn real_subset(per_folder: usize) -> Option<Vec<Entry>> {
    let src = shared_archive()?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(src).unwrap(),
    ));
    let mut counts = std::collections::HashMap::new();
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let parts: Vec<&str> = path.split('/').collect();
        let is_review = parts.len() == 4 && parts[3].ends_with(".txt");
        if !is_review || !matches!(parts[1], "train" | "test") || !matches!(parts[2], "pos" | "neg")
        {
            continue;
        }
        let key = format!("{}/{}", parts[1], parts[2]);
        let n = counts.entry(key).or_insert(0usize);
        if *n >= per_folder {
            continue;
        }
        *n += 1;
        let mut text = Vec::new();
        e.read_to_end(&mut text).unwrap();
        out.push((parts[1..].join("/"), text));
    }
    Some(out)
}

/// Made-up reviews with a clear sentiment signal, for tests that must not depend on the
/// shared archive. Deterministic.
pub fn synthetic(per_folder: usize) -> Vec<Entry> {
    const POS: [&str; 6] = [
        "wonderful",
        "great",
        "loved",
        "brilliant",
        "moving",
        "superb",
    ];
    const NEG: [&str; 6] = ["awful", "boring", "hated", "terrible", "dull", "waste"];
    const FILL: [&str; 8] = [
        "the", "film", "plot", "actor", "was", "and", "scene", "story",
    ];
    let mut next = draws(12345);
    let mut out = Vec::new();
    for split in ["train", "test"] {
        for (folder, words, ratings) in [("pos", POS, [7, 8, 9, 10]), ("neg", NEG, [1, 2, 3, 4])] {
            for i in 0..per_folder {
                let mut text = String::new();
                for k in 0..30 {
                    let w = if k % 4 == 0 {
                        words[next(6)]
                    } else {
                        FILL[next(8)]
                    };
                    text.push_str(w);
                    text.push(' ');
                }
                let rating = ratings[next(4)];
                out.push((
                    format!("{split}/{folder}/{i}_{rating}.txt"),
                    text.into_bytes(),
                ));
            }
        }
    }
    out
}

/// Writes `dir/small.tar.gz`: the first `real_per_folder` reviews of each folder of the
/// shared archive, or, where that is absent, `synthetic_per_folder` made-up ones (saying
/// so). Returns the archive and whether its reviews are real.
pub fn small_archive(
    dir: &Path,
    real_per_folder: usize,
    synthetic_per_folder: usize,
) -> (PathBuf, bool) {
    let path = dir.join("small.tar.gz");
    let real = real_subset(real_per_folder);
    let is_real = real.is_some();
    let entries = real.unwrap_or_else(|| {
        eprintln!("note: shared archive absent; using synthetic reviews");
        synthetic(synthetic_per_folder)
    });
    write_archive(&path, &entries);
    (path, is_real)
}

/// Writes `dir/synthetic.tar.gz` with the reviews of [`synthetic`]`(per_folder)`.
pub fn synthetic_archive(dir: &Path, per_folder: usize) -> PathBuf {
    let path = dir.join("synthetic.tar.gz");
    write_archive(&path, &synthetic(per_folder));
    path
}

/// `dir/vol`, a volume the copier sharded into `workers` shards of
/// [`synthetic`]`(per_folder)` reviews.
pub fn synthetic_volume(dir: &Path, per_folder: usize, workers: usize) -> PathBuf {
    let root = dir.join("vol");
    shard(&synthetic_archive(dir, per_folder), &root, workers);
    root
}

/// Every hidden temporary file under `root` (there must be none after a run).
pub fn temp_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if fedimdb::atomic::is_temp_name(&e.file_name().to_string_lossy()) {
                out.push(p);
            }
        }
    }
    out
}

/// The labels of [`tickets`], in class order (byte order of the names).
pub const TICKET_LABELS: [&str; 3] = ["bug", "feature", "question"];

/// A made-up three-class dataset of issue-tracker tickets: `per_class` texts of each of
/// [`TICKET_LABELS`], round robin, as (text, label). Every fourth word says the class (one
/// time in four a word of a random class instead), the rest is filler shared by all.
/// Deterministic.
pub fn tickets(per_class: usize) -> Vec<(String, &'static str)> {
    const WORDS: [[&str; 6]; 3] = [
        ["crash", "error", "broken", "fails", "exception", "panic"],
        ["add", "support", "request", "option", "wish", "proposal"],
        ["how", "why", "help", "possible", "anyone", "explain"],
    ];
    const FILL: [&str; 10] = [
        "the", "app", "when", "it", "page", "button", "settings", "user", "on", "with",
    ];
    let mut next = draws(424242);
    let mut out = Vec::new();
    for i in 0..3 * per_class {
        let class = i % 3;
        let mut text = String::new();
        for k in 0..24 {
            let w = if k % 4 == 0 {
                let c = if next(4) == 0 { next(3) } else { class };
                WORDS[c][next(6)]
            } else {
                FILL[next(10)]
            };
            text.push_str(w);
            text.push(' ');
        }
        out.push((text.trim_end().to_owned(), TICKET_LABELS[class]));
    }
    out
}

/// `rows` as CSV with the header `text,label`, every text quoted.
pub fn to_csv(rows: &[(String, &str)]) -> String {
    let mut s = "text,label\n".to_owned();
    for (t, l) in rows {
        s.push_str(&format!("\"{}\",{l}\n", t.replace('"', "\"\"")));
    }
    s
}

/// `rows` as JSON lines `{"text": …, "label": …}`.
pub fn to_jsonl(rows: &[(String, &str)]) -> String {
    rows.iter()
        .map(|(t, l)| serde_json::json!({ "text": t, "label": l }).to_string() + "\n")
        .collect()
}
