//! The memory allocator every fedimdb binary runs on: mimalloc, declared by
//! [`global_allocator!`](crate::global_allocator) in each binary's `main.rs`.
//!
//! Why not the system allocator: a trainer or an aggregator lives for one round, and most of
//! its work is filling fresh tables (a shard's features, its renumbered buckets, gathered
//! weights, the combined model) and dropping them. glibc's allocator maps every large table
//! anew, so each one is paid for again in page faults, and its arena locks are contended by
//! the featurising threads. mimalloc keeps freed memory for the next table and gives every
//! thread its own heap. Whole 5-worker runs take about 7% less time with it (side by side,
//! docs/BENCHMARKS.md); the results are the same bytes, as the allocator never touches values.
//! It is built without transparent huge pages (`no_thp`): with them a trainer zeroes whole
//! 2 MiB pages it only partly uses and peaks about 35 MB higher, for no measurable gain. The
//! fuzz targets keep their own allocator (fuzz/src/lib.rs), so they do not invoke the macro.

pub use mimalloc::MiMalloc;

/// Makes [`MiMalloc`] the global allocator of the binary whose `main.rs` invokes it (once).
#[macro_export]
macro_rules! global_allocator {
    () => {
        #[global_allocator]
        static GLOBAL_ALLOCATOR: $crate::alloc::MiMalloc = $crate::alloc::MiMalloc;
    };
}
