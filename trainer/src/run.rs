//! The trainer's two forms: on the shared volume (`--root`) and on loose files (the
//! original `--data … --savemodel …`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use fedimdb::atomic::write_json_atomic;
use fedimdb::checkpoint::{Checkpoint, Header, Kind};
use fedimdb::dataset::{Featurized, featurize_all, load_reviews};
use fedimdb::featurize::FeaturizerConfig;
use fedimdb::layout::Layout;
use fedimdb::manifest::DataManifest;
use fedimdb::model::{BIAS, ClassCounts, Model, ModelConfig, NB_RATIO, WEIGHT};
use fedimdb::report::UpdateReport;
use fedimdb::train::{EpochStats, SparseSgd, TrainConfig, train_candle, worker_seed};
use fedimdb::verify::{UpdateWant, check_update, load_global};
use tracing::info;

use crate::Args;

fn model_config(args: &Args) -> ModelConfig {
    ModelConfig {
        featurizer: FeaturizerConfig { hash_bits: args.hash_bits, max_ngram: args.max_ngram },
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
    let manifest = DataManifest::read(&layout.data_manifest())
        .with_context(|| format!("no complete data under {}: run the copier first", root.display()))?;
    let entry = manifest.shard(shard)?;
    let seed = worker_seed(args.seed, round, shard);
    let out = layout.update(round, shard);
    // The starting point, verified against the checksum its aggregator recorded.
    let base = match round.checked_sub(1) {
        None => None,
        Some(prev) => Some(
            load_global(&layout, prev)
                .with_context(|| format!("cannot start round {round}: the global model of round {prev} is missing or damaged"))?
                .0,
        ),
    };
    let config = base.as_ref().map_or_else(|| model_config(args), |b| b.header.config);
    let tc = TrainConfig { epochs: args.epochs, batch: args.batch, lr: args.lr, seed };
    let want = UpdateWant {
        data_sha256: entry.sha256.clone(),
        config: Some(config),
        base_sha256: base.as_ref().map(|b| b.sha256.clone()),
        train: base.is_some().then_some(tc),
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
    info!(round, shard, reviews = reviews.len(), "training worker started");

    let (ck, data, train, epochs) = match base {
        None => {
            let data = featurize_all(&reviews, config.featurizer);
            let counts = ClassCounts::count(config.dim(), &data.features, &data.labels);
            let mut header = Header::new(Kind::Stats, config, 0);
            header.shard = Some(shard);
            (Checkpoint::from_counts(&counts, header), data, None, Vec::new())
        }
        Some(base) => {
            let base_sha256 = base.sha256.clone();
            let data = featurize_all(&reviews, config.featurizer);
            let trained = train(base, &data, &tc, device)?;
            let mut header = Header::new(Kind::Update, config, round);
            header.shard = Some(shard);
            header.samples = data.len() as u64;
            header.seed = Some(seed);
            header.base_sha256 = Some(base_sha256);
            header.train = Some(serde_json::to_value(tc)?);
            let tensors = BTreeMap::from([(WEIGHT.to_owned(), trained.weight), (BIAS.to_owned(), vec![trained.bias])]);
            (Checkpoint { header, tensors, sha256: String::new() }, data, Some(tc), trained.epochs)
        }
    };
    // The update first, then its report with the update's checksum: a reader finding an
    // update without a report knows its trainer did not finish.
    let sha256 = ck.save(&out)?;
    fedimdb::fault::point(&format!("trainer:{round}:{shard}:update-written"));
    let report = UpdateReport {
        round,
        shard,
        kind: if round == 0 { "stats" } else { "update" }.to_owned(),
        samples: data.len(),
        positive: data.positives(),
        device: device_name(device),
        train,
        epochs,
        seconds: start.elapsed().as_secs_f64(),
        sha256,
        version: fedimdb::VERSION.to_owned(),
        data_sha256: want.data_sha256,
        base_sha256: want.base_sha256,
        config: Some(config),
    };
    write_json_atomic(&layout.update_report(round, shard), &report)?;
    info!(path = %out.display(), seconds = format!("{:.2}", report.seconds), "update written");
    Ok(())
}

/// Original form: train on one shard file and write a whole model, which the original
/// aggregator form (`--dir`) averages.
pub fn original(data_path: &Path, out: &Path, init: Option<&Path>, args: &Args, device: &Device) -> Result<()> {
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
            (Checkpoint::from_model(&model, Header::new(Kind::Model, config, 0))?, data)
        }
    };
    let mut header = base.header.clone();
    header.round += 1;
    header.samples = data.len() as u64;
    header.seed = Some(args.seed);
    header.shard = None;
    header.card = None;
    let ratio = base.tensor(NB_RATIO).to_vec();
    let tc = TrainConfig { epochs: args.epochs, batch: args.batch, lr: args.lr, seed: args.seed };
    header.train = Some(serde_json::to_value(tc)?);
    let trained = train(base, &data, &tc, device)?;
    let tensors = BTreeMap::from([
        (WEIGHT.to_owned(), trained.weight),
        (BIAS.to_owned(), vec![trained.bias]),
        (NB_RATIO.to_owned(), ratio),
    ]);
    Checkpoint { header, tensors, sha256: String::new() }.save(out)?;
    info!(path = %out.display(), "model written");
    Ok(())
}

/// The outcome of local training.
struct Trained {
    weight: Vec<f32>,
    bias: f32,
    epochs: Vec<EpochStats>,
}

/// Trains the model of `base` on the chosen device; refuses to return a diverged model.
/// On the CPU the checkpoint's vectors are trained in place (no copies of the tables).
fn train(mut base: Checkpoint, data: &Featurized, tc: &TrainConfig, device: &Device) -> Result<Trained> {
    let pb = fedimdb::logging::progress(tc.epochs as u64, "epochs");
    let log = |s: &EpochStats| {
        pb.inc(1);
        info!(epoch = s.epoch, loss = format!("{:.4}", s.loss), accuracy = format!("{:.4}", s.accuracy), seconds = format!("{:.2}", s.seconds), "epoch done");
    };
    let trained = if device.is_cpu() {
        let bias = base.tensor(BIAS)[0];
        let mut sgd = SparseSgd::from_parts(base.take_tensor(WEIGHT)?, bias, base.take_tensor(NB_RATIO)?);
        let epochs = sgd.train(&data.features, &data.labels, tc, log);
        Trained { weight: sgd.weight, bias: sgd.bias, epochs }
    } else {
        let mut model = base.to_model()?;
        let epochs = train_candle(&mut model, &data.features, &data.labels, tc, device, log)?;
        Trained {
            weight: model.weight.to_device(&Device::Cpu)?.to_vec1()?,
            bias: model.bias.to_device(&Device::Cpu)?.to_vec1::<f32>()?[0],
            epochs,
        }
    };
    pb.finish_and_clear();
    if let Some(s) = trained.epochs.iter().find(|s| !s.loss.is_finite()) {
        bail!("training diverged: the loss became {} in epoch {}; nothing was written. Lower --lr (now {})", s.loss, s.epoch, tc.lr);
    }
    if trained.weight.iter().any(|x| !x.is_finite()) || !trained.bias.is_finite() {
        bail!("training diverged: the weights hold NaN or infinity; nothing was written. Lower --lr (now {})", tc.lr);
    }
    Ok(trained)
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}
