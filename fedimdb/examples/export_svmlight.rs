//! Writes a copier output folder as svmlight files, for a peer model over the very same
//! features: `cargo run --release -p fedimdb --example export_svmlight -- DATA OUT`.
//!
//! Issue 13 measures the K-class model against scikit-learn's logistic regression "over the
//! same n-grams". Re-creating the featurizer in Python could drift from ours (tokens, hashes,
//! collisions), so the peer reads what ours sees instead: each review's sorted distinct
//! hashed n-gram buckets, each with the value `1/sqrt(buckets)` ([`doc_scale`], the model's
//! input scale), and its class index as the label. `OUT/train.svm` holds every shard in index
//! order, `OUT/test.svm` the test set; both are deterministic. The shards are checked against
//! `DATA/manifest.json` first, so a damaged or swapped file is named, not exported.
//! `tests/bench/sklearn_peer.sh` runs it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use fedimdb::dataset::featurize_all;
use fedimdb::layout::MANIFEST_FILE;
use fedimdb::manifest::{DataManifest, FileEntry};
use fedimdb::model::{ModelArgs, doc_scale};
use fedimdb::reviews::{Review, read_parquet};
use fedimdb::verify::check_file;

#[derive(Parser)]
struct Args {
    /// The copier's `data/` folder (shards, test set, manifest.json).
    data: PathBuf,
    /// Where `train.svm` and `test.svm` go (created if missing).
    out: PathBuf,
    /// The featurizer the model would use (defaults: the model's).
    #[command(flatten)]
    model: ModelArgs,
}

/// Reads one file of the manifest, checked against its checksum and row count. Not
/// `dataset::load_reviews`, which refuses more than two classes until the K-class model exists.
fn load(data: &Path, entry: &FileEntry) -> Result<Vec<Review>> {
    let path = data.join(&entry.file);
    check_file(&path, &entry.sha256, &data.join(MANIFEST_FILE))?;
    let reviews = read_parquet(&path)?;
    ensure!(
        reviews.len() == entry.rows,
        "{} holds {} reviews, the data manifest says {}; re-run the copier with --force",
        path.display(),
        reviews.len(),
        entry.rows
    );
    Ok(reviews)
}

/// Writes `entries`' reviews as one svmlight file: `label bucket:value ...`, buckets sorted.
fn export(data: &Path, entries: &[FileEntry], args: &ModelArgs, out: &Path) -> Result<usize> {
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?,
    );
    let mut rows = 0;
    for entry in entries {
        let reviews = load(data, entry)?;
        let featurized = featurize_all(&reviews, args.config(2).featurizer);
        for (buckets, label) in featurized.features.iter().zip(&featurized.labels) {
            let value = doc_scale(buckets.len());
            write!(w, "{label}")?;
            for b in buckets {
                write!(w, " {b}:{value}")?;
            }
            writeln!(w)?;
        }
        rows += reviews.len();
    }
    w.flush()
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(rows)
}

fn main() -> Result<()> {
    let args = Args::parse();
    args.model.validate().map_err(anyhow::Error::msg)?;
    let manifest_path = args.data.join(MANIFEST_FILE);
    let manifest = DataManifest::read(&manifest_path).with_context(|| {
        format!(
            "no complete copier output in {}: run the copier first",
            args.data.display()
        )
    })?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let train = export(
        &args.data,
        &manifest.shards,
        &args.model,
        &args.out.join("train.svm"),
    )?;
    let test = export(
        &args.data,
        std::slice::from_ref(&manifest.test),
        &args.model,
        &args.out.join("test.svm"),
    )?;
    println!(
        "{} classes ({}), 2^{} buckets: {train} training and {test} test reviews in {}",
        manifest.labels.len(),
        manifest.labels.join(", "),
        args.model.hash_bits,
        args.out.display()
    );
    Ok(())
}
