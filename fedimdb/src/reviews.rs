//! The review record and its Parquet format: what the copier writes and the trainer,
//! aggregator and server read.
//!
//! One row per review, four columns:
//!
//! | column | type   | meaning |
//! |--------|--------|---------|
//! | id     | string | `train/pos/123`: split, label folder and the number from the file name |
//! | rating | uint8  | the star rating from the file name (1–4 negative, 7–10 positive) |
//! | label  | uint8  | 1 positive, 0 negative |
//! | text   | string | the review as written, UTF-8 |

use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use polars::io::mmap::MmapBytesReader;
use polars::prelude::{Column, DataFrame, DataType, ParquetCompression, ParquetReader, ParquetWriter, SerReader, StatisticsOptions};

use crate::atomic::write_atomic;

/// Sentiment label of a review.
pub const POSITIVE: u8 = 1;
pub const NEGATIVE: u8 = 0;

/// The column names, in file order.
pub const COLUMNS: [&str; 4] = ["id", "rating", "label", "text"];

/// One labeled review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Review {
    pub id: String,
    pub rating: u8,
    pub label: u8,
    pub text: String,
}

/// Writes reviews as Parquet, atomically (see [`crate::atomic`]).
pub fn write_parquet(path: &Path, reviews: &[Review]) -> Result<()> {
    write_atomic(path, |w| encode_parquet(w, reviews))
}

/// Encodes reviews as Parquet into any writer: a file, or memory, where the copier hashes
/// the bytes before writing them and encodes the test set while the archive is still read.
pub fn encode_parquet<W: std::io::Write>(w: W, reviews: &[Review]) -> Result<()> {
    let n = reviews.len();
    let id = Column::new("id".into(), reviews.iter().map(|r| r.id.as_str()).collect::<Vec<_>>());
    let rating = Column::new("rating".into(), reviews.iter().map(|r| r.rating).collect::<Vec<u8>>());
    let label = Column::new("label".into(), reviews.iter().map(|r| r.label).collect::<Vec<u8>>());
    let text = Column::new("text".into(), reviews.iter().map(|r| r.text.as_str()).collect::<Vec<_>>());
    let mut df = DataFrame::new(n, vec![id, rating, label, text])?;
    ParquetWriter::new(w)
        .with_compression(ParquetCompression::Zstd(None))
        .with_statistics(StatisticsOptions::empty())
        .finish(&mut df)?;
    Ok(())
}

/// Reads a review Parquet file, checking its schema. Errors name the file and what is
/// wrong with it.
pub fn read_parquet(path: &Path) -> Result<Vec<Review>> {
    let file = File::open(path).with_context(|| format!("cannot open review file {}", path.display()))?;
    decode(file, &path.display())
}

/// Decodes review Parquet data held in memory, checking its schema, as [`read_parquet`]
/// does for a file (the fuzzer's entry point).
pub fn decode_parquet(bytes: &[u8]) -> Result<Vec<Review>> {
    decode(std::io::Cursor::new(bytes), &"the review data")
}

/// Decodes Parquet from `reader`; `what` names the source in errors. A panic inside polars
/// on corrupt input becomes an error too, so a damaged file is reported by name like any
/// other unreadable one.
fn decode<R: MmapBytesReader>(reader: R, what: &dyn std::fmt::Display) -> Result<Vec<Review>> {
    let unreadable = || format!("{what} is not a readable Parquet file (truncated or corrupt?)");
    let df = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ParquetReader::new(reader).finish()))
        .map_err(|panic| anyhow::anyhow!("the Parquet reader failed: {}", panic_message(&*panic)))
        .with_context(unreadable)?
        .with_context(unreadable)?;
    reviews_from_frame(&df).with_context(|| format!("{what} does not hold reviews in the fedimdb format"))
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("panic")
}

fn reviews_from_frame(df: &DataFrame) -> Result<Vec<Review>> {
    let names: Vec<&str> = df.get_column_names().iter().map(|s| s.as_str()).collect();
    ensure!(names == COLUMNS, "columns are {names:?}, expected {COLUMNS:?}");
    let col = |name: &str, want: DataType| -> Result<&Column> {
        let c = df.column(name)?;
        if c.dtype() != &want {
            bail!("column `{name}` has type {}, expected {want}", c.dtype());
        }
        Ok(c)
    };
    let id = col("id", DataType::String)?.str()?;
    let rating = col("rating", DataType::UInt8)?.u8()?;
    let label = col("label", DataType::UInt8)?.u8()?;
    let text = col("text", DataType::String)?.str()?;
    let mut out = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let (Some(id), Some(rating), Some(label), Some(text)) = (id.get(i), rating.get(i), label.get(i), text.get(i))
        else {
            bail!("row {i} has a missing (null) value");
        };
        ensure!(label == POSITIVE || label == NEGATIVE, "row {i} ({id}) has label {label}, expected 0 or 1");
        out.push(Review { id: id.to_owned(), rating, label, text: text.to_owned() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Review> {
        vec![
            Review { id: "train/pos/1".into(), rating: 9, label: POSITIVE, text: "Loved it — é".into() },
            Review { id: "train/neg/2".into(), rating: 2, label: NEGATIVE, text: "Dull.<br />Awful".into() },
        ]
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.parquet");
        write_parquet(&p, &sample()).unwrap();
        assert_eq!(read_parquet(&p).unwrap(), sample());
    }

    #[test]
    fn identical_input_gives_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.parquet"), dir.path().join("b.parquet"));
        write_parquet(&a, &sample()).unwrap();
        write_parquet(&b, &sample()).unwrap();
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    }

    /// A 264-byte file found by the fuzzer (`fuzz/`, target `shard_reader`) on which polars
    /// 0.55 panics while reading the footer ("thrift bool field"), hex-encoded.
    const POLARS_PANICS: &str = concat!(
        "151426f6021c15150c16021654167826fe01264152414167000050415231001c020000504152310000504152",
        "31001c0200005041523141414541414941414142705a41413d001806506f010000001901ffffffffff415231",
        "523141414541414941414142705a41413d001806506f6c4541414941414142705a41413d001806506f6c6172",
        "73190100005041523141414541414941414142727319010000504152316c6172731901000050415231000050",
        "41523141414541411100000000000000010000504152316c6172010001000050415231190100005041523141",
        "41454141494141414272731901000050415231000000000000010000504152316c6172010001000050415231",
    );

    #[test]
    fn a_file_polars_panics_on_is_an_error_naming_it() {
        let bytes = hex::decode(POLARS_PANICS).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fuzzed.parquet");
        std::fs::write(&p, &bytes).unwrap();
        let err = format!("{:#}", read_parquet(&p).unwrap_err());
        assert!(err.contains("fuzzed.parquet") && err.contains("not a readable Parquet"), "{err}");
        let err = format!("{:#}", decode_parquet(&bytes).unwrap_err());
        assert!(err.contains("the review data is not a readable Parquet"), "{err}");
    }

    #[test]
    fn decodes_from_memory() {
        let mut bytes = Vec::new();
        encode_parquet(&mut bytes, &sample()).unwrap();
        assert_eq!(decode_parquet(&bytes).unwrap(), sample());
        let err = format!("{:#}", decode_parquet(&bytes[..bytes.len() / 2]).unwrap_err());
        assert!(err.contains("not a readable Parquet"), "{err}");
    }

    #[test]
    fn wrong_schema_and_garbage_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.parquet");
        let mut df = DataFrame::new(1, vec![Column::new("id".into(), ["x"]), Column::new("stars".into(), [3u8])]).unwrap();
        ParquetWriter::new(File::create(&p).unwrap()).finish(&mut df).unwrap();
        let err = format!("{:#}", read_parquet(&p).unwrap_err());
        assert!(err.contains("bad.parquet") && err.contains("columns are"), "{err}");

        let g = dir.path().join("garbage.parquet");
        std::fs::write(&g, b"not parquet at all").unwrap();
        let err = format!("{:#}", read_parquet(&g).unwrap_err());
        assert!(err.contains("garbage.parquet") && err.contains("not a readable Parquet"), "{err}");
    }
}
