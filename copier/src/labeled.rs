//! From records with label names (`table.rs`) to a [`Dataset`]: the label set and its class
//! order (`fedimdb::labels::order`), the test set (`--test` or a stratified, seeded
//! `--test-fraction`), and the checks a learnable data set needs. Everything is checked
//! before anything is written, so a bad source leaves nothing behind.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, bail, ensure};
use fedimdb::labels::{MAX_CLASSES, order};
use fedimdb::reviews::Review;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::source::{Dataset, SourceKind, Spec, kind_of, source_info};
use crate::table::{self, Columns, Record};

/// Mixed into `--seed` for the test split, so that it draws from another stream than the
/// partition of the shards.
const SPLIT_SEED: u64 = 0x7465_7374_2d73_706c; // "test-spl"

/// Reads the source at `path` (of `kind`, not IMDB) and its test set.
pub fn read(path: &Path, kind: SourceKind, spec: &Spec) -> Result<Dataset> {
    let columns = Columns {
        text: spec.args.text_column(),
        label: spec.args.label_column(),
    };
    let train = table::read(path, kind, columns)?;
    let test = match &spec.args.test {
        Some(t) => {
            let test_kind = kind_of(t, spec.args.format)?;
            Some((t.as_path(), test_kind, table::read(t, test_kind, columns)?))
        }
        None => None,
    };
    let labels = label_set(path, &train.records)?;
    let class: HashMap<&str, u8> = labels
        .iter()
        .enumerate()
        .map(|(k, name)| (name.as_str(), k as u8))
        .collect();
    let (train_records, test_records, test_source) = match test {
        Some((test_path, test_kind, table)) => {
            if let Some(r) = table
                .records
                .iter()
                .find(|r| !class.contains_key(r.label.as_str()))
            {
                bail!(
                    "{}: label {:?} is not among the training labels of {} ({}); a model cannot learn a \
                     label it never sees: fix the label, or add reviews of it to the training data",
                    r.at.show(test_path),
                    r.label,
                    path.display(),
                    labels.join(", ")
                );
            }
            let info = source_info(test_path, test_kind, table.sha256);
            (train.records, table.records, Some(info))
        }
        None => {
            let fraction = spec
                .args
                .test_fraction
                .expect("checked: --test or --test-fraction");
            let (train, test) = stratified_split(train.records, &class, fraction, spec.seed);
            ensure!(
                !test.is_empty(),
                "--test-fraction {fraction} holds out no review of {} (each label keeps at least one for \
                 training); raise it",
                path.display()
            );
            (train, test, None)
        }
    };
    Ok(Dataset {
        train: reviews("train", train_records, &class),
        test: reviews("test", test_records, &class),
        source: source_info(path, kind, train.sha256),
        test_source,
        labels,
    })
}

/// The label names of the training records in class order; at least two, at most
/// [`MAX_CLASSES`].
fn label_set(path: &Path, records: &[Record]) -> Result<Vec<String>> {
    let mut names: Vec<String> = records.iter().map(|r| r.label.clone()).collect();
    names.sort_unstable();
    names.dedup();
    let labels = order(names);
    if labels.len() < 2 {
        bail!(
            "{} has a single label, {:?}, on all its {} reviews: a classifier needs at least two \
             (is --label-column the right column?)",
            path.display(),
            labels[0],
            records.len()
        );
    }
    ensure!(
        labels.len() <= MAX_CLASSES,
        "{} has {} labels; at most {MAX_CLASSES} are supported (is --label-column the right column?)",
        path.display(),
        labels.len()
    );
    Ok(labels)
}

/// Moves records into reviews of `split` (`train/17`: line 17).
fn reviews(split: &str, records: Vec<Record>, class: &HashMap<&str, u8>) -> Vec<Review> {
    records
        .into_iter()
        .map(|r| Review {
            id: format!("{split}/{}", r.at.id()),
            rating: 0,
            label: class[r.label.as_str()],
            text: r.text,
        })
        .collect()
}

/// Holds out `round(n × fraction)` of each label's `n` records, chosen by a shuffle seeded
/// from `seed`, but never a label's last training record. Both parts keep source order.
fn stratified_split(
    records: Vec<Record>,
    class: &HashMap<&str, u8>,
    fraction: f64,
    seed: u64,
) -> (Vec<Record>, Vec<Record>) {
    let mut rng = StdRng::seed_from_u64(seed ^ SPLIT_SEED);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); class.len()];
    for (i, r) in records.iter().enumerate() {
        by_class[usize::from(class[r.label.as_str()])].push(i);
    }
    let mut held_out = vec![false; records.len()];
    for mut members in by_class {
        let n = members.len();
        let k = ((n as f64 * fraction).round() as usize).min(n.saturating_sub(1));
        fedimdb::partition::shuffle(&mut members, &mut rng);
        for &i in &members[..k] {
            held_out[i] = true;
        }
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (r, out) in records.into_iter().zip(held_out) {
        if out { &mut test } else { &mut train }.push(r);
    }
    (train, test)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::At;

    fn records(labels: &[&str]) -> Vec<Record> {
        labels
            .iter()
            .enumerate()
            .map(|(i, l)| Record {
                at: At::Line(i + 2),
                label: (*l).to_owned(),
                text: format!("t{i}"),
            })
            .collect()
    }

    #[test]
    fn the_split_is_stratified_seeded_and_keeps_every_label_in_training() {
        let labels: Vec<&str> = (0..100)
            .map(|i| ["a", "b", "c"][usize::from(i % 10 == 0) + usize::from(i % 10 == 1) * 2])
            .collect();
        let class: HashMap<&str, u8> = [("a", 0), ("b", 1), ("c", 2)].into_iter().collect();
        let (train, test) = stratified_split(records(&labels), &class, 0.2, 42);
        let count = |rs: &[Record], l: &str| rs.iter().filter(|r| r.label == l).count();
        assert_eq!(
            [count(&test, "a"), count(&test, "b"), count(&test, "c")],
            [16, 2, 2]
        );
        assert_eq!(train.len(), 80);
        assert!(train.windows(2).all(
            |w| w[0].at.id().parse::<usize>().unwrap() < w[1].at.id().parse::<usize>().unwrap()
        ));
        let again = stratified_split(records(&labels), &class, 0.2, 42).1;
        assert_eq!(test, again);
        assert_ne!(test, stratified_split(records(&labels), &class, 0.2, 7).1);
        // A label with one record keeps it for training.
        let class: HashMap<&str, u8> = [("a", 0), ("b", 1)].into_iter().collect();
        let (train, test) = stratified_split(records(&["a", "a", "b"]), &class, 0.5, 1);
        assert_eq!((count(&train, "b"), count(&test, "b")), (1, 0));
    }

    #[test]
    fn a_single_label_is_refused() {
        let err = label_set(Path::new("x.csv"), &records(&["spam", "spam"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.csv has a single label, \"spam\", on all its 2 reviews"),
            "{err}"
        );
    }
}
