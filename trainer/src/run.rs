//! The trainer's two forms: on the shared volume (`--root`) and on loose files (the
//! original `--data … --savemodel …`).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use candle_core::Device;
use fedimdb::atomic::write_json_atomic;
use fedimdb::checkpoint::{Checkpoint, Header, Kind};
use fedimdb::control::{Control, values_at, worker_control};
use fedimdb::dataset::{Featurized, featurize_all, load_reviews};
use fedimdb::layout::Layout;
use fedimdb::manifest::DataManifest;
use fedimdb::model::{BIAS, ClassCounts, Model, ModelConfig, NB_RATIO, WEIGHT};
use fedimdb::outcome::{Outcome, Status};
use fedimdb::report::UpdateReport;
use fedimdb::train::{
    Algorithm, Correction, EpochStats, LocalShard, TrainArgs, TrainConfig, train_local,
    train_sparse,
};
use fedimdb::verify::{
    UpdateWant, check_update, left_out_of_done_round, load_control, load_global,
};
use tracing::info;

use crate::Args;
use crate::candle_engine::train_candle;

/// Volume form: the worker of each of `shards`, one after the other. The round's inputs
/// (global model, control variate) are read and verified once, when the first shard that
/// has work needs them, and shared by the others.
///
/// The first shard that fails ends the process: its error names the shard, the updates of
/// the shards before it are written and verified, those after it are not started.
pub fn volume(
    root: &Path,
    round: u32,
    shards: &[usize],
    args: &Args,
    device: &Device,
) -> Result<()> {
    ensure!(
        !shards.is_empty(),
        "no shard index: pass --shard I (or several, --shard I,J) or set JOB_COMPLETION_INDEX"
    );
    // The outcome record is one step's (a pod's termination message holds one record).
    ensure!(
        shards.len() == 1 || fedimdb::outcome::requested_file().is_none(),
        "{} asks for one step's outcome record, and --shard lists {} shards: give each shard \
         its own trainer process",
        fedimdb::outcome::ENV,
        shards.len()
    );
    let mut inputs = None;
    for &shard in shards {
        let outcome = volume_shard(root, round, shard, args, device, &mut inputs);
        match shards {
            [_] => outcome?,
            _ => outcome.with_context(|| format!("round {round}, shard {shard} failed"))?,
        }
        .record();
    }
    Ok(())
}

/// One worker: round 0 writes the shard's statistics, later rounds a trained update.
/// `inputs` holds the round's inputs once a shard of this process has loaded them.
///
/// With `resume`, an update already on disk that verifies and was computed from exactly
/// these inputs and arguments is kept, and the worker ends without work.
fn volume_shard(
    root: &Path,
    round: u32,
    shard: usize,
    args: &Args,
    device: &Device,
    inputs: &mut Option<Inputs>,
) -> Result<Outcome> {
    let start = Instant::now();
    let layout = Layout::new(root);
    let manifest = DataManifest::of_run(&layout)?;
    let classes = manifest.labels.len();
    let entry = manifest.shard(shard)?;
    let out = layout.update(round, shard);
    if args.volume.resume {
        // Judged by the records, before any model file is read: a round whose files the
        // retention rule removed is done, and its inputs are gone.
        let done = UpdateWant::from_records(
            &layout,
            entry,
            args.model.config(classes),
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
    let inputs = match inputs {
        Some(loaded) => loaded,
        None => inputs.insert(Inputs::load(&layout, round, &args.train)?),
    };
    let config = inputs
        .base
        .as_ref()
        .map_or_else(|| args.model.config(classes), |b| b.header.config);
    ensure!(
        config.classes() == classes,
        "the global model has {} classes, the data ({}) {classes} labels: the data was sharded \
         again after the run started; start the run over (--from-round 0)",
        config.classes(),
        layout.data_manifest().display()
    );
    let tc = args.train.config(round, shard, config.classes());
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
    let (ck, epochs) = match &inputs.base {
        None => (statistics(config, shard, &data), Vec::new()),
        Some(base) => {
            // The round reads and writes only the shard's own buckets.
            let local = LocalShard::new(&data.features, base.tensor(NB_RATIO), config.rows());
            let correction = match &inputs.control {
                // A round of no steps (the gradient round) has nothing to correct: its pass
                // only measures the gradient at the model it was given.
                Some(_) if tc.takes_no_steps() => None,
                Some((control, _)) => Some(correction(
                    &layout,
                    (control, round - 1),
                    shard,
                    &local,
                    base,
                )?),
                None => None,
            };
            let mut header = Header::new(Kind::Update, config, round);
            header.shard = Some(shard);
            header.seed = Some(tc.seed);
            header.base_sha256 = Some(base.sha256.clone());
            header.train = Some(tc);
            header.control_sha256 = want.control_sha256.clone();
            header.samples = data.len() as u64;
            // A clone of a mapped file's tensors is a reference to the mapping, not a copy.
            let trained = train_shard(
                base.clone(),
                &local,
                &data,
                &tc,
                correction.as_ref(),
                device,
            )?;
            let epochs = trained.epochs.clone();
            (trained.into_update(header, local.touched), epochs)
        }
    };
    let report = UpdateReport {
        round,
        shard,
        kind: ck.header.kind,
        samples: data.len(),
        label_counts: data.label_counts(classes),
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
    let mut header = Header::new(Kind::Stats, config, 0);
    header.shard = Some(shard);
    Checkpoint::count(header, config.classes(), &data.features, &data.labels)
}

/// A worker's round on its shard's buckets: the trained weights there, the bias, the passes
/// it made and the mean gradient there (the worker's next control variate).
struct Trained {
    weight: Vec<f32>,
    bias: Vec<f32>,
    epochs: Vec<EpochStats>,
    mean_grad: Vec<f32>,
    mean_grad_bias: Vec<f32>,
}

impl Trained {
    /// The sparse update: the shard's buckets only (the aggregator rebuilds the others, see
    /// `fedimdb::train::Drift`).
    fn into_update(self, header: Header, touched: Vec<u32>) -> Checkpoint {
        Checkpoint::update(
            header,
            touched,
            self.weight,
            self.bias,
            self.mean_grad,
            self.mean_grad_bias,
        )
    }
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
    report.sha256 = ck.save(&out)?;
    fedimdb::fault::point(&format!("trainer:{round}:{shard}:update-written"));
    report.bytes = std::fs::metadata(&out)
        .with_context(|| format!("cannot read the size of {}", out.display()))?
        .len();
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

/// SCAFFOLD's correction for worker `shard` at its buckets: the global control variate (of
/// round `control_round`) minus its own, row by row. Zero when the control does not hold the
/// shard's gradient (`Control::holds`: the shard was away too long), as if its own were the
/// global one, so that the corrections of the round still sum to zero.
fn correction(
    layout: &Layout,
    (control, control_round): (&Control, u32),
    shard: usize,
    local: &LocalShard,
    base: &Checkpoint,
) -> Result<Correction> {
    let config = &base.header.config;
    ensure!(
        control.weight.len() == config.rows() * config.dim() && control.bias.len() == config.rows(),
        "the control variate has {} values, the global model {} rows of {} buckets",
        control.weight.len(),
        config.rows(),
        config.dim()
    );
    if !control.holds(shard, control_round) {
        info!(
            shard,
            since = control.sources.get(shard).copied(),
            "the control variate no longer holds this shard's gradient (the shard was away): this round trains without a correction"
        );
        return Ok(Correction {
            weight: vec![0.0; config.rows() * local.touched.len()],
            bias: vec![0.0; config.rows()],
        });
    }
    let (index, values, own_bias) =
        worker_control(layout, control, shard, base.tensor(NB_RATIO), config)?;
    let own: Vec<f32> = values
        .chunks(index.len().max(1))
        .flat_map(|row| values_at(&index, row, &local.touched))
        .collect();
    let global = local.gather(&control.weight);
    ensure!(
        own.len() == global.len(),
        "the control variate of shard {shard} has {} rows, the model {}",
        values.len() / index.len().max(1),
        config.rows()
    );
    Ok(Correction {
        weight: global.iter().zip(&own).map(|(c, o)| c - o).collect(),
        bias: control
            .bias
            .iter()
            .zip(&own_bias)
            .map(|(c, o)| c - o)
            .collect(),
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
            // No manifest here: the classes are those the shard's labels reach.
            let classes = reviews
                .iter()
                .map(|r| r.label as usize + 1)
                .max()
                .unwrap_or(2)
                .max(2);
            let config = args.model.config(classes);
            let data = featurize_all(&reviews, config.featurizer);
            let counts =
                ClassCounts::count(config.classes(), config.dim(), &data.features, &data.labels);
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
        ..args.train.config(0, 0, model.config.classes())
    };
    header.train = Some(tc);
    let outcome = with_progress(&tc, &data, |log| {
        Ok(match Engine::of(device) {
            Engine::Sparse => {
                train_sparse(&mut model, &data.features, &data.labels, &tc, None, log)
            }
            Engine::Candle(device) => train_candle(
                &mut model,
                device,
                &data.features,
                &data.labels,
                &tc,
                None,
                log,
            )?,
        })
    })?;
    refuse_diverged(&outcome.epochs, &model.weight, &model.bias, &tc)?;
    Checkpoint::from_model(model, header).save(out)?;
    info!(path = %out.display(), "model written");
    Ok(())
}

/// A worker's round from the global model `base` on the chosen device: on the CPU on the
/// shard's buckets alone; on a GPU with the candle engine over the whole model (its
/// correction zero outside the shard's buckets, which no review reads and the update leaves
/// out), taken back to the shard's buckets.
fn train_shard(
    base: Checkpoint,
    local: &LocalShard,
    data: &Featurized,
    tc: &TrainConfig,
    correction: Option<&Correction>,
    device: &Device,
) -> Result<Trained> {
    train_shard_with(Engine::of(device), base, local, data, tc, correction)
}

/// The engine of a worker's round.
enum Engine<'a> {
    /// `fedimdb::train` on the CPU: a round on the shard's buckets.
    Sparse,
    /// The candle engine on this device, over the whole model.
    Candle(&'a Device),
}

impl<'a> Engine<'a> {
    fn of(device: &'a Device) -> Self {
        if device.is_cpu() {
            Engine::Sparse
        } else {
            Engine::Candle(device)
        }
    }
}

fn train_shard_with(
    engine: Engine,
    base: Checkpoint,
    local: &LocalShard,
    data: &Featurized,
    tc: &TrainConfig,
    correction: Option<&Correction>,
) -> Result<Trained> {
    // The gradient round takes no steps, only one pass for the exact gradient: the sparse
    // engine's, on the CPU, whatever the device (a GPU would save nothing there).
    let engine = if tc.takes_no_steps() {
        Engine::Sparse
    } else {
        engine
    };
    let trained = match engine {
        Engine::Sparse => {
            let mut weight = local.gather(base.tensor(WEIGHT));
            let mut bias = base.tensor(BIAS).to_vec();
            let link = base.header.config.link();
            let round = with_progress(tc, data, |log| {
                Ok(train_local(
                    local,
                    &mut weight,
                    &mut bias,
                    &data.labels,
                    link,
                    tc,
                    correction,
                    log,
                ))
            })?;
            Trained {
                weight,
                bias,
                epochs: round.epochs,
                mean_grad: round.mean_grad,
                mean_grad_bias: round.mean_grad_bias,
            }
        }
        Engine::Candle(device) => {
            let mut model = base.into_model()?;
            let (dim, n) = (model.config.dim(), local.touched.len());
            let dense = correction.map(|c| {
                let mut weight = vec![0.0; model.weight.len()];
                for (r, row) in c.weight.chunks(n.max(1)).enumerate() {
                    for (&j, &v) in local.touched.iter().zip(row) {
                        weight[r * dim + j as usize] = v;
                    }
                }
                Correction {
                    weight,
                    bias: c.bias.clone(),
                }
            });
            let outcome = with_progress(tc, data, |log| {
                Ok(train_candle(
                    &mut model,
                    device,
                    &data.features,
                    &data.labels,
                    tc,
                    dense.as_ref(),
                    log,
                )?)
            })?;
            Trained {
                weight: local.gather(&model.weight),
                bias: model.bias,
                epochs: outcome.epochs,
                mean_grad: local.gather(&outcome.mean_grad),
                mean_grad_bias: outcome.mean_grad_bias,
            }
        }
    };
    refuse_diverged(&trained.epochs, &trained.weight, &trained.bias, tc)?;
    Ok(trained)
}

/// Runs `train` with a progress bar over the round's passes and a log line per pass.
fn with_progress<T>(
    tc: &TrainConfig,
    data: &Featurized,
    train: impl FnOnce(&dyn Fn(&EpochStats)) -> Result<T>,
) -> Result<T> {
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
    let out = train(&log)?;
    pb.finish_and_clear();
    Ok(out)
}

/// Refuses a round whose loss or weights (the ones to be written) are no longer finite.
fn refuse_diverged(
    epochs: &[EpochStats],
    weight: &[f32],
    bias: &[f32],
    tc: &TrainConfig,
) -> Result<()> {
    if let Some(s) = epochs.iter().find(|s| !s.loss.is_finite()) {
        bail!(
            "training diverged: the loss became {} in pass {}; nothing was written. Lower --lr (now {})",
            s.loss,
            s.epoch,
            tc.lr
        );
    }
    if weight.iter().chain(bias).any(|x| !x.is_finite()) {
        bail!(
            "training diverged: the weights hold NaN or infinity; nothing was written. Lower --lr (now {})",
            tc.lr
        );
    }
    Ok(())
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedimdb::checkpoint::{Header, Kind};
    use fedimdb::model::{ClassCounts, ModelConfig};
    use fedimdb::train::Schedule;

    /// The candle engine (what a GPU runs) and the sparse one write the same update: the
    /// candle round over the whole model, taken back to the shard's buckets, equals the
    /// sparse round on them, correction included.
    #[test]
    fn both_engines_make_the_same_update() {
        let config = ModelConfig::with_buckets(8, 2);
        let docs: Vec<Vec<u32>> = (0..30u32)
            .map(|i| {
                let mut d = vec![i % 2, 5 + i % 7, 40 + (i * 13) % 50];
                d.sort_unstable();
                d.dedup();
                d
            })
            .collect();
        let labels: Vec<u8> = (0..30).map(|i| (i % 2) as u8).collect();
        let mut model =
            Model::from_counts(config, &ClassCounts::count(2, config.dim(), &docs, &labels));
        model
            .weight
            .iter_mut()
            .enumerate()
            .for_each(|(j, w)| *w = (j % 5) as f32 * 0.01);
        let base = Checkpoint::from_model(model, Header::new(Kind::Model, config, 1));
        let local = LocalShard::new(&docs, base.tensor(NB_RATIO), 1);
        let correction = Correction {
            weight: (0..local.touched.len())
                .map(|k| (k % 3) as f32 * 1e-3 - 1e-3)
                .collect(),
            bias: vec![0.02],
        };
        let data = Featurized {
            features: docs,
            labels,
        };
        let tc = TrainConfig {
            algorithm: Algorithm::Scaffold,
            batch: 2,
            epochs: 0,
            lr: 0.5,
            schedule: Schedule::Linear,
            seed: 3,
            steps: 40,
        };
        // The candle engine on the tests' device: the GPU in a `cuda` build.
        let device = crate::device::for_tests();
        let run = |engine| {
            train_shard_with(engine, base.clone(), &local, &data, &tc, Some(&correction)).unwrap()
        };
        let (sparse, candle) = (run(Engine::Sparse), run(Engine::Candle(&device)));
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max)
        };
        assert!(
            diff(&sparse.weight, &candle.weight) < 1e-5,
            "weights differ"
        );
        assert!(
            diff(&sparse.mean_grad, &candle.mean_grad) < 1e-6,
            "control variates differ"
        );
        assert!(diff(&sparse.bias, &candle.bias) < 1e-5);
        assert!(diff(&sparse.mean_grad_bias, &candle.mean_grad_bias) < 1e-6);
        assert_ne!(
            sparse.weight,
            local.gather(base.tensor(WEIGHT)),
            "nothing trained"
        );

        // The gradient round takes no steps, on any device: both engines write the shard's
        // exact gradient at the base model and leave its weights as they were.
        let gradient = TrainConfig {
            steps: 0,
            epochs: 0,
            ..tc
        };
        let run = |engine| {
            train_shard_with(engine, base.clone(), &local, &data, &gradient, None).unwrap()
        };
        let (sparse, candle) = (run(Engine::Sparse), run(Engine::Candle(&device)));
        assert_eq!(sparse.weight, local.gather(base.tensor(WEIGHT)));
        assert_eq!(candle.weight, sparse.weight);
        assert_eq!(candle.mean_grad, sparse.mean_grad);
        let model = base.clone().into_model().unwrap();
        let (g, g_bias) = fedimdb::control::shard_gradient(&model, &data.features, &data.labels);
        assert!(diff(&local.gather(&g), &sparse.mean_grad) < 1e-6);
        assert!(diff(&g_bias, &sparse.mean_grad_bias) < 1e-6);
    }
}
