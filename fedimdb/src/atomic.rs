//! Crash-safe writes for the shared volume.
//!
//! Every binary writes through here: the bytes go to a hidden temporary file in the
//! destination folder, are flushed to disk, and only then renamed over the final name
//! (a rename within one folder is atomic on local file systems and on NFS). A reader
//! therefore sees either the old complete file or the new complete file, never a
//! half-written one, and a crash leaves at most a `.*.tmp-*` file that no reader opens.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// The temporary name used while `path` is being written: hidden, in the same folder,
/// unique per process and call.
pub fn temp_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// True for names produced by [`temp_path_for`]; readers and listings skip them.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// Removes the temporary file unless the write completed.
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Writes `path` atomically: `write` fills a buffered writer on a temporary file, which is
/// then fsynced and renamed into place, and the folder is synced so the rename survives a
/// crash. If `write` fails, the temporary file is removed and `path` is left untouched.
pub fn write_atomic<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&mut BufWriter<File>) -> Result<()>,
{
    let dir = parent_dir(path);
    fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let tmp = temp_path_for(path);
    let mut guard = TempGuard {
        path: tmp.clone(),
        armed: true,
    };
    let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    write(&mut out).with_context(|| format!("while writing {}", path.display()))?;
    crate::fault::write_point(path);
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("cannot flush {}", tmp.display()))?;
    file.sync_all()
        .with_context(|| format!("cannot sync {}", tmp.display()))?;
    drop(file);
    fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    guard.armed = false;
    sync_dir(dir);
    Ok(())
}

/// [`write_atomic`] for bytes already in memory.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_parts_atomic(path, &[bytes])
}

/// [`write_atomic`] for a file made of `parts` in order, each written from where it lies: a
/// checkpoint's header and then its tables, without first copying them into one buffer the
/// size of the file (84 MB a round for the aggregator).
pub fn write_parts_atomic(path: &Path, parts: &[&[u8]]) -> Result<()> {
    write_atomic(path, |w| {
        // Stopped half-way, so that the crash tests' `write:` fault point (see
        // [`crate::fault`]) finds a genuinely half-written temporary file.
        let half = parts.iter().map(|p| p.len()).sum::<usize>() / 2;
        let (mut written, mut halted) = (0, false);
        for &part in parts {
            let mut part = part;
            if !halted && written + part.len() >= half {
                let (first, rest) = part.split_at(half - written);
                w.write_all(first)?;
                if std::env::var_os(crate::fault::ENV).is_some() {
                    w.flush()?;
                    crate::fault::write_point(path);
                }
                (written, halted, part) = (half, true, rest);
            }
            w.write_all(part)?;
            written += part.len();
        }
        Ok(())
    })
}

/// Puts the file `src`, already written and synced, at `path` as well, atomically: as a hard
/// link to `src` when the file system allows one (no second copy on the volume, no second
/// write), otherwise as a copy ([`copy_atomic`]). Either way a reader of `path` sees the old
/// file or the new one, whole.
pub fn link_or_copy_atomic(src: &Path, path: &Path) -> Result<()> {
    let tmp = temp_path_for(path);
    if fs::hard_link(src, &tmp).is_ok() {
        let mut guard = TempGuard {
            path: tmp.clone(),
            armed: true,
        };
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
        guard.armed = false;
        sync_dir(parent_dir(path));
        return Ok(());
    }
    copy_atomic(src, path)
}

/// Copies the file `src` to `path` through [`write_atomic`].
pub fn copy_atomic(src: &Path, path: &Path) -> Result<()> {
    let mut from = File::open(src).with_context(|| format!("cannot open {}", src.display()))?;
    write_atomic(path, |w| {
        std::io::copy(&mut from, w).with_context(|| format!("cannot read {}", src.display()))?;
        Ok(())
    })
}

/// [`write_atomic`] for a value serialised as pretty JSON with a trailing newline.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value)?;
        w.write_all(b"\n")?;
        Ok(())
    })
}

/// Reads and parses a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not valid JSON of the expected shape", path.display()))
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Syncs a folder so that renames inside it are durable. Best effort: some file systems
/// do not allow opening folders for sync, and the data itself is already synced.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_nothing_and_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.bin");
        write_bytes_atomic(&path, b"old").unwrap();
        let err = write_atomic(&path, |w| {
            w.write_all(b"partial")?;
            anyhow::bail!("disk on fire")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("disk on fire"));
        assert_eq!(fs::read(&path).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "temporary file left behind: {names:?}");
    }

    #[test]
    fn a_linked_copy_replaces_the_old_file_whole_and_survives_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("global.bin"), dir.path().join("latest.bin"));
        write_bytes_atomic(&dst, b"old").unwrap();
        write_bytes_atomic(&src, b"new model").unwrap();
        link_or_copy_atomic(&src, &dst).unwrap();
        assert_eq!(fs::read(&dst).unwrap(), b"new model");
        fs::remove_file(&src).unwrap();
        assert_eq!(
            fs::read(&dst).unwrap(),
            b"new model",
            "the published file outlives its round"
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "temporary file left behind: {names:?}");
        // Where the file system has no hard links, the file is copied.
        write_bytes_atomic(&src, b"copied").unwrap();
        copy_atomic(&src, &dst).unwrap();
        assert_eq!(fs::read(&dst).unwrap(), b"copied");
        let e = format!(
            "{:#}",
            copy_atomic(&dir.path().join("gone"), &dst).unwrap_err()
        );
        assert!(e.contains("cannot open") && e.contains("gone"), "{e}");
        assert_eq!(fs::read(&dst).unwrap(), b"copied");
    }

    /// A file written in parts is their concatenation, whichever part holds its middle.
    #[test]
    fn a_file_of_parts_is_their_concatenation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("parts.bin");
        for parts in [
            vec![&b"head"[..], &b"0123456789"[..], &b""[..], &b"tail"[..]],
            vec![&b""[..]],
            vec![&b"ab"[..], &b"cd"[..]],
        ] {
            write_parts_atomic(&path, &parts).unwrap();
            assert_eq!(fs::read(&path).unwrap(), parts.concat());
        }
    }

    #[test]
    fn temp_names_are_hidden_and_recognised() {
        let p = temp_path_for(Path::new("/x/shard-00001.parquet"));
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(is_temp_name(name), "{name}");
        assert!(!is_temp_name("shard-00001.parquet"));
        assert_eq!(p.parent().unwrap(), Path::new("/x"));
    }
}
