//! Verification of what is on the shared volume, against the checksums its writers recorded.
//!
//! Every file a step consumes has its SHA-256 written down by the step that made it, in a
//! file written after it:
//!
//! | file                                   | checksum recorded in                 |
//! |----------------------------------------|--------------------------------------|
//! | `data/shard-*.parquet`, `test.parquet` | `data/manifest.json`                 |
//! | `rounds/round-R/updates/shard-I.safetensors` | `updates/shard-I.json` (its [`UpdateReport`]) |
//! | `rounds/round-R/global.safetensors`    | `rounds/round-R/report.json` ([`RoundReport`]) |
//! | `model/latest.safetensors`             | `model/latest.json` ([`ModelCard`], published) |
//!
//! Readers go through [`load_update`], [`load_global`] (and the manifest check in
//! [`crate::dataset::load_reviews`]), so a truncated, corrupted or swapped file is refused
//! with its name and the record it contradicts, and never consumed. The same checks tell a
//! re-run which steps are already done: [`check_update`] and [`check_round`] accept a
//! step's outputs only if they verify *and* were computed from exactly the inputs and
//! arguments the re-run would use (the chain of `base_sha256` links each round to the one
//! before).

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

use crate::atomic::read_json;
use crate::checkpoint::{Checkpoint, Kind};
use crate::checkpoint::{ModelCard, Publication};
use crate::digest::sha256_file;
use crate::layout::Layout;
use crate::manifest::FileEntry;
use crate::model::ModelConfig;
use crate::report::{RoundReport, UpdateReport};
use crate::train::{Algorithm, TrainArgs, TrainConfig};

/// Fails unless `sha` (of `path`) is `recorded` (as written in `record`).
pub fn ensure_sha(path: &Path, sha: &str, recorded: &str, record: &Path) -> Result<()> {
    ensure!(
        sha == recorded,
        "{} does not match its checksum: its sha256 is {sha}, {} records {recorded}. The file was \
         truncated, damaged or replaced after it was written; re-run the step that writes it",
        path.display(),
        record.display()
    );
    Ok(())
}

/// Fails unless the file at `path` has the checksum `recorded` (as written in `record`):
/// the one check of a file against its record, for files read by other means than
/// [`load_verified`] (Parquet shards, the copier's re-check, the published model).
pub fn check_file(path: &Path, recorded: &str, record: &Path) -> Result<()> {
    ensure_sha(path, &sha256_file(path)?, recorded, record)
}

/// Reads `path`, checks its bytes against the checksum `recorded` in `record` *before*
/// parsing them (so damage is reported as damage, whatever byte it hit), then parses it as
/// a file of `kind`.
pub fn load_verified(path: &Path, kind: Kind, recorded: &str, record: &Path) -> Result<Checkpoint> {
    let bytes = read_verified(path, recorded, record)?;
    Checkpoint::from_mapped(bytes, path, recorded.to_owned())?.expect_kind(kind, path)
}

/// The bytes of `path`, checked against the checksum `recorded` in `record`.
pub fn read_verified(path: &Path, recorded: &str, record: &Path) -> Result<FileBytes> {
    let bytes = FileBytes::map(path)?;
    ensure_sha(path, &crate::digest::sha256_bytes(&bytes), recorded, record)?;
    Ok(bytes)
}

/// A file's bytes, mapped into memory rather than copied into a buffer.
///
/// Every trainer reads the global model and the control variate whole (50 MB) to check
/// their checksums, and keeps only its shard's buckets. Read into a fresh buffer, each of
/// those pages is first faulted in and zeroed, then filled by a copy from the page cache;
/// mapped, the page cache itself is read. With 64 workers that was a quarter of a
/// trainer's time.
pub struct FileBytes(Option<memmap2::Mmap>);

impl FileBytes {
    /// Maps `path` read-only.
    ///
    /// Safe as the volume is written: a file on it is never changed in place, only replaced
    /// whole by a rename (`crate::atomic`) or removed, and a mapping keeps the file it was
    /// made from. A file shortened in place by something else while mapped would end the
    /// process with SIGBUS rather than a checksum error.
    pub fn map(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        if len == 0 {
            // Mapping zero bytes is an error on Linux; an empty file is just empty.
            return Ok(Self(None));
        }
        // SAFETY: see above; the bytes are only read, and checked before they are parsed.
        // `populate`: the whole file is read at once (hashed), so its pages are mapped in one
        // call instead of faulted in one by one.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(Self(Some(map)))
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

/// The report of worker `shard` in `round`, checked to be about that round and shard.
pub fn read_update_report(layout: &Layout, round: u32, shard: usize) -> Result<UpdateReport> {
    let path = layout.update_report(round, shard);
    let report: UpdateReport = read_json(&path).with_context(|| {
        format!(
            "the update of shard {shard} in round {round} has no readable report, so it cannot be \
             verified (its trainer may have died before finishing); re-run that trainer"
        )
    })?;
    ensure!(
        report.round == round && report.shard == shard,
        "{} is the report of round {} shard {}, not of round {round} shard {shard}: files were moved \
         or swapped; re-run the trainer",
        path.display(),
        report.round,
        report.shard
    );
    Ok(report)
}

/// Loads worker `shard`'s update of `round`, verified against the checksum in its report.
pub fn load_update(
    layout: &Layout,
    round: u32,
    shard: usize,
    kind: Kind,
) -> Result<(Checkpoint, UpdateReport)> {
    let report = read_update_report(layout, round, shard)?;
    let path = layout.update(round, shard);
    let ck = load_verified(
        &path,
        kind,
        &report.sha256,
        &layout.update_report(round, shard),
    )?;
    Ok((ck, report))
}

/// The aggregator's report of `round`, checked to be about that round.
pub fn read_round_report(layout: &Layout, round: u32) -> Result<RoundReport> {
    let path = layout.round_report(round);
    let report: RoundReport = read_json(&path).with_context(|| {
        format!("round {round} has no readable report, so its global model cannot be verified; re-run its aggregator")
    })?;
    ensure!(
        report.round == round,
        "{} is the report of round {}, not round {round}: files were moved or swapped; re-run the aggregator",
        path.display(),
        report.round
    );
    Ok(report)
}

/// Loads the global model of `round`, verified against the checksum in the round report.
pub fn load_global(layout: &Layout, round: u32) -> Result<(Checkpoint, RoundReport)> {
    let report = read_round_report(layout, round)?;
    let path = layout.global_model(round);
    if !path.exists() && superseded(layout, &report).is_ok() {
        bail!(
            "{} was removed by the retention rule after later rounds were made from it \
             (--keep-rounds keeps the model files of the newest rounds only); recompute from \
             round 0 (pipeline --from-round 0), or keep more rounds to go back to round {}",
            path.display(),
            round + 1
        );
    }
    let ck = load_verified(
        &path,
        Kind::Model,
        &report.model_sha256,
        &layout.round_report(round),
    )?;
    ensure!(
        ck.header.round == round,
        "{} says it is the model of round {}, expected round {round}",
        path.display(),
        ck.header.round
    );
    Ok((ck, report))
}

/// Loads the control variate the aggregator wrote at the end of `round`, verified against
/// the checksum in the round report.
pub fn load_control(layout: &Layout, round: u32) -> Result<(crate::control::Control, String)> {
    let report = read_round_report(layout, round)?;
    let path = layout.control(round);
    let recorded = report.control_sha256.as_deref().with_context(|| {
        format!("{} records no control variate (written by an older version); re-run from round {round}", layout.round_report(round).display())
    })?;
    let ck = load_verified(&path, Kind::Control, recorded, &layout.round_report(round))?;
    let sha = ck.sha256.clone();
    Ok((
        crate::control::Control::from_checkpoint(ck)
            .with_context(|| format!("{} is not a valid control file", path.display()))?,
        sha,
    ))
}

/// Loads the server optimizer's moments the aggregator wrote at the end of `round`, verified
/// against the checksum in the round report; `None` when the report records none (round 0,
/// or a round made with `--server-optimizer none`): the next round's moments start at zero.
pub fn load_moments(
    layout: &Layout,
    round: u32,
) -> Result<Option<crate::server_optimizer::Moments>> {
    let report = read_round_report(layout, round)?;
    let Some(recorded) = report.moments_sha256.as_deref() else {
        return Ok(None);
    };
    let path = layout.moments(round);
    let ck = load_verified(&path, Kind::Moments, recorded, &layout.round_report(round))?;
    crate::server_optimizer::Moments::from_checkpoint(ck)
        .with_context(|| format!("{} is not a valid moments file", path.display()))
        .map(Some)
}

/// What a worker's update must have been computed from to count as done.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateWant {
    /// SHA-256 of the shard, from the data manifest.
    pub data_sha256: String,
    /// Round 0: the model config asked for. Later rounds inherit the global model's.
    pub config: Option<ModelConfig>,
    /// Rounds ≥ 1: the verified global model of the round before, and the training asked for.
    pub base_sha256: Option<String>,
    pub train: Option<TrainConfig>,
    /// Rounds ≥ 1: the verified control file of the round before.
    pub control_sha256: Option<String>,
}

impl UpdateWant {
    /// What worker `shard`'s update of `round` must come from: its shard (`entry` of the
    /// data manifest) and the model `config`; from round 1 on also the verified global
    /// model of the round before, the training `train` asks for and, with SCAFFOLD, the
    /// verified control file of the round before. The trainer and the local pipeline ask
    /// this one question, so they agree on what counts as done.
    pub fn new(
        entry: &FileEntry,
        config: ModelConfig,
        round: u32,
        shard: usize,
        train: &TrainArgs,
        base_sha256: Option<&str>,
        control_sha256: Option<&str>,
    ) -> Self {
        Self {
            data_sha256: entry.sha256.clone(),
            config: Some(config),
            base_sha256: base_sha256.map(str::to_owned),
            train: (round > 0).then(|| train.config(round, shard, config.classes())),
            control_sha256: match train.algorithm {
                Algorithm::Scaffold => control_sha256.map(str::to_owned),
                Algorithm::FedAvg => None,
            },
        }
    }

    /// [`UpdateWant::new`] from the records of the round before (its report's model and
    /// control checksums) rather than its files, which the retention rule may have removed:
    /// what `trainer --resume` asks before loading anything. From round 1 on the base
    /// model's checksum pins the model config, so none is asked for.
    pub fn from_records(
        layout: &Layout,
        entry: &FileEntry,
        config: ModelConfig,
        round: u32,
        shard: usize,
        train: &TrainArgs,
    ) -> Result<Self> {
        let before = match round.checked_sub(1) {
            Some(prev) => Some(read_round_report(layout, prev)?),
            None => None,
        };
        let base = before.as_ref().map(|r| r.model_sha256.as_str());
        let control = before.as_ref().and_then(|r| r.control_sha256.as_deref());
        let mut want = Self::new(entry, config, round, shard, train, base, control);
        if round > 0 {
            want.config = None;
        }
        Ok(want)
    }
}

/// `Ok` if worker `shard`'s update of `round` is on disk, matches its checksum, and was
/// computed from what `want` describes; otherwise the reason it must be (re)computed.
/// Hashes the update file; does not parse it.
///
/// An update the retention rule removed ([`crate::retention`]) is judged by its records:
/// its report must match `want`, and the round's report, verified through a later round's
/// model ([`superseded`]), must have combined exactly that update.
pub fn check_update(
    layout: &Layout,
    round: u32,
    shard: usize,
    want: &UpdateWant,
) -> Result<UpdateReport> {
    let path = layout.update(round, shard);
    // A removed update's round, verified once: through a later round's model.
    let retired = if path.exists() {
        None
    } else {
        let missing = || format!("{} is missing", path.display());
        Some(retired_round(layout, round, want.base_sha256.as_deref()).with_context(missing)?)
    };
    let report = read_update_report(layout, round, shard)?;
    if retired.is_none() {
        check_file(&path, &report.sha256, &layout.update_report(round, shard))?;
    }
    let differs =
        |what: &str| anyhow::anyhow!("{} was computed from another {what}", path.display());
    if report.data_sha256 != want.data_sha256 {
        return Err(differs("shard (the data was re-sharded)"));
    }
    if want.config.is_some() && report.config != want.config {
        return Err(differs("model config"));
    }
    if report.base_sha256 != want.base_sha256 {
        return Err(differs("global model"));
    }
    if report.train != want.train {
        return Err(differs("training configuration"));
    }
    if report.control_sha256 != want.control_sha256 {
        return Err(differs("control variate"));
    }
    if let Some(combined) = retired {
        let used = (combined.shards.iter().zip(&combined.update_sha256))
            .any(|(&s, sha)| s == shard && *sha == report.sha256);
        ensure!(
            used,
            "{} is missing, and the global model of round {round} was not made from it",
            path.display()
        );
    }
    Ok(report)
}

/// `Ok` if the global model of `round` is on disk, matches the checksum in its report, was
/// made from the model `base_sha256` (rounds ≥ 1), and the updates it combined are still
/// the ones on disk. Otherwise the reason the round's aggregation must be (re)run.
/// (Whether it used the strategy asked for is the aggregator's check.)
///
/// A round whose model files the retention rule removed counts as done when a later
/// round's global model is on disk, verifies, and was made from this round's model through
/// the reports in between ([`superseded`]): the checksums chain, so the round was complete.
pub fn check_round(layout: &Layout, round: u32, base_sha256: Option<&str>) -> Result<RoundReport> {
    check_round_files(layout, round, base_sha256, Files::Hashed)
}

/// How [`check_round_files`] checks a round's model files against its report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Files {
    /// Each file hashed and compared with its report's checksum.
    Hashed,
    /// Each file present, none hashed: for a round whose files the next steps of the same
    /// run are about to read, each reader hashing what it reads, so the 84 MB would otherwise
    /// be hashed twice in a row (the pipeline between an aggregator and the next round).
    Present,
}

/// [`check_round`], with the model files checked as `files` says.
pub fn check_round_files(
    layout: &Layout,
    round: u32,
    base_sha256: Option<&str>,
    files: Files,
) -> Result<RoundReport> {
    let path = layout.global_model(round);
    let report = if path.exists() {
        let report = read_round_report(layout, round)?;
        let record = layout.round_report(round);
        // The model and the state the next round starts from besides it, where the report
        // records it: 84 MB by default, hashed side by side.
        let recorded: Vec<(&str, std::path::PathBuf)> = [
            (Some(&report.model_sha256), path.clone()),
            (report.control_sha256.as_ref(), layout.control(round)),
            (report.moments_sha256.as_ref(), layout.moments(round)),
        ]
        .into_iter()
        .filter_map(|(recorded, file)| recorded.map(|r| (r.as_str(), file)))
        .collect();
        std::thread::scope(|s| {
            let checks: Vec<_> = recorded
                .iter()
                .map(|(recorded, file)| {
                    s.spawn(|| {
                        ensure!(file.exists(), "{} is missing", file.display());
                        match files {
                            Files::Hashed => check_file(file, recorded, &record),
                            Files::Present => Ok(()),
                        }
                    })
                })
                .collect();
            checks
                .into_iter()
                .try_for_each(|c| c.join().expect("a checksum thread panicked"))
        })?;
        report
    } else {
        let missing = || format!("{} is missing", path.display());
        let report = read_round_report(layout, round).with_context(missing)?;
        superseded(layout, &report).with_context(missing)?;
        report
    };
    ensure!(
        report.base_sha256.as_deref() == base_sha256,
        "{} was made from another global model of round {}",
        path.display(),
        round.saturating_sub(1)
    );
    ensure!(
        report.update_sha256.len() == report.shards.len(),
        "{} does not list the checksums of the updates it combined (written by an older version)",
        layout.round_report(round).display()
    );
    for (&shard, sha) in report.shards.iter().zip(&report.update_sha256) {
        let now = read_update_report(layout, round, shard)
            .map(|r| r.sha256)
            .unwrap_or_default();
        ensure!(
            &now == sha,
            "{} was made from an update of shard {shard} that has since changed or gone",
            path.display()
        );
    }
    Ok(report)
}

/// The report of `round` if the round verifies ([`check_round`], made from `base_sha256`)
/// and a later round's verified model was made from it ([`superseded`]): its update files
/// are then judged by their records. A round whose global model is gone was shown to be
/// superseded by [`check_round`] itself, so the chain is walked (and hashed) once.
fn retired_round(layout: &Layout, round: u32, base_sha256: Option<&str>) -> Result<RoundReport> {
    let report = check_round(layout, round, base_sha256)?;
    if layout.global_model(round).exists() {
        superseded(layout, &report)?;
    }
    Ok(report)
}

/// Whether worker `shard` was left out of `round` under a quorum (`--min-workers`) and the
/// round is done: a later round's verified model was made from it. Its update is then no
/// longer wanted: filling it in would change a model later rounds were built on, and the
/// retention rule may have removed the inputs it would be computed from.
pub fn left_out_of_done_round(layout: &Layout, round: u32, shard: usize) -> bool {
    read_round_report(layout, round)
        .is_ok_and(|r| r.missing.contains(&shard) && superseded(layout, &r).is_ok())
}

/// `Ok` if a later round's global model is on disk, verifies against its report, and was
/// made from the model `report` records, through the reports of the rounds in between:
/// then the files of `report`'s round were removed after use (retention), not lost.
pub fn superseded(layout: &Layout, report: &RoundReport) -> Result<()> {
    let mut model = report.model_sha256.clone();
    let mut round = report.round + 1;
    loop {
        let next = read_round_report(layout, round)
            .map_err(|_| anyhow::anyhow!("no later round was made from its model"))?;
        ensure!(
            next.base_sha256.as_deref() == Some(model.as_str()),
            "round {round} was made from another model than round {}'s",
            round - 1
        );
        let path = layout.global_model(round);
        if path.exists() {
            return check_file(&path, &next.model_sha256, &layout.round_report(round));
        }
        model = next.model_sha256;
        round += 1;
    }
}

/// The publication a card names; `card_path` (where it was read) names it in the error.
pub fn publication_of(card: &ModelCard, card_path: &Path) -> Result<Publication> {
    card.published.clone().with_context(|| {
        format!(
            "{} is not a published model card: it lacks `round`, `sha256` or `trained_at`; \
             re-run the last aggregator",
            card_path.display()
        )
    })
}

/// `Ok` with the publication if `model/latest.safetensors` matches the checksum in
/// `latest.json`.
pub fn check_latest(layout: &Layout) -> Result<Publication> {
    let card_path = layout.latest_card();
    let card: ModelCard = read_json(&card_path)?;
    let published = publication_of(&card, &card_path)?;
    check_file(&layout.latest_model(), &published.sha256, &card_path)?;
    Ok(published)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::atomic::{write_bytes_atomic, write_json_atomic};
    use crate::checkpoint::Header;
    use crate::metrics::Metrics;

    fn small_config() -> ModelConfig {
        let mut c = ModelConfig::default();
        c.featurizer.hash_bits = 10;
        c
    }

    fn global(round: u32) -> Checkpoint {
        let c = small_config();
        let dim = c.dim();
        Checkpoint::dense(
            Kind::Model,
            Header::new(Kind::Model, c, round),
            [
                ("linear.bias", vec![0.5]),
                ("linear.weight", vec![0.25; dim]),
                ("nb.ratio", vec![1.0; dim]),
            ],
        )
    }

    fn write_round(layout: &Layout, round: u32) -> String {
        let bytes = global(round).to_bytes().unwrap();
        let sha = crate::digest::sha256_bytes(&bytes);
        write_bytes_atomic(&layout.global_model(round), &bytes).unwrap();
        let report = RoundReport {
            round,
            strategy: crate::strategy::Combination::Strategy(crate::strategy::Strategy::FedAvg),
            shards: vec![],
            missing: vec![],
            samples: vec![],
            test: Metrics::compute(&[0.9, 0.2], &[1, 0]),
            seconds: 0.0,
            model_sha256: sha.clone(),
            version: crate::VERSION.into(),
            base_sha256: None,
            update_sha256: vec![],
            update_bytes: vec![],
            control_sha256: None,
            control_sources: vec![],
            server_optimizer: None,
            moments_sha256: None,
        };
        write_json_atomic(&layout.round_report(round), &report).unwrap();
        sha
    }

    #[test]
    fn a_verified_global_loads_and_a_damaged_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let sha = write_round(&layout, 0);
        let (ck, _) = load_global(&layout, 0).unwrap();
        assert_eq!(ck.sha256, sha);
        check_round(&layout, 0, None).unwrap();

        // Same length, one value changed: still a valid safetensors file, but not the one
        // the report records.
        let path = layout.global_model(0);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        for err in [
            load_global(&layout, 0).unwrap_err(),
            check_round(&layout, 0, None).unwrap_err(),
        ] {
            let msg = format!("{err:#}");
            assert!(
                msg.contains("global.safetensors does not match its checksum"),
                "{msg}"
            );
            assert!(msg.contains("report.json records"), "{msg}");
        }
    }

    /// What the pipeline checks between an aggregator and the next round's readers: the
    /// records and the files' presence, not their bytes, which the readers hash.
    #[test]
    fn a_round_checked_for_present_files_skips_their_bytes_but_not_their_absence() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        write_round(&layout, 0);
        let path = layout.global_model(0);
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        check_round_files(&layout, 0, None, Files::Present).unwrap();
        let msg = format!(
            "{:#}",
            check_round_files(&layout, 0, None, Files::Hashed).unwrap_err()
        );
        assert!(msg.contains("does not match its checksum"), "{msg}");
        // The damage is the next reader's to name.
        let msg = format!("{:#}", load_global(&layout, 0).unwrap_err());
        assert!(msg.contains("does not match its checksum"), "{msg}");

        let msg = format!(
            "{:#}",
            check_round_files(&layout, 0, Some("abc"), Files::Present).unwrap_err()
        );
        assert!(msg.contains("made from another global model"), "{msg}");
        std::fs::remove_file(&path).unwrap();
        let msg = format!(
            "{:#}",
            check_round_files(&layout, 0, None, Files::Present).unwrap_err()
        );
        assert!(msg.contains("global.safetensors is missing"), "{msg}");
    }

    #[test]
    fn swapped_rounds_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        write_round(&layout, 0);
        write_round(&layout, 1);
        let (a, b) = (layout.global_model(0), layout.global_model(1));
        let tmp = dir.path().join("swap");
        std::fs::rename(&a, &tmp).unwrap();
        std::fs::rename(&b, &a).unwrap();
        std::fs::rename(&tmp, &b).unwrap();
        let msg = format!("{:#}", load_global(&layout, 1).unwrap_err());
        assert!(
            msg.contains("round-0001/global.safetensors does not match its checksum"),
            "{msg}"
        );
    }

    #[test]
    fn a_round_made_from_another_base_is_not_done() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        write_round(&layout, 1);
        let msg = format!("{:#}", check_round(&layout, 1, Some("abc")).unwrap_err());
        assert!(
            msg.contains("made from another global model of round 0"),
            "{msg}"
        );
        let msg = format!("{:#}", check_round(&layout, 2, None).unwrap_err());
        assert!(
            msg.contains("round-0002/global.safetensors is missing"),
            "{msg}"
        );
    }
}
