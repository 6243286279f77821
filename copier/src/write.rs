//! Writing the shards, the test set and the manifest, and deciding whether to write at all.
//!
//! The manifest is the commit point: it is written last, so its presence means every file
//! it lists is complete. Hence the order of a (re)write:
//!
//! 1. delete an existing manifest (so no old manifest ever describes new files),
//! 2. write the shards and the test set, in parallel, each atomically,
//! 3. delete shards beyond the new worker count and temporary files of crashed runs,
//! 4. write the new manifest.
//!
//! A failure in 2–4 removes every file this run wrote (and the folders it created), so
//! the folder holds no manifest and the next run starts over.
//!
//! Files are encoded to memory, hashed there, then written: no second read for the
//! checksum, and the test set can be encoded before writing starts (see [`Content`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow, bail};
use fedimdb::atomic::{is_temp_name, sync_dir, write_bytes_atomic, write_json_atomic};
use fedimdb::labels::{MAX_CLASSES, Task};
use fedimdb::layout::Layout;
use fedimdb::manifest::{DataManifest, FileEntry, MANIFEST_VERSION, Partition, SourceInfo};
use fedimdb::reviews::{Review, encode_parquet};

/// The arguments that determine the output, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub workers: usize,
    pub partition: Partition,
    /// `None` for IID, where alpha means nothing.
    pub alpha: Option<f64>,
    /// `None` for IID, where the floor means nothing.
    pub min_shard: Option<usize>,
    pub seed: u64,
    /// IMDB sources: the labels made (`None` for other sources).
    pub task: Option<Task>,
    /// Table sources: the columns read (`None` for others).
    pub text_column: Option<String>,
    pub label_column: Option<String>,
    /// The held-out fraction, when the test set came from the source.
    pub test_fraction: Option<f64>,
}

impl Settings {
    /// The settings an existing manifest was made with.
    pub fn of(m: &DataManifest) -> Self {
        Self {
            workers: m.workers,
            partition: m.partition,
            alpha: m.alpha,
            min_shard: m.min_shard,
            seed: m.seed,
            task: m.task,
            text_column: m.text_column.clone(),
            label_column: m.label_column.clone(),
            test_fraction: m.test_fraction,
        }
    }

    /// Human-readable differences from `old` to `self`, e.g. `workers 4 → 5`.
    pub fn differences(&self, old: &Settings) -> Vec<String> {
        let mut d = Vec::new();
        if self.workers != old.workers {
            d.push(format!("workers {} → {}", old.workers, self.workers));
        }
        if self.partition != old.partition {
            d.push(format!("partition {} → {}", old.partition, self.partition));
        }
        if !same_alpha(self.alpha, old.alpha) {
            let show = |a: Option<f64>| a.map_or("none".to_owned(), |a| a.to_string());
            d.push(format!("alpha {} → {}", show(old.alpha), show(self.alpha)));
        }
        if self.min_shard != old.min_shard {
            let show = |m: Option<usize>| m.map_or("none".to_owned(), |m| m.to_string());
            d.push(format!(
                "min-shard {} → {}",
                show(old.min_shard),
                show(self.min_shard)
            ));
        }
        if self.seed != old.seed {
            d.push(format!("seed {} → {}", old.seed, self.seed));
        }
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".to_owned());
        if self.task != old.task {
            let show = |t: Option<Task>| t.map_or("none".to_owned(), |t| t.to_string());
            d.push(format!("task {} → {}", show(old.task), show(self.task)));
        }
        if self.text_column != old.text_column {
            d.push(format!(
                "text-column {} → {}",
                show(&old.text_column),
                show(&self.text_column)
            ));
        }
        if self.label_column != old.label_column {
            d.push(format!(
                "label-column {} → {}",
                show(&old.label_column),
                show(&self.label_column)
            ));
        }
        if !same_alpha(self.test_fraction, old.test_fraction) {
            let show = |f: Option<f64>| f.map_or("none".to_owned(), |f| f.to_string());
            d.push(format!(
                "test-fraction {} → {}",
                show(old.test_fraction),
                show(self.test_fraction)
            ));
        }
        d
    }
}

/// Alphas (and test fractions) compare with a relative tolerance of 1e-12: the old one went through JSON, and
/// serde_json's default float parsing may be one unit in the last place off.
fn same_alpha(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b || (a - b).abs() <= 1e-12 * a.abs().max(b.abs()),
        (a, b) => a.is_none() && b.is_none(),
    }
}

/// What is in the output folder before this run, and so what the run must do.
#[derive(Debug)]
pub enum Existing {
    /// No manifest: write everything (shards without a manifest are an interrupted run).
    Nothing,
    /// A manifest made with the same settings: compare the source and the files.
    SameSettings(Box<DataManifest>),
    /// A manifest that `--force` allows to be replaced.
    Replace,
}

/// Reads the existing manifest, if any, and refuses (unless `force`) when it was made
/// with other settings or cannot be read.
pub fn inspect(layout: &Layout, settings: &Settings, force: bool) -> Result<Existing> {
    let path = layout.data_manifest();
    if !path.exists() {
        return Ok(Existing::Nothing);
    }
    if force {
        tracing::info!(
            "--force: replacing the data described by {}",
            path.display()
        );
        return Ok(Existing::Replace);
    }
    let old = DataManifest::read(&path).with_context(|| {
        format!(
            "the existing manifest cannot be used; pass --force to rewrite {}",
            layout.data_dir().display()
        )
    })?;
    let diff = settings.differences(&Settings::of(&old));
    if !diff.is_empty() {
        bail!(
            "{} already holds data made with other arguments ({}); pass --force to replace it \
             (workers of a running job would then read the new shards), or choose another --out",
            layout.data_dir().display(),
            diff.join(", ")
        );
    }
    Ok(Existing::SameSettings(Box::new(old)))
}

/// Checks every file an up-to-date manifest lists against its checksum there
/// ([`fedimdb::verify::check_file`]). Returns the problems found (a missing file, a changed
/// checksum); empty means nothing to do.
pub fn verify(layout: &Layout, manifest: &DataManifest) -> Vec<String> {
    let dir = layout.data_dir();
    let record = layout.data_manifest();
    manifest
        .shards
        .iter()
        .chain(std::iter::once(&manifest.test))
        .filter_map(|entry| {
            fedimdb::verify::check_file(&dir.join(&entry.file), &entry.sha256, &record)
                .err()
                .map(|e| format!("{e:#}"))
        })
        .collect()
}

/// Removes what a failed run wrote. Folders are removed only if this run created them
/// and they are empty.
struct Cleanup {
    files: Mutex<Vec<PathBuf>>,
    /// Folders this run created, deepest first.
    created_dirs: Vec<PathBuf>,
    armed: bool,
}

impl Cleanup {
    fn wrote(&self, path: PathBuf) {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(path);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for f in self
            .files
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = fs::remove_file(f);
        }
        for d in &self.created_dirs {
            let _ = fs::remove_dir(d);
        }
    }
}

/// A Parquet file in memory, with the counts its manifest entry needs.
#[derive(Debug)]
pub struct Encoded {
    rows: usize,
    /// Reviews per class index (all 256, as the label count may not be known yet).
    label_counts: Vec<usize>,
    bytes: Vec<u8>,
}

/// Encodes reviews as a Parquet file in memory.
pub fn encode(reviews: &[Review]) -> Result<Encoded> {
    // Zstd-compressed text is about 40% of its size.
    let text: usize = reviews.iter().map(|r| r.text.len()).sum();
    let mut bytes = Vec::with_capacity(text / 2 + 4096);
    encode_parquet(&mut bytes, reviews)?;
    Ok(Encoded {
        rows: reviews.len(),
        label_counts: fedimdb::dataset::label_counts(reviews, MAX_CLASSES),
        bytes,
    })
}

/// Where the data came from: the source, and the test set's own source if it had one.
#[derive(Debug)]
pub struct Sources {
    pub source: SourceInfo,
    pub test: Option<SourceInfo>,
}

/// What a file is made from.
pub enum Content {
    /// Reviews still to encode, in file order.
    Reviews(Vec<Review>),
    /// An encoding already under way on another thread (the test set, started while the
    /// archive was still being read).
    Encoding(JoinHandle<Result<Encoded>>),
}

impl Content {
    fn encoded(self) -> Result<Encoded> {
        match self {
            Content::Reviews(reviews) => encode(&reviews),
            Content::Encoding(handle) => handle
                .join()
                .map_err(|_| anyhow!("the thread encoding the test set panicked"))?,
        }
    }
}

/// Writes the shards (`shards[i]` are the reviews of shard i, in file order), the test set
/// and, last, the manifest. See the module doc for the order and the clean-up on failure.
pub fn write_all(
    layout: &Layout,
    sources: Sources,
    settings: &Settings,
    labels: &[String],
    shards: Vec<Vec<Review>>,
    test: Content,
) -> Result<DataManifest> {
    let dir = layout.data_dir();
    // The folders create_dir_all will make, deepest first, so a failed run removes them.
    let created_dirs: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(Path::to_path_buf)
        .collect();
    let mut cleanup = Cleanup {
        files: Mutex::new(Vec::new()),
        created_dirs,
        armed: true,
    };
    fs::create_dir_all(&dir).with_context(|| {
        format!(
            "cannot create the output folder {}; check the --out path and its permissions",
            dir.display()
        )
    })?;

    let manifest_path = layout.data_manifest();
    if manifest_path.exists() {
        fs::remove_file(&manifest_path).with_context(|| {
            format!("cannot remove the old manifest {}", manifest_path.display())
        })?;
        sync_dir(&dir);
    }

    // The test set first: it is the largest file, so with few threads it starts early.
    let mut jobs: Vec<(String, Content)> = vec![("test.parquet".to_owned(), test)];
    jobs.extend(
        shards
            .into_iter()
            .enumerate()
            .map(|(i, s)| (Layout::shard_file_name(i), Content::Reviews(s))),
    );
    let mut entries = write_files(&dir, jobs, labels.len(), &cleanup)?;
    let test_entry = entries.remove(0);

    remove_leftovers(&dir, settings.workers)?;

    let manifest = DataManifest {
        format_version: MANIFEST_VERSION,
        tool: format!("copier {}", fedimdb::VERSION),
        source: sources.source,
        workers: settings.workers,
        partition: settings.partition,
        alpha: settings.alpha,
        min_shard: settings.min_shard,
        seed: settings.seed,
        task: settings.task,
        text_column: settings.text_column.clone(),
        label_column: settings.label_column.clone(),
        test_fraction: settings.test_fraction,
        test_source: sources.test,
        labels: labels.to_vec(),
        shards: entries,
        test: test_entry,
    };
    write_json_atomic(&manifest_path, &manifest)?;
    cleanup.armed = false;
    Ok(manifest)
}

/// Encodes each job to `dir/name` on a few threads, hashing the bytes before they are
/// written. Returns the entries in job order, or the first error (after all threads
/// stopped).
fn write_files(
    dir: &Path,
    jobs: Vec<(String, Content)>,
    classes: usize,
    cleanup: &Cleanup,
) -> Result<Vec<FileEntry>> {
    let n = jobs.len();
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(n)
        .max(1);
    let jobs: Vec<Mutex<Option<(String, Content)>>> =
        jobs.into_iter().map(|j| Mutex::new(Some(j))).collect();
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<FileEntry>>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else {
                        break;
                    };
                    let taken = job.lock().unwrap_or_else(|e| e.into_inner()).take();
                    let Some((name, content)) = taken else {
                        break;
                    };
                    let result = write_one(dir, &name, content, classes, cleanup);
                    let failed = result.is_err();
                    results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
                    if failed {
                        // Stop the other threads from starting more files.
                        next.store(n, Ordering::Relaxed);
                        break;
                    }
                }
            });
        }
    });
    let mut entries = Vec::with_capacity(jobs.len());
    let mut skipped = false;
    for r in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
        match r {
            Some(Ok(e)) => entries.push(e),
            Some(Err(e)) => return Err(e),
            None => skipped = true,
        }
    }
    if skipped {
        return Err(anyhow!("a writer thread stopped without a result"));
    }
    Ok(entries)
}

/// Encodes and writes one file; its entry counts the reviews of each of the `classes`.
fn write_one(
    dir: &Path,
    name: &str,
    content: Content,
    classes: usize,
    cleanup: &Cleanup,
) -> Result<FileEntry> {
    let path = dir.join(name);
    let encoded = content
        .encoded()
        .with_context(|| format!("cannot encode {}", path.display()))?;
    write_bytes_atomic(&path, &encoded.bytes)?;
    cleanup.wrote(path.clone());
    tracing::info!("wrote {} ({} reviews)", path.display(), encoded.rows);
    let mut label_counts = encoded.label_counts;
    label_counts.truncate(classes);
    let binary = classes == 2;
    Ok(FileEntry {
        file: name.to_owned(),
        rows: encoded.rows,
        positive: binary.then(|| label_counts[1]),
        negative: binary.then(|| label_counts[0]),
        label_counts,
        sha256: fedimdb::digest::sha256_bytes(&encoded.bytes),
    })
}

/// Deletes shard files with an index at or beyond `workers` (from an earlier run with more
/// workers) and temporary files of our names left by a crashed run.
fn remove_leftovers(dir: &Path, workers: usize) -> Result<()> {
    let listing = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for item in listing {
        let item = item.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = item.file_name().to_string_lossy().into_owned();
        let stale_shard = name.ends_with(".parquet")
            && Layout::parse_shard_name(&name).is_some_and(|i| i >= workers);
        let ours = |n: &str| {
            n.starts_with(".shard-")
                || n.starts_with(".test.parquet")
                || n.starts_with(".manifest.json")
        };
        let stale_temp = is_temp_name(&name) && ours(&name);
        if stale_shard || stale_temp {
            fs::remove_file(item.path()).with_context(|| {
                format!("cannot remove the stale file {}", item.path().display())
            })?;
            tracing::info!("removed stale {}", item.path().display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_each_changed_setting() {
        let a = Settings {
            workers: 4,
            partition: Partition::Iid,
            alpha: None,
            min_shard: None,
            seed: 42,
            task: Some(Task::Sentiment),
            text_column: None,
            label_column: None,
            test_fraction: None,
        };
        let b = Settings {
            workers: 5,
            partition: Partition::Dirichlet,
            alpha: Some(0.5),
            min_shard: Some(32),
            seed: 7,
            task: Some(Task::Rating),
            text_column: None,
            label_column: None,
            test_fraction: None,
        };
        assert!(a.differences(&a).is_empty());
        assert_eq!(
            b.differences(&a),
            [
                "workers 4 → 5",
                "partition iid → dirichlet",
                "alpha none → 0.5",
                "min-shard none → 32",
                "seed 42 → 7",
                "task sentiment → rating"
            ]
        );
        let c = Settings {
            alpha: Some(0.5 + 1e-16),
            ..b.clone()
        };
        assert!(c.differences(&b).is_empty());
        let d = Settings {
            alpha: Some(0.6),
            ..b.clone()
        };
        assert_eq!(d.differences(&b), ["alpha 0.5 → 0.6"]);
    }

    #[test]
    fn leftovers_beyond_the_worker_count_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        for n in [
            "shard-00000.parquet",
            "shard-00001.parquet",
            "shard-00002.parquet",
            ".shard-00000.parquet.tmp-1-2",
            "notes.txt",
        ] {
            fs::write(dir.path().join(n), b"x").unwrap();
        }
        remove_leftovers(dir.path(), 2).unwrap();
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["notes.txt", "shard-00000.parquet", "shard-00001.parquet"]
        );
    }
}
