//! The JSON reports trainers and the aggregator leave beside their outputs, read by the
//! pipeline for its tables and by people.

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::train::{EpochStats, TrainConfig};

/// `rounds/round-R/updates/shard-I.json`: what one worker did in one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpdateReport {
    pub round: u32,
    pub shard: usize,
    /// `stats` for round 0, `update` after.
    pub kind: crate::checkpoint::Kind,
    pub samples: usize,
    /// The shard's reviews of each class, in the data manifest's label order.
    #[serde(default)]
    pub label_counts: Vec<usize>,
    pub device: String,
    pub train: Option<TrainConfig>,
    pub epochs: Vec<EpochStats>,
    /// Seconds from start to the update being on disk.
    pub seconds: f64,
    /// SHA-256 of the update file: readers check it before using the update.
    pub sha256: String,
    pub version: String,
    /// SHA-256 of the shard it was trained on (from the data manifest).
    #[serde(default)]
    pub data_sha256: String,
    /// SHA-256 of the global model it started from (rounds ≥ 1).
    #[serde(default)]
    pub base_sha256: Option<String>,
    /// The model config (round 0 chooses it; later rounds inherit it).
    #[serde(default)]
    pub config: Option<crate::model::ModelConfig>,
    /// SHA-256 of the control file its correction came from (rounds ≥ 1).
    #[serde(default)]
    pub control_sha256: Option<String>,
    /// Bytes of the update file.
    #[serde(default)]
    pub bytes: u64,
}

/// `rounds/round-R/report.json`: the aggregator's account of a round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: u32,
    /// `sum` in round 0, the strategy after (`fedavg`, `median`, `trimmed-mean(0.2)`).
    pub strategy: crate::strategy::Combination,
    /// Shards whose updates were combined, and their sample counts.
    pub shards: Vec<usize>,
    /// Shards of the data manifest with no update this round (aggregated under a quorum,
    /// `--min-workers`); empty when every shard's update was combined.
    #[serde(default)]
    pub missing: Vec<usize>,
    pub samples: Vec<u64>,
    /// Test-set metrics of the new global model.
    pub test: Metrics,
    pub seconds: f64,
    /// SHA-256 of `global.safetensors`: readers check it before using the model.
    pub model_sha256: String,
    pub version: String,
    /// SHA-256 of the global model of the round before (rounds ≥ 1).
    #[serde(default)]
    pub base_sha256: Option<String>,
    /// SHA-256 of each combined update, in the order of `shards`.
    #[serde(default)]
    pub update_sha256: Vec<String>,
    /// Bytes of each combined update file, in the order of `shards`.
    #[serde(default)]
    pub update_bytes: Vec<u64>,
    /// SHA-256 of `control.safetensors`, the control variate the next round corrects with.
    #[serde(default)]
    pub control_sha256: Option<String>,
    /// Per shard, the round whose update holds that worker's control variate after this
    /// round (the control file's `sources`): this round for a worker that took part, an
    /// earlier one for a worker left out under a quorum. The retention rule keeps those
    /// updates. Empty in reports written before it was recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub control_sources: Vec<u32>,
    /// How the combined weights moved the global model (rounds ≥ 1; absent in round 0 and in
    /// reports written before there was a choice, which took the combined weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_optimizer: Option<crate::server_optimizer::ServerOptimizer>,
    /// SHA-256 of `moments.safetensors`, the server optimizer's state the next round starts
    /// from (with `adam`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moments_sha256: Option<String>,
}

/// The current time as RFC 3339 UTC (`2026-11-21T22:16:00Z`).
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs)
}

/// Formats seconds since the Unix epoch as RFC 3339 UTC (civil-from-days conversion).
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_known_instants() {
        assert_eq!(super::format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::format_utc(1_795_299_360), "2026-11-21T22:16:00Z");
    }
}
