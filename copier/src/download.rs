//! `copier download`: fetches the official archive and keeps it only if its SHA-256 is the
//! published one.
//!
//! The body is streamed into a hidden temporary file in the target folder while it is
//! hashed, and renamed to its final name only after the hash matched. So a corrupted or
//! substituted download never sits under the name the copier reads, and an interrupted
//! one leaves at most a hidden temporary file.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail, ensure};
use fedimdb::atomic::write_atomic;
use fedimdb::digest::{HashingReader, sha256_file};
use indicatif::ProgressBar;

/// Where the dataset's authors publish it.
pub const OFFICIAL_URL: &str = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz";
/// SHA-256 of the official `aclImdb_v1.tar.gz`.
pub const OFFICIAL_SHA256: &str =
    "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe";
/// The name the archive is kept under in the target folder.
pub const FILE_NAME: &str = "aclImdb_v1.tar.gz";

/// What [`download`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Downloaded(PathBuf),
    AlreadyPresent(PathBuf),
}

/// Downloads `url` into `to/aclImdb_v1.tar.gz` and checks it against `sha256` (hex).
/// Skips the download if that file is already there with the right hash.
pub fn download(to: &Path, url: &str, sha256: &str) -> Result<Outcome> {
    let expected = sha256.trim().to_ascii_lowercase();
    ensure!(
        expected.len() == 64 && expected.bytes().all(|b| b.is_ascii_hexdigit()),
        "--sha256 must be 64 hexadecimal digits, got {sha256:?}"
    );
    let created = !to.exists();
    std::fs::create_dir_all(to)
        .with_context(|| format!("cannot create the download folder {}", to.display()))?;
    let result = fetch(to, url, &expected);
    if result.is_err() && created {
        // Leave no empty folder behind from a failed download.
        let _ = std::fs::remove_dir(to);
    }
    result
}

/// [`download`] once the hash is checked and the folder exists.
fn fetch(to: &Path, url: &str, expected: &str) -> Result<Outcome> {
    let dest = to.join(FILE_NAME);
    if dest.exists() {
        let have = sha256_file(&dest)?;
        if have == expected {
            return Ok(Outcome::AlreadyPresent(dest));
        }
        tracing::warn!(
            "{} has sha256 {have}, expected {expected}; downloading it again",
            dest.display()
        );
    }

    tracing::info!("downloading {url}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .user_agent(format!("fedimdb-copier/{}", fedimdb::VERSION))
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| match e {
        ureq::Error::StatusCode(code) => {
            anyhow!("cannot download {url}: the server answered HTTP {code}; check the URL (--url) or try a mirror")
        }
        other => anyhow!("cannot download {url}: {other}; check the network connection and the URL"),
    })?;
    let body = response.into_body();
    let len = body.content_length();
    let pb = fedimdb::logging::progress(len.unwrap_or(0), "download");

    let mut mismatch: Option<String> = None;
    let written = write_atomic(&dest, |w| {
        let mut reader = HashingReader::new(ProgressRead {
            inner: body.into_reader(),
            pb: pb.clone(),
        });
        io::copy(&mut reader, w)
            .with_context(|| format!("the download from {url} was interrupted"))?;
        let got = reader.finish();
        if got != expected {
            mismatch = Some(got);
            bail!("sha256 mismatch");
        }
        Ok(())
    });
    pb.finish_and_clear();
    if let Some(got) = mismatch {
        bail!(
            "the file downloaded from {url} has sha256 {got}, expected {expected}; it was not kept. \
             The transfer was corrupted or the file at the URL is not the expected one: try again, \
             or pass the right --sha256 for a different file"
        );
    }
    written?;
    tracing::info!("downloaded {} (sha256 {expected})", dest.display());
    Ok(Outcome::Downloaded(dest))
}

/// Advances the progress bar as bytes arrive.
struct ProgressRead<R> {
    inner: R,
    pb: ProgressBar,
}

impl<R: Read> Read for ProgressRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pb.inc(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_hash_is_refused_before_any_network_access() {
        let dir = tempfile::tempdir().unwrap();
        let err = download(dir.path(), "http://127.0.0.1:9/x", "abc")
            .unwrap_err()
            .to_string();
        assert!(err.contains("64 hexadecimal digits"), "{err}");
    }

    #[test]
    fn present_file_with_the_right_hash_is_not_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"abc").unwrap();
        let sha = fedimdb::digest::sha256_bytes(b"abc");
        // Port 9 (discard) on 127.0.0.1: nothing listens, so a fetch attempt would fail.
        let out = download(dir.path(), "http://127.0.0.1:9/x", &sha.to_uppercase()).unwrap();
        assert_eq!(out, Outcome::AlreadyPresent(dir.path().join(FILE_NAME)));
    }
}
