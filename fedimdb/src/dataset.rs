//! Loading a review file for training or evaluation: checksum check against the data
//! manifest, Parquet read, and featurisation on all cores.

use std::path::Path;

use anyhow::{Result, ensure};

use crate::featurize::{Featurizer, FeaturizerConfig};
use crate::labels::MAX_CLASSES;
use crate::manifest::FileEntry;
use crate::reviews::{Review, read_parquet};

/// Reviews of one file as model inputs.
#[derive(Debug, Clone, Default)]
pub struct Featurized {
    /// Per review, its sorted distinct feature buckets.
    pub features: Vec<Vec<u32>>,
    pub labels: Vec<u8>,
}

impl Featurized {
    /// The labels of `reviews`, each review without buckets: all a model whose weights are
    /// all zero needs to be scored (its logits are its biases).
    pub fn labels_of(reviews: &[Review]) -> Self {
        Self {
            features: vec![Vec::new(); reviews.len()],
            labels: reviews.iter().map(|r| r.label).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The reviews of each of `classes` classes.
    pub fn label_counts(&self, classes: usize) -> Vec<usize> {
        let mut counts = vec![0; classes];
        for &y in &self.labels {
            counts[y as usize] += 1;
        }
        counts
    }
}

/// Featurises reviews on all available cores (order preserved).
pub fn featurize_all(reviews: &[Review], cfg: FeaturizerConfig) -> Featurized {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 16);
    let chunk = reviews.len().div_ceil(threads).max(1);
    let features = std::thread::scope(|s| {
        let handles: Vec<_> = reviews
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    let mut f = Featurizer::new(cfg);
                    part.iter().map(|r| f.features(&r.text)).collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("featurizer thread panicked"))
            .collect()
    });
    Featurized {
        features,
        labels: reviews.iter().map(|r| r.label).collect(),
    }
}

/// Reads a review file, checking it against its manifest entry (checksum and row count)
/// when one is given, so a damaged or swapped file is named instead of silently used.
pub fn load_reviews(path: &Path, entry: Option<&FileEntry>) -> Result<Vec<Review>> {
    if let Some(e) = entry {
        let manifest = path.with_file_name(crate::layout::MANIFEST_FILE);
        crate::verify::check_file(path, &e.sha256, &manifest)?;
    }
    let reviews = read_parquet(path)?;
    if let Some(e) = entry {
        ensure!(
            reviews.len() == e.rows,
            "{} holds {} reviews, the data manifest says {}",
            path.display(),
            reviews.len(),
            e.rows
        );
    }
    ensure!(!reviews.is_empty(), "{} holds no reviews", path.display());
    if let Some(e) = entry.filter(|e| !e.label_counts.is_empty()) {
        let counts = label_counts(&reviews, e.label_counts.len().max(MAX_CLASSES));
        ensure!(
            counts[..e.label_counts.len()] == e.label_counts[..]
                && counts[e.label_counts.len()..].iter().all(|&c| c == 0),
            "{}: its reviews per class ({:?}) differ from the data manifest's ({:?}); re-run the copier with --force",
            path.display(),
            trimmed(&counts),
            e.label_counts
        );
    }
    Ok(reviews)
}

/// The reviews of each class index `0..n`.
pub fn label_counts(reviews: &[Review], n: usize) -> Vec<usize> {
    let mut counts = vec![0; n];
    for r in reviews {
        if let Some(c) = counts.get_mut(usize::from(r.label)) {
            *c += 1;
        }
    }
    counts
}

/// `counts` without its trailing zeros, for messages.
fn trimmed(counts: &[usize]) -> &[usize] {
    let end = counts.iter().rposition(|&c| c > 0).map_or(0, |i| i + 1);
    &counts[..end]
}
