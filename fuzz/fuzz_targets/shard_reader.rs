//! The review shard reader on arbitrary bytes: `reviews::decode_parquet` (what
//! `read_parquet` runs on a file) returns reviews or an error, never panics out and never
//! allocates without bound. Reviews it returns encode back to Parquet that decodes to the
//! same reviews. (A label is any class index, `0..K` of the data manifest's label set, which
//! the reader does not know; the file's checksum in the manifest vouches for it.)
//!
//! The reader catches panics inside polars (a corrupt file must give an error naming it,
//! not kill the process); libFuzzer's panic hook would abort on those before they are
//! caught, so this target's hook stays quiet for panics during a decode and aborts for any
//! other. `FEDIMDB_FUZZ_POLARS_PANICS=1` makes every panic a crash, to collect polars'
//! own bugs for an upstream report.

#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};

use fedimdb::reviews::{decode_parquet, encode_parquet};
use libfuzzer_sys::fuzz_target;

/// Set while a decode runs (polars may panic on its own worker threads).
static DECODING: AtomicBool = AtomicBool::new(false);

fn init() {
    // One polars thread: columns decode in parallel otherwise, and which of two corrupt
    // columns fails first (an error, or a huge allocation) would vary from run to run, so a
    // crash found would not always reproduce.
    // SAFETY: no other thread runs yet (polars starts its pool on first use).
    unsafe { std::env::set_var("POLARS_MAX_THREADS", "1") };
    fedimdb_fuzz::init("shard_reader");
    if std::env::var_os("FEDIMDB_FUZZ_POLARS_PANICS").is_some() {
        return;
    }
    let fuzzer_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !DECODING.load(Ordering::SeqCst) {
            fuzzer_hook(info);
        }
    }));
}

fuzz_target!(
    init: init(),
    |data: &[u8]| {
        DECODING.store(true, Ordering::SeqCst);
        let decoded = decode_parquet(data);
        DECODING.store(false, Ordering::SeqCst);
        let Ok(reviews) = decoded else { return };
        let mut bytes = Vec::new();
        encode_parquet(&mut bytes, &reviews).expect("decoded reviews encode");
        assert_eq!(decode_parquet(&bytes).expect("encoded reviews decode"), reviews);
    }
);
