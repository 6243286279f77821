//! What the fuzz targets share: an allocation limit that works without a sanitizer, and the
//! seed corpus writer.
//!
//! libFuzzer's `-malloc_limit_mb` needs a sanitizer's malloc hooks; these targets build
//! with `--sanitizer none` (see README.md), so [`LimitedAlloc`], the global allocator of
//! every target, enforces the same limit itself: a single allocation over it prints
//! `out-of-memory (malloc(N))` and aborts, and libFuzzer saves the input as a crash. That
//! turns "this input makes the parser allocate gigabytes" into a finding even when the
//! memory is never touched (and so never shows in `-rss_limit_mb`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The global allocator of every target: the system allocator with a per-allocation limit.
pub struct LimitedAlloc;

#[global_allocator]
static ALLOC: LimitedAlloc = LimitedAlloc;

/// Largest single allocation, in bytes (unlimited until [`init`] reads the flags).
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

#[inline]
fn check(size: usize) {
    if size > LIMIT.load(Ordering::Relaxed) {
        over_limit(size);
    }
}

#[cold]
fn over_limit(size: usize) -> ! {
    // No allocation from here on: format on the stack, write straight to stderr.
    let mut buf = [0u8; 160];
    let mut w = &mut buf[..];
    let limit_mb = LIMIT.load(Ordering::Relaxed) >> 20;
    let _ = writeln!(
        w,
        "==fedimdb-fuzz== ERROR: out-of-memory (malloc({size})) over -malloc_limit_mb={limit_mb}"
    );
    let left = w.len();
    let _ = std::io::stderr().write_all(&buf[..buf.len() - left]);
    std::process::abort();
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for LimitedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Called from every target's `init`: sets the allocation limit from libFuzzer's own flags
/// (`-malloc_limit_mb=N`, else `-rss_limit_mb=N`, else libFuzzer's default of 2048 MB, as
/// libFuzzer does), and writes the seed corpus when `FEDIMDB_FUZZ_WRITE_SEEDS` names a folder.
pub fn init(target: &str) {
    let flag = |name: &str| {
        std::env::args()
            .filter_map(|a| a.strip_prefix(name).and_then(|v| v.parse::<usize>().ok()))
            .next_back()
    };
    let mb = flag("-malloc_limit_mb=")
        .filter(|&m| m > 0)
        .or(flag("-rss_limit_mb="))
        .filter(|&m| m > 0)
        .unwrap_or(2048);
    if let Some(dir) = std::env::var_os("FEDIMDB_FUZZ_WRITE_SEEDS") {
        let dir = Path::new(&dir).join(target);
        std::fs::create_dir_all(&dir).expect("cannot create the seed folder");
        let seeds = seeds::for_target(target);
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).expect("cannot write a seed");
        }
        eprintln!("wrote {} seeds to {}", seeds.len(), dir.display());
        std::process::exit(0);
    }
    LIMIT.store(mb.saturating_mul(1 << 20), Ordering::Relaxed);
}

pub mod seeds;
