//! The real `server` binary as a child process on 127.0.0.1, on a port it picks itself (it
//! logs `listening on http://ADDR`, which is read back from its log file). Used by the soak
//! and schemathesis tests, which test the binary as it is deployed rather than the library
//! in-process. The process is killed when dropped, or stopped with SIGTERM by [`ServerProcess::terminate`].
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct ServerProcess {
    pub addr: SocketAddr,
    pub log: PathBuf,
    child: Option<Child>,
}

impl ServerProcess {
    /// Starts `server --root ROOT --listen 127.0.0.1:0 EXTRA...`, logging to `log`, and waits
    /// until it listens.
    pub fn start(root: &Path, log: PathBuf, extra: &[&str]) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_server"))
            .arg("--root")
            .arg(root)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("the server binary starts");
        let mut p = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(addr) = listening_addr(&p.log_text()) {
                p.addr = addr;
                return p;
            }
            if let Some(status) = p.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the server exited ({status}) before listening:\n{}",
                    p.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the server did not listen within 60 s:\n{}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGTERM (what Kubernetes sends), then waits up to `within` for the exit status.
    pub fn terminate(mut self, within: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The address in the server's `listening on http://ADDR` log line.
fn listening_addr(log: &str) -> Option<SocketAddr> {
    let rest = &log[log.find("listening on http://")? + "listening on http://".len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || ".:[]".contains(c)))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}
