//! The trainer's two forms: on the shared volume (`--root`) and on loose files (the
//! original `--data … --savemodel …`).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use candle_core::Device;
use fedimdb::atomic::{write_bytes_atomic, write_json_atomic};
use fedimdb::checkpoint::{Checkpoint, Header, Kind};
use fedimdb::control::{Control, worker_control};
use fedimdb::dataset::{Featurized, featurize_all, load_reviews};
use fedimdb::layout::Layout;
use fedimdb::manifest::DataManifest;
use fedimdb::model::{ClassCounts, Model, ModelConfig, NB_RATIO};
use fedimdb::outcome::{Outcome, Status};
use fedimdb::report::UpdateReport;
use fedimdb::train::{
    Algorithm, Correction, EpochStats, LocalOutcome, TrainArgs, TrainConfig, train_sparse,
};
use fedimdb::verify::{
    UpdateWant, check_update, left_out_of_done_round, load_control, load_global,
};
use tracing::info;

use crate::Args;
use crate::candle_engine::train_candle;

/// Volume form: round 0 writes the shard's statistics, later rounds a trained update.
///
/// With `resume`, an update already on disk that verifies and was computed from exactly
/// these inputs and arguments is kept, and the trainer exits without work.
pub fn volume(
    root: &Path,
    round: u32,
    shard: usize,
    args: &Args,
    device: &Device,
) -> Result<Outcome> {
    let start = Instant::now();
    let layout = Layout::new(root);
    let manifest = DataManifest::of_run(&layout)?;
    manifest.ensure_two_classes(&layout.data_manifest())?;
    let entry = manifest.shard(shard)?;
    let out = layout.update(round, shard);
    if args.volume.resume {
        // Judged by the records, before any model file is read: a round whose files the
        // retention rule removed is done, and its inputs are gone.
        let done = UpdateWant::from_records(
            &layout,
            entry,
            args.model.config(),
            round,
            shard,
            &args.train,
        )
        .and_then(|want| check_update(&layout, round, shard, &want));
        match done {
            Ok(_) => {
                info!(round, shard, path = %out.display(), "up to date: the update on disk verifies and was made from the same inputs; nothing to do");
                return Ok(outcome(Status::UpToDate, round, shard));
            }
            Err(_) if left_out_of_done_round(&layout, round, shard) => {
                info!(
                    round,
                    shard,
                    "up to date: the round went on without this shard (a quorum) and later rounds were made from it; nothing to do"
                );
                return Ok(outcome(Status::UpToDate, round, shard));
            }
            Err(why) => info!(round, shard, "computing the update: {why:#}"),
        }
    }
    let inputs = Inputs::load(&layout, round, &args.train)?;
    let config = inputs
        .base
        .as_ref()
        .map_or_else(|| args.model.config(), |b| b.header.config);
    let tc = args.train.config(round, shard);
    let want = UpdateWant::new(
        entry,
        config,
        round,
        shard,
        &args.train,
        inputs.base.as_ref().map(|b| b.sha256.as_str()),
        inputs.control.as_ref().map(|c| c.1.as_str()),
    );
    let reviews = load_reviews(&layout.shard(shard), Some(entry))?;
    info!(
        round,
        shard,
        reviews = reviews.len(),
        "training worker started"
    );
    let data = featurize_all(&reviews, config.featurizer);
    let (ck, epochs) = match inputs.base {
        None => (statistics(config, shard, &data), Vec::new()),
        Some(base) => {
            let correction = match &inputs.control {
                Some((control, _)) => {
                    Some(correction(&layout, control, shard, base.tensor(NB_RATIO))?)
                }
                None => None,
            };
            let mut header = Header::new(Kind::Update, config, round);
            header.shard = Some(shard);
            header.seed = Some(tc.seed);
            header.base_sha256 = Some(base.sha256.clone());
            header.train = Some(tc);
            header.control_sha256 = want.control_sha256.clone();
            let mut model = base.into_model()?;
            let trained = train(&mut model, &data, &tc, correction.as_ref(), device)?;
            let epochs = trained.epochs.clone();
            (local_update(header, &model, &data, trained), epochs)
        }
    };
    let report = UpdateReport {
        round,
        shard,
        kind: ck.header.kind,
        samples: data.len(),
        positive: data.positives(),
        device: device_name(device),
        train: want.train,
        epochs,
        seconds: 0.0,
        sha256: String::new(),
        version: fedimdb::VERSION.to_owned(),
        data_sha256: want.data_sha256,
        base_sha256: want.base_sha256,
        config: Some(config),
        control_sha256: want.control_sha256,
        bytes: 0,
    };
    write_update(&layout, &ck, report, start)?;
    Ok(outcome(Status::Done, round, shard))
}

fn outcome(status: Status, round: u32, shard: usize) -> Outcome {
    let mut o = Outcome::new("trainer", status);
    (o.round, o.shard) = (Some(round), Some(shard));
    o
}

/// Round 0's output: the shard's per-class bucket counts (sparse).
fn statistics(config: ModelConfig, shard: usize, data: &Featurized) -> Checkpoint {
    let counts = ClassCounts::count(config.dim(), &data.features, &data.labels);
    let mut header = Header::new(Kind::Stats, config, 0);
    header.shard = Some(shard);
    Checkpoint::from_counts(&counts, header)
}

/// A training round's output: the trained weights and the mean gradient at the buckets the
/// shard touches (the aggregator rebuilds the others, see `fedimdb::train::Drift`).
fn local_update(
    mut header: Header,
    model: &Model,
    data: &Featurized,
    trained: LocalOutcome,
) -> Checkpoint {
    header.samples = data.len() as u64;
    let index = trained.touched;
    let gather = |v: &[f32]| index.iter().map(|&j| v[j as usize]).collect::<Vec<f32>>();
    let (weight, grad) = (gather(&model.weight), gather(&trained.mean_grad));
    Checkpoint::update(
        header,
        index,
        weight,
        model.bias,
        grad,
        trained.mean_grad_bias,
    )
}

/// Writes the update, then its report with the update's checksum and size: a reader
/// finding an update without a report knows its trainer did not finish.
fn write_update(
    layout: &Layout,
    ck: &Checkpoint,
    mut report: UpdateReport,
    start: Instant,
) -> Result<()> {
    let (round, shard) = (report.round, report.shard);
    let out = layout.update(round, shard);
    let bytes = ck.to_bytes()?;
    write_bytes_atomic(&out, &bytes)?;
    fedimdb::fault::point(&format!("trainer:{round}:{shard}:update-written"));
    report.sha256 = fedimdb::digest::sha256_bytes(&bytes);
    report.bytes = bytes.len() as u64;
    report.seconds = start.elapsed().as_secs_f64();
    write_json_atomic(&layout.update_report(round, shard), &report)?;
    info!(path = %out.display(), bytes = report.bytes, seconds = format!("{:.2}", report.seconds), "update written");
    Ok(())
}

/// What a worker starts from: nothing in round 0; the verified global model of the round
/// before, and with SCAFFOLD its verified control variate, later.
struct Inputs {
    base: Option<Checkpoint>,
    control: Option<(Control, String)>,
}

impl Inputs {
    fn load(layout: &Layout, round: u32, train: &TrainArgs) -> Result<Self> {
        let Some(prev) = round.checked_sub(1) else {
            return Ok(Self {
                base: None,
                control: None,
            });
        };
        let base = load_global(layout, prev)
            .with_context(|| format!("cannot start round {round}: the global model of round {prev} is missing or damaged"))?
            .0;
        let control = match train.algorithm {
            Algorithm::Scaffold => Some(
                load_control(layout, prev)
                    .with_context(|| format!("cannot start round {round}: the control variate of round {prev} is missing or damaged"))?,
            ),
            Algorithm::FedAvg => None,
        };
        Ok(Self {
            base: Some(base),
            control,
        })
    }
}

/// SCAFFOLD's correction for worker `shard`: the global control variate minus its own.
fn correction(
    layout: &Layout,
    control: &Control,
    shard: usize,
    ratio: &[f32],
) -> Result<Correction> {
    let (own, own_bias) = worker_control(layout, control, shard, ratio)?;
    ensure!(
        own.len() == control.weight.len(),
        "the control variate of shard {shard} has {} buckets, the global one {}",
        own.len(),
        control.weight.len()
    );
    Ok(Correction {
        weight: control
            .weight
            .iter()
            .zip(&own)
            .map(|(c, o)| c - o)
            .collect(),
        bias: control.bias - own_bias,
    })
}

/// Original form: train on one shard file and write a whole model, which the original
/// aggregator form (`--dir`) averages.
pub fn original(
    data_path: &Path,
    out: &Path,
    init: Option<&Path>,
    args: &Args,
    device: &Device,
) -> Result<()> {
    let reviews = load_reviews(data_path, None)?;
    let (mut header, mut model, data) = match init {
        Some(p) => {
            let base = Checkpoint::load_kind(p, Kind::Model)?;
            let data = featurize_all(&reviews, base.header.config.featurizer);
            (base.header.clone(), base.into_model()?, data)
        }
        None => {
            let config = args.model.config();
            let data = featurize_all(&reviews, config.featurizer);
            let counts = ClassCounts::count(config.dim(), &data.features, &data.labels);
            let model = Model::from_counts(config, &counts);
            (Header::new(Kind::Model, config, 0), model, data)
        }
    };
    header.round += 1;
    header.samples = data.len() as u64;
    header.seed = Some(args.train.seed);
    header.shard = None;
    header.card = None;
    // One worker alone has nothing to correct for.
    let tc = TrainConfig {
        algorithm: Algorithm::FedAvg,
        seed: args.train.seed,
        ..args.train.config(0, 0)
    };
    header.train = Some(tc);
    train(&mut model, &data, &tc, None, device)?;
    Checkpoint::from_model(model, header).save(out)?;
    info!(path = %out.display(), "model written");
    Ok(())
}

/// Trains `model` in place on the chosen device and returns the mean data-loss gradient
/// along the path (the worker's next control variate); refuses a diverged model.
fn train(
    model: &mut Model,
    data: &Featurized,
    tc: &TrainConfig,
    correction: Option<&Correction>,
    device: &Device,
) -> Result<LocalOutcome> {
    let pb = fedimdb::logging::progress(
        tc.steps_for(data.len()).div_ceil(data.len().max(1) as u64),
        "passes",
    );
    let log = |s: &EpochStats| {
        pb.inc(1);
        info!(
            epoch = s.epoch,
            loss = format!("{:.4}", s.loss),
            accuracy = format!("{:.4}", s.accuracy),
            seconds = format!("{:.2}", s.seconds),
            "pass done"
        );
    };
    let (docs, labels) = (&data.features, &data.labels);
    let outcome = if device.is_cpu() {
        train_sparse(model, docs, labels, tc, correction, log)
    } else {
        train_candle(model, device, docs, labels, tc, correction, log)?
    };
    pb.finish_and_clear();
    if let Some(s) = outcome.epochs.iter().find(|s| !s.loss.is_finite()) {
        bail!(
            "training diverged: the loss became {} in pass {}; nothing was written. Lower --lr (now {})",
            s.loss,
            s.epoch,
            tc.lr
        );
    }
    if model.weight.iter().any(|x| !x.is_finite()) || !model.bias.is_finite() {
        bail!(
            "training diverged: the weights hold NaN or infinity; nothing was written. Lower --lr (now {})",
            tc.lr
        );
    }
    Ok(outcome)
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}
