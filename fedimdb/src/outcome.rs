//! What a step did, as a small machine-readable record: done, up to date (its outputs
//! already existed and verified), with the round's test accuracy where there is one.
//!
//! Each binary writes its record, when it ends well, to the file `FEDIMDB_OUTCOME_FILE`
//! names. The Kubernetes Jobs set it to `/dev/termination-log`, the container's
//! termination message, which the API server keeps in the pod's status; `pipeline k8s`
//! reads it there instead of searching the logs for a phrase. `pipeline local` gives each
//! step a file under `ROOT/logs/` and reads the same record.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One step's record. Every field is written, absent ones as `null`, so that the record
/// reads the same for every step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// `copier`, `trainer` or `aggregator`.
    pub step: String,
    pub status: Status,
    pub round: Option<u32>,
    pub shard: Option<usize>,
    /// The aggregator's: the round's global model on the test set (a report, never a
    /// decision input).
    pub test_accuracy: Option<f64>,
}

/// Whether the step computed its outputs (`done`) or found them already there, verified
/// and made from the same inputs (`up-to-date`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Done,
    UpToDate,
}

/// The variable naming the file to write the record to. Unset: no record is written.
pub const ENV: &str = "FEDIMDB_OUTCOME_FILE";

/// Where Kubernetes reads a container's termination message (`terminationMessagePath`'s
/// default; at most 4096 bytes, which a record never comes near).
pub const TERMINATION_LOG: &str = "/dev/termination-log";

/// The file [`ENV`] names, if it names one: unset or empty, no record is asked for.
pub fn requested_file() -> Option<std::ffi::OsString> {
    std::env::var_os(ENV).filter(|p| !p.is_empty())
}

impl Outcome {
    pub fn new(step: &str, status: Status) -> Self {
        Self {
            step: step.to_owned(),
            status,
            round: None,
            shard: None,
            test_accuracy: None,
        }
    }

    /// Writes the record to the file [`ENV`] names, if it names one. A failure to write is
    /// logged, not returned: the step's work is done and verified either way, and the
    /// driver then reports the step's outcome as unknown.
    pub fn record(&self) {
        let Some(path) = requested_file() else {
            return;
        };
        if let Err(e) = self.write(Path::new(&path)) {
            tracing::warn!("cannot write the step's outcome record: {e:#}");
        }
    }

    fn write(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string(self).expect("an outcome serialises");
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {} ({ENV})", path.display()))
    }

    /// Reads a record back (a termination message, or the file a local step wrote).
    pub fn parse(text: &str) -> Result<Self> {
        serde_json::from_str(text.trim()).with_context(|| {
            format!(
                "not a step outcome record: {:?}",
                text.chars().take(200).collect::<String>()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_names_its_fields() {
        let mut o = Outcome::new("aggregator", Status::UpToDate);
        o.round = Some(3);
        o.test_accuracy = Some(0.9185);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outcome.json");
        o.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"step\":\"aggregator\",\"status\":\"up-to-date\",\"round\":3,\"shard\":null,\"test_accuracy\":0.9185}\n"
        );
        assert_eq!(Outcome::parse(&text).unwrap(), o);
        let err = Outcome::parse("INFO up to date").unwrap_err().to_string();
        assert!(err.contains("not a step outcome record"), "{err}");
    }
}
