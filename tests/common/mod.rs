//! Helpers for the system tests: locating the built binaries and making small archives.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

/// The shared IMDB archive, if this checkout has `../shared` beside it.
pub fn shared_archive() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FEDIMDB_ARCHIVE") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/aclImdb-labeled.tar.gz");
    p.is_file().then_some(p)
}

/// One review file for an archive: (path inside `aclImdb/`, text).
pub type Entry = (String, String);

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
        let mut text = String::new();
        e.read_to_string(&mut text).unwrap();
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
    let mut state = 12345u64;
    let mut next = move |n: usize| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
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
                out.push((format!("{split}/{folder}/{i}_{rating}.txt"), text));
            }
        }
    }
    out
}

/// Writes entries as a gzip tar in the official `aclImdb/…` layout.
pub fn write_archive(path: &Path, entries: &[Entry]) {
    let file = std::fs::File::create(path).unwrap();
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    for (name, text) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, format!("aclImdb/{name}"), text.as_bytes())
            .unwrap();
    }
    b.into_inner().unwrap().finish().unwrap();
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
