//! The aggregator's two forms: a round on the shared volume (`--root`) and a folder of
//! loose model files (the original `--dir … --savefile …`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use fedimdb::atomic::{is_temp_name, link_or_copy_atomic, write_json_atomic};
use fedimdb::checkpoint::{
    Checkpoint, GRAD_BIAS, GRAD_WEIGHT, Header, Kind, ModelCard, RoundPoint, Values,
};
use fedimdb::control::{Control, initial_gradient, worker_control};
use fedimdb::dataset::{Featurized, featurize_all, load_reviews};
use fedimdb::layout::Layout;
use fedimdb::manifest::DataManifest;
use fedimdb::metrics::Metrics;
use fedimdb::model::{BIAS, ClassCounts, Model, ModelConfig, NB_RATIO, WEIGHT, start_weight};
use fedimdb::outcome::{Outcome, Status};
use fedimdb::report::RoundReport;
use fedimdb::retention;
use fedimdb::server_optimizer::{Moments, ServerOptimizer};
use fedimdb::train::{Drift, TrainConfig};
use fedimdb::verify::{
    check_latest, check_round, load_control, load_global, load_moments, load_update,
    read_round_report, read_update_report, read_verified, superseded,
};
use tracing::{info, warn};

use crate::Args;
use crate::combine::{BiasSpread, Combiner, Fill, flat_index};
use crate::evaluate::evaluate;
use fedimdb::strategy::{Combination, Strategy};

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
            bail!(
                "{} is not a worker update name (expected shard-NNNNN.safetensors); remove it",
                entry.path().display()
            );
        };
        // The trainer writes its report (holding the update's checksum) after the update:
        // an update without one is from a trainer that died, and cannot be verified.
        if !entry.path().with_extension("json").exists() {
            warn!(
                "{} has no report next to it (its trainer did not finish); not using it",
                entry.path().display()
            );
            continue;
        }
        out.insert(shard, entry.path());
    }
    Ok(out)
}

/// Volume form: aggregate round `round` and publish the result, as four steps: find the
/// round's finished updates, combine them (and the control variates) into the next global
/// model, evaluate it, write and publish the round.
pub fn volume(root: &Path, round: u32, args: &Args) -> Result<Outcome> {
    let start = Instant::now();
    let layout = Layout::new(root);
    let manifest = DataManifest::of_run(&layout)?;
    let strategy = args.strategy().map_err(anyhow::Error::msg)?;
    let label = Combination::of_round(round, strategy);
    let optimizer = (round > 0)
        .then(|| args.combine.server_optimizer(manifest.labels.len()))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let quorum = args.min_workers().map_or(manifest.workers, |(m, _)| m);
    let asked = Asked {
        label,
        optimizer,
        quorum,
    };
    if args.volume.resume
        && let Some(done) = up_to_date(&layout, round, done_as_asked(&layout, round, &asked))?
    {
        prune(&layout, round, args)?;
        return Ok(outcome(Status::UpToDate, round, done.test.accuracy));
    }
    let (updates, missing) = find_updates(&layout, &manifest, round, args)?;
    if round == 0 && strategy != Strategy::FedAvg {
        // A count sum is not an average: robust statistics of counts is future work.
        info!(%strategy, "round 0 sums the workers' feature counts whatever the strategy; it applies from round 1");
    }
    // A round of updates that all took no steps (SCAFFOLD's gradient round) should leave the
    // model as it was; if it does (checked after combining), the base model's verified test
    // metrics are its metrics, and the test set is neither read nor featurised for it.
    let expect_base = round > 0 && took_no_steps(&layout, round, &updates)?;
    let test_path = layout.test_set();
    // The test set is read from the start, and featurised on its own thread as soon as the
    // model's config is known, while the updates are read and combined.
    let (combined, base_sha256, test) = std::thread::scope(|scope| -> Result<_> {
        let (config_tx, config_rx) = std::sync::mpsc::channel::<ModelConfig>();
        let (path, entry) = (&test_path, &manifest.test);
        let test_job = scope.spawn(move || -> Result<Option<Featurized>> {
            let early = (!expect_base)
                .then(|| load_reviews(path, Some(entry)))
                .transpose()?;
            // No config comes when combining failed, whose error is the one to report, or
            // when the model is its base, whose metrics are reused.
            let Ok(config) = config_rx.recv() else {
                return Ok(None);
            };
            let reviews = match early {
                Some(reviews) => reviews,
                None => load_reviews(path, Some(entry))?,
            };
            Ok(Some({
                if round == 0 && start_weight(config.classes()) == 0.0 {
                    // A K-class model starts with every weight at zero, so a review's
                    // logits are the biases whatever its buckets (checked below): the same
                    // metrics without featurising 25,000 reviews.
                    Featurized::labels_of(&reviews)
                } else {
                    featurize_all(&reviews, config.featurizer)
                }
            }))
        });
        // Rounds ≥ 1: the base model's metrics, when the combined model is the base.
        let mut base_metrics = None;
        let mut start_test = move |config: ModelConfig| {
            // The receiver takes the first config; it is gone only if the job failed,
            // whose error the join below reports.
            let _ = config_tx.send(config);
        };
        let (combined, base_sha256) = match round.checked_sub(1) {
            None => (
                combine_statistics(&layout, &manifest, &updates, &mut start_test)?,
                None,
            ),
            Some(prev) => {
                let (base, base_report) = load_global(&layout, prev)
                    .with_context(|| format!("cannot aggregate round {round}: the global model of round {prev} is missing or damaged"))?;
                let config = base.header.config;
                if !expect_base {
                    start_test(config);
                }
                let base_sha256 = base.sha256.clone();
                let optimizer = optimizer.expect("rounds ≥ 1 have one");
                let combined = combine_updates(
                    &layout, &manifest, round, base, &updates, strategy, optimizer,
                )?;
                if combined.moved {
                    start_test(config); // no-op when sent already
                } else {
                    info!(
                        round,
                        accuracy = format!("{:.4}", base_report.test.accuracy),
                        "the combined model is round {prev}'s, bit for bit: its test metrics stand"
                    );
                    base_metrics = Some(base_report.test);
                }
                (combined, Some(base_sha256))
            }
        };
        drop(start_test); // the sender: a job still waiting for a config stops
        let featurized = test_job.join().expect("test featurizer panicked")?;
        let test = match (base_metrics, featurized) {
            (Some(metrics), _) => TestScores::Base(metrics),
            (None, Some(test)) => TestScores::Score(test),
            (None, None) => unreachable!("the config was sent before the sender was dropped"),
        };
        Ok((combined, base_sha256, test))
    })?;
    ensure!(
        round > 0
            || matches!(&test, TestScores::Score(t) if t.features.iter().any(|f| !f.is_empty()))
            || combined.model.tensor(WEIGHT).iter().all(|&w| w == 0.0),
        "round 0's model has weights other than zero, so the test set must be featurised to \
         score it; this is a bug in the aggregator"
    );
    let accuracy = finish_round(
        &layout,
        &manifest,
        round,
        combined,
        test,
        RoundFacts {
            label,
            optimizer,
            missing,
            base_sha256,
            start,
        },
    )?;
    prune(&layout, round, args)?;
    Ok(outcome(Status::Done, round, accuracy))
}

/// Whether every update of `round` in `updates` says it took no steps (its report's
/// training config).
fn took_no_steps(layout: &Layout, round: u32, updates: &BTreeMap<usize, PathBuf>) -> Result<bool> {
    for &shard in updates.keys() {
        let report = read_update_report(layout, round, shard)?;
        if !report.train.is_some_and(|t| t.takes_no_steps()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Where a round's test metrics come from.
enum TestScores {
    /// The test set, featurised: the model is scored on it.
    Score(Featurized),
    /// The model is the base model, bit for bit: the base's verified metrics.
    Base(Metrics),
}

fn outcome(status: Status, round: u32, accuracy: f64) -> Outcome {
    let mut o = Outcome::new("aggregator", status);
    (o.round, o.test_accuracy) = (Some(round), Some(accuracy));
    o
}

/// Applies the retention rule once round `round` is written, verified and published.
fn prune(layout: &Layout, round: u32, args: &Args) -> Result<()> {
    let keep = args.retention.keep_rounds;
    let retention::Keep::Last(n) = keep else {
        return Ok(());
    };
    if !layout.control(round).exists() {
        // This round was itself retired by a later one, whose aggregator applied the rule.
        return Ok(());
    }
    // The updates holding the control variates that the kept rounds and the next one
    // start from: those named by the controls of rounds newest - n ..= newest.
    let mut in_use = BTreeSet::new();
    for r in round.saturating_sub(n)..=round {
        let report = read_round_report(layout, r)?;
        let sources = if report.control_sources.is_empty() && layout.control(r).exists() {
            load_control(layout, r)?.0.sources // a report from before sources were recorded
        } else {
            report.control_sources
        };
        in_use.extend(
            sources
                .into_iter()
                .enumerate()
                .map(|(shard, src)| (src, shard)),
        );
    }
    let pruned = retention::prune(layout, round, keep, &in_use)?;
    if pruned.files > 0 {
        info!(
            round,
            files = pruned.files,
            mb = format!("{:.1}", pruned.bytes as f64 / 1e6),
            "removed the model files of the rounds before the newest {keep} (--keep-rounds); their reports stay"
        );
    }
    Ok(())
}

/// A round's finished updates by shard, and the shards of the manifest without one. Fails
/// below the quorum, naming the missing files.
fn find_updates(
    layout: &Layout,
    manifest: &DataManifest,
    round: u32,
    args: &Args,
) -> Result<(BTreeMap<usize, PathBuf>, Vec<usize>)> {
    let (quorum, flag) = args
        .min_workers()
        .unwrap_or((manifest.workers, "--min-workers"));
    ensure!(
        quorum <= manifest.workers,
        "{flag} {quorum} is more than the {} shards in the data manifest",
        manifest.workers
    );
    let dir = layout.updates_dir(round);
    let updates = list_updates(&dir)?;
    if updates.is_empty() {
        bail!(
            "no worker updates in {} (empty or missing folder): run the round's trainers first",
            dir.display()
        );
    }
    if let Some((&extra, path)) = updates.iter().find(|(s, _)| **s >= manifest.workers) {
        bail!(
            "{} is for shard {extra}, but the data has only {} shards",
            path.display(),
            manifest.workers
        );
    }
    let missing: Vec<usize> = (0..manifest.workers)
        .filter(|s| !updates.contains_key(s))
        .collect();
    let missing_names = || {
        missing
            .iter()
            .map(|&s| layout.update(round, s).display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
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
    Ok((updates, missing))
}

/// What a round combined: the new global model, the control variate for the next round,
/// and per combined update its sample count, checksum and size.
struct Combined {
    model: Checkpoint,
    shards: Vec<usize>,
    control: Control,
    /// The server optimizer's state after the round (`None` without one, and in round 0).
    moments: Option<Moments>,
    samples: Vec<u64>,
    update_sha256: Vec<String>,
    update_bytes: Vec<u64>,
    /// Whether the model differs from the round's base (always, in round 0).
    moved: bool,
}

/// Loads a worker's file of `round`, verified, and refuses one that is not the shard's own
/// work of this round.
fn load_checked(
    layout: &Layout,
    manifest: &DataManifest,
    round: u32,
    shard: usize,
    kind: Kind,
    seen: &mut BTreeMap<String, usize>,
) -> Result<(Checkpoint, u64)> {
    let path = layout.update(round, shard);
    let (ck, report) = load_update(layout, round, shard, kind)?;
    let h = &ck.header;
    let why = |msg: String| anyhow::anyhow!("refusing {}: {msg}", path.display());
    if let Some(first) = seen.insert(ck.sha256.clone(), shard) {
        return Err(why(format!(
            "it is a duplicate of {} (same bytes)",
            layout.update(round, first).display()
        )));
    }
    if h.round != round {
        return Err(why(format!(
            "it is an update of round {}, not round {round}",
            h.round
        )));
    }
    if h.shard != Some(shard) {
        return Err(why(format!(
            "its header says shard {:?}, its name says shard {shard}",
            h.shard
        )));
    }
    let rows = manifest.shards[shard].rows as u64;
    if h.samples != rows {
        return Err(why(format!(
            "it was trained on {} reviews, the manifest's shard has {rows}",
            h.samples
        )));
    }
    Ok((ck, report.bytes))
}

/// Round 0: the workers' counts summed into the first global model, and the first control
/// variate (the gradient at that model, from the same counts).
fn combine_statistics(
    layout: &Layout,
    manifest: &DataManifest,
    updates: &BTreeMap<usize, PathBuf>,
    start_test: &mut impl FnMut(ModelConfig),
) -> Result<Combined> {
    let (mut total, mut config): (Option<ClassCounts>, Option<ModelConfig>) = (None, None);
    let (mut samples, mut update_sha256, mut update_bytes, mut seen) =
        (Vec::new(), Vec::new(), Vec::new(), BTreeMap::new());
    for &shard in updates.keys() {
        let (ck, bytes) = load_checked(layout, manifest, 0, shard, Kind::Stats, &mut seen)?;
        let path = layout.update(0, shard);
        match config {
            Some(c) if c != ck.header.config => {
                bail!(
                    "refusing {}: its model config {:?} differs from the round's {c:?}",
                    path.display(),
                    ck.header.config
                )
            }
            Some(_) => {}
            None => {
                config = Some(ck.header.config);
                start_test(ck.header.config);
            }
        }
        match &mut total {
            Some(t) => ck.add_counts_to(t),
            None => ck.to_counts().map(|counts| total = Some(counts)),
        }
        .with_context(|| format!("refusing {}", path.display()))?;
        samples.push(ck.header.samples);
        update_sha256.push(ck.sha256.clone());
        update_bytes.push(bytes);
        info!(shard, samples = ck.header.samples, "statistics accepted");
    }
    let (total, config) = (
        total.expect("at least one update"),
        config.expect("at least one update"),
    );
    ensure!(
        config.classes() == manifest.labels.len(),
        "the statistics are of a {}-class model, the data ({}) has {} labels: the data was \
         sharded again after round 0 ran; start the run over (--from-round 0)",
        config.classes(),
        layout.data_manifest().display(),
        manifest.labels.len()
    );
    let model = Model::from_counts(config, &total);
    let (weight, bias) = initial_gradient(&total, &model.nb_ratio, &model.bias, config.link());
    let control = Control {
        weight: weight.into(),
        bias,
        sources: vec![0; manifest.workers],
        class_samples: total.docs.clone(),
    };
    let model = Checkpoint::from_model(model, Header::new(Kind::Model, config, 0));
    Ok(Combined {
        model,
        shards: updates.keys().copied().collect(),
        control,
        moments: None,
        samples,
        update_sha256,
        update_bytes,
        moved: true,
    })
}

/// Rounds ≥ 1: each worker's trained weights, completed where its sparse update is silent
/// by the drift every untouched bucket took ([`Drift`]), combined with `strategy`; and the
/// control variate, the newest gradients of the shards it holds (this round's, and missing
/// ones that still stand in: `Control::holds`) combined the same way ([`Controls`]).
fn combine_updates(
    layout: &Layout,
    manifest: &DataManifest,
    round: u32,
    mut base: Checkpoint,
    updates: &BTreeMap<usize, PathBuf>,
    strategy: Strategy,
    optimizer: ServerOptimizer,
) -> Result<Combined> {
    let prev = round - 1;
    let (mut prev_control, prev_sha) =
        load_control(layout, prev).with_context(|| format!("cannot aggregate round {round}: the control variate of round {prev} is missing or damaged"))?;
    let config = base.header.config;
    let x = Arc::new(base.take_tensor(WEIGHT)?);
    // Shared by every update's fill; nothing else reads the old control's weights.
    let d = Arc::new(std::mem::take(&mut prev_control.weight));
    let ratio = base.tensor(NB_RATIO).to_vec();
    // The shards in the new control variate's mean: this round's, and the missing ones whose
    // newest gradient still stands in (`fedimdb::control::STAND_IN_ROUNDS`).
    let in_mean = |s: usize| updates.contains_key(&s) || prev_control.holds(s, round);
    let n_total = (0..manifest.workers)
        .filter(|&s| in_mean(s))
        .map(|s| manifest.shards[s].rows)
        .sum::<usize>() as f64;
    let mut sum = Combiner::new(strategy);
    let (rows, dim) = (config.rows(), config.dim());
    let mut controls = Controls::new(strategy, rows, dim);
    let (mut samples, mut update_sha256, mut update_bytes, mut seen) =
        (Vec::new(), Vec::new(), Vec::new(), BTreeMap::new());
    let mut sources = prev_control.sources.clone();
    let mut spread = BiasSpread::new(strategy);
    for &shard in updates.keys() {
        let (ck, bytes) = load_checked(layout, manifest, round, shard, Kind::Update, &mut seen)?;
        let h = &ck.header;
        let refusing = || format!("refusing {}", layout.update(round, shard).display());
        // A worker whose gradient the control did not hold trained without a correction.
        let corrected = prev_control.holds(shard, prev);
        let fill = update_fill(layout, round, &ck, &base, &x, (&d, &prev_sha, corrected))
            .with_context(refusing)?;
        sum.add_sparse(&ck, fill, h.samples as f64)
            .with_context(refusing)?;
        spread.add(base.tensor(BIAS), ck.tensor(BIAS), h.samples as f64);
        controls
            .add(
                flat_index(&ck.index, rows, dim),
                ck.tensor(GRAD_WEIGHT),
                ck.tensor(GRAD_BIAS),
                h.samples as f64 / n_total,
            )
            .with_context(refusing)?;
        sources[shard] = round;
        samples.push(h.samples);
        update_sha256.push(ck.sha256.clone());
        update_bytes.push(bytes);
        info!(shard, samples = h.samples, bytes, "update accepted");
    }
    // A shard missing from this round stands in with its newest gradient while that is
    // recent; after that its gradient leaves the mean until the shard is back.
    for shard in (0..manifest.workers).filter(|s| !updates.contains_key(s)) {
        if !in_mean(shard) {
            info!(
                shard,
                since = prev_control.sources[shard],
                "the shard's newest gradient is too old to stand in the control variate: left out of its mean until the shard is back"
            );
            continue;
        }
        let (index, g, g_bias) = worker_control(layout, &prev_control, shard, &ratio, &config)?;
        controls.add(
            flat_index(&index, rows, dim),
            &g,
            &g_bias,
            manifest.shards[shard].rows as f64 / n_total,
        )?;
    }
    let (weight, bias) = controls.finish()?;
    let control = Control {
        weight: weight.into(),
        bias,
        sources,
        class_samples: prev_control.class_samples.clone(),
    };
    let mut combined = sum.combine()?;
    let target = combined
        .remove(WEIGHT)
        .context("the combined update has no weights")?;
    // The fills are gone with the combiner: the global weights are this function's alone.
    let mut weight = Arc::try_unwrap(x).unwrap_or_else(|x| x.as_ref().clone());
    let mut moments = server_moments(layout, prev, optimizer, weight.len())?;
    let moved = optimizer.step(&mut weight, &target, moments.as_mut());
    let target_bias = combined
        .remove(BIAS)
        .context("the combined update has no biases")?;
    let mut bias = base.tensor(BIAS).to_vec();
    let agreement = optimizer.step_bias(&mut bias, &target_bias, &spread.finish(rows)?);
    info!(
        round,
        ?agreement,
        "the biases moved by the workers' agreement on them"
    );
    let moved = moved
        || bias != base.tensor(BIAS)
        || combined
            .iter()
            .any(|(name, v)| base.tensors.get(name).is_none_or(|b| **b != **v));
    combined.insert(WEIGHT.to_owned(), weight);
    combined.insert(BIAS.to_owned(), bias);
    for (name, v) in combined {
        base.tensors.insert(name, v.into());
    }
    Ok(Combined {
        model: base,
        shards: updates.keys().copied().collect(),
        control,
        moments,
        samples,
        update_sha256,
        update_bytes,
        moved,
    })
}

/// The server optimizer's state a round starts from: the moments round `prev` wrote,
/// verified, or zero when it wrote none (round 0, or a round made without Adam); `None` for
/// an optimizer without state.
fn server_moments(
    layout: &Layout,
    prev: u32,
    optimizer: ServerOptimizer,
    len: usize,
) -> Result<Option<Moments>> {
    if optimizer == ServerOptimizer::None {
        return Ok(None);
    }
    let Some(moments) = load_moments(layout, prev)? else {
        info!(
            round = prev + 1,
            "the server optimizer's moments start at zero"
        );
        return Ok(Some(Moments::zeros(len)));
    };
    ensure!(
        moments.first.len() == len,
        "{} holds {} moments, the model {len} weights",
        layout.moments(prev).display(),
        moments.first.len()
    );
    Ok(Some(moments))
}

/// What worker `shard`'s sparse update of `round` stands for where it is silent: every
/// bucket it did not write is the global weight `x` moved by the correction alone, as the
/// worker's own steps moved it ([`Drift`]). Refuses an update made from another config,
/// global model or control variate than this round's.
fn update_fill(
    layout: &Layout,
    round: u32,
    ck: &Checkpoint,
    base: &Checkpoint,
    x: &Arc<Vec<f32>>,
    (prev_control, prev_sha, corrected): (&Arc<Values>, &str, bool),
) -> Result<Fill> {
    let prev = round - 1;
    let h = &ck.header;
    let config = base.header.config;
    ensure!(
        h.config == config,
        "its model config {:?} differs from the round's {config:?}",
        h.config
    );
    ensure!(
        h.base_sha256.as_deref() == Some(base.sha256.as_str()),
        "it was trained from another global model than {}",
        layout.global_model(prev).display()
    );
    let tc: TrainConfig = h.train.context("its header has no training config")?;
    // The correction the worker applied to every bucket it never read: none when the control
    // variate did not hold its gradient (`Control::holds`).
    let drift = match &h.control_sha256 {
        Some(sha) if sha == prev_sha && !corrected => None,
        Some(sha) if sha == prev_sha => Some((
            Arc::clone(prev_control),
            Drift::new(tc.steps_for(h.samples as usize), tc.lr, tc.schedule),
        )),
        Some(_) => bail!(
            "it was corrected with another control variate than {}",
            layout.control(prev).display()
        ),
        None => None,
    };
    Ok(Fill {
        base: Arc::clone(x),
        drift,
    })
}

/// How the shards' newest gradients combine into the control variate: with the round's
/// strategy, like the weights. FedAvg takes SCAFFOLD's sample-weighted mean. The robust rules
/// take their coordinate-wise median or trimmed mean (unweighted, a gradient being zero at
/// the buckets its shard never reads): the control corrects every worker's steps in the next
/// round, so a mean would let one worker's wild gradients steer all of them, whatever the rule
/// kept out of the weights.
enum Controls {
    Mean(ControlSum),
    Robust {
        combiner: Combiner,
        /// Zeros, model-sized: a gradient's value at the buckets it does not list.
        zeros: Arc<Vec<f32>>,
    },
}

impl Controls {
    fn new(strategy: Strategy, rows: usize, dim: usize) -> Self {
        match strategy {
            Strategy::FedAvg => Controls::Mean(ControlSum::new(rows, dim)),
            _ => Controls::Robust {
                combiner: Combiner::new(strategy),
                zeros: Arc::new(fedimdb::dense::zeros(rows * dim)),
            },
        }
    }

    /// Adds one shard's gradient: `values` at the row-major places `index`, and `bias`; `p`
    /// is the shard's share of the training reviews (the mean's weight).
    fn add(&mut self, index: Vec<u32>, values: &[f32], bias: &[f32], p: f64) -> Result<()> {
        match self {
            Controls::Mean(sum) => {
                sum.add_sparse(&index, values, bias, p);
                Ok(())
            }
            Controls::Robust { combiner, zeros } => {
                let fill = Fill {
                    base: zeros.clone(),
                    drift: None,
                };
                combiner.add_parts(index, values, bias, fill, p)
            }
        }
    }

    /// The control variate's weights and biases.
    fn finish(self) -> Result<(Vec<f32>, Vec<f32>)> {
        match self {
            Controls::Mean(sum) => Ok(sum.finish()),
            Controls::Robust { combiner, .. } => {
                let mut c = combiner.combine()?;
                let weight = c
                    .remove(WEIGHT)
                    .context("the combined control has no weights")?;
                let bias = c
                    .remove(BIAS)
                    .context("the combined control has no biases")?;
                Ok((weight, bias))
            }
        }
    }
}

/// A running weighted sum of control variates, in f64 (row-major weights, a bias per row).
struct ControlSum {
    weight: Vec<f64>,
    bias: Vec<f64>,
}

impl ControlSum {
    fn new(rows: usize, dim: usize) -> Self {
        Self {
            weight: fedimdb::dense::zeros(rows * dim),
            bias: vec![0.0; rows],
        }
    }

    /// Adds `p` times a sparse control variate: `values` at the places of `index` in the
    /// row-major weights ([`flat_index`]).
    fn add_sparse(&mut self, index: &[u32], values: &[f32], bias: &[f32], p: f64) {
        for (&j, &v) in index.iter().zip(values) {
            self.weight[j as usize] += p * v as f64;
        }
        for (s, &b) in self.bias.iter_mut().zip(bias) {
            *s += p * b as f64;
        }
    }

    fn finish(self) -> (Vec<f32>, Vec<f32>) {
        (
            self.weight.into_iter().map(|x| x as f32).collect(),
            self.bias.into_iter().map(|x| x as f32).collect(),
        )
    }
}

/// What the round report says besides what was combined.
struct RoundFacts {
    label: Combination,
    /// Rounds ≥ 1: the server optimizer that moved the model.
    optimizer: Option<ServerOptimizer>,
    missing: Vec<usize>,
    base_sha256: Option<String>,
    start: Instant,
}

/// Writes the state the next round starts from besides the global model: the control
/// variate and the server optimizer's moments, returning their checksums.
fn write_state(
    layout: &Layout,
    round: u32,
    config: ModelConfig,
    control: &Control,
    moments: Option<&Moments>,
) -> Result<(String, Option<String>)> {
    let control_sha256 = control
        .to_checkpoint(config, round)
        .save(&layout.control(round))?;
    let moments_sha256 = moments
        .map(|m| m.to_checkpoint(config, round).save(&layout.moments(round)))
        .transpose()?;
    Ok((control_sha256, moments_sha256))
}

/// Evaluates the combined model on the test set and writes the round: the control variate
/// and the moments ([`write_state`]) on their own thread while the model is scored and
/// written (its card carries the test metrics), then the report holding every checksum, then
/// the published copy. A reader checks each file against the record written after it.
/// Returns the test accuracy.
fn finish_round(
    layout: &Layout,
    manifest: &DataManifest,
    round: u32,
    combined: Combined,
    test: TestScores,
    facts: RoundFacts,
) -> Result<f64> {
    let Combined {
        model,
        shards,
        control,
        moments,
        samples,
        update_sha256,
        update_bytes,
        moved: _,
    } = combined;
    let config = model.header.config;
    std::thread::scope(|scope| -> Result<f64> {
        let (control, moments) = (&control, moments.as_ref());
        let writer = scope.spawn(move || write_state(layout, round, config, control, moments));
        let metrics = match test {
            TestScores::Score(test) => {
                let metrics = evaluate(&model.scorer()?, &test);
                info!(
                    round,
                    accuracy = format!("{:.4}", metrics.accuracy),
                    "evaluated on the test set"
                );
                metrics
            }
            TestScores::Base(metrics) => metrics,
        };
        let mut history = model
            .header
            .card
            .as_ref()
            .map(|c| c.history.clone())
            .unwrap_or_default();
        history.push(RoundPoint {
            round,
            test_accuracy: metrics.accuracy,
        });
        let card = ModelCard {
            published: None,
            workers: manifest.workers,
            partition: manifest.partition,
            alpha: manifest.alpha,
            train_samples: samples.iter().sum(),
            history,
            metrics: metrics.to_map(),
            labels: manifest.labels.clone(),
            task: Some(manifest.task_title()),
        };
        let mut header = Header::new(Kind::Model, config, round);
        header.samples = card.train_samples;
        header.card = Some(card.clone());
        let sha = Checkpoint { header, ..model }.save(&layout.global_model(round))?;
        fedimdb::fault::point(&format!("aggregator:{round}:global-written"));
        let (control_sha256, moments_sha256) = writer.join().expect("state writer panicked")?;
        let accuracy = metrics.accuracy;
        let report = RoundReport {
            round,
            strategy: facts.label,
            shards,
            missing: facts.missing,
            samples,
            test: metrics,
            seconds: facts.start.elapsed().as_secs_f64(),
            model_sha256: sha.clone(),
            version: fedimdb::VERSION.to_owned(),
            base_sha256: facts.base_sha256,
            update_sha256,
            update_bytes,
            control_sha256: Some(control_sha256),
            control_sources: control.sources.clone(),
            server_optimizer: facts.optimizer,
            moments_sha256,
        };
        write_json_atomic(&layout.round_report(round), &report)?;
        fedimdb::fault::point(&format!("aggregator:{round}:report-written"));
        publish(
            layout,
            &layout.global_model(round),
            card.published(round, sha),
            round,
        )?;
        info!(
            round,
            seconds = format!("{:.2}", report.seconds),
            "global model written and published"
        );
        Ok(accuracy)
    })
}

/// Publishes a global model as the latest: the model first, then its card, each atomic.
/// A server watching the card therefore never sees a card for a model not yet in place.
/// The model is a hard link to the round's global model file `global` where the volume
/// allows it (one copy on the volume, not two), and a copy of that file where it does not.
fn publish(layout: &Layout, global: &Path, card: ModelCard, round: u32) -> Result<()> {
    link_or_copy_atomic(global, &layout.latest_model())?;
    fedimdb::fault::point(&format!("aggregator:{round}:latest-model-written"));
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
    done: Result<RoundReport>,
) -> Result<Option<RoundReport>> {
    let report = match done {
        Ok(r) => r,
        Err(why) => {
            info!(round, "aggregating: {why:#}");
            return Ok(None);
        }
    };
    match check_latest(layout) {
        Ok(latest) if latest.round >= round => {}
        published => {
            let why = published.map_or_else(
                |e| format!("{e:#}"),
                |p| format!("it is the model of round {}", p.round),
            );
            info!(round, "publishing the model of round {round} again: {why}");
            let path = layout.global_model(round);
            let bytes = read_verified(&path, &report.model_sha256, &layout.round_report(round))?;
            let ck = Checkpoint::from_hashed_bytes(&bytes, &path, report.model_sha256.clone())?;
            let card = ck.header.card.clone().unwrap_or_default();
            publish(layout, &path, card.published(round, ck.sha256), round)?;
        }
    }
    info!(round, path = %layout.global_model(round).display(), "up to date: the global model on disk verifies and was made from the same inputs; nothing to do");
    Ok(Some(report))
}

/// How a round is asked to be aggregated: what `--resume` compares a round on disk with.
struct Asked {
    label: Combination,
    /// Rounds ≥ 1: the server optimizer.
    optimizer: Option<ServerOptimizer>,
    quorum: usize,
}

/// The report of round `round` if its global model verifies and was made from the model
/// the round before records, with the strategy and server optimizer asked, out of exactly
/// the finished updates on disk and at least the quorum of them; otherwise why not. A round
/// a later round was made from is judged by its reports alone: the retention rule
/// (`fedimdb::retention`) may have removed its updates.
fn done_as_asked(layout: &Layout, round: u32, asked: &Asked) -> Result<RoundReport> {
    let (strategy, quorum) = (asked.label, asked.quorum);
    let base = match round.checked_sub(1) {
        Some(prev) => Some(read_round_report(layout, prev)?.model_sha256),
        None => None,
    };
    let report = check_round(layout, round, base.as_deref())?;
    ensure!(
        report.strategy == strategy,
        "the global model on disk was made with {}, not {strategy}",
        report.strategy
    );
    // Reports from before the choice existed took the combined weights as they were.
    let made_with = match (round, report.server_optimizer) {
        (0, _) => None,
        (_, made) => Some(made.unwrap_or(ServerOptimizer::None)),
    };
    let text = |o: Option<ServerOptimizer>| o.map_or("(none)".to_owned(), |o| o.to_string());
    ensure!(
        made_with == asked.optimizer,
        "the global model on disk was made with server optimizer {}, not {}",
        text(made_with),
        text(asked.optimizer)
    );
    ensure!(
        report.shards.len() >= quorum,
        "the global model on disk combined {} updates, fewer than the quorum of {quorum}",
        report.shards.len()
    );
    // A round whose global model is gone was shown superseded by `check_round` already.
    let retired = !layout.global_model(round).exists() || superseded(layout, &report).is_ok();
    if !retired {
        let now: Vec<usize> = list_updates(&layout.updates_dir(round))?
            .into_keys()
            .collect();
        ensure!(
            report.shards == now,
            "the global model on disk combined shards {:?}, the finished updates now are {now:?}",
            report.shards
        );
    }
    Ok(report)
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
            bail!(
                "refusing {}: it is a duplicate of {} (same bytes)",
                path.display(),
                dup.display()
            );
        }
        if let Some(f) = &first
            && f.config != ck.header.config
        {
            bail!(
                "refusing {}: its model config differs from {}'s",
                path.display(),
                files[0].display()
            );
        }
        ensure!(
            ck.header.samples > 0,
            "refusing {}: it records no training samples",
            path.display()
        );
        sum.add(&ck, ck.header.samples as f64)
            .with_context(|| format!("refusing {}", path.display()))?;
        total += ck.header.samples;
        round = round.max(ck.header.round);
        first.get_or_insert(ck.header);
    }
    let mut header = first.expect("at least one file");
    header.round = round;
    header.samples = total;
    header.shard = None;
    let ck = Checkpoint {
        header,
        tensors: sum
            .combine()?
            .into_iter()
            .map(|(name, v)| (name, v.into()))
            .collect(),
        index: Vec::new(),
        sha256: String::new(),
    };
    ck.save(out)?;
    info!(files = files.len(), %strategy, path = %out.display(), "combined model written");
    if let Some(test) = test {
        let reviews = load_reviews(test, None)?;
        let m: Metrics = evaluate(
            &ck.scorer()?,
            &featurize_all(&reviews, ck.header.config.featurizer),
        );
        println!("{}", serde_json::to_string_pretty(&m)?);
    }
    Ok(())
}
