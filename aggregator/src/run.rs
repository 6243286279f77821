//! The aggregator's two forms: a round on the shared volume (`--root`) and a folder of
//! loose model files (the original `--dir … --savefile …`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use fedimdb::atomic::{is_temp_name, write_bytes_atomic, write_json_atomic};
use fedimdb::checkpoint::{Checkpoint, Header, Kind, ModelCard, RoundPoint};
use fedimdb::dataset::{Featurized, featurize_all, load_reviews};
use fedimdb::layout::Layout;
use fedimdb::manifest::DataManifest;
use fedimdb::metrics::Metrics;
use fedimdb::model::{ClassCounts, Model, ModelConfig};
use fedimdb::report::{LatestCard, RoundReport, utc_now};
use fedimdb::verify::{check_latest, check_round, ensure_sha, load_global, load_update};
use tracing::{info, warn};

use crate::Args;
use crate::evaluate::evaluate;
use crate::strategy::{Combiner, Strategy};

/// The finished update files of a round's folder, by shard index. Anything else in the
/// folder (reports, temporary files of writers still at work) is ignored.
fn list_updates(dir: &Path) -> Result<BTreeMap<usize, PathBuf>> {
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_temp_name(&name) || !name.ends_with(".safetensors") {
            continue;
        }
        let Some(shard) = Layout::parse_shard_name(&name) else {
            bail!("{} is not a worker update name (expected shard-NNNNN.safetensors); remove it", entry.path().display());
        };
        // The trainer writes its report (holding the update's checksum) after the update:
        // an update without one is from a trainer that died, and cannot be verified.
        if !entry.path().with_extension("json").exists() {
            warn!("{} has no report next to it (its trainer did not finish); not using it", entry.path().display());
            continue;
        }
        out.insert(shard, entry.path());
    }
    Ok(out)
}

/// Volume form: aggregate round `round` and publish the result.
pub fn volume(root: &Path, round: u32, args: &Args) -> Result<()> {
    let start = Instant::now();
    let layout = Layout::new(root);
    let manifest = DataManifest::read(&layout.data_manifest())
        .with_context(|| format!("no complete data under {}: run the copier first", root.display()))?;
    let strategy = args.strategy().map_err(anyhow::Error::msg)?;
    let (quorum, flag) = args.min_workers().unwrap_or((manifest.workers, "--min-workers"));
    ensure!(
        quorum <= manifest.workers,
        "{flag} {quorum} is more than the {} shards in the data manifest",
        manifest.workers
    );
    let dir = layout.updates_dir(round);
    let updates = list_updates(&dir)?;
    if updates.is_empty() {
        bail!("no worker updates in {} (empty or missing folder): run the round's trainers first", dir.display());
    }
    if let Some((&extra, path)) = updates.iter().find(|(s, _)| **s >= manifest.workers) {
        bail!("{} is for shard {extra}, but the data has only {} shards", path.display(), manifest.workers);
    }
    let missing: Vec<usize> = (0..manifest.workers).filter(|s| !updates.contains_key(s)).collect();
    let missing_names = || missing.iter().map(|&s| layout.update(round, s).display().to_string()).collect::<Vec<_>>().join(", ");
    if updates.len() < quorum {
        bail!(
            "round {round} has {} of {} expected worker updates, fewer than the quorum of {quorum} ({flag}); missing: {}",
            updates.len(),
            manifest.workers,
            missing_names()
        );
    }
    if !missing.is_empty() {
        warn!(
            "round {round}: aggregating {} of {} worker updates (quorum {quorum}); missing: {}",
            updates.len(),
            manifest.workers,
            missing_names()
        );
    }
    if round == 0 && strategy != Strategy::FedAvg {
        // A count sum is not an average: robust statistics of counts is future work.
        info!(%strategy, "round 0 sums the workers' feature counts whatever the strategy; it applies from round 1");
    }

    let base = match round.checked_sub(1) {
        Some(prev) => Some(
            load_global(&layout, prev)
                .with_context(|| format!("cannot aggregate round {round}: the global model of round {prev} is missing or damaged"))?
                .0,
        ),
        None => None,
    };
    let label = if round == 0 { "sum".to_owned() } else { strategy.to_string() };
    if args.resume && up_to_date(&layout, round, base.as_ref().map(|b| b.sha256.as_str()), &label, &updates)? {
        return Ok(());
    }
    let want_kind = if round == 0 { Kind::Stats } else { Kind::Update };
    let test_path = layout.test_set();
    // The test set is featurised on its own threads while the updates are read and summed.
    let base_sha256 = base.as_ref().map(|b| b.sha256.clone());
    let (model, metrics, samples, update_sha256) = std::thread::scope(|scope| -> Result<_> {
        let mut test_job = None;
        let start_test = |config: ModelConfig| {
            let (path, entry) = (&test_path, &manifest.test);
            scope.spawn(move || -> Result<Featurized> { Ok(featurize_all(&load_reviews(path, Some(entry))?, config.featurizer)) })
        };
        let mut config: Option<ModelConfig> = base.as_ref().map(|b| b.header.config);
        if let Some(c) = config {
            test_job = Some(start_test(c));
        }
        let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut sum = Combiner::new(strategy);
        let mut counts: Option<ClassCounts> = None;
        let mut samples = Vec::new();
        let mut update_sha256 = Vec::new();
        for (&shard, path) in &updates {
            let (ck, _) = load_update(&layout, round, shard, want_kind)?;
            let h = &ck.header;
            let why = |msg: String| anyhow::anyhow!("refusing {}: {msg}", path.display());
            if let Some(first) = seen.insert(ck.sha256.clone(), path.clone()) {
                return Err(why(format!("it is a duplicate of {} (same bytes)", first.display())));
            }
            if h.round != round {
                return Err(why(format!("it is an update of round {}, not round {round}", h.round)));
            }
            if h.shard != Some(shard) {
                return Err(why(format!("its header says shard {:?}, its name says shard {shard}", h.shard)));
            }
            match config {
                Some(c) if c != h.config => {
                    return Err(why(format!("its model config {:?} differs from the round's {:?}", h.config, c)));
                }
                Some(_) => {}
                None => {
                    config = Some(h.config);
                    test_job = Some(start_test(h.config));
                }
            }
            let rows = manifest.shards[shard].rows as u64;
            if h.samples != rows {
                return Err(why(format!("it was trained on {} reviews, the manifest's shard has {rows}", h.samples)));
            }
            if let Some(b) = &base
                && h.base_sha256.as_deref() != Some(b.sha256.as_str())
            {
                return Err(why(format!(
                    "it was trained from another global model than {}",
                    layout.input_model(round).unwrap().display()
                )));
            }
            if round == 0 {
                let c = ck.to_counts().map_err(|e| why(e.to_string()))?;
                match &mut counts {
                    Some(total) => total.add(&c),
                    None => counts = Some(c),
                }
            } else {
                sum.add(&ck, h.samples as f64).map_err(|e| why(e.to_string()))?;
            }
            samples.push(h.samples);
            update_sha256.push(ck.sha256.clone());
            info!(shard, samples = h.samples, "update accepted");
        }
        let config = config.expect("at least one update");
        let model = match (base, counts) {
            (None, Some(total)) => Checkpoint::from_model(&Model::from_counts(config, &total)?, Header::new(Kind::Model, config, round))?,
            (Some(mut ck), _) => {
                for (name, v) in sum.combine()? {
                    ck.tensors.insert(name, v);
                }
                ck
            }
            (None, None) => unreachable!("round 0 sums counts"),
        };
        let test = test_job.expect("started with the config").join().expect("test featurizer panicked")?;
        let metrics = evaluate(&model.scorer()?, &test);
        Ok((model, metrics, samples, update_sha256))
    })?;
    info!(round, accuracy = format!("{:.4}", metrics.accuracy), "evaluated on the test set");

    let mut history = model.header.card.as_ref().map(|c| c.history.clone()).unwrap_or_default();
    history.push(RoundPoint { round, test_accuracy: metrics.accuracy });
    let card = ModelCard {
        workers: manifest.workers,
        partition: manifest.partition.to_string(),
        alpha: manifest.alpha,
        train_samples: samples.iter().sum(),
        history,
        metrics: metrics.to_map(),
    };
    let mut header = Header::new(Kind::Model, model.header.config, round);
    header.samples = card.train_samples;
    header.card = Some(card.clone());
    let bytes = Checkpoint { header, ..model }.to_bytes()?;
    let sha = fedimdb::digest::sha256_bytes(&bytes);
    // The model, then the report holding its checksum, then the published copy: a reader
    // checks each file against the record written after it.
    write_bytes_atomic(&layout.global_model(round), &bytes)?;
    fedimdb::fault::point(&format!("aggregator:{round}:global-written"));
    let report = RoundReport {
        round,
        strategy: if round == 0 { "sum".to_owned() } else { strategy.to_string() },
        shards: updates.keys().copied().collect(),
        missing,
        samples,
        test: metrics,
        seconds: start.elapsed().as_secs_f64(),
        model_sha256: sha.clone(),
        version: fedimdb::VERSION.to_owned(),
        base_sha256,
        update_sha256,
    };
    write_json_atomic(&layout.round_report(round), &report)?;
    fedimdb::fault::point(&format!("aggregator:{round}:report-written"));
    publish(&layout, &bytes, LatestCard { round, sha256: sha, trained_at: utc_now(), card })?;
    info!(round, seconds = format!("{:.2}", report.seconds), "global model written and published");
    Ok(())
}

/// Publishes a global model as the latest: the model first, then its card, each atomic.
/// A server watching the card therefore never sees a card for a model not yet in place.
fn publish(layout: &Layout, bytes: &[u8], card: LatestCard) -> Result<()> {
    write_bytes_atomic(&layout.latest_model(), bytes)?;
    fedimdb::fault::point(&format!("aggregator:{}:latest-model-written", card.round));
    write_json_atomic(&layout.latest_card(), &card)
}

/// `--resume`: true if round `round`'s global model on disk verifies, was made from the
/// current base model with `strategy` out of exactly the finished updates now in the
/// folder. Then it is only published again if the published model is damaged, missing or
/// of an earlier round (a resumed run walks through finished rounds in order, and the
/// server must not step back to an older model meanwhile).
fn up_to_date(
    layout: &Layout,
    round: u32,
    base_sha256: Option<&str>,
    strategy: &str,
    updates: &BTreeMap<usize, PathBuf>,
) -> Result<bool> {
    let report = match check_round(layout, round, base_sha256) {
        Ok(r) => r,
        Err(why) => {
            info!(round, "aggregating: {why:#}");
            return Ok(false);
        }
    };
    if report.strategy != strategy {
        info!(round, "aggregating: the global model on disk was made with {}, not {strategy}", report.strategy);
        return Ok(false);
    }
    let now: Vec<usize> = updates.keys().copied().collect();
    if report.shards != now {
        info!(round, "aggregating: the global model on disk combined shards {:?}, the finished updates now are {now:?}", report.shards);
        return Ok(false);
    }
    match check_latest(layout) {
        Ok(card) if card.round >= round => {}
        published => {
            let why = published.map_or_else(|e| format!("{e:#}"), |c| format!("it is the model of round {}", c.round));
            info!(round, "publishing the model of round {round} again: {why}");
            let bytes = std::fs::read(layout.global_model(round))
                .with_context(|| format!("cannot read {}", layout.global_model(round).display()))?;
            let ck = Checkpoint::from_bytes(&bytes, &layout.global_model(round))?;
            let card = ck.header.card.clone().unwrap_or_default();
            ensure_sha(&layout.global_model(round), &ck.sha256, &report.model_sha256, &layout.round_report(round))?;
            publish(layout, &bytes, LatestCard { round, sha256: ck.sha256, trained_at: utc_now(), card })?;
        }
    }
    info!(round, path = %layout.global_model(round).display(), "up to date: the global model on disk verifies and was made from the same inputs; nothing to do");
    Ok(true)
}

/// Original form: every tensor of the model files in `dir` combined with `strategy` (by
/// default the sample-weighted mean).
pub fn original(dir: &Path, out: &Path, test: Option<&Path>, strategy: Strategy) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.ends_with(".safetensors") && !is_temp_name(&n)
        })
        .map(|e| e.path())
        .filter(|p| p != out)
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no model files (*.safetensors) in {}", dir.display());
    }
    let mut sum = Combiner::new(strategy);
    let (mut first, mut total, mut round): (Option<Header>, u64, u32) = (None, 0, 0);
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in &files {
        let ck = Checkpoint::load_kind(path, Kind::Model)?;
        if let Some(dup) = seen.insert(ck.sha256.clone(), path.clone()) {
            bail!("refusing {}: it is a duplicate of {} (same bytes)", path.display(), dup.display());
        }
        if let Some(f) = &first
            && f.config != ck.header.config
        {
            bail!("refusing {}: its model config differs from {}'s", path.display(), files[0].display());
        }
        ensure!(ck.header.samples > 0, "refusing {}: it records no training samples", path.display());
        sum.add(&ck, ck.header.samples as f64).with_context(|| format!("refusing {}", path.display()))?;
        total += ck.header.samples;
        round = round.max(ck.header.round);
        first.get_or_insert(ck.header);
    }
    let mut header = first.expect("at least one file");
    header.round = round;
    header.samples = total;
    header.shard = None;
    let ck = Checkpoint { header, tensors: sum.combine()?, sha256: String::new() };
    ck.save(out)?;
    info!(files = files.len(), %strategy, path = %out.display(), "combined model written");
    if let Some(test) = test {
        let reviews = load_reviews(test, None)?;
        let m: Metrics = evaluate(&ck.scorer()?, &featurize_all(&reviews, ck.header.config.featurizer));
        println!("{}", serde_json::to_string_pretty(&m)?);
    }
    Ok(())
}
