//! The candle training engine (`--device cuda`, or any candle device): the model's forward
//! pass in candle ops, autograd, and candle-nn's SGD, dense over all buckets. On a GPU the
//! dense update is cheap; on a CPU `fedimdb::train::train_sparse` is far faster.
//!
//! It walks exactly the steps of the sparse engine (`fedimdb::train::run_steps`: the same
//! batches, order and learning rates), so both give the same model; the tests below pin
//! that. Candle lives here, in the trainer, so that no other binary compiles it.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use fedimdb::model::{Model, doc_scale};
use fedimdb::train::{
    Correction, Drift, EpochStats, LocalOutcome, TrainConfig, logistic_loss, run_steps,
    touched_buckets,
};

/// A batch of documents in flat (CSR-like) form: for each non-zero, its bucket, the
/// document it belongs to and that document's scale.
struct SparseBatch {
    docs: usize,
    indices: Tensor,
    doc_of: Tensor,
    scale: Tensor,
}

impl SparseBatch {
    fn new(docs: &[&[u32]], device: &Device) -> candle_core::Result<Self> {
        let nnz: usize = docs.iter().map(|d| d.len()).sum();
        let (mut indices, mut doc_of, mut scale) = (
            Vec::with_capacity(nnz),
            Vec::with_capacity(nnz),
            Vec::with_capacity(nnz),
        );
        for (i, d) in docs.iter().enumerate() {
            indices.extend_from_slice(d);
            doc_of.extend(std::iter::repeat_n(i as u32, d.len()));
            scale.extend(std::iter::repeat_n(doc_scale(d.len()), d.len()));
        }
        Ok(Self {
            docs: docs.len(),
            indices: Tensor::from_vec(indices, nnz, device)?,
            doc_of: Tensor::from_vec(doc_of, nnz, device)?,
            scale: Tensor::from_vec(scale, nnz, device)?,
        })
    }
}

/// Logits `[batch]`: an embedding bag (gather, scale, sum per document) plus the bias; the
/// same function as `Model::logit`.
fn forward(
    weight: &Tensor,
    bias: &Tensor,
    nb_ratio: &Tensor,
    batch: &SparseBatch,
) -> candle_core::Result<Tensor> {
    let contrib = (weight.index_select(&batch.indices, 0)?
        * nb_ratio.index_select(&batch.indices, 0)?)?
    .mul(&batch.scale)?;
    let sums = Tensor::zeros(batch.docs, DType::F32, weight.device())?.index_add(
        &batch.doc_of,
        &contrib,
        0,
    )?;
    sums.broadcast_add(bias)
}

/// Local training on `device`: the same steps as `fedimdb::train::train_sparse`, dense. The
/// correction enters the loss (`+ <d, w> + d_b b`), so the optimizer's plain gradient step
/// is the corrected step.
pub fn train_candle(
    model: &mut Model,
    device: &Device,
    docs: &[Vec<u32>],
    labels: &[u8],
    cfg: &TrainConfig,
    correction: Option<&Correction>,
    on_epoch: impl FnMut(&EpochStats),
) -> candle_core::Result<LocalOutcome> {
    let dim = model.config.dim();
    let weight = Var::from_tensor(&Tensor::from_slice(&model.weight, dim, device)?)?;
    let bias = Var::from_tensor(&Tensor::new(&[model.bias], device)?)?;
    let ratio = Tensor::from_slice(&model.nb_ratio, dim, device)?;
    let (d, d_bias) = match correction {
        Some(c) => (
            Some(Tensor::from_slice(&c.weight, dim, device)?),
            Tensor::new(&[c.bias], device)?,
        ),
        None => (None, Tensor::zeros(1, DType::F32, device)?),
    };
    let mut sgd = candle_nn::SGD::new(vec![weight.clone(), bias.clone()], cfg.lr as f64)?;
    let mut grad_sum = Tensor::zeros(dim, DType::F32, device)?;
    let mut grad_sum_bias = 0.0f64;
    let steps = cfg.steps_for(docs.len());
    let epochs = run_steps(docs.len(), cfg, on_epoch, |t, rows| {
        sgd.set_learning_rate(Drift::rate(cfg.lr, cfg.schedule, t as u64, steps) as f64);
        let batch_docs: Vec<&[u32]> = rows.iter().map(|&i| docs[i].as_slice()).collect();
        let batch_labels: Vec<u8> = rows.iter().map(|&i| labels[i]).collect();
        let batch = SparseBatch::new(&batch_docs, device)?;
        let logits = forward(weight.as_tensor(), bias.as_tensor(), &ratio, &batch)?;
        let y: Vec<f32> = batch_labels.iter().map(|&l| l as f32).collect();
        let y = Tensor::from_vec(y, batch_labels.len(), device)?;
        let data_loss = candle_nn::loss::binary_cross_entropy_with_logit(&logits, &y)?;
        // The data gradient alone, for the control variate, then the full step.
        let data_grads = data_loss.backward()?;
        if let Some(g) = data_grads.get(weight.as_tensor()) {
            grad_sum = (grad_sum.clone() + g)?;
        }
        if let Some(g) = data_grads.get(bias.as_tensor()) {
            grad_sum_bias += g.to_device(&Device::Cpu)?.to_vec1::<f32>()?[0] as f64;
        }
        let mut loss = data_loss.clone();
        if let Some(d) = &d {
            loss = (loss + (weight.as_tensor() * d)?.sum_all()?)?;
            loss = (loss + (bias.as_tensor() * &d_bias)?.sum_all()?)?;
        }
        sgd.backward_step(&loss)?;
        let z = logits.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
        let loss_sum: f64 = z
            .iter()
            .zip(&batch_labels)
            .map(|(&z, &l)| logistic_loss(z, l))
            .sum();
        let correct = z
            .iter()
            .zip(&batch_labels)
            .filter(|&(&z, &l)| (z >= 0.0) == (l == 1))
            .count();
        Ok::<_, candle_core::Error>((loss_sum, correct))
    })?;
    model.weight = weight.as_tensor().to_device(&Device::Cpu)?.to_vec1()?;
    model.bias = bias.as_tensor().to_device(&Device::Cpu)?.to_vec1::<f32>()?[0];
    let k = steps.max(1) as f64;
    Ok(LocalOutcome {
        epochs,
        mean_grad: (grad_sum / k)?.to_device(&Device::Cpu)?.to_vec1()?,
        mean_grad_bias: (grad_sum_bias / k) as f32,
        touched: touched_buckets(docs, dim),
    })
}

#[cfg(test)]
mod tests {
    use fedimdb::model::{ClassCounts, ModelConfig};
    use fedimdb::train::{Algorithm, Schedule, train_sparse};

    use super::*;

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Forty three-bucket documents over a 1,024-bucket table, half positive.
    fn toy() -> (Model, Vec<Vec<u32>>, Vec<u8>) {
        let config = ModelConfig::with_buckets(10, 1);
        let docs: Vec<Vec<u32>> = (0..40u32)
            .map(|i| vec![i % 2, 10 + i % 7, 30 + i % 5])
            .collect();
        let labels: Vec<u8> = (0..40).map(|i| (i % 2) as u8).collect();
        let counts = ClassCounts::count(config.dim(), &docs, &labels);
        (Model::from_counts(config, &counts), docs, labels)
    }

    #[test]
    fn the_forward_pass_is_the_models_logit() {
        let (mut model, docs, _) = toy();
        model.weight = (0..model.weight.len())
            .map(|i| 0.5 + (i % 7) as f32 * 0.1)
            .collect();
        let cpu = Device::Cpu;
        let dim = model.config.dim();
        let refs: Vec<&[u32]> = docs.iter().map(Vec::as_slice).collect();
        let logits = forward(
            &Tensor::from_slice(&model.weight, dim, &cpu).unwrap(),
            &Tensor::new(&[model.bias], &cpu).unwrap(),
            &Tensor::from_slice(&model.nb_ratio, dim, &cpu).unwrap(),
            &SparseBatch::new(&refs, &cpu).unwrap(),
        )
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        for (d, l) in docs.iter().zip(logits) {
            assert!(
                (model.logit(d) - l).abs() < 1e-5,
                "{} vs {l}",
                model.logit(d)
            );
        }
    }

    #[test]
    fn both_engines_train_to_the_same_model() {
        let (model, docs, labels) = toy();
        let tc = |steps, batch, schedule| TrainConfig {
            algorithm: Algorithm::Scaffold,
            steps,
            epochs: 0,
            batch,
            lr: 0.5,
            schedule,
            seed: 9,
        };
        // Non-zero on buckets no document reads too, so the sparse engine's lazy path counts.
        let dim = model.config.dim();
        let correction = Correction {
            weight: (0..dim).map(|j| ((j % 13) as f32 - 6.0) * 1e-3).collect(),
            bias: 0.01,
        };
        for (cfg, corr) in [
            (tc(30, 4, Schedule::Constant), None),
            (tc(30, 4, Schedule::Linear), None),
            (tc(25, 3, Schedule::Linear), Some(&correction)),
        ] {
            let mut sparse = model.clone();
            let s1 = train_sparse(&mut sparse, &docs, &labels, &cfg, corr, |_| {});
            let mut dense = model.clone();
            let s2 =
                train_candle(&mut dense, &Device::Cpu, &docs, &labels, &cfg, corr, |_| {}).unwrap();
            let diff = max_diff(&dense.weight, &sparse.weight);
            assert!(diff < 1e-5, "engines differ by {diff} with {cfg:?}");
            assert!((dense.bias - sparse.bias).abs() < 1e-5);
            assert!(
                max_diff(&s1.mean_grad, &s2.mean_grad) < 1e-6,
                "control variates differ"
            );
            assert!((s1.mean_grad_bias - s2.mean_grad_bias).abs() < 1e-6);
            assert_eq!(s1.touched, s2.touched);
            assert_eq!(s1.epochs.len(), s2.epochs.len());
            for (a, b) in s1.epochs.iter().zip(&s2.epochs) {
                assert!(
                    (a.loss - b.loss).abs() < 1e-5 && a.accuracy == b.accuracy,
                    "{a:?} vs {b:?}"
                );
            }
        }
    }
}
