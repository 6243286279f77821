//! Reading a source: which kind a path is ([`kind_of`]), and the labeled IMDB reviews from
//! the official `aclImdb_v1.tar.gz`, the repacked shared archive, or an unpacked `aclImdb/`
//! folder. Any other labeled text (CSV, TSV, JSON Lines, Parquet, one folder per label) is
//! read by `table.rs` and given its classes and test split by `labeled.rs`.
//!
//! An archive is read as one stream (file → SHA-256 → gunzip → untar) and never unpacked
//! to disk: the copier runs in a pod whose only disk may be the shared volume, and
//! 100,000 small files on NFS would take far longer than the gunzip itself. A second
//! thread turns the raw entries into [`Review`]s, so decompression never waits for
//! validation.
//!
//! Everything is read and validated before anything is written (see `write.rs`), so a bad
//! source leaves no output behind. Reviews come back in canonical order (split, label
//! folder, numeric id) whatever the archive order, so folder and archive sources give
//! byte-identical shards.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::{Context, Result, anyhow, bail, ensure};
use fedimdb::digest::HashingReader;
use fedimdb::labels::{Format, Shape, SourceArgs, Task};
use fedimdb::manifest::SourceInfo;
use fedimdb::reviews::{NEGATIVE, POSITIVE, Review};
use flate2::read::GzDecoder;
use indicatif::ProgressBar;
use sha2::{Digest, Sha256};

/// The reviews of one source, split as the dataset splits them.
#[derive(Debug)]
pub struct Dataset {
    /// Training reviews in canonical order.
    pub train: Vec<Review>,
    /// Test reviews in canonical order.
    pub test: Vec<Review>,
    /// Where they came from; `sha256` identifies the content for the manifest.
    pub source: SourceInfo,
    /// The test set's own source (`--test`), if it had one.
    pub test_source: Option<SourceInfo>,
    /// The label names in class order (`Review::label` indexes them).
    pub labels: Vec<String>,
}

/// What a source path holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// IMDB: a gzip-compressed tar file.
    Archive,
    /// IMDB: an unpacked `aclImdb/` folder, or a folder holding one.
    Folder,
    Csv,
    Tsv,
    Jsonl,
    Parquet,
    /// One folder per label, `DIR/<label>/*.txt`.
    Folders,
}

impl SourceKind {
    /// The name recorded in the manifest's `source.kind`.
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Archive => "archive",
            SourceKind::Folder => "folder",
            SourceKind::Csv => "csv",
            SourceKind::Tsv => "tsv",
            SourceKind::Jsonl => "jsonl",
            SourceKind::Parquet => "parquet",
            SourceKind::Folders => "folders",
        }
    }

    /// The IMDB archive or folder: its own test split, labels from the layout.
    pub fn is_imdb(self) -> bool {
        matches!(self, SourceKind::Archive | SourceKind::Folder)
    }

    /// Sources whose text and label are columns (`--text-column`, `--label-column`).
    pub fn has_columns(self) -> bool {
        matches!(
            self,
            SourceKind::Csv | SourceKind::Tsv | SourceKind::Jsonl | SourceKind::Parquet
        )
    }
}

/// Checks that `path` exists and says which kind of source it is, from `format` or, for
/// `auto`, from the path (see [`Format::Auto`]). Nothing is read yet beyond the file type
/// and the names of a folder's subfolders.
pub fn kind_of(path: &Path, format: Format) -> Result<SourceKind> {
    let meta = fs::metadata(path).map_err(|e| {
        anyhow!(
            "source {} cannot be opened ({e}); pass the official aclImdb_v1.tar.gz (fetch it with \
             `copier download --to DIR`), the repacked aclImdb-labeled.tar.gz, an unpacked aclImdb/ folder, \
             or your own labeled text (README, \"Your own data\")",
            path.display()
        )
    })?;
    let is_dir = meta.is_dir();
    let kind = match format {
        Format::Auto if is_dir => {
            if path.join("aclImdb").is_dir() || path.join("train").is_dir() {
                SourceKind::Folder
            } else {
                SourceKind::Folders
            }
        }
        Format::Auto => match Format::of_file_name(path) {
            Some(Format::Csv) => SourceKind::Csv,
            Some(Format::Tsv) => SourceKind::Tsv,
            Some(Format::Jsonl) => SourceKind::Jsonl,
            Some(Format::Parquet) => SourceKind::Parquet,
            _ => SourceKind::Archive,
        },
        Format::Imdb if is_dir => SourceKind::Folder,
        Format::Imdb => SourceKind::Archive,
        Format::Folders => SourceKind::Folders,
        Format::Csv => SourceKind::Csv,
        Format::Tsv => SourceKind::Tsv,
        Format::Jsonl => SourceKind::Jsonl,
        Format::Parquet => SourceKind::Parquet,
    };
    let wants_dir = matches!(kind, SourceKind::Folder | SourceKind::Folders);
    ensure!(
        wants_dir == is_dir,
        "source {} is a {}, but --format {} needs a {}",
        path.display(),
        if is_dir { "folder" } else { "file" },
        kind.name(),
        if wants_dir { "folder" } else { "file" }
    );
    Ok(kind)
}

/// How to read a source: the flags that say what it is and how it is labeled and split.
#[derive(Debug, Clone, Copy)]
pub struct Spec<'a> {
    pub args: &'a SourceArgs,
    pub task: Task,
    /// Seeds the `--test-fraction` split.
    pub seed: u64,
}

impl Spec<'_> {
    /// The source's kind, after checking that the flags fit it. Fails before anything is
    /// read or written.
    pub fn check(&self, path: &Path) -> Result<SourceKind> {
        self.args.validate()?;
        let kind = kind_of(path, self.args.format)?;
        let a = self.args;
        let shape = Shape {
            name: kind.name(),
            imdb: kind.is_imdb(),
            columns: kind.has_columns(),
        };
        a.check_shape(shape, self.task, &path.display())?;
        if let Some(test) = &a.test {
            let test_kind = kind_of(test, a.format)?;
            ensure!(
                !test_kind.is_imdb(),
                "--test {} looks like the IMDB dataset; --test takes a source like --source (CSV, TSV, \
                 JSON Lines, Parquet or label folders)",
                test.display()
            );
        }
        Ok(kind)
    }
}

/// The SHA-256s that identify a source (and a `--test` source) in the manifest, without
/// parsing them where a file's hash will do (one fast pass); a folder's digest needs every
/// review read, so the whole dataset is read and returned for reuse.
pub fn identify(path: &Path, spec: &Spec) -> Result<(String, Option<String>, Option<Dataset>)> {
    let kind = kind_of(path, spec.args.format)?;
    let test_is_file = match &spec.args.test {
        Some(t) => !matches!(kind_of(t, spec.args.format)?, SourceKind::Folders),
        None => true,
    };
    if matches!(kind, SourceKind::Folder | SourceKind::Folders) || !test_is_file {
        let data = read(path, spec, &mut |_| {})?;
        let test = data.test_source.as_ref().map(|t| t.sha256.clone());
        return Ok((data.source.sha256.clone(), test, Some(data)));
    }
    let test = match &spec.args.test {
        Some(t) => Some(fedimdb::digest::sha256_file(t)?),
        None => None,
    };
    Ok((fedimdb::digest::sha256_file(path)?, test, None))
}

/// Called with the test reviews, in canonical order, when an archive moves on from its
/// test entries to training entries: the test set then looks complete, and the caller may
/// start encoding it while the training reviews are still being read. It is a guess (an
/// archive could hold more test entries later), so the caller must check that the final
/// test set has as many reviews as it was given: reviews are only ever added, so equal
/// counts mean identical sets.
pub type TestReadEarly<'a> = dyn FnMut(Vec<Review>) + 'a;

/// Reads and validates every labeled review of the source at `path` (and of a `--test`
/// source). `test_read_early` is called at most once, and only for IMDB archives whose
/// test entries come first (as in the official and the repacked archive).
pub fn read(path: &Path, spec: &Spec, test_read_early: &mut TestReadEarly) -> Result<Dataset> {
    let kind = kind_of(path, spec.args.format)?;
    let (entries, sha256) = match kind {
        SourceKind::Archive => read_archive(path, spec.task, test_read_early)?,
        SourceKind::Folder => read_folder(path, spec.task)?,
        _ => return crate::labeled::read(path, kind, spec),
    };
    let (train, test) = split(entries);
    Ok(Dataset {
        train,
        test,
        source: source_info(path, kind, sha256),
        test_source: None,
        labels: spec.task.labels(),
    })
}

/// What the manifest records of a source.
pub fn source_info(path: &Path, kind: SourceKind, sha256: String) -> SourceInfo {
    SourceInfo {
        path: path.display().to_string(),
        kind: kind.name().to_owned(),
        sha256,
    }
}

/// The two splits of the dataset, in canonical order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Split {
    Test,
    Train,
}

/// Canonical position of a review: split, label folder (`neg` before `pos`), number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Key {
    split: Split,
    label: u8,
    number: u64,
}

const FOLDERS: [(Split, u8, &str); 4] = [
    (Split::Train, POSITIVE, "train/pos"),
    (Split::Train, NEGATIVE, "train/neg"),
    (Split::Test, POSITIVE, "test/pos"),
    (Split::Test, NEGATIVE, "test/neg"),
];

/// A file that sits in one of the four review folders, before its content is checked.
struct RawEntry {
    /// The path as the source names it, for error messages.
    name: String,
    split: Split,
    label: u8,
    /// The file name inside the label folder.
    file: String,
    bytes: Vec<u8>,
}

/// A parsed review with its sort key.
struct Parsed {
    key: Key,
    review: Review,
}

/// Where a path lies in the dataset layout.
enum Place<'a> {
    /// In `{train,test}/{pos,neg}/`: a review file.
    Review {
        split: Split,
        label: u8,
        file: &'a str,
    },
    /// Anything else (README, vocabulary, `train/unsup/`, `*.feat`, folders): skipped.
    Other,
}

/// Classifies a path from an archive or folder. Accepts the official layout
/// (`aclImdb/train/pos/123_9.txt`, optionally under further folders or `./`) and a tar of
/// the `aclImdb/` contents (`train/pos/123_9.txt`). Hidden files (`._123_9.txt` from
/// macOS tar, `.DS_Store`) are skipped.
fn place(path: &str) -> Place<'_> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let n = parts.len();
    if n < 3 || (n > 3 && parts[n - 4] != "aclImdb") {
        return Place::Other;
    }
    let split = match parts[n - 3] {
        "train" => Split::Train,
        "test" => Split::Test,
        _ => return Place::Other,
    };
    let label = match parts[n - 2] {
        "pos" => POSITIVE,
        "neg" => NEGATIVE,
        _ => return Place::Other,
    };
    let file = parts[n - 1];
    if file.starts_with('.') {
        return Place::Other;
    }
    Place::Review { split, label, file }
}

/// Turns a raw entry into a review, checking its name, rating and encoding, with the class
/// `task` gives it. `origin` is the source path, named in every error together with the
/// entry.
fn parse(raw: RawEntry, origin: &Path, task: Task) -> Result<Parsed> {
    let RawEntry {
        name,
        split,
        label,
        file,
        bytes,
    } = raw;
    let bad_name = || {
        anyhow!(
            "{name} in {}: a review file name must be ID_RATING.txt (e.g. 123_9.txt); \
             is this the IMDB dataset?",
            origin.display()
        )
    };
    let stem = file.strip_suffix(".txt").ok_or_else(bad_name)?;
    let (number, rating) = stem.split_once('_').ok_or_else(bad_name)?;
    let all_digits =
        |s: &str| !s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(number) || !all_digits(rating) {
        return Err(bad_name());
    }
    let number: u64 = number.parse().map_err(|_| bad_name())?;
    let rating: u64 = rating.parse().map_err(|_| bad_name())?;
    ensure!(
        (1..=10).contains(&rating),
        "{name} in {}: rating {rating} is outside 1..=10",
        origin.display()
    );
    let rating = rating as u8;
    if label == POSITIVE {
        ensure!(
            rating >= 7,
            "{name} in {}: rating {rating} in a pos/ folder, but positive reviews are rated 7..=10",
            origin.display()
        );
    } else {
        ensure!(
            rating <= 4,
            "{name} in {}: rating {rating} in a neg/ folder, but negative reviews are rated 1..=4",
            origin.display()
        );
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{name} in {}: the review is not valid UTF-8 (bad byte at offset {}); \
             the IMDB reviews are UTF-8, so the source is damaged or not the IMDB dataset",
            origin.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let split_name = if split == Split::Train {
        "train"
    } else {
        "test"
    };
    let folder = if label == POSITIVE { "pos" } else { "neg" };
    let review = Review {
        id: format!("{split_name}/{folder}/{number}"),
        rating,
        label: task.class(label == POSITIVE, rating),
        text,
    };
    Ok(Parsed {
        key: Key {
            split,
            label,
            number,
        },
        review,
    })
}

/// Collects parsed reviews, rejecting duplicates, and checks at the end that all four
/// review folders were present.
struct Collector<'a> {
    origin: &'a Path,
    task: Task,
    parsed: Vec<Parsed>,
    seen: HashSet<Key>,
}

impl<'a> Collector<'a> {
    fn new(origin: &'a Path, task: Task) -> Self {
        Self {
            origin,
            task,
            parsed: Vec::with_capacity(50_000),
            seen: HashSet::with_capacity(50_000),
        }
    }

    fn add(&mut self, raw: RawEntry) -> Result<()> {
        let name = raw.name.clone();
        let p = parse(raw, self.origin, self.task)?;
        ensure!(
            self.seen.insert(p.key),
            "{name} in {}: a second review with id {}; each review number may appear once per folder",
            self.origin.display(),
            p.review.id
        );
        self.parsed.push(p);
        Ok(())
    }

    /// Copies of the reviews of `split` read so far, in canonical order.
    fn snapshot(&self, split: Split) -> Vec<Review> {
        let mut v: Vec<&Parsed> = self
            .parsed
            .iter()
            .filter(|p| p.key.split == split)
            .collect();
        v.sort_unstable_by_key(|p| p.key);
        v.into_iter().map(|p| p.review.clone()).collect()
    }

    /// The reviews in canonical order, or an error naming the missing folders.
    fn finish(mut self) -> Result<Vec<Parsed>> {
        let missing: Vec<String> = FOLDERS
            .iter()
            .filter(|(s, l, _)| !self.seen.iter().any(|k| k.split == *s && k.label == *l))
            .map(|(_, _, f)| format!("aclImdb/{f}"))
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} has no reviews in {}; expected the IMDB layout aclImdb/{{train,test}}/{{pos,neg}}/ID_RATING.txt \
                 (the official aclImdb_v1.tar.gz, the repacked aclImdb-labeled.tar.gz, or an unpacked aclImdb/ folder)",
                self.origin.display(),
                missing.join(", ")
            );
        }
        self.parsed.sort_unstable_by_key(|p| p.key);
        Ok(self.parsed)
    }
}

fn split(parsed: Vec<Parsed>) -> (Vec<Review>, Vec<Review>) {
    let n_test = parsed
        .iter()
        .take_while(|p| p.key.split == Split::Test)
        .count();
    let mut test: Vec<Review> = parsed.into_iter().map(|p| p.review).collect();
    let train = test.split_off(n_test);
    (train, test)
}

/// Entries travel from the untar thread to the parsing thread in batches, to keep channel
/// overhead negligible next to 50,000 small files.
const BATCH: usize = 256;

/// Reads a gzip tar as a stream. The untar thread hashes, decompresses and cuts the stream
/// into review entries; this thread validates them. Returns the reviews and the archive's
/// SHA-256.
fn read_archive(
    path: &Path,
    task: Task,
    test_read_early: &mut TestReadEarly,
) -> Result<(Vec<Parsed>, String)> {
    let mut file =
        File::open(path).with_context(|| format!("cannot open source {}", path.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut magic = [0u8; 2];
    let got = read_up_to(&mut file, &mut magic)
        .with_context(|| format!("cannot read source {}", path.display()))?;
    if got < 2 || magic != [0x1f, 0x8b] {
        bail!(
            "source {} is not a gzip file (it does not start with the gzip signature 1f 8b); \
             pass a .tar.gz archive such as aclImdb_v1.tar.gz, or an unpacked aclImdb/ folder",
            path.display()
        );
    }
    let file =
        File::open(path).with_context(|| format!("cannot open source {}", path.display()))?;
    tracing::info!("reading {} ({:.1} MB)", path.display(), len as f64 / 1e6);
    let pb = fedimdb::logging::progress(len, "reading");

    let (tx, rx) = mpsc::sync_channel::<Vec<RawEntry>>(16);
    let origin = path.to_path_buf();
    let progress = pb.clone();
    let untar = std::thread::Builder::new()
        .name("untar".into())
        .spawn(move || untar(file, len, progress, &origin, tx))
        .context("cannot start the untar thread")?;

    let mut collector = Collector::new(path, task);
    let mut parse_error = None;
    let (mut previous, mut announced) = (None, false);
    for batch in rx.iter() {
        for raw in batch {
            if !announced && previous == Some(Split::Test) && raw.split == Split::Train {
                test_read_early(collector.snapshot(Split::Test));
                announced = true;
            }
            previous = Some(raw.split);
            if let Err(e) = collector.add(raw) {
                parse_error = Some(e);
                break;
            }
        }
        if parse_error.is_some() {
            break;
        }
    }
    // Dropping the receiver makes the untar thread's next send fail, so it stops early.
    drop(rx);
    let untarred = untar
        .join()
        .map_err(|_| anyhow!("the untar thread panicked"))?;
    pb.finish_and_clear();
    if let Some(e) = parse_error {
        return Err(e);
    }
    let sha256 = untarred?;
    let parsed = collector.finish()?;
    tracing::info!("read {} reviews from {}", parsed.len(), path.display());
    Ok((parsed, sha256))
}

/// Reads as many bytes as fit in `buf` unless the file is shorter.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The untar thread: streams `file` through SHA-256 and gunzip, sends review entries in
/// batches, then checks the gzip trailer and hashes any remaining bytes. Returns the
/// file's SHA-256. Stops quietly if the receiver is gone (the parser found an error).
fn untar(
    file: File,
    len: u64,
    pb: ProgressBar,
    origin: &Path,
    tx: mpsc::SyncSender<Vec<RawEntry>>,
) -> Result<String> {
    let corrupt = |what: String| {
        format!(
            "cannot read {} {what}: the archive is truncated or corrupt (or not a tar); download it again \
             (`copier download`) and check its sha256",
            origin.display()
        )
    };
    let hashing = HashingReader::new(ProgressReader::new(file, len, pb));
    let mut archive = tar::Archive::new(GzDecoder::new(hashing));
    let mut batch = Vec::with_capacity(BATCH);
    // The last entry read, so an error can say where the damage starts.
    let mut last = String::new();
    for entry in archive.entries().with_context(|| corrupt(String::new()))? {
        let mut entry = entry.with_context(|| {
            corrupt(if last.is_empty() {
                "at its first entry".into()
            } else {
                format!("after entry {last}")
            })
        })?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let (split, label, file) = match place(&name) {
            Place::Review { split, label, file } => (split, label, file.to_owned()),
            Place::Other => {
                last = name;
                continue;
            }
        };
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            last = name;
            continue;
        }
        ensure!(
            kind.is_file() || kind.is_contiguous(),
            "{name} in {}: expected a regular review file, found a {kind:?} entry",
            origin.display()
        );
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut bytes)
            .with_context(|| corrupt(format!("at entry {name}")))?;
        batch.push(RawEntry {
            name: name.clone(),
            split,
            label,
            file,
            bytes,
        });
        last = name;
        if batch.len() == BATCH
            && tx
                .send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)))
                .is_err()
        {
            return Ok(String::new());
        }
    }
    if !batch.is_empty() && tx.send(batch).is_err() {
        return Ok(String::new());
    }
    drop(tx);
    // The tar end marker may come before the end of the gzip stream: read the rest so the
    // gzip trailer (CRC and length) is checked, then hash whatever follows the gzip member.
    let mut gz = archive.into_inner();
    io::copy(&mut gz, &mut io::sink()).with_context(|| corrupt("at its end".into()))?;
    let mut hashing = gz.into_inner();
    io::copy(&mut hashing, &mut io::sink()).with_context(|| corrupt("at its end".into()))?;
    Ok(hashing.finish())
}

/// Counts bytes read for the progress bar, or, when stderr is not a terminal (a pod log),
/// logs each quarter of the file instead.
struct ProgressReader<R> {
    inner: R,
    len: u64,
    done: u64,
    next_log: u64,
    pb: ProgressBar,
}

impl<R> ProgressReader<R> {
    fn new(inner: R, len: u64, pb: ProgressBar) -> Self {
        Self {
            inner,
            len,
            done: 0,
            next_log: len / 4,
            pb,
        }
    }
}

impl<R: Read> Read for ProgressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.pb.is_hidden() {
            if self.len > 0 && self.done >= self.next_log && self.done < self.len {
                tracing::info!("read {}% of the archive", self.done * 100 / self.len);
                self.next_log += self.len / 4;
            }
        } else {
            self.pb.inc(n as u64);
        }
        Ok(n)
    }
}

/// The folder holding `train/` and `test/`: `path` itself or its `aclImdb/` subfolder.
fn dataset_root(path: &Path) -> PathBuf {
    let inner = path.join("aclImdb");
    if inner.is_dir() {
        inner
    } else {
        path.to_path_buf()
    }
}

/// Reads an unpacked folder. Its identity for the manifest is the SHA-256 over the review
/// files in canonical order, each contributing its path relative to `aclImdb/`
/// (`train/pos/123_9.txt`), a zero byte, its length as 8 little-endian bytes, and its
/// content: a file's bytes change the digest, file timestamps and unrelated files do not.
fn read_folder(path: &Path, task: Task) -> Result<(Vec<Parsed>, String)> {
    let root = dataset_root(path);
    tracing::info!("reading folder {}", root.display());
    let mut collector = Collector::new(path, task);
    let mut rel_names: Vec<(Key, String)> = Vec::with_capacity(50_000);
    for (split, label, folder) in FOLDERS {
        let dir = root.join(folder);
        if !dir.is_dir() {
            continue; // reported by Collector::finish with the other missing folders
        }
        let listing: Vec<fs::DirEntry> = fs::read_dir(&dir)
            .and_then(|rd| rd.collect::<io::Result<_>>())
            .with_context(|| format!("cannot list {}", dir.display()))?;
        let pb = fedimdb::logging::progress(listing.len() as u64, folder);
        for item in listing {
            let file = item.file_name();
            let Some(file) = file.to_str() else {
                bail!(
                    "{}: file name is not valid UTF-8; is this the IMDB dataset?",
                    item.path().display()
                );
            };
            if file.starts_with('.') || item.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let full = item.path();
            let bytes = fs::read(&full)
                .with_context(|| format!("cannot read review {}", full.display()))?;
            let rel = format!("{folder}/{file}");
            let raw = RawEntry {
                name: rel.clone(),
                split,
                label,
                file: file.to_owned(),
                bytes,
            };
            collector.add(raw)?;
            let key = collector.parsed.last().map(|p| p.key).expect("just added");
            rel_names.push((key, rel));
            pb.inc(1);
        }
        pb.finish_and_clear();
    }
    let parsed = collector.finish()?;
    rel_names.sort_unstable_by_key(|(k, _)| *k);
    let digest = folder_digest(
        rel_names
            .iter()
            .zip(&parsed)
            .map(|((_, rel), p)| (rel.as_str(), p.review.text.as_bytes())),
    );
    tracing::info!("read {} reviews from {}", parsed.len(), root.display());
    Ok((parsed, digest))
}

/// The identity of a folder source: the SHA-256 over its files in reading order, each
/// contributing its path relative to the folder, a zero byte, its length as 8
/// little-endian bytes, and its content. A file's bytes change the digest, file
/// timestamps and unrelated files do not.
pub fn folder_digest<'a>(files: impl Iterator<Item = (&'a str, &'a [u8])>) -> String {
    let mut hasher = Sha256::new();
    for (rel, bytes) in files {
        hasher.update(rel.as_bytes());
        hasher.update([0u8]);
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(name: &str, bytes: &[u8]) -> RawEntry {
        let Place::Review { split, label, file } = place(name) else {
            panic!("{name} is not a review path")
        };
        RawEntry {
            name: name.into(),
            split,
            label,
            file: file.into(),
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn places_follow_the_official_layout() {
        for p in [
            "aclImdb/train/pos/1_9.txt",
            "./aclImdb/test/neg/0_2.txt",
            "train/pos/1_9.txt",
            "x/aclImdb/train/neg/3_1.txt",
        ] {
            assert!(matches!(place(p), Place::Review { .. }), "{p}");
        }
        for p in [
            "aclImdb/README",
            "aclImdb/train/unsup/1_0.txt",
            "aclImdb/train/labeledBow.feat",
            "aclImdb/train/pos/",
            "aclImdb/train/pos/._1_9.txt",
            "other/train/pos/1_9.txt",
        ] {
            assert!(matches!(place(p), Place::Other), "{p}");
        }
    }

    #[test]
    fn parse_builds_ids_and_checks_ratings() {
        let o = Path::new("a.tar.gz");
        let p = parse(
            raw("aclImdb/train/pos/0123_10.txt", "Très bien".as_bytes()),
            o,
            Task::Sentiment,
        )
        .unwrap();
        assert_eq!(
            p.review,
            Review {
                id: "train/pos/123".into(),
                rating: 10,
                label: POSITIVE,
                text: "Très bien".into()
            }
        );
        let p = parse(raw("aclImdb/test/neg/7_1.txt", b"bad"), o, Task::Sentiment).unwrap();
        assert_eq!(
            (p.review.id.as_str(), p.review.label),
            ("test/neg/7", NEGATIVE)
        );

        for (name, needle) in [
            ("aclImdb/train/pos/1_3.txt", "rating 3 in a pos/ folder"),
            ("aclImdb/train/neg/1_8.txt", "rating 8 in a neg/ folder"),
            ("aclImdb/train/neg/1_0.txt", "outside 1..=10"),
            ("aclImdb/train/neg/1_11.txt", "outside 1..=10"),
            ("aclImdb/train/neg/1.txt", "ID_RATING.txt"),
            ("aclImdb/train/neg/a_1.txt", "ID_RATING.txt"),
            ("aclImdb/train/neg/1_1.text", "ID_RATING.txt"),
        ] {
            let err = format!(
                "{:#}",
                parse(raw(name, b"x"), o, Task::Sentiment).err().unwrap()
            );
            assert!(
                err.contains(needle) && err.contains(name) && err.contains("a.tar.gz"),
                "{err}"
            );
        }
        let err = format!(
            "{:#}",
            parse(
                raw("aclImdb/train/neg/1_1.txt", b"ok \xff\xfe"),
                o,
                Task::Sentiment
            )
            .err()
            .unwrap()
        );
        assert!(
            err.contains("not valid UTF-8") && err.contains("offset 3"),
            "{err}"
        );
    }

    #[test]
    fn collector_sorts_canonically_and_names_missing_folders() {
        let o = Path::new("src");
        let mut c = Collector::new(o, Task::Sentiment);
        for n in [
            "train/pos/10_9.txt",
            "train/pos/9_9.txt",
            "test/neg/2_1.txt",
            "train/neg/5_1.txt",
            "test/pos/1_7.txt",
        ] {
            c.add(raw(n, b"t")).unwrap();
        }
        let err = c
            .add(raw("aclImdb/train/pos/9_8.txt", b"t"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("second review with id train/pos/9"), "{err}");
        let (train, test) = split(c.finish().unwrap());
        let ids: Vec<_> = train.iter().chain(&test).map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "train/neg/5",
                "train/pos/9",
                "train/pos/10",
                "test/neg/2",
                "test/pos/1"
            ]
        );

        let mut c = Collector::new(o, Task::Sentiment);
        c.add(raw("train/pos/1_9.txt", b"t")).unwrap();
        let err = c.finish().err().unwrap().to_string();
        assert!(
            err.contains("aclImdb/train/neg, aclImdb/test/pos, aclImdb/test/neg"),
            "{err}"
        );
    }
}
