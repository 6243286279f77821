//! Loading a review file for training or evaluation: checksum check against the data
//! manifest, Parquet read, and featurisation on all cores.

use std::path::Path;

use anyhow::{Result, ensure};

use crate::featurize::{Featurizer, FeaturizerConfig};
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
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn positives(&self) -> usize {
        self.labels.iter().filter(|&&y| y == 1).count()
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
    Ok(reviews)
}
