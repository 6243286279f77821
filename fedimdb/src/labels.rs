//! Labels of any data set: the order that turns label names into class indices, the IMDB
//! tasks and the flags that say how a source is read.
//!
//! A shard stores a review's class as a small integer (`label`, u8); the data manifest
//! records the label names in class order (`DataManifest::labels`), so class `k` is
//! `labels[k]`. The order is a function of the names alone ([`order`]), so the same
//! data always gives the same classes, and IMDB keeps its historic encoding: `neg` 0,
//! `pos` 1.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail, ensure};
use serde::{Deserialize, Serialize};

/// The most classes a shard can hold: the class index is a `u8`.
pub const MAX_CLASSES: usize = 256;

/// The IMDB sentiment labels in class order (the folder names `neg/` and `pos/`).
pub const SENTIMENT: [&str; 2] = ["neg", "pos"];

/// The star ratings IMDB's labeled reviews carry, in class order (no 5 or 6: the dataset
/// leaves neutral reviews out).
pub const RATINGS: [u8; 8] = [1, 2, 3, 4, 7, 8, 9, 10];

/// Orders label names into classes: labels that are all integers (`1`, `2`, `10`, `-1`)
/// by value, any other set by the bytes of their UTF-8 names (Unicode code point order, so
/// `Ham` < `ham` < `spam`). Class k is the k-th label. With two labels, class 1 is the
/// one the 2-class model's probability is about: `pos` over `neg`, `spam` over `ham`,
/// `1` over `0`, `yes` over `no`.
pub fn order(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names.dedup();
    let numbers: Option<Vec<i128>> = names.iter().map(|n| n.parse().ok()).collect();
    if let Some(numbers) = numbers {
        let mut by_value: Vec<(i128, String)> = numbers.into_iter().zip(names).collect();
        by_value.sort();
        return by_value.into_iter().map(|(_, n)| n).collect();
    }
    names
}

/// The labels of the IMDB archive that `task` trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Two classes from the folders: `neg` (ratings 1–4) and `pos` (7–10).
    #[default]
    Sentiment,
    /// Eight classes from the file names' star ratings: 1, 2, 3, 4, 7, 8, 9, 10.
    Rating,
}

impl Task {
    /// The label names, in class order.
    pub fn labels(self) -> Vec<String> {
        match self {
            Task::Sentiment => SENTIMENT.iter().map(|s| (*s).to_owned()).collect(),
            Task::Rating => RATINGS.iter().map(u8::to_string).collect(),
        }
    }

    /// The class of a review from its folder's sentiment (`pos`) and its star rating, which
    /// the reader has checked to agree (1–4 negative, 7–10 positive).
    pub fn class(self, positive: bool, rating: u8) -> u8 {
        match self {
            Task::Sentiment => u8::from(positive),
            Task::Rating => RATINGS
                .iter()
                .position(|&r| r == rating)
                .expect("ratings are checked before") as u8,
        }
    }
}

impl Task {
    /// The task in words for people (a model card's `task`).
    pub fn title(self) -> &'static str {
        match self {
            Task::Sentiment => "IMDB sentiment",
            Task::Rating => "IMDB rating",
        }
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Task::Sentiment => "sentiment",
            Task::Rating => "rating",
        })
    }
}

/// `--task`, shared by the copier and the pipeline's run configuration (it decides what is
/// learned, so it is part of a run on Kubernetes too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::Args)]
pub struct TaskArgs {
    /// IMDB only: `sentiment` (neg/pos, the default) or `rating` (8 classes, the star
    /// ratings 1–4 and 7–10 from the file names).
    #[arg(long, value_enum, ignore_case = true, default_value = "sentiment")]
    pub task: Task,
}

impl TaskArgs {
    /// The flag for the copier's command line; none for the default, so an IMDB sentiment
    /// command reads as it always did.
    pub fn to_args(&self) -> Vec<String> {
        match self.task {
            Task::Sentiment => Vec::new(),
            task => vec!["--task".to_owned(), task.to_string()],
        }
    }
}

/// What a source file or folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// From the path: a folder holding `aclImdb/` or `train/` is IMDB, any other folder
    /// holds one folder per label; files by extension (`.csv`, `.tsv`/`.tab`,
    /// `.jsonl`/`.ndjson`, `.parquet`), anything else is read as an IMDB `.tar.gz`.
    #[default]
    Auto,
    /// The IMDB archive (`.tar.gz`) or an unpacked `aclImdb/` folder.
    Imdb,
    /// Comma-separated values with a header line.
    Csv,
    /// Tab-separated values with a header line.
    Tsv,
    /// JSON Lines: one object per line.
    Jsonl,
    /// A Parquet file.
    Parquet,
    /// One folder per label: `DIR/<label>/*.txt`.
    Folders,
}

impl Format {
    /// The format `auto` reads a file as, from its extension (any case): `.csv`,
    /// `.tsv`/`.tab`, `.jsonl`/`.ndjson`, `.parquet`. None for any other file, which `auto`
    /// reads as the IMDB `.tar.gz`.
    pub fn of_file_name(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(Format::Csv),
            "tsv" | "tab" => Some(Format::Tsv),
            "jsonl" | "ndjson" => Some(Format::Jsonl),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }

    /// The flag's value (`csv`, `folders`, ...).
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .expect("no skipped variants")
            .get_name()
            .to_owned()
    }
}

/// What the source flags' rules need to know of a source: the name of its kind (as the
/// data manifest records it), whether it is the IMDB dataset (its own test split, star
/// ratings in its file names) and whether its text and label are columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub name: &'static str,
    pub imdb: bool,
    pub columns: bool,
}

impl Shape {
    /// The IMDB dataset, as far as the rules go (the archive and the folder alike).
    pub const IMDB: Shape = Shape {
        name: "imdb",
        imdb: true,
        columns: false,
    };
}

/// The default `--text-column` and `--label-column`.
pub const TEXT_COLUMN: &str = "text";
pub const LABEL_COLUMN: &str = "label";

/// How a source is read, beyond its path: shared by the copier and `pipeline local`, which
/// passes them on with `--source`.
#[derive(Debug, Clone, PartialEq, Default, clap::Args)]
pub struct SourceArgs {
    /// What the source is (default: from its path, see the README "Your own data").
    #[arg(long, value_enum, ignore_case = true, default_value = "auto")]
    pub format: Format,
    /// CSV, TSV, JSON Lines, Parquet: the column (key) holding the text. Default: `text`.
    #[arg(long, value_name = "NAME")]
    pub text_column: Option<String>,
    /// CSV, TSV, JSON Lines, Parquet: the column (key) holding the label. Default: `label`.
    #[arg(long, value_name = "NAME")]
    pub label_column: Option<String>,
    /// The test set, read like the source (same format rules and columns). For data without
    /// a test split; IMDB has its own.
    #[arg(long, value_name = "SOURCE", conflicts_with = "test_fraction")]
    pub test: Option<PathBuf>,
    /// Hold out this fraction of each label's reviews (seeded by --seed) as the test set,
    /// for data without a test split. 0 < F < 1.
    #[arg(long, value_name = "F")]
    pub test_fraction: Option<f64>,
}

impl SourceArgs {
    /// The text column asked for, or the default.
    pub fn text_column(&self) -> &str {
        self.text_column.as_deref().unwrap_or(TEXT_COLUMN)
    }

    /// The label column asked for, or the default.
    pub fn label_column(&self) -> &str {
        self.label_column.as_deref().unwrap_or(LABEL_COLUMN)
    }

    /// Checks the flags that need nothing read.
    pub fn validate(&self) -> Result<()> {
        if let Some(f) = self.test_fraction {
            ensure!(
                f > 0.0 && f < 1.0,
                "--test-fraction must be between 0 and 1 (exclusive), not {f}; 0.2 holds out a fifth of each label"
            );
        }
        for (flag, name) in [
            ("--text-column", &self.text_column),
            ("--label-column", &self.label_column),
        ] {
            if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
                bail!("{flag} must name a column, not an empty string");
            }
        }
        Ok(())
    }

    /// What the source at `path` is, as far as its name and `--format` tell, without
    /// looking at it: None where only the file system can say (under `auto`, a folder or
    /// a file of another extension; under `imdb` nothing is unknown).
    pub fn shape_of_name(&self, path: &Path) -> Option<Shape> {
        let columns = |name| Shape {
            name,
            imdb: false,
            columns: true,
        };
        let format = match self.format {
            Format::Auto => Format::of_file_name(path)?,
            f => f,
        };
        Some(match format {
            Format::Auto => unreachable!("resolved above"),
            Format::Imdb => Shape::IMDB,
            Format::Folders => Shape {
                name: "folders",
                imdb: false,
                columns: false,
            },
            Format::Csv => columns("csv"),
            Format::Tsv => columns("tsv"),
            Format::Jsonl => columns("jsonl"),
            Format::Parquet => columns("parquet"),
        })
    }

    /// Checks the flags against what the source is (`shape`), with `task`: IMDB has its
    /// own test split and no columns; other data needs `--test` or `--test-fraction` and
    /// has no star ratings. `what` names the source in the messages. The copier checks
    /// the source it opened with it; the pipeline, before anything runs, what a source's
    /// name tells ([`SourceArgs::shape_of_name`]).
    pub fn check_shape(
        &self,
        shape: Shape,
        task: Task,
        what: &dyn std::fmt::Display,
    ) -> Result<()> {
        if shape.imdb {
            ensure!(
                self.test.is_none() && self.test_fraction.is_none(),
                "{what} is the IMDB dataset, which has its own test split: drop --test and --test-fraction"
            );
        } else {
            ensure!(
                task == Task::Sentiment,
                "--task {task} needs the IMDB archive or folder (its file names carry the star ratings); \
                 {what} is a {} source, whose labels are its own",
                shape.name
            );
            ensure!(
                self.test.is_some() || self.test_fraction.is_some(),
                "{what} has no test split: pass --test SOURCE (a file or folder like it) or --test-fraction F \
                 (e.g. 0.2, a seeded fifth of each label)"
            );
        }
        if !shape.columns {
            for (flag, given) in [
                ("--text-column", &self.text_column),
                ("--label-column", &self.label_column),
            ] {
                ensure!(
                    given.is_none(),
                    "{flag} applies to CSV, TSV, JSON Lines and Parquet sources; {what} is a {} source",
                    shape.name
                );
            }
        }
        Ok(())
    }

    /// The flags for the copier's command line (only those given, so an IMDB command reads
    /// as it always did).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.format != Format::Auto {
            args.extend(["--format".to_owned(), self.format.name()]);
        }
        for (flag, value) in [
            ("--text-column", &self.text_column),
            ("--label-column", &self.label_column),
        ] {
            if let Some(v) = value {
                args.extend([flag.to_owned(), v.clone()]);
            }
        }
        if let Some(t) = &self.test {
            args.extend(["--test".to_owned(), t.display().to_string()]);
        }
        if let Some(f) = self.test_fraction {
            args.extend(["--test-fraction".to_owned(), f.to_string()]);
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn integers_order_by_value_and_names_by_bytes() {
        assert_eq!(
            order(strings(&["10", "2", "1", "9", "7", "3", "4", "8", "2"])),
            strings(&["1", "2", "3", "4", "7", "8", "9", "10"])
        );
        assert_eq!(order(strings(&["pos", "neg"])), SENTIMENT);
        assert_eq!(order(strings(&["spam", "ham"])), strings(&["ham", "spam"]));
        assert_eq!(
            order(strings(&["-1", "1", "0"])),
            strings(&["-1", "0", "1"])
        );
        // Not all integers: bytes, so "10" sorts before "2".
        assert_eq!(
            order(strings(&["2", "10", "x"])),
            strings(&["10", "2", "x"])
        );
        assert_eq!(
            order(strings(&["spam", "Ham", "ham"])),
            strings(&["Ham", "ham", "spam"])
        );
    }

    #[test]
    fn tasks_follow_the_order_rule() {
        for task in [Task::Sentiment, Task::Rating] {
            assert_eq!(order(task.labels()), task.labels());
        }
        assert_eq!(Task::Sentiment.class(true, 9), 1);
        assert_eq!(Task::Sentiment.class(false, 2), 0);
        assert_eq!(Task::Rating.class(false, 1), 0);
        assert_eq!(Task::Rating.class(false, 4), 3);
        assert_eq!(Task::Rating.class(true, 7), 4);
        assert_eq!(Task::Rating.class(true, 10), 7);
    }

    #[test]
    fn source_flags_round_trip_and_are_checked() {
        let a = SourceArgs {
            format: Format::Tsv,
            text_column: Some("body".into()),
            label_column: None,
            test: None,
            test_fraction: Some(0.25),
        };
        assert_eq!(
            a.to_args().join(" "),
            "--format tsv --text-column body --test-fraction 0.25"
        );
        assert!(SourceArgs::default().to_args().is_empty());
        for f in [0.0, 1.0, -0.1, f64::NAN] {
            let a = SourceArgs {
                test_fraction: Some(f),
                ..SourceArgs::default()
            };
            assert!(a.validate().is_err(), "{f}");
        }
        assert!(TaskArgs::default().to_args().is_empty());
        assert_eq!(
            TaskArgs { task: Task::Rating }.to_args(),
            ["--task", "rating"]
        );
    }
}
