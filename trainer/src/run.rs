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
use fedimdb::featurize::FeaturizerConfig;
use fedimdb::layout::Layout;
use fedimdb::manifest::DataManifest;
use fedimdb::model::{BIAS, ClassCounts, Model, ModelConfig, NB_RATIO, WEIGHT};
use fedimdb::report::UpdateReport;
use fedimdb::train::{
    Algorithm, Correction, EpochStats, SparseSgd, TrainArgs, TrainConfig, touched_buckets,
    train_candle,
};
use fedimdb::verify::{UpdateWant, check_update, load_control, load_global};
use tracing::info;

use crate::Args;

fn model_config(args: &Args) -> ModelConfig {
    ModelConfig {
        featurizer: FeaturizerConfig {
            hash_bits: args.hash_bits,
            max_ngram: args.max_ngram,
        },
        ..ModelConfig::default()
    }
}

/// Volume form: round 0 writes the shard's statistics, later rounds a trained update.
///
/// With `resume`, an update already on disk that verifies and was computed from exactly
/// these inputs and arguments is kept, and the trainer exits without work.
pub fn volume(root: &Path, round: u32, shard: usize, args: &Args, device: &Device) -> Result<()> {
    let start = Instant::now();
    let layout = Layout::new(root);
    let manifest = DataManifest::read(&layout.data_manifest()).with_context(|| {
        format!(
            "no complete data under {}: run the copier first",
            root.display()
        )
    })?;
    let entry = manifest.shard(shard)?;
    let out = layout.update(round, shard);
    let inputs = Inputs::load(&layout, round, &args.train)?;
    let config = inputs
        .base
        .as_ref()
        .map_or_else(|| model_config(args), |b| b.header.config);
    let tc = args.train.config(round, shard);
    let want = UpdateWant {
        data_sha256: entry.sha256.clone(),
        config: Some(config),
        base_sha256: inputs.base.as_ref().map(|b| b.sha256.clone()),
        train: inputs.base.is_some().then_some(tc),
        control_sha256: inputs.control.as_ref().map(|c| c.1.clone()),
    };
    if args.resume {
        match check_update(&layout, round, shard, &want) {
            Ok(_) => {
                info!(round, shard, path = %out.display(), "up to date: the update on disk verifies and was made from the same inputs; nothing to do");
                return Ok(());
            }
            Err(why) => info!(round, shard, "computing the update: {why:#}"),
        }
    }
    let reviews = load_reviews(&layout.shard(shard), Some(entry))?;
    info!(
        round,
        shard,
        reviews = reviews.len(),
        "training worker started"
    );
    let data = featurize_all(&reviews, config.featurizer);
    let (ck, epochs) = match inputs.base {
        None => {
            let counts = ClassCounts::count(config.dim(), &data.features, &data.labels);
            let mut header = Header::new(Kind::Stats, config, 0);
            header.shard = Some(shard);
            (Checkpoint::from_counts(&counts, header), Vec::new())
        }
        Some(base) => {
            let mut header = Header::new(Kind::Update, config, round);
            header.shard = Some(shard);
            header.samples = data.len() as u64;
            header.seed = Some(tc.seed);
            header.base_sha256 = Some(base.sha256.clone());
            header.train = Some(serde_json::to_value(tc)?);
            header.control_sha256 = want.control_sha256.clone();
            let correction = match &inputs.control {
                Some((control, _)) => {
                    Some(correction(&layout, control, shard, base.tensor(NB_RATIO))?)
                }
                None => None,
            };
            let trained = train(base, &data, &tc, correction.as_ref(), device)?;
            let index = touched_buckets(&data.features, config.dim());
            let gather = |v: &[f32]| index.iter().map(|&j| v[j as usize]).collect::<Vec<f32>>();
            let (weight, grad) = (gather(&trained.weight), gather(&trained.grad));
            (
                Checkpoint::update(header, index, weight, trained.bias, grad, trained.grad_bias),
                trained.epochs,
            )
        }
    };
    // The update first, then its report with the update's checksum: a reader finding an
    // update without a report knows its trainer did not finish.
    let bytes = ck.to_bytes()?;
    write_bytes_atomic(&out, &bytes)?;
    fedimdb::fault::point(&format!("trainer:{round}:{shard}:update-written"));
    let report = UpdateReport {
        round,
        shard,
        kind: if round == 0 { "stats" } else { "update" }.to_owned(),
        samples: data.len(),
        positive: data.positives(),
        device: device_name(device),
        train: want.train,
        epochs,
        seconds: start.elapsed().as_secs_f64(),
        sha256: fedimdb::digest::sha256_bytes(&bytes),
        version: fedimdb::VERSION.to_owned(),
        data_sha256: want.data_sha256,
        base_sha256: want.base_sha256,
        config: Some(config),
        control_sha256: want.control_sha256,
        bytes: bytes.len() as u64,
    };
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
    let (base, data) = match init {
        Some(p) => {
            let base = Checkpoint::load_kind(p, Kind::Model)?;
            let data = featurize_all(&reviews, base.header.config.featurizer);
            (base, data)
        }
        None => {
            let config = model_config(args);
            let data = featurize_all(&reviews, config.featurizer);
            let counts = ClassCounts::count(config.dim(), &data.features, &data.labels);
            let model = Model::from_counts(config, &counts)?;
            (
                Checkpoint::from_model(&model, Header::new(Kind::Model, config, 0))?,
                data,
            )
        }
    };
    let mut header = base.header.clone();
    header.round += 1;
    header.samples = data.len() as u64;
    header.seed = Some(args.train.seed);
    header.shard = None;
    header.card = None;
    let ratio = base.tensor(NB_RATIO).to_vec();
    // One worker alone has nothing to correct for.
    let tc = TrainConfig {
        algorithm: Algorithm::FedAvg,
        seed: args.train.seed,
        ..args.train.config(0, 0)
    };
    header.train = Some(serde_json::to_value(tc)?);
    let trained = train(base, &data, &tc, None, device)?;
    let ck = Checkpoint::dense(
        Kind::Model,
        header,
        [
            (WEIGHT, trained.weight),
            (BIAS, vec![trained.bias]),
            (NB_RATIO, ratio),
        ],
    );
    ck.save(out)?;
    info!(path = %out.display(), "model written");
    Ok(())
}

/// The outcome of local training: the weights, and the mean gradient along the way.
struct Trained {
    weight: Vec<f32>,
    bias: f32,
    grad: Vec<f32>,
    grad_bias: f32,
    epochs: Vec<EpochStats>,
}

/// Trains the model of `base` on the chosen device; refuses to return a diverged model.
/// On the CPU the checkpoint's vectors are trained in place (no copies of the tables).
fn train(
    mut base: Checkpoint,
    data: &Featurized,
    tc: &TrainConfig,
    correction: Option<&Correction>,
    device: &Device,
) -> Result<Trained> {
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
    // The mean gradient along the local path is the worker's next control variate.
    let trained = if device.is_cpu() {
        let bias = base.tensor(BIAS)[0];
        let mut sgd =
            SparseSgd::from_parts(base.take_tensor(WEIGHT)?, bias, base.take_tensor(NB_RATIO)?);
        let out = sgd.train(&data.features, &data.labels, tc, correction, log);
        Trained {
            weight: sgd.weight,
            bias: sgd.bias,
            grad: out.mean_grad,
            grad_bias: out.mean_grad_bias,
            epochs: out.epochs,
        }
    } else {
        let mut model = base.to_model()?;
        let out = train_candle(
            &mut model,
            &data.features,
            &data.labels,
            tc,
            correction,
            device,
            log,
        )?;
        Trained {
            weight: model.weight.to_device(&Device::Cpu)?.to_vec1()?,
            bias: model.bias.to_device(&Device::Cpu)?.to_vec1::<f32>()?[0],
            grad: out.mean_grad,
            grad_bias: out.mean_grad_bias,
            epochs: out.epochs,
        }
    };
    pb.finish_and_clear();
    if let Some(s) = trained.epochs.iter().find(|s| !s.loss.is_finite()) {
        bail!(
            "training diverged: the loss became {} in pass {}; nothing was written. Lower --lr (now {})",
            s.loss,
            s.epoch,
            tc.lr
        );
    }
    if trained.weight.iter().any(|x| !x.is_finite()) || !trained.bias.is_finite() {
        bail!(
            "training diverged: the weights hold NaN or infinity; nothing was written. Lower --lr (now {})",
            tc.lr
        );
    }
    Ok(trained)
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}
