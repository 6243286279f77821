//! `copier download` against a local HTTP server on 127.0.0.1 that serves a small archive
//! made by the test: success (then sharding the download), wrong hash, HTTP 404.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;

use common::*;

/// Starts a minimal HTTP/1.1 server on 127.0.0.1 that answers `GET /archive.tar.gz` with
/// `body` and every other path with 404. Returns its base URL; the thread lives as long
/// as the test process.
fn serve(body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            // Skip the headers.
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("");
            let (status, payload): (&str, &[u8]) = if path == "/archive.tar.gz" {
                ("200 OK", &body)
            } else {
                ("404 Not Found", b"not found")
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/x-gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                payload.len()
            );
            let _ = stream
                .write_all(head.as_bytes())
                .and_then(|_| stream.write_all(payload));
        }
    });
    format!("http://{addr}")
}

/// Runs `copier download --to TO --url URL --sha256 SHA256`.
fn download(to: &Path, url: &str, sha256: &str) -> std::process::Output {
    copier(&["download", "--to", s(to), "--url", url, "--sha256", sha256])
}

fn small_archive_bytes(dir: &Path) -> Vec<u8> {
    let p = dir.join("made.tar.gz");
    write_archive(&p, &small_dataset());
    let bytes = std::fs::read(&p).unwrap();
    std::fs::remove_file(p).unwrap();
    bytes
}

#[test]
fn downloads_checks_and_skips_a_second_time() {
    let tmp = tempfile::tempdir().unwrap();
    let body = small_archive_bytes(tmp.path());
    let sha = fedimdb::digest::sha256_bytes(&body);
    let url = format!("{}/archive.tar.gz", serve(body.clone()));
    let to = tmp.path().join("downloads");
    // A damaged earlier download under the final name is replaced.
    std::fs::create_dir(&to).unwrap();
    std::fs::write(to.join("aclImdb_v1.tar.gz"), b"half a file").unwrap();

    let log = ok(download(&to, &url, &sha));
    assert!(log.contains("downloading it again"), "{log}");
    assert!(
        log.contains("downloaded") && log.contains("sha256 verified"),
        "{log}"
    );
    assert_eq!(names(&to), ["aclImdb_v1.tar.gz"]);
    assert_eq!(std::fs::read(to.join("aclImdb_v1.tar.gz")).unwrap(), body);

    let log = ok(download(&to, &url, &sha));
    assert!(log.contains("already present"), "{log}");

    // The download is a valid source.
    let root = tmp.path().join("run");
    ok(shard(&to.join("aclImdb_v1.tar.gz"), &root, 2, &[]));
    assert_eq!(read_output(&root).manifest.source.sha256, sha);
}

#[test]
fn wrong_hash_keeps_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let body = small_archive_bytes(tmp.path());
    let actual = fedimdb::digest::sha256_bytes(&body);
    let expected = fedimdb::digest::sha256_bytes(b"something else");
    let url = format!("{}/archive.tar.gz", serve(body));
    let to = tmp.path().join("downloads");
    fails(
        download(&to, &url, &expected),
        &[&actual, &expected, "not kept"],
    );
    assert!(!to.exists(), "left behind: {:?}", names(&to));
}

#[test]
fn http_404_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("{}/missing.tar.gz", serve(Vec::new()));
    let to = tmp.path().join("downloads");
    fails(
        download(&to, &url, &"0".repeat(64)),
        &["HTTP 404", "missing.tar.gz"],
    );
    assert!(!to.exists(), "left behind: {:?}", names(&to));
}
