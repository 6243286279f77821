//! The review record and its Parquet format: what the copier writes and the trainer,
//! aggregator and server read.
//!
//! One row per review, four columns:
//!
//! | column | type   | meaning |
//! |--------|--------|---------|
//! | id     | string | `train/pos/123`: split, label folder and the number from the file name |
//! | rating | uint8  | IMDB: the star rating from the file name (1–4 negative, 7–10 positive); 0 for other data |
//! | label  | uint8  | the class index: IMDB sentiment 1 positive, 0 negative; any data, `labels[k]` of the data manifest |
//! | text   | string | the review as written, UTF-8 |
//!
//! Other sources (CSV, …) give `id` as the split and where the row was
//! (`train/17`: line 17 of the file; `train/spam/msg1`: folder `spam/`, file `msg1.txt`).

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use polars::prelude::{
    Column, DataFrame, DataType, ParquetCompression, ParquetReader, ParquetWriter, SerReader,
    StatisticsOptions,
};
use polars_parquet::parquet::page::CompressedPage;
use polars_parquet::parquet::read::PageReader;

use crate::atomic::write_atomic;

/// Sentiment label of an IMDB review (the class index of `pos` and `neg`).
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
    let id = Column::new(
        "id".into(),
        reviews.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
    );
    let rating = Column::new(
        "rating".into(),
        reviews.iter().map(|r| r.rating).collect::<Vec<u8>>(),
    );
    let label = Column::new(
        "label".into(),
        reviews.iter().map(|r| r.label).collect::<Vec<u8>>(),
    );
    let text = Column::new(
        "text".into(),
        reviews.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(),
    );
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
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot open review file {}", path.display()))?;
    decode(&bytes, &path.display())
}

/// Decodes review Parquet data held in memory, checking its schema, as [`read_parquet`]
/// does for a file (the fuzzer's entry point).
pub fn decode_parquet(bytes: &[u8]) -> Result<Vec<Review>> {
    decode(bytes, &"the review data")
}

/// Decodes Parquet bytes; `what` names the source in errors.
///
/// Corrupt input must give an error, never end the process, and polars (0.55) does not
/// guarantee that (found by fuzzing, see fuzz/README.md): it panics on some corrupt footers,
/// which is caught here, and it trusts the value counts of the file, reserving memory for
/// them before decoding (a page header's negative count becomes 2^64 values), a failed
/// allocation that aborts the process and cannot be caught. So the counts are checked first,
/// in the footer and in every page header: every review costs at least a byte of the file
/// (ids are distinct), so more rows or values than bytes means a corrupt file.
fn decode(bytes: &[u8], what: &dyn std::fmt::Display) -> Result<Vec<Review>> {
    let df = read_frame(bytes, what)?;
    reviews_from_frame(&df)
        .with_context(|| format!("{what} does not hold reviews in the fedimdb format"))
}

/// Reads any Parquet file held in memory into a data frame, with the checks of [`decode`]
/// (a corrupt file is an error, never a crash): how the copier reads a Parquet source.
pub fn read_frame(bytes: &[u8], what: &dyn std::fmt::Display) -> Result<DataFrame> {
    let read = || -> Result<DataFrame> {
        check_counts(bytes)?;
        Ok(ParquetReader::new(std::io::Cursor::new(bytes)).finish()?)
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read))
        .unwrap_or_else(|panic| {
            Err(anyhow::anyhow!(
                "the Parquet reader failed: {}",
                panic_message(&*panic)
            ))
        })
        .with_context(|| format!("{what} is not a readable Parquet file (truncated or corrupt?)"))
}

/// Checks that the footer and every page header of a Parquet file claim no more rows or
/// values than the file has bytes (see [`decode`]).
fn check_counts(bytes: &[u8]) -> Result<()> {
    let size = bytes.len() as u64;
    let plausible = |n: u64| n <= size;
    check_footer(bytes)?;
    let mut reader = ParquetReader::new(std::io::Cursor::new(bytes));
    let meta = reader.get_metadata()?;
    ensure!(
        plausible(meta.num_rows as u64),
        "its footer claims {} rows in {size} bytes",
        meta.num_rows
    );
    let file = polars_buffer::Buffer::from(bytes.to_vec());
    for (i, rg) in meta.row_groups.iter().enumerate() {
        ensure!(
            plausible(rg.num_rows() as u64),
            "row group {i} claims {} rows in {size} bytes",
            rg.num_rows()
        );
        for column in rg.parquet_columns() {
            let n = column.num_values();
            ensure!(
                u64::try_from(n).is_ok_and(plausible),
                "row group {i} claims {n} values in a column in {size} bytes"
            );
            let range = column.byte_range();
            ensure!(
                range.start <= range.end && range.end <= size,
                "row group {i} has a column at bytes {range:?} of {size}"
            );
            let chunk = file
                .clone()
                .sliced(range.start as usize..range.end as usize);
            // The page headers, not the pages: nothing is decompressed. The size limit bounds
            // what the header reader may allocate, which polars leaves unbounded.
            let pages =
                PageReader::new(std::io::Cursor::new(chunk), column, Vec::new(), bytes.len());
            for page in pages {
                if let CompressedPage::Data(page) = page? {
                    let n = page.num_values();
                    ensure!(
                        plausible(n as u64),
                        "row group {i} has a page claiming {n} values in {size} bytes"
                    );
                }
            }
        }
    }
    Ok(())
}

/// Parses the footer with the budgeted Thrift reader first: polars' own footer reader
/// allocates whatever a list length claims (a kilobyte file claimed 109 GB, an allocation
/// failure that aborts), while this one refuses lists and strings larger than the budget. A
/// list element takes at least a byte of the footer, counted as 8 by the budget, once per
/// level of nesting (at most 4 in Parquet's footer): 64 bytes of budget per footer byte.
fn check_footer(bytes: &[u8]) -> Result<()> {
    use polars_parquet_format::thrift::protocol::TCompactInputProtocol;
    let n = bytes.len();
    ensure!(
        n >= 12 && bytes.ends_with(b"PAR1"),
        "no Parquet footer at its end"
    );
    let len = u32::from_le_bytes(bytes[n - 8..n - 4].try_into().expect("4 bytes")) as usize;
    ensure!(len <= n - 8, "its footer claims {len} bytes of {n}");
    let footer = &bytes[n - 8 - len..n - 8];
    let mut prot = TCompactInputProtocol::new(footer, 64 * len + 4096);
    polars_parquet_format::FileMetaData::read_from_in_protocol(&mut prot)
        .map_err(|e| anyhow::anyhow!("its footer is corrupt: {e}"))?;
    Ok(())
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("panic")
}

fn reviews_from_frame(df: &DataFrame) -> Result<Vec<Review>> {
    let names: Vec<&str> = df.get_column_names().iter().map(|s| s.as_str()).collect();
    ensure!(
        names == COLUMNS,
        "columns are {names:?}, expected {COLUMNS:?}"
    );
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
        let (Some(id), Some(rating), Some(label), Some(text)) =
            (id.get(i), rating.get(i), label.get(i), text.get(i))
        else {
            bail!("row {i} has a missing (null) value");
        };
        out.push(Review {
            id: id.to_owned(),
            rating,
            label,
            text: text.to_owned(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    fn sample() -> Vec<Review> {
        vec![
            Review {
                id: "train/pos/1".into(),
                rating: 9,
                label: POSITIVE,
                text: "Loved it — é".into(),
            },
            Review {
                id: "train/neg/2".into(),
                rating: 2,
                label: NEGATIVE,
                text: "Dull.<br />Awful".into(),
            },
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
        assert!(
            err.contains("fuzzed.parquet") && err.contains("not a readable Parquet"),
            "{err}"
        );
        let err = format!("{:#}", decode_parquet(&bytes).unwrap_err());
        assert!(
            err.contains("the review data is not a readable Parquet"),
            "{err}"
        );
    }

    /// A 298-byte file found by the fuzzer whose page header claims a negative number of
    /// values: polars 0.55 reserves memory for 2^64 of them, a failed allocation that aborts
    /// the process. Hex-encoded.
    const NEGATIVE_PAGE_COUNT: &str = concat!(
        "65672f371500151015222c1503151015061506000028b52ffd2008410000020000001502195c4804726f6f74",
        "150800150c25021802696425004c1c000000150225021806726174696e6725164cac13081200000015022502",
        "18056c6162656c251600150c250218047465787425004c1c0000001602191c194c26e0011c150c1935000610",
        "1918026964150c1602166a168e01265226080016c60615140026f6021c15021935000610191806726174696e",
        "67150c16021654167826fe0126ca010016da0615160026ac041c150219350006101918056c6162656c150c16",
        "021654167826b4032680030016f0061516002698071c150c193500061019180474657874150c160216b00116",
        "d40126c40526b4040016860715160016c20316024500001c00000001000050415231",
    );

    #[test]
    fn a_page_claiming_more_values_than_bytes_is_refused_before_decoding() {
        let bytes = hex::decode(NEGATIVE_PAGE_COUNT).unwrap();
        let err = format!("{:#}", decode_parquet(&bytes).unwrap_err());
        assert!(
            err.contains("not a readable Parquet") && err.contains("page claiming"),
            "{err}"
        );
    }

    /// 14 bytes found by the fuzzer: a footer whose list claims so many elements that
    /// polars 0.55 asks for 195 GB at once, a failed allocation that aborts the process.
    #[test]
    fn a_footer_claiming_a_huge_list_is_refused_before_decoding() {
        let bytes = b"\x2a\xf3\xf3\xf3\xff\xff\x06\x00\x00\x00PAR1";
        let err = format!("{:#}", decode_parquet(bytes).unwrap_err());
        assert!(
            err.contains("not a readable Parquet") && err.contains("footer is corrupt"),
            "{err}"
        );
    }

    #[test]
    fn decodes_from_memory() {
        let mut bytes = Vec::new();
        encode_parquet(&mut bytes, &sample()).unwrap();
        assert_eq!(decode_parquet(&bytes).unwrap(), sample());
        let err = format!(
            "{:#}",
            decode_parquet(&bytes[..bytes.len() / 2]).unwrap_err()
        );
        assert!(err.contains("not a readable Parquet"), "{err}");
    }

    #[test]
    fn wrong_schema_and_garbage_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.parquet");
        let mut df = DataFrame::new(
            1,
            vec![
                Column::new("id".into(), ["x"]),
                Column::new("stars".into(), [3u8]),
            ],
        )
        .unwrap();
        ParquetWriter::new(File::create(&p).unwrap())
            .finish(&mut df)
            .unwrap();
        let err = format!("{:#}", read_parquet(&p).unwrap_err());
        assert!(
            err.contains("bad.parquet") && err.contains("columns are"),
            "{err}"
        );

        let g = dir.path().join("garbage.parquet");
        std::fs::write(&g, b"not parquet at all").unwrap();
        let err = format!("{:#}", read_parquet(&g).unwrap_err());
        assert!(
            err.contains("garbage.parquet") && err.contains("not a readable Parquet"),
            "{err}"
        );
    }
}
