//! The volume layout: where every file of a run lives under one root folder.
//!
//! The root is the NFS mount on Kubernetes and a local folder otherwise. All binaries build
//! paths through [`Layout`] so that the layout is written down once; `docs/VOLUME.md`
//! describes the same tree for people.
//!
//! ```text
//! ROOT/
//!   data/                          written by copier
//!     shard-00000.parquet …        one training shard per worker
//!     test.parquet                 the 25,000 official test reviews
//!     manifest.json                written last: its presence means data/ is complete
//!   rounds/
//!     round-0000/                  round 0: federated feature statistics
//!       updates/shard-00000.safetensors   a worker's output for the round
//!       updates/shard-00000.json          its training report
//!       global.safetensors         the aggregator's output: the global model after the round
//!       control.safetensors        the global control variate for the next round (SCAFFOLD)
//!       moments.safetensors        the server optimizer's state for the next round (Adam)
//!       report.json                the aggregator's round report (test metrics)
//!     round-0001/ …                training rounds
//!   model/
//!     latest.safetensors           the newest global model (what the server loads)
//!     latest.json                  its model card
//! ```
//!
//! Round `R` trainers start from `rounds/round-{R-1}/global.safetensors`; round 0 has no
//! input model.

use std::path::{Path, PathBuf};

/// The flags of a step's volume form, `--root ROOT --round R [--resume]`: one definition
/// for the trainer and the aggregator (each adds its own flags, and its original form's
/// flags conflict with `--root`).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct VolumeArgs {
    /// Root folder of the shared volume (layout in docs/VOLUME.md).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// The round (0: the round that gathers feature statistics).
    #[arg(long, requires = "root")]
    pub round: Option<u32>,
    /// Keep this step's output already on disk if it verifies and was made from the same
    /// inputs and arguments (how a resumed pipeline skips finished work); otherwise compute it.
    #[arg(long, requires = "root")]
    pub resume: bool,
}

impl VolumeArgs {
    /// The volume and round to work on, `None` without `--root`; `--root` needs `--round`.
    pub fn target(&self) -> Result<Option<(&Path, u32)>, String> {
        match (&self.root, self.round) {
            (Some(root), Some(round)) => Ok(Some((root, round))),
            (Some(_), None) => Err("--root needs --round R".to_owned()),
            (None, _) => Ok(None),
        }
    }
}

/// File name of the data manifest, beside the shards it lists.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Paths of one run's files under its root folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Folder of the copier's output.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// File name of training shard `index` (no folder).
    pub fn shard_file_name(index: usize) -> String {
        format!("shard-{index:05}.parquet")
    }

    /// Training shard `index` (0-based).
    pub fn shard(&self, index: usize) -> PathBuf {
        self.data_dir().join(Self::shard_file_name(index))
    }

    /// The test set.
    pub fn test_set(&self) -> PathBuf {
        self.data_dir().join("test.parquet")
    }

    /// The copier's manifest; written last.
    pub fn data_manifest(&self) -> PathBuf {
        self.data_dir().join(MANIFEST_FILE)
    }

    /// Folder holding all rounds.
    pub fn rounds_dir(&self) -> PathBuf {
        self.root.join("rounds")
    }

    /// Folder of round `round`.
    pub fn round_dir(&self, round: u32) -> PathBuf {
        self.rounds_dir().join(format!("round-{round:04}"))
    }

    /// Folder of the worker updates of `round`.
    pub fn updates_dir(&self, round: u32) -> PathBuf {
        self.round_dir(round).join("updates")
    }

    /// The update (weights or statistics) worker `shard` wrote in `round`.
    pub fn update(&self, round: u32, shard: usize) -> PathBuf {
        self.updates_dir(round)
            .join(format!("shard-{shard:05}.safetensors"))
    }

    /// The training report worker `shard` wrote in `round`.
    pub fn update_report(&self, round: u32, shard: usize) -> PathBuf {
        self.updates_dir(round)
            .join(format!("shard-{shard:05}.json"))
    }

    /// The global model the aggregator produced at the end of `round`.
    pub fn global_model(&self, round: u32) -> PathBuf {
        self.round_dir(round).join("global.safetensors")
    }

    /// The global control variate (SCAFFOLD) the aggregator wrote at the end of `round`.
    pub fn control(&self, round: u32) -> PathBuf {
        self.round_dir(round).join("control.safetensors")
    }

    /// The server optimizer's moments the aggregator wrote at the end of `round` (rounds ≥ 1,
    /// with `--server-optimizer adam`).
    pub fn moments(&self, round: u32) -> PathBuf {
        self.round_dir(round).join("moments.safetensors")
    }

    /// The model round `round`'s trainers start from: the global model of the round before.
    /// `None` for round 0, which starts from nothing.
    pub fn input_model(&self, round: u32) -> Option<PathBuf> {
        round.checked_sub(1).map(|r| self.global_model(r))
    }

    /// The aggregator's report for `round`.
    pub fn round_report(&self, round: u32) -> PathBuf {
        self.round_dir(round).join("report.json")
    }

    /// Folder of the published model.
    pub fn model_dir(&self) -> PathBuf {
        self.root.join("model")
    }

    /// The newest global model, which the server serves.
    pub fn latest_model(&self) -> PathBuf {
        self.model_dir().join("latest.safetensors")
    }

    /// The model card of the newest global model.
    pub fn latest_card(&self) -> PathBuf {
        self.model_dir().join("latest.json")
    }

    /// Parses a shard file name back to its index (`shard-00003.parquet` or
    /// `shard-00003.safetensors` → 3).
    pub fn parse_shard_name(name: &str) -> Option<usize> {
        let stem = name.strip_prefix("shard-")?;
        let digits = stem.split('.').next()?;
        if digits.len() != 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_the_documented_tree() {
        let l = Layout::new("/vol");
        assert_eq!(l.shard(3), Path::new("/vol/data/shard-00003.parquet"));
        assert_eq!(l.test_set(), Path::new("/vol/data/test.parquet"));
        assert_eq!(l.data_manifest(), Path::new("/vol/data/manifest.json"));
        assert_eq!(
            l.update(2, 4),
            Path::new("/vol/rounds/round-0002/updates/shard-00004.safetensors")
        );
        assert_eq!(
            l.global_model(2),
            Path::new("/vol/rounds/round-0002/global.safetensors")
        );
        assert_eq!(l.input_model(0), None);
        assert_eq!(l.input_model(3), Some(l.global_model(2)));
        assert_eq!(l.latest_model(), Path::new("/vol/model/latest.safetensors"));
    }

    #[test]
    fn shard_names_round_trip() {
        for i in [0, 7, 12345] {
            assert_eq!(
                Layout::parse_shard_name(&Layout::shard_file_name(i)),
                Some(i)
            );
        }
        assert_eq!(Layout::parse_shard_name("shard-00004.safetensors"), Some(4));
        assert_eq!(Layout::parse_shard_name("shard-4.parquet"), None);
        assert_eq!(Layout::parse_shard_name("test.parquet"), None);
    }
}
