//! The trainer's two forms: on the shared volume (`--root`) and on loose files (the
//! original `--data … --savemodel …`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use candle_core::Device;
use fedimdb::atomic::write_json_atomic;
use fedimdb::checkpoint::{Checkpoint, Header, Kind};
use fedimdb::dataset::{Featurized, featurize_all, load_reviews};
use fedimdb::featurize::FeaturizerConfig;
use fedimdb::layout::Layout;
use fedimdb::manifest::DataManifest;
use fedimdb::model::{BIAS, ClassCounts, Model, ModelConfig, WEIGHT};
use fedimdb::report::UpdateReport;
use fedimdb::train::{EpochStats, SparseSgd, TrainConfig, train_candle};
use tracing::info;

use crate::Args;

/// A worker's seed for one round: distinct per round and shard, fixed by `--seed`.
fn worker_seed(seed: u64, round: u32, shard: usize) -> u64 {
    seed ^ (round as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (shard as u64 + 1).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
}

fn model_config(args: &Args) -> ModelConfig {
    ModelConfig {
        featurizer: FeaturizerConfig { hash_bits: args.hash_bits, max_ngram: args.max_ngram },
        ..ModelConfig::default()
    }
}

/// Volume form: round 0 writes the shard's statistics, later rounds a trained update.
pub fn volume(root: &Path, round: u32, shard: usize, args: &Args, device: &Device) -> Result<()> {
    let start = Instant::now();
    let layout = Layout::new(root);
    let manifest = DataManifest::read(&layout.data_manifest())
        .with_context(|| format!("no complete data under {}: run the copier first", root.display()))?;
    let entry = manifest.shard(shard)?;
    let reviews = load_reviews(&layout.shard(shard), Some(entry))?;
    let seed = worker_seed(args.seed, round, shard);
    let out = layout.update(round, shard);
    info!(round, shard, reviews = reviews.len(), "training worker started");

    let (ck, data, train, epochs) = if round == 0 {
        let config = model_config(args);
        let data = featurize_all(&reviews, config.featurizer);
        let counts = ClassCounts::count(config.dim(), &data.features, &data.labels);
        let mut header = Header::new(Kind::Stats, config, 0);
        header.shard = Some(shard);
        (Checkpoint::from_counts(&counts, header), data, None, Vec::new())
    } else {
        let input = layout.input_model(round).expect("round > 0 has an input model");
        let base = Checkpoint::load_kind(&input, Kind::Model)
            .with_context(|| format!("cannot start round {round}: the global model of round {} is missing or damaged", round - 1))?;
        ensure!(
            base.header.round == round - 1,
            "{} says it is the model of round {}, expected round {}",
            input.display(),
            base.header.round,
            round - 1
        );
        let mut model = base.to_model()?;
        let data = featurize_all(&reviews, model.config.featurizer);
        let tc = TrainConfig { epochs: args.epochs, batch: args.batch, lr: args.lr, seed };
        let epochs = train(&mut model, &data, &tc, device)?;
        let mut header = Header::new(Kind::Update, model.config, round);
        header.shard = Some(shard);
        header.samples = data.len() as u64;
        header.seed = Some(seed);
        header.base_sha256 = Some(base.sha256.clone());
        header.train = Some(serde_json::to_value(tc)?);
        (update_checkpoint(&model, header)?, data, Some(tc), epochs)
    };
    let sha256 = ck.save(&out)?;
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
    };
    write_json_atomic(&layout.update_report(round, shard), &report)?;
    info!(path = %out.display(), seconds = format!("{:.2}", report.seconds), "update written");
    Ok(())
}

/// Original form: train on one shard file and write a whole model, which the original
/// aggregator form (`--dir`) averages.
pub fn original(data_path: &Path, out: &Path, init: Option<&Path>, args: &Args, device: &Device) -> Result<()> {
    let reviews = load_reviews(data_path, None)?;
    let (mut model, round) = match init {
        Some(p) => {
            let base = Checkpoint::load_kind(p, Kind::Model)?;
            (base.to_model()?, base.header.round + 1)
        }
        None => {
            let config = model_config(args);
            let data = featurize_all(&reviews, config.featurizer);
            let counts = ClassCounts::count(config.dim(), &data.features, &data.labels);
            (Model::from_counts(config, &counts)?, 1)
        }
    };
    let data = featurize_all(&reviews, model.config.featurizer);
    let tc = TrainConfig { epochs: args.epochs, batch: args.batch, lr: args.lr, seed: args.seed };
    train(&mut model, &data, &tc, device)?;
    let mut header = Header::new(Kind::Model, model.config, round);
    header.samples = data.len() as u64;
    header.seed = Some(args.seed);
    header.train = Some(serde_json::to_value(tc)?);
    Checkpoint::from_model(&model, header)?.save(out)?;
    info!(path = %out.display(), "model written");
    Ok(())
}

/// Trains in place on the chosen device; refuses to return a diverged model.
fn train(model: &mut Model, data: &Featurized, tc: &TrainConfig, device: &Device) -> Result<Vec<EpochStats>> {
    let pb = fedimdb::logging::progress(tc.epochs as u64, "epochs");
    let log = |s: &EpochStats| {
        pb.inc(1);
        info!(epoch = s.epoch, loss = format!("{:.4}", s.loss), accuracy = format!("{:.4}", s.accuracy), seconds = format!("{:.2}", s.seconds), "epoch done");
    };
    let stats = if device.is_cpu() {
        let mut sgd = SparseSgd::new(model)?;
        let stats = sgd.train(&data.features, &data.labels, tc, log);
        sgd.write_into(model)?;
        stats
    } else {
        train_candle(model, &data.features, &data.labels, tc, device, log)?
    };
    pb.finish_and_clear();
    if let Some(s) = stats.iter().find(|s| !s.loss.is_finite()) {
        bail!("training diverged: the loss became {} in epoch {}; nothing was written. Lower --lr (now {})", s.loss, s.epoch, tc.lr);
    }
    Ok(stats)
}

fn update_checkpoint(model: &Model, header: Header) -> Result<Checkpoint> {
    let weight: Vec<f32> = model.weight.to_device(&Device::Cpu)?.to_vec1()?;
    let bias: Vec<f32> = model.bias.to_device(&Device::Cpu)?.to_vec1()?;
    if weight.iter().chain(&bias).any(|x| !x.is_finite()) {
        bail!("training diverged: the weights hold NaN or infinity; nothing was written. Lower --lr");
    }
    Ok(Checkpoint { header, tensors: BTreeMap::from([(WEIGHT.to_owned(), weight), (BIAS.to_owned(), bias)]), sha256: String::new() })
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_owned(),
        other => format!("{other:?}").to_lowercase(),
    }
}
