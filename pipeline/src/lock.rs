//! The lock on a run's root folder, so that two pipelines never write into one root.
//!
//! `ROOT/pipeline.lock` is locked with `flock(2)` (std's `File::try_lock`) while a pipeline
//! runs, and holds a one-line JSON record of the holder. The kernel drops the lock when the
//! holder's process ends however it ends, SIGKILL included, so a dead holder never blocks
//! anyone; on NFS the client emulates it with a POSIX lock that the server releases when
//! the holder's machine or pod is gone (after the NFS lease, about 90 s). A pipeline that
//! ends normally, successfully or not, empties the record on its way out; finding the lock
//! free *with* a record in it therefore means the previous run was interrupted, which the
//! pipeline reports before resuming.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// File name of the lock under the root.
pub const LOCK_FILE: &str = "pipeline.lock";

/// Who holds (or held) the lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub host: String,
    pub started_at: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on host {}, started {}",
            self.pid, self.host, self.started_at
        )
    }
}

/// What the previous holder left behind, if it did not end normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Previous {
    /// No record: the root is new or the last run ended normally.
    Clean,
    /// A record whose holder no longer holds the lock: that run was interrupted.
    Interrupted(Option<Holder>),
}

/// A held lock; dropping it empties the record and releases the lock.
#[derive(Debug)]
pub struct RootLock {
    file: File,
    path: PathBuf,
}

/// This machine's name for lock records: the pod's name in a cluster, else the host name.
pub fn host_name() -> String {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|h| !h.trim().is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .or_else(|_| std::fs::read_to_string("/etc/hostname"))
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "unknown-host".into())
}

impl RootLock {
    /// Takes the lock on `root` (created if missing), or fails naming the live holder.
    pub fn acquire(root: &Path) -> Result<(Self, Previous)> {
        let path = root.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = read_record(&mut file).ok().flatten();
                let who = holder.map_or_else(
                    || "a pipeline that has not written its record yet".into(),
                    |h| h.to_string(),
                );
                bail!(
                    "{} is in use by another pipeline ({who}); two pipelines must not write into one root. \
                     Wait for it to finish, or use another --root",
                    root.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        let previous = match read_record(&mut file) {
            Ok(None) => Previous::Clean,
            Ok(Some(h)) => Previous::Interrupted(Some(h)),
            Err(_) => Previous::Interrupted(None),
        };
        let me = Holder {
            pid: std::process::id(),
            host: host_name(),
            started_at: fedimdb::report::utc_now(),
        };
        write_record(&mut file, Some(&me))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok((Self { file, path }, previous))
    }
}

impl Drop for RootLock {
    fn drop(&mut self) {
        if let Err(e) = write_record(&mut self.file, None) {
            tracing::warn!("cannot clear {}: {e}", self.path.display());
        }
        let _ = self.file.unlock();
    }
}

/// The record in the lock file: `None` when empty; an error when unreadable (a holder
/// killed while writing it).
fn read_record(file: &mut File) -> Result<Option<Holder>> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_string(&mut text)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    Ok(Some(serde_json::from_str(text.trim())?))
}

fn write_record(file: &mut File, holder: Option<&Holder>) -> std::io::Result<()> {
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    if let Some(h) = holder {
        writeln!(
            file,
            "{}",
            serde_json::to_string(h).map_err(std::io::Error::other)?
        )?;
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_a_normal_end_leaves_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let (lock, prev) = RootLock::acquire(dir.path()).unwrap();
        assert_eq!(prev, Previous::Clean);
        // flock is per open file description: a second open in this process conflicts too.
        let msg = format!("{:#}", RootLock::acquire(dir.path()).unwrap_err());
        assert!(msg.contains("is in use by another pipeline"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        drop(lock);
        let (_lock, prev) = RootLock::acquire(dir.path()).unwrap();
        assert_eq!(prev, Previous::Clean);
    }

    #[test]
    fn a_record_without_a_holder_is_an_interrupted_run() {
        let dir = tempfile::tempdir().unwrap();
        let dead = Holder {
            pid: 999_999,
            host: "node-7".into(),
            started_at: "2026-11-22T01:00:00Z".into(),
        };
        std::fs::write(
            dir.path().join(LOCK_FILE),
            serde_json::to_string(&dead).unwrap(),
        )
        .unwrap();
        let (_lock, prev) = RootLock::acquire(dir.path()).unwrap();
        assert_eq!(prev, Previous::Interrupted(Some(dead)));

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(LOCK_FILE), "{\"pid\": 12").unwrap();
        let (_lock, prev) = RootLock::acquire(dir.path()).unwrap();
        assert_eq!(prev, Previous::Interrupted(None));
    }
}
