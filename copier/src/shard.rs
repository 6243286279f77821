//! Sharding a source into `ROOT/data/`: the copier's workflow, one step a function.
//!
//! 1. [`check_arguments`]: the cheap checks, before the source or the output is touched;
//! 2. [`plan`]: what `ROOT/data/` already holds decides whether there is anything to do;
//! 3. [`read_source`]: every review, validated, with the test set's encoding started early;
//! 4. [`split_into_shards`]: the training reviews dealt to the workers;
//! 5. [`write::write_all`]: the files, then the manifest (see `write.rs`), and [`report`].

use std::path::PathBuf;
use std::thread::JoinHandle;

use anyhow::{Result, bail};
use fedimdb::labels::{SourceArgs, Task};
use fedimdb::layout::Layout;
use fedimdb::manifest::{DataManifest, Partition};
use fedimdb::outcome::{Outcome, Status};
use fedimdb::partition::{self, PartitionArgs};
use fedimdb::reviews::Review;

use crate::source::{self, Dataset, Spec};
use crate::write::{self, Existing, Settings};

/// What to shard and how: the copier's command line, checked by clap.
#[derive(Debug)]
pub struct Request {
    pub source: PathBuf,
    /// How the source is read: format, columns, test set.
    pub reading: SourceArgs,
    /// IMDB only: sentiment or rating labels.
    pub task: Task,
    pub out: PathBuf,
    pub workers: usize,
    /// How the reviews are spread (alpha and the floor are used by `dirichlet` only).
    pub partition: PartitionArgs,
    pub seed: u64,
    /// Replace data made with other arguments, or rewrite data that is up to date.
    pub force: bool,
}

/// Writes the shards, the test set and the manifest of `req` under `ROOT/data/`, or
/// nothing where they are already there and verify.
pub fn run(req: &Request) -> Result<Outcome> {
    let settings = check_arguments(req)?;
    let layout = Layout::new(&req.out);
    let already_read = match plan(req, &layout, &settings)? {
        Plan::UpToDate { source_sha256 } => {
            println!(
                "{} is already done: {} {} shards (seed {}) from source sha256 {}; nothing to do (pass --force to rewrite)",
                layout.data_dir().display(),
                settings.workers,
                settings.partition,
                settings.seed,
                source_sha256
            );
            return Ok(Outcome::new("copier", Status::UpToDate));
        }
        Plan::Write { already_read } => already_read,
    };
    let (data, early_test) = read_source(req, already_read)?;
    let labels = data.labels;
    let shards = split_into_shards(req, data.train)?;
    let test = test_file(data.test, early_test);
    let sources = write::Sources {
        source: data.source,
        test: data.test_source,
    };
    let manifest = write::write_all(&layout, sources, &settings, &labels, shards, test)?;
    report(&layout, &manifest);
    Ok(Outcome::new("copier", Status::Done))
}

/// The checks that need nothing read: the worker count, alpha, that the source exists and
/// that the reading flags fit it. Returns the settings the manifest records.
fn check_arguments(req: &Request) -> Result<Settings> {
    if req.workers == 0 {
        bail!(partition::PartitionError::NoWorkers);
    }
    req.partition.validate()?;
    let kind = spec(req).check(&req.source)?;
    let p = &req.partition;
    let r = &req.reading;
    let columns = kind.has_columns();
    Ok(Settings {
        workers: req.workers,
        partition: p.partition,
        alpha: p.dirichlet_alpha(),
        min_shard: p.dirichlet_alpha().map(|_| p.min_shard),
        seed: req.seed,
        task: kind.is_imdb().then_some(req.task),
        text_column: columns.then(|| r.text_column().to_owned()),
        label_column: columns.then(|| r.label_column().to_owned()),
        test_fraction: r.test_fraction,
    })
}

/// How `req` reads its source.
fn spec(req: &Request) -> Spec<'_> {
    Spec {
        args: &req.reading,
        task: req.task,
        seed: req.seed,
    }
}

/// What this run must do, given what `ROOT/data/` holds.
enum Plan {
    /// The data was made with these settings from this source and matches its manifest.
    UpToDate { source_sha256: String },
    /// Write everything: from `already_read` if identifying a folder source read it.
    Write { already_read: Option<Dataset> },
}

/// Refuses data made with other settings (unless `--force`) or from another source; data
/// made with these settings from this source is up to date unless a file fails its
/// checksum (each problem is logged, and the data rewritten).
fn plan(req: &Request, layout: &Layout, settings: &Settings) -> Result<Plan> {
    let old = match write::inspect(layout, settings, req.force)? {
        Existing::Nothing | Existing::Replace => return Ok(Plan::Write { already_read: None }),
        Existing::SameSettings(old) => old,
    };
    let (sha256, test_sha256, already_read) = source::identify(&req.source, &spec(req))?;
    let old_test = old.test_source.as_ref().map(|t| t.sha256.clone());
    if test_sha256 != old_test {
        bail!(
            "{} already holds data made with another test source ({} from {}, now {} from {}); \
             pass --force to replace it, or choose another --out",
            layout.data_dir().display(),
            old_test.as_deref().unwrap_or("none"),
            old.test_source.as_ref().map_or("none", |t| t.path.as_str()),
            test_sha256.as_deref().unwrap_or("none"),
            req.reading
                .test
                .as_ref()
                .map_or("none".into(), |t| t.display().to_string())
        );
    }
    if sha256 != old.source.sha256 {
        bail!(
            "{} already holds data made from another source (sha256 {} from {}, now {} from {}); \
             pass --force to replace it, or choose another --out",
            layout.data_dir().display(),
            old.source.sha256,
            old.source.path,
            sha256,
            req.source.display()
        );
    }
    let problems = write::verify(layout, &old);
    if problems.is_empty() {
        return Ok(Plan::UpToDate {
            source_sha256: sha256,
        });
    }
    for p in &problems {
        tracing::warn!("{p}");
    }
    tracing::warn!("the data does not match its manifest; rewriting it");
    Ok(Plan::Write { already_read })
}

/// The test set's encoding, started while the training reviews were still being read.
struct EarlyTest {
    /// How many test reviews it encodes.
    rows: usize,
    encoding: JoinHandle<Result<write::Encoded>>,
}

/// Reads the source, unless it was `already_read`. The test set's encoding starts as soon as
/// an archive moves on to training reviews, so that it overlaps with reading them (see
/// [`source::TestReadEarly`]).
fn read_source(
    req: &Request,
    already_read: Option<Dataset>,
) -> Result<(Dataset, Option<EarlyTest>)> {
    if let Some(data) = already_read {
        return Ok((data, None));
    }
    let mut early_test = None;
    let data = source::read(&req.source, &spec(req), &mut |test| {
        let rows = test.len();
        tracing::debug!("the test set looks complete ({rows} reviews); encoding it early");
        let encoding = std::thread::Builder::new()
            .name("encode-test".into())
            .spawn(move || write::encode(&test));
        // Without a thread the test set is simply encoded later with the shards.
        early_test = encoding.ok().map(|encoding| EarlyTest { rows, encoding });
    })?;
    Ok((data, early_test))
}

/// Deals the training reviews to the workers as `req.partition` says.
fn split_into_shards(req: &Request, train: Vec<Review>) -> Result<Vec<Vec<Review>>> {
    let labels: Vec<u8> = train.iter().map(|r| r.label).collect();
    let p = &req.partition;
    let indices = match p.partition {
        Partition::Iid => partition::iid(&labels, req.workers, req.seed)?,
        Partition::Dirichlet => {
            partition::dirichlet(&labels, req.workers, p.alpha, p.min_shard, req.seed)?
        }
    };
    Ok(take_shards(train, &indices))
}

/// Moves the training reviews into their shards (no copies of the texts).
fn take_shards(train: Vec<Review>, indices: &[Vec<usize>]) -> Vec<Vec<Review>> {
    let mut slots: Vec<Option<Review>> = train.into_iter().map(Some).collect();
    indices
        .iter()
        .map(|idx| {
            idx.iter()
                .map(|&i| slots[i].take().expect("partition places each review once"))
                .collect()
        })
        .collect()
}

/// What the test file is made from: the early encoding if it covers the whole test set.
fn test_file(test: Vec<Review>, early: Option<EarlyTest>) -> write::Content {
    match early {
        Some(early) if early.rows == test.len() => write::Content::Encoding(early.encoding),
        // More test reviews came later: the early encoding is stale (its thread is left to
        // finish on its own) and the full test set is encoded with the shards.
        early => {
            if let Some(early) = early {
                tracing::debug!(
                    "{} test reviews came after the first {}; encoding again",
                    test.len() - early.rows,
                    early.rows
                );
            }
            write::Content::Reviews(test)
        }
    }
}

/// Logs every shard and prints the one-line result.
fn report(layout: &Layout, manifest: &DataManifest) {
    let per_label = |e: &fedimdb::manifest::FileEntry| {
        manifest
            .labels
            .iter()
            .zip(&e.label_counts)
            .map(|(l, c)| format!("{c} {l}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for s in manifest
        .shards
        .iter()
        .chain(std::iter::once(&manifest.test))
    {
        tracing::info!("{}: {} reviews ({})", s.file, s.rows, per_label(s));
    }
    println!(
        "wrote {} {} shards ({} training reviews) and test.parquet ({} reviews) to {}; {} labels: {}",
        manifest.workers,
        manifest.partition,
        manifest.train_rows(),
        manifest.test.rows,
        layout.data_dir().display(),
        manifest.labels.len(),
        manifest.labels.join(", ")
    );
}
