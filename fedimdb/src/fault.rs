//! Fault injection for the crash tests.
//!
//! With `FEDIMDB_FAULT=POINT` in its environment, a binary kills itself with SIGKILL when
//! it reaches POINT: no destructor, no flush, no cleanup runs, as when a node dies or the
//! kernel's OOM killer strikes. The tests in `tests/fault_injection.rs` use this to stop
//! the trainer and the aggregator at exact places (half-way through writing a file
//! included), then re-run the pipeline and compare its result with an uninterrupted run.
//!
//! Points are plain strings:
//! - `write:SUFFIX`: while writing a file whose path ends with the components SUFFIX
//!   (e.g. `write:round-0002/global.safetensors`), after half of its bytes reached the
//!   temporary file and before it is synced and renamed;
//! - the named steps the binaries declare with [`point`], such as
//!   `trainer:2:1:update-written` (see the trainer's and aggregator's `run.rs`).
//!
//! Without the variable every check is one comparison against a cached `None`.

use std::path::Path;
use std::sync::OnceLock;

/// The environment variable naming the point to die at.
pub const ENV: &str = "FEDIMDB_FAULT";

fn armed() -> Option<&'static str> {
    static POINT: OnceLock<Option<String>> = OnceLock::new();
    POINT
        .get_or_init(|| std::env::var(ENV).ok().filter(|s| !s.is_empty()))
        .as_deref()
}

/// Dies if `FEDIMDB_FAULT` names `name`.
pub fn point(name: &str) {
    if armed() == Some(name) {
        die(name);
    }
}

/// Dies if `FEDIMDB_FAULT` is `write:SUFFIX` and `path` ends with SUFFIX.
pub fn write_point(path: &Path) {
    if let Some(suffix) = armed().and_then(|p| p.strip_prefix("write:"))
        && path.ends_with(suffix)
    {
        die(&format!("write:{}", path.display()));
    }
}

fn die(at: &str) -> ! {
    eprintln!(
        "{ENV}: killing this process (pid {}) at {at}",
        std::process::id()
    );
    // SAFETY: kill(2) on our own pid with a valid signal number has no memory effects.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    unreachable!("SIGKILL cannot be caught")
}
