//! The data manifest: what the copier wrote, written last so that its presence means the
//! data folder is complete. Trainers read it to check their shard index and the shard's
//! checksum; the aggregator reads it for the test set's.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use crate::atomic::read_json;
use crate::labels::Task;

/// Current manifest format version.
pub const MANIFEST_VERSION: u32 = 1;

/// How training reviews were spread over the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Partition {
    /// Stratified: equal sizes (±1) and equal label balance (±1).
    #[default]
    Iid,
    /// Label skew drawn from Dirichlet(alpha) per label.
    Dirichlet,
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Partition::Iid => "iid",
            Partition::Dirichlet => "dirichlet",
        })
    }
}

/// Where the reviews came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// The path given to `--source` (or `--test`).
    pub path: String,
    /// IMDB: `archive` (a gzip tar) or `folder` (an unpacked `aclImdb/`). Any other data:
    /// `csv`, `tsv`, `jsonl`, `parquet`, or `folders` (one folder per label).
    pub kind: String,
    /// For a file (archive, CSV, …), the SHA-256 of the file; for a folder, the SHA-256
    /// over the sorted review paths (relative to the folder) and their contents.
    pub sha256: String,
}

impl SourceInfo {
    /// Whether the source is the IMDB archive or folder (which has its own test split and
    /// the `--task` choice).
    pub fn is_imdb(&self) -> bool {
        matches!(self.kind.as_str(), "archive" | "folder")
    }
}

/// One file the copier wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside `data/`.
    pub file: String,
    pub rows: usize,
    /// Two labels only: the reviews of class 1 (IMDB: `pos`). Absent with more labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positive: Option<usize>,
    /// Two labels only: the reviews of class 0 (IMDB: `neg`). Absent with more labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative: Option<usize>,
    /// The reviews of each class, in the order of [`DataManifest::labels`].
    #[serde(default)]
    pub label_counts: Vec<usize>,
    pub sha256: String,
}

/// `data/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataManifest {
    pub format_version: u32,
    /// `copier <version>`.
    pub tool: String,
    pub source: SourceInfo,
    pub workers: usize,
    pub partition: Partition,
    /// Dirichlet concentration; `None` for IID.
    pub alpha: Option<f64>,
    /// Dirichlet only: the fewest reviews a shard was given (`--min-shard`); `None` for IID
    /// and for data sharded before the floor existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_shard: Option<usize>,
    pub seed: u64,
    /// IMDB sources: which labels were made (`sentiment` when absent, as before the choice
    /// existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    /// Table sources (CSV, TSV, JSON Lines, Parquet): the column holding the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_column: Option<String>,
    /// Table sources: the column holding the label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_column: Option<String>,
    /// The fraction of each label held out as the test set (`--test-fraction`), if the
    /// test set came from the source itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_fraction: Option<f64>,
    /// Where the test set came from when it was a source of its own (`--test`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_source: Option<SourceInfo>,
    /// The label names in class order: a shard's `label` k is `labels[k]` (see
    /// [`crate::labels::order`]). Manifests from before K classes are IMDB sentiment.
    #[serde(default = "sentiment_labels")]
    pub labels: Vec<String>,
    /// One entry per shard, in index order.
    pub shards: Vec<FileEntry>,
    pub test: FileEntry,
}

fn sentiment_labels() -> Vec<String> {
    Task::Sentiment.labels()
}

impl DataManifest {
    /// What a model trained on this data predicts, in words for people (a model card's
    /// `task`): `IMDB sentiment` or `IMDB rating`, else the name of the source file or folder.
    pub fn task_title(&self) -> String {
        if self.source.is_imdb() {
            return self.task.unwrap_or_default().title().to_owned();
        }
        let path = std::path::Path::new(&self.source.path);
        path.file_name().map_or_else(
            || self.source.path.clone(),
            |n| n.to_string_lossy().into_owned(),
        )
    }

    /// Reads and checks a manifest.
    pub fn read(path: &Path) -> Result<Self> {
        let mut m: DataManifest = read_json(path)?;
        ensure!(
            m.format_version == MANIFEST_VERSION,
            "{} has format_version {}, this build reads {MANIFEST_VERSION}; re-run the copier",
            path.display(),
            m.format_version
        );
        ensure!(
            m.shards.len() == m.workers,
            "{} lists {} shards for {} workers; it is damaged, re-run the copier with --force",
            path.display(),
            m.shards.len(),
            m.workers
        );
        if m.task.is_none() && m.source.is_imdb() {
            m.task = Some(Task::Sentiment);
        }
        for e in m.shards.iter_mut().chain(std::iter::once(&mut m.test)) {
            // Written before per-label counts: the positive and negative counts are they.
            if e.label_counts.is_empty()
                && let (Some(p), Some(n)) = (e.positive, e.negative)
            {
                e.label_counts = vec![n, p];
            }
            ensure!(
                e.label_counts.len() == m.labels.len(),
                "{}: {} has counts for {} labels, the manifest names {}; it is damaged, re-run the copier with --force",
                path.display(),
                e.file,
                e.label_counts.len(),
                m.labels.len()
            );
        }
        Ok(m)
    }

    /// The manifest of the run under `layout`, for a step that needs the data: a missing or
    /// unreadable manifest means the copier has not finished.
    pub fn of_run(layout: &crate::layout::Layout) -> Result<Self> {
        Self::read(&layout.data_manifest()).with_context(|| {
            format!(
                "no complete data under {}: run the copier first",
                layout.root().display()
            )
        })
    }

    /// The entry of shard `index`, or an error naming the valid range.
    pub fn shard(&self, index: usize) -> Result<&FileEntry> {
        self.shards.get(index).ok_or_else(|| {
            anyhow::anyhow!(
                "shard index {index} is outside the manifest: the copier wrote {} shards (0..={})",
                self.shards.len(),
                self.shards.len().saturating_sub(1)
            )
        })
    }

    /// Total training reviews over all shards.
    pub fn train_rows(&self) -> usize {
        self.shards.iter().map(|s| s.rows).sum()
    }
}
