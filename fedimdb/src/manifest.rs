//! The data manifest: what the copier wrote, written last so that its presence means the
//! data folder is complete. Trainers read it to check their shard index and the shard's
//! checksum; the aggregator reads it for the test set's.

use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use crate::atomic::read_json;

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
    /// The path given to `--source`.
    pub path: String,
    /// `archive` (a gzip tar) or `folder` (an unpacked `aclImdb/`).
    pub kind: String,
    /// For an archive, the SHA-256 of the file; for a folder, the SHA-256 over the sorted
    /// review paths (relative to `aclImdb/`) and their contents.
    pub sha256: String,
}

/// One file the copier wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside `data/`.
    pub file: String,
    pub rows: usize,
    pub positive: usize,
    pub negative: usize,
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
    /// One entry per shard, in index order.
    pub shards: Vec<FileEntry>,
    pub test: FileEntry,
}

impl DataManifest {
    /// Reads and checks a manifest.
    pub fn read(path: &Path) -> Result<Self> {
        let m: DataManifest = read_json(path)?;
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
