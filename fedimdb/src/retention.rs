//! Which files of finished rounds stay on the volume.
//!
//! Every round writes a global model (33.5 MB at the default size), a control file
//! (16.8 MB) and one update per worker. Once a later round's global model is written and
//! verified, those files are needed by nobody: the next round starts from the newest model,
//! and a re-run recognises the older rounds by their *reports*, which record the sha256 of
//! every file and of what it was made from (see [`crate::verify::check_round`]: a round whose
//! files are gone counts as done when a later round's verified model chains back to it).
//! So after round R the aggregator keeps the model files of the newest `--keep-rounds` N
//! rounds (R-N+1 ..= R) and the inputs they were made from: the global model and control
//! file of round R-N, and every update that still holds a control variate one of them (or
//! the next round) starts from, which is a worker's update of the round before, or an older
//! one when it missed rounds under a quorum. Everything older is removed. So every kept
//! round can still be recomputed (`--from-round`, a worker trained again, an aggregator
//! re-run with another strategy), and every report stays: the whole chain of checksums, from
//! the data to the newest model, remains for auditing.
//!
//! What is given up: recomputing a round older than the kept ones (its inputs are gone; a
//! re-run from round 0 rebuilds everything, to the same bytes) and re-reading an old
//! round's bytes.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result};

use crate::atomic::is_temp_name;
use crate::layout::Layout;

/// How many rounds keep their model files when no flag says otherwise: the newest, which
/// the next round starts from, and which can be recomputed from what is kept with it.
pub const DEFAULT_KEEP_ROUNDS: u32 = 1;

/// The rounds whose model files stay: the last N, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    All,
    /// The newest N rounds (N ≥ 1).
    Last(u32),
}

/// As `--keep-rounds` takes it: `all` or the count.
impl std::fmt::Display for Keep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Keep::Last(n) = self {
            write!(f, "{n}")
        } else {
            f.write_str("all")
        }
    }
}

/// Parses `--keep-rounds`: a count of at least 1, or `all`. Used as clap's value parser.
pub fn parse_keep(s: &str) -> Result<Keep, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(Keep::All);
    }
    match s.parse::<u32>() {
        Ok(n) if n >= 1 => Ok(Keep::Last(n)),
        _ => Err(format!(
            "expected `all` or a number of rounds of at least 1 (the newest round's files are always kept), not {s:?}"
        )),
    }
}

/// The retention flag, shared by the aggregator (which applies it) and the pipeline (which
/// passes it on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct RetentionArgs {
    /// Rounds whose model files (updates, global model, control) stay on the volume after a
    /// round: the newest N, or `all`. Reports of every round are always kept.
    #[arg(long, value_name = "N|all", default_value_t = Keep::Last(DEFAULT_KEEP_ROUNDS), value_parser = parse_keep)]
    pub keep_rounds: Keep,
}

impl Default for RetentionArgs {
    fn default() -> Self {
        Self {
            keep_rounds: Keep::Last(DEFAULT_KEEP_ROUNDS),
        }
    }
}

impl RetentionArgs {
    /// The flag as arguments for the aggregator's command line.
    pub fn to_args(&self) -> Vec<String> {
        vec!["--keep-rounds".to_owned(), self.keep_rounds.to_string()]
    }
}

/// What [`prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub files: usize,
    pub bytes: u64,
}

/// Applies the rule after round `newest`: removes every model file (updates, global model,
/// control) of the rounds before `newest - keep`, and the updates of round `newest - keep`,
/// except the updates in `in_use`; keeps every report. Call it only once round `newest` is
/// written, verified and published. Files already gone are skipped, so it is idempotent,
/// and a crash half-way leaves only files a later call removes.
///
/// `in_use` holds the updates, as (round, shard), that still hold a control variate the
/// kept rounds or the next one start from (the `sources` of the controls of rounds
/// `newest - keep ..= newest`); they stay whatever their round.
pub fn prune(
    layout: &Layout,
    newest: u32,
    keep: Keep,
    in_use: &BTreeSet<(u32, usize)>,
) -> Result<Pruned> {
    let Keep::Last(n) = keep else {
        return Ok(Pruned::default());
    };
    let Some(inputs_of_oldest_kept) = newest.checked_sub(n) else {
        return Ok(Pruned::default());
    };
    let mut pruned = Pruned::default();
    for round in 0..=inputs_of_oldest_kept {
        let mut files = Vec::new();
        if round < inputs_of_oldest_kept {
            files.extend([
                layout.global_model(round),
                layout.control(round),
                layout.moments(round),
            ]);
        }
        let dir = layout.updates_dir(round);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries {
                let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let used = Layout::parse_shard_name(&name)
                    .is_some_and(|shard| in_use.contains(&(round, shard)));
                if name.ends_with(".safetensors") && !is_temp_name(&name) && !used {
                    files.push(entry.path());
                }
            }
        }
        for path in files {
            remove(&path, &mut pruned)?;
        }
    }
    Ok(pruned)
}

fn remove(path: &Path, pruned: &mut Pruned) -> Result<()> {
    let bytes = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    match std::fs::remove_file(path) {
        Ok(()) => {
            pruned.files += 1;
            pruned.bytes += bytes;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot remove {} (retention, --keep-rounds); check the volume's permissions",
                path.display()
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(updates: &[(u32, usize)]) -> BTreeSet<(u32, usize)> {
        updates.iter().copied().collect()
    }

    fn touch(path: &Path, bytes: usize) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, vec![0u8; bytes]).unwrap();
    }

    /// A volume of `rounds + 1` rounds of two workers, every file present.
    fn volume(rounds: u32) -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        for r in 0..=rounds {
            for s in 0..2 {
                touch(&l.update(r, s), 10);
                touch(&l.update_report(r, s), 1);
            }
            touch(&l.global_model(r), 100);
            touch(&l.control(r), 50);
            touch(&l.round_report(r), 1);
        }
        (dir, l)
    }

    #[test]
    fn the_last_rounds_keep_their_files_and_every_report_stays() {
        let (_dir, l) = volume(4);
        let pruned = prune(&l, 4, Keep::Last(2), &used(&[(4, 0), (4, 1)])).unwrap();
        // Rounds 0 and 1 lose everything, round 2 its updates; 3 and 4 are kept.
        assert_eq!(
            pruned,
            Pruned {
                files: 10,
                bytes: 2 * 170 + 20
            }
        );
        for r in 0..=4 {
            assert_eq!(l.global_model(r).exists(), r >= 2, "round {r}");
            assert_eq!(l.control(r).exists(), r >= 2, "round {r}");
            assert_eq!(l.update(r, 1).exists(), r >= 3, "round {r}");
            assert!(l.round_report(r).exists() && l.update_report(r, 1).exists());
        }
        assert_eq!(
            prune(&l, 4, Keep::Last(2), &used(&[(4, 0), (4, 1)])).unwrap(),
            Pruned::default()
        );
        assert_eq!(
            prune(&l, 1, Keep::Last(2), &used(&[])).unwrap(),
            Pruned::default()
        );
    }

    #[test]
    fn all_keeps_everything_and_temp_files_are_left_to_their_writers() {
        let (_dir, l) = volume(2);
        assert_eq!(
            prune(&l, 2, Keep::All, &used(&[])).unwrap(),
            Pruned::default()
        );
        let temp = l.updates_dir(0).join(".shard-00000.safetensors.tmp-1-0");
        touch(&temp, 1);
        // Shard 1 missed rounds 1 and 2: its control variate is still its round-0 update.
        prune(&l, 2, Keep::Last(1), &used(&[(2, 0), (0, 1)])).unwrap();
        assert!(temp.exists() && !l.update(0, 0).exists() && l.update(2, 0).exists());
        assert!(l.update(0, 1).exists() && !l.update(1, 1).exists());
        assert!(!l.global_model(0).exists() && l.global_model(1).exists());
    }

    #[test]
    fn keep_rounds_is_all_or_at_least_one() {
        assert_eq!(parse_keep("all"), Ok(Keep::All));
        assert_eq!(parse_keep("3"), Ok(Keep::Last(3)));
        for bad in ["0", "-1", "two", ""] {
            let err = parse_keep(bad).unwrap_err();
            assert!(err.contains("at least 1"), "{bad}: {err}");
        }
    }
}
