//! Reading labeled text that is not IMDB: CSV and TSV (polars' reader), Parquet (polars'
//! reader, with the library's guards against corrupt files), JSON Lines (serde_json, line
//! by line) and one folder per label (`DIR/<label>/*.txt`). Each gives its records in file
//! order with the label as written; `labeled.rs` turns labels into classes.
//!
//! Every error names the file and the line (CSV, TSV, JSON Lines), the row (Parquet) or
//! the file (folders) at fault, and what to do. polars reports neither line numbers nor
//! which line is malformed, so a delimited file is first scanned here (UTF-8, quoting,
//! field counts) and handed to polars only when the scan finds it well formed; the scan
//! also gives each record's first line for the messages about its values.
//!
//! Memory: a file's bytes and the records made from them are held at once (about twice the
//! text); the IMDB reader holds the reviews as well, so memory stays of the same order.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Cursor};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail, ensure};
use fedimdb::digest::HashingReader;
use polars::prelude::{
    Column, CsvParseOptions, CsvReadOptions, DataFrame, DataType, PlSmallStr, SerReader,
};

use crate::source::{SourceKind, folder_digest};

/// Where a record is in its source, for its id and for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    /// The line a record starts on (CSV, TSV, JSON Lines), 1-based, the header included.
    Line(usize),
    /// The row of a Parquet file, 1-based.
    Row(usize),
    /// A file of a label folder, relative to the source (`spam/msg1.txt`).
    File(String),
}

impl At {
    /// The record's id within its split: the line or row number, or the file's path
    /// without `.txt`.
    pub fn id(&self) -> String {
        match self {
            At::Line(n) | At::Row(n) => n.to_string(),
            At::File(rel) => rel.strip_suffix(".txt").unwrap_or(rel).to_owned(),
        }
    }

    /// `PATH line N`, `PATH row N` or `PATH/FILE`, for messages.
    pub fn show(&self, origin: &Path) -> String {
        match self {
            At::Line(n) => format!("{} line {n}", origin.display()),
            At::Row(n) => format!("{} row {n}", origin.display()),
            At::File(rel) => origin.join(rel).display().to_string(),
        }
    }
}

/// One labeled text as the source gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub at: At,
    /// The label, trimmed of surrounding white space.
    pub label: String,
    pub text: String,
}

impl Record {
    /// A record, refusing an empty text or label (neither can be learned from).
    fn new(origin: &Path, at: At, label: &str, text: String) -> Result<Self> {
        let what = |w: &str, flag: &str| {
            anyhow!(
                "{}: the {w} is empty; every review needs a text and a label (is {flag} the right column?)",
                at.show(origin)
            )
        };
        let label = label.trim();
        if text.trim().is_empty() {
            return Err(what("text", "--text-column"));
        }
        if label.is_empty() {
            return Err(what("label", "--label-column"));
        }
        Ok(Self {
            label: label.to_owned(),
            text,
            at,
        })
    }
}

/// The records of one source, in source order, and its SHA-256 for the manifest.
#[derive(Debug)]
pub struct Table {
    pub records: Vec<Record>,
    pub sha256: String,
}

/// The two columns to read.
#[derive(Debug, Clone, Copy)]
pub struct Columns<'a> {
    pub text: &'a str,
    pub label: &'a str,
}

/// Reads a source that is not IMDB.
pub fn read(path: &Path, kind: SourceKind, columns: Columns) -> Result<Table> {
    tracing::info!("reading {} ({})", path.display(), kind.name());
    let table = match kind {
        SourceKind::Csv => read_delimited(path, b',', columns)?,
        SourceKind::Tsv => read_delimited(path, b'\t', columns)?,
        SourceKind::Jsonl => read_jsonl(path, columns)?,
        SourceKind::Parquet => read_parquet(path, columns)?,
        SourceKind::Folders => read_folders(path)?,
        SourceKind::Archive | SourceKind::Folder => {
            unreachable!("the IMDB reader reads IMDB sources")
        }
    };
    ensure!(
        !table.records.is_empty(),
        "{} holds no reviews",
        path.display()
    );
    tracing::info!(
        "read {} reviews from {}",
        table.records.len(),
        path.display()
    );
    Ok(table)
}

/// The error for bytes that are not UTF-8 at `offset`, naming the line.
fn not_utf8(origin: &Path, bytes: &[u8], offset: usize) -> anyhow::Error {
    let line = 1 + bytes[..offset].iter().filter(|&&b| b == b'\n').count();
    anyhow!(
        "{} line {line}: not valid UTF-8 (bad byte at offset {offset} of the file); save the file as UTF-8",
        origin.display()
    )
}

/// The header's names, for messages about a missing column.
fn list(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The position of column `name` in `header`, or an error naming the file, the flag and the
/// columns there are.
fn find_column(origin: &Path, header: &[String], name: &str, flag: &str) -> Result<()> {
    ensure!(
        header.iter().any(|h| h == name),
        "{}: no column {name:?} (the {flag}); its columns are {}",
        origin.display(),
        list(header)
    );
    Ok(())
}

/// What the scan of a delimited file found: the header's names, the first line of every
/// data record, and where the records end (blank lines after them excluded).
#[derive(Debug, PartialEq)]
struct Scan {
    header: Vec<String>,
    starts: Vec<usize>,
    end: usize,
}

/// Scans a delimited file with a header (RFC 4180 quoting: a field in `"` may hold the
/// delimiter, line breaks and `""` for a quote). Blank lines at the end are left out (see
/// [`Scan::end`]); one between records is an error, as polars would read it as a row of
/// nothing. Errors name the line.
fn scan_delimited(bytes: &[u8], sep: u8) -> std::result::Result<Scan, String> {
    let sep_name = if sep == b'\t' { "a tab" } else { "a comma" };
    let n = bytes.len();
    let (mut i, mut line) = (0, 1);
    let mut header: Option<Vec<String>> = None;
    let mut starts = Vec::new();
    while i < n {
        if bytes[i] == b'\n' || (bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n')) {
            if bytes[i..].iter().all(|&c| c == b'\n' || c == b'\r') {
                break;
            }
            return Err(format!(
                "line {line} is blank; remove the blank lines between records"
            ));
        }
        let first = line;
        let mut fields: Vec<String> = Vec::new();
        let mut count = 0;
        loop {
            let mut field = Vec::new();
            if bytes.get(i) == Some(&b'"') {
                i += 1;
                loop {
                    match bytes.get(i) {
                        None => {
                            return Err(format!(
                                "line {first}: a quoted field is never closed (a \" without its closing \")"
                            ));
                        }
                        Some(b'"') if bytes.get(i + 1) == Some(&b'"') => {
                            field.push(b'"');
                            i += 2;
                        }
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(&c) => {
                            line += usize::from(c == b'\n');
                            field.push(c);
                            i += 1;
                        }
                    }
                }
                let at_end = match bytes.get(i) {
                    None | Some(b'\n') => true,
                    Some(b'\r') => bytes.get(i + 1).is_none_or(|&c| c == b'\n'),
                    Some(&c) => c == sep,
                };
                if !at_end {
                    return Err(format!(
                        "line {line}: text after the closing quote of a field; quote the whole field and \
                         write a quote inside it as \"\""
                    ));
                }
            } else {
                while let Some(&c) = bytes.get(i) {
                    if c == sep || c == b'\n' || (c == b'\r' && bytes.get(i + 1) == Some(&b'\n')) {
                        break;
                    }
                    field.push(c);
                    i += 1;
                }
            }
            count += 1;
            if header.is_none() {
                fields.push(String::from_utf8_lossy(&field).into_owned());
            }
            match bytes.get(i) {
                Some(&c) if c == sep => i += 1,
                _ => break,
            }
        }
        // The record's line break.
        if bytes.get(i) == Some(&b'\r') {
            i += 1;
        }
        if bytes.get(i) == Some(&b'\n') {
            i += 1;
            line += 1;
        }
        match &header {
            None => header = Some(fields),
            Some(h) if h.len() != count => {
                return Err(format!(
                    "line {first} has {count} fields, the header (line 1) has {}; a field holding {sep_name}, \
                     a quote or a line break must be quoted (\"…\")",
                    h.len()
                ));
            }
            Some(_) => starts.push(first),
        }
    }
    let header = header.ok_or("it is empty: no header line")?;
    Ok(Scan {
        header,
        starts,
        end: i,
    })
}

/// CSV or TSV with a header line.
fn read_delimited(path: &Path, sep: u8, columns: Columns) -> Result<Table> {
    let bytes = fs::read(path).with_context(|| format!("cannot read source {}", path.display()))?;
    let sha256 = fedimdb::digest::sha256_bytes(&bytes);
    let body = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    if let Err(e) = std::str::from_utf8(body) {
        return Err(not_utf8(path, body, e.valid_up_to()));
    }
    let scan = scan_delimited(body, sep).map_err(|e| anyhow!("{} {e}", path.display()))?;
    find_column(path, &scan.header, columns.text, "--text-column")?;
    find_column(path, &scan.header, columns.label, "--label-column")?;
    let names: Arc<[PlSmallStr]> = [columns.text, columns.label]
        .iter()
        .map(|c| PlSmallStr::from(*c))
        .collect();
    let df = CsvReadOptions::default()
        .with_has_header(true)
        // Every column as text: labels are names, whatever they look like.
        .with_infer_schema_length(Some(0))
        .with_columns(Some(names))
        .with_parse_options(CsvParseOptions::default().with_separator(sep))
        .into_reader_with_file_handle(Cursor::new(&body[..scan.end]))
        .finish()
        .with_context(|| format!("polars cannot read {}", path.display()))?;
    drop(bytes);
    ensure!(
        df.height() == scan.starts.len(),
        "{}: polars read {} rows where the scan found {} records; please report this file",
        path.display(),
        df.height(),
        scan.starts.len()
    );
    records_of(path, &df, columns, |i| At::Line(scan.starts[i]))
        .map(|records| Table { records, sha256 })
}

/// The records of a data frame's two columns (text as text, labels cast to text); `at`
/// says where row i came from.
fn records_of(
    path: &Path,
    df: &DataFrame,
    columns: Columns,
    at: impl Fn(usize) -> At,
) -> Result<Vec<Record>> {
    let text = df.column(columns.text)?;
    ensure!(
        text.dtype() == &DataType::String,
        "{}: column {:?} (the --text-column) has type {}, not text",
        path.display(),
        columns.text,
        text.dtype()
    );
    let text = text.str()?;
    let label: Column = df
        .column(columns.label)?
        .cast(&DataType::String)
        .map_err(|e| {
            anyhow!(
                "{}: column {:?} (the --label-column) cannot be read as label names ({e}); labels must be text, integers or booleans",
                path.display(),
                columns.label
            )
        })?;
    let label = label.str()?;
    (0..df.height())
        .map(|i| {
            Record::new(
                path,
                at(i),
                label.get(i).unwrap_or(""),
                text.get(i).unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// A Parquet file with a text and a label column.
fn read_parquet(path: &Path, columns: Columns) -> Result<Table> {
    let bytes = fs::read(path).with_context(|| format!("cannot read source {}", path.display()))?;
    let sha256 = fedimdb::digest::sha256_bytes(&bytes);
    let df = fedimdb::reviews::read_frame(&bytes, &path.display())?;
    drop(bytes);
    let header: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    find_column(path, &header, columns.text, "--text-column")?;
    find_column(path, &header, columns.label, "--label-column")?;
    records_of(path, &df, columns, |i| At::Row(i + 1)).map(|records| Table { records, sha256 })
}

/// JSON Lines: one object per line, blank lines skipped. Labels may be strings, numbers or
/// booleans (`1` and `"1"` are the same label).
fn read_jsonl(path: &Path, columns: Columns) -> Result<Table> {
    let file =
        File::open(path).with_context(|| format!("cannot open source {}", path.display()))?;
    let mut reader = BufReader::new(HashingReader::new(file));
    let mut records = Vec::new();
    let mut buf = Vec::new();
    let mut line = 0;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .with_context(|| format!("cannot read source {}", path.display()))?;
        if n == 0 {
            break;
        }
        line += 1;
        let at = At::Line(line);
        let here = || at.show(path);
        let text = std::str::from_utf8(&buf).map_err(|e| {
            anyhow!(
                "{}: not valid UTF-8 (bad byte at offset {} of the line); save the file as UTF-8",
                here(),
                e.valid_up_to()
            )
        })?;
        if text.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            anyhow!(
                "{}: not a JSON object ({e}); JSON Lines holds one object per line",
                here()
            )
        })?;
        let serde_json::Value::Object(mut object) = value else {
            bail!(
                "{}: a JSON value that is not an object; JSON Lines holds one object per line",
                here()
            );
        };
        let mut field = |name: &str, flag: &str| {
            object.remove(name).ok_or_else(|| {
                let keys: Vec<String> = object.keys().cloned().collect();
                anyhow!(
                    "{}: no key {name:?} (the {flag}); its keys are {}",
                    here(),
                    list(&keys)
                )
            })
        };
        let text = match field(columns.text, "--text-column")? {
            serde_json::Value::String(s) => s,
            serde_json::Value::Null => String::new(),
            other => bail!(
                "{}: {:?} is {other}, not a string of text",
                here(),
                columns.text
            ),
        };
        let label = match field(columns.label, "--label-column")? {
            serde_json::Value::String(s) => s,
            serde_json::Value::Null => String::new(),
            v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => v.to_string(),
            other => bail!(
                "{}: the label {:?} is {other}; labels must be strings, numbers or booleans",
                here(),
                columns.label
            ),
        };
        records.push(Record::new(path, at, &label, text)?);
    }
    let sha256 = reader.into_inner().finish();
    Ok(Table { records, sha256 })
}

/// The visible entries of a folder, sorted by name, with their names as UTF-8.
fn listing(dir: &Path) -> Result<Vec<(String, fs::DirEntry)>> {
    let mut items = Vec::new();
    for item in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let item = item.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = item.file_name().into_string().map_err(|_| {
            anyhow!(
                "{}: the name is not valid UTF-8; rename it (label folder names are the labels)",
                item.path().display()
            )
        })?;
        if !name.starts_with('.') {
            items.push((name, item));
        }
    }
    items.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(items)
}

/// One folder per label: every `DIR/<label>/*.txt` is a review of that label, read in
/// (label, file name) order. Other files are skipped; the identity is the folder digest.
fn read_folders(path: &Path) -> Result<Table> {
    let mut records = Vec::new();
    for (label, item) in listing(path)? {
        if !item.file_type().is_ok_and(|t| t.is_dir()) {
            tracing::debug!("skipping {}: not a label folder", item.path().display());
            continue;
        }
        for (file, entry) in listing(&item.path())? {
            if !file.ends_with(".txt") || !entry.file_type().is_ok_and(|t| t.is_file()) {
                tracing::warn!(
                    "skipping {}: a label folder's reviews are *.txt files",
                    entry.path().display()
                );
                continue;
            }
            let at = At::File(format!("{label}/{file}"));
            let bytes = fs::read(entry.path())
                .with_context(|| format!("cannot read review {}", entry.path().display()))?;
            let text = String::from_utf8(bytes).map_err(|e| {
                anyhow!(
                    "{}: not valid UTF-8 (bad byte at offset {}); save the file as UTF-8",
                    at.show(path),
                    e.utf8_error().valid_up_to()
                )
            })?;
            records.push(Record::new(path, at, &label, text)?);
        }
    }
    ensure!(
        !records.is_empty(),
        "{} holds no label folders with reviews; expected one folder per label, DIR/<label>/*.txt",
        path.display()
    );
    let rel: Vec<String> = records
        .iter()
        .map(|r| match &r.at {
            At::File(rel) => rel.clone(),
            _ => unreachable!("folder records are files"),
        })
        .collect();
    let sha256 = folder_digest(
        rel.iter()
            .zip(&records)
            .map(|(rel, r)| (rel.as_str(), r.text.as_bytes())),
    );
    Ok(Table { records, sha256 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(s: &str) -> std::result::Result<Scan, String> {
        scan_delimited(s.as_bytes(), b',')
    }

    #[test]
    fn the_scan_follows_quotes_and_counts_lines() {
        let input = "text,label\n\"a, b\",x\r\n\"two\nlines \"\"q\"\"\",y\nlast,z\n\r\n\n";
        let s = scan(input).unwrap();
        assert_eq!(s.header, ["text", "label"]);
        assert_eq!(s.starts, [2, 3, 5]);
        assert_eq!(&input[s.end..], "\r\n\n");
        let s = scan("\"t\",l\n").unwrap();
        assert_eq!((s.header, s.starts), (vec!["t".into(), "l".into()], vec![]));
    }

    #[test]
    fn malformed_lines_are_named() {
        for (input, want) in [
            (
                "text,label\na,b\nc,d,e\n",
                "line 3 has 3 fields, the header (line 1) has 2",
            ),
            ("text,label\na\n", "line 2 has 1 fields"),
            (
                "text,label\n\"open,b\nmore\n",
                "line 2: a quoted field is never closed",
            ),
            (
                "text,label\n\"a\"b,c\n",
                "line 2: text after the closing quote",
            ),
            ("", "no header line"),
            ("text,label\na,b\n\nc,d\n", "line 3 is blank"),
        ] {
            let err = scan(input).unwrap_err();
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }
}
