//! Cache hints for the loops that read a table at a review's buckets.
//!
//! A review reads the weights (or ratios, or gradient sums) of its few hundred buckets at
//! scattered places of a table of megabytes, larger than the cache. The reads do not depend on
//! each other, yet the processor's out-of-order window holds only a few dozen of them, so
//! without help most of them wait on memory one after another. Each loop therefore asks for
//! the entry it will read [`AHEAD`] non-zeros later. A hint changes no value and no order of
//! operations: models stay the same bits (docs/BENCHMARKS.md, "prefetching a review's
//! weights").

/// How many non-zeros ahead of its use an entry is asked for: far enough to cover a read
/// from memory at the rate these loops consume non-zeros, near enough that the line is
/// still in the first-level cache when it is used.
pub const AHEAD: usize = 24;

/// Asks the processor to bring the cache line holding `x` into its caches.
#[inline(always)]
pub fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it reads nothing into the program and cannot fault.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>((x as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// [`prefetch`] of the entry of `table` that non-zero `p + AHEAD` of a review reads: the
/// first of its `rows` entries at bucket `buckets[p + AHEAD]`, if the review has that many.
#[inline(always)]
pub fn ahead<T>(table: &[T], buckets: &[u32], p: usize, rows: usize) {
    if let Some(&j) = buckets.get(p + AHEAD)
        && let Some(x) = table.get(j as usize * rows)
    {
        prefetch(x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asking_ahead_never_reads_out_of_bounds() {
        let table = vec![1.0f64; 8];
        // A review shorter than AHEAD, one whose bucket `AHEAD` ahead lies past the table,
        // and several rows per bucket: each is a hint or nothing, never a panic.
        let short = [0u32, 3, 7];
        let long: Vec<u32> = (0..AHEAD as u32 + 2).map(|j| j * 1000).collect();
        for p in 0..long.len() {
            ahead(&table, &short, p.min(2), 1);
            ahead(&table, &long, p, 1);
            ahead(&table, &short, p.min(2), 3);
        }
        assert_eq!(table, vec![1.0; 8], "a hint changes no value");
    }
}
