//! The candle training engine (`--device cuda`, or any candle device): the model's forward
//! pass in candle ops, autograd, and candle-nn's SGD, dense over all buckets. On a GPU the
//! dense update is cheap; on a CPU `fedimdb::train::train_sparse` is far faster.
//!
//! It walks exactly the steps of the sparse engine (`fedimdb::train::run_steps`: the same
//! batches, order and learning rates), so both give the same model; the tests below pin
//! that. Candle lives here, in the trainer, so that no other binary compiles it.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use fedimdb::model::{Link, Model, doc_scale};
use fedimdb::train::{
    Correction, Drift, EpochStats, LocalOutcome, TrainConfig, run_steps, touched_buckets,
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

/// Logits `[batch, rows]`: an embedding bag per row (gather, scale, sum per document)
/// plus the row's bias; the same function as `Model::logits`. `weight` and `nb_ratio` are
/// `[rows, dim]`, `bias` `[rows]`.
fn forward(
    weight: &Tensor,
    bias: &Tensor,
    nb_ratio: &Tensor,
    batch: &SparseBatch,
) -> candle_core::Result<Tensor> {
    let rows = weight.dim(0)?;
    let contrib = (weight.index_select(&batch.indices, 1)?
        * nb_ratio.index_select(&batch.indices, 1)?)?
    .broadcast_mul(&batch.scale.unsqueeze(0)?)?;
    let sums = Tensor::zeros((rows, batch.docs), DType::F32, weight.device())?.index_add(
        &batch.doc_of,
        &contrib,
        1,
    )?;
    sums.broadcast_add(&bias.unsqueeze(1)?)?.t()
}

/// The batch's mean training loss for `link`, as the sparse engine's residuals
/// differentiate it (`Link::loss`, averaged over the batch).
fn batch_loss(link: Link, logits: &Tensor, labels: &[u8]) -> candle_core::Result<Tensor> {
    let device = logits.device();
    let (b, rows) = logits.dims2()?;
    match link {
        Link::Logistic => {
            let y: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
            candle_nn::loss::binary_cross_entropy_with_logit(
                &logits.squeeze(1)?,
                &Tensor::from_vec(y, b, device)?,
            )
        }
        Link::Softmax => {
            let y: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
            candle_nn::loss::cross_entropy(logits, &Tensor::from_vec(y, b, device)?)
        }
        Link::OneVsRest => {
            let y: Vec<f32> = labels
                .iter()
                .flat_map(|&l| (0..rows).map(move |k| f32::from(k == l as usize)))
                .collect();
            // The mean over batch and rows, times the rows: each row's own logistic loss.
            candle_nn::loss::binary_cross_entropy_with_logit(
                logits,
                &Tensor::from_vec(y, (b, rows), device)?,
            )? * rows as f64
        }
    }
}

/// Local training on `device`: the same steps as `fedimdb::train::train_sparse`, dense. The
/// correction enters the loss (`+ <d, w> + <d_b, b>`), so the optimizer's plain gradient
/// step is the corrected step.
pub fn train_candle(
    model: &mut Model,
    device: &Device,
    docs: &[Vec<u32>],
    labels: &[u8],
    cfg: &TrainConfig,
    correction: Option<&Correction>,
    on_epoch: impl FnMut(&EpochStats),
) -> candle_core::Result<LocalOutcome> {
    let (rows, dim) = (model.config.rows(), model.config.dim());
    let link = model.config.link();
    let weight = Var::from_tensor(&Tensor::from_slice(&model.weight, (rows, dim), device)?)?;
    let bias = Var::from_tensor(&Tensor::from_slice(&model.bias, rows, device)?)?;
    let ratio = Tensor::from_slice(&model.nb_ratio, (rows, dim), device)?;
    let (d, d_bias) = match correction {
        Some(c) => (
            Some(Tensor::from_slice(&c.weight, (rows, dim), device)?),
            Tensor::from_slice(&c.bias, rows, device)?,
        ),
        None => (None, Tensor::zeros(rows, DType::F32, device)?),
    };
    let mut sgd = candle_nn::SGD::new(vec![weight.clone(), bias.clone()], cfg.lr as f64)?;
    let mut grad_sum = Tensor::zeros((rows, dim), DType::F32, device)?;
    let mut grad_sum_bias = vec![0.0f64; rows];
    let steps = cfg.steps_for(docs.len());
    let epochs = run_steps(docs.len(), cfg, on_epoch, |t, batch_rows| {
        sgd.set_learning_rate(Drift::rate(cfg.lr, cfg.schedule, t as u64, steps) as f64);
        let batch_docs: Vec<&[u32]> = batch_rows.iter().map(|&i| docs[i].as_slice()).collect();
        let batch_labels: Vec<u8> = batch_rows.iter().map(|&i| labels[i]).collect();
        let batch = SparseBatch::new(&batch_docs, device)?;
        let logits = forward(weight.as_tensor(), bias.as_tensor(), &ratio, &batch)?;
        let data_loss = batch_loss(link, &logits, &batch_labels)?;
        // The data gradient alone, for the control variate, then the full step.
        let data_grads = data_loss.backward()?;
        if let Some(g) = data_grads.get(weight.as_tensor()) {
            grad_sum = (grad_sum.clone() + g)?;
        }
        if let Some(g) = data_grads.get(bias.as_tensor()) {
            for (s, g) in grad_sum_bias
                .iter_mut()
                .zip(g.to_device(&Device::Cpu)?.to_vec1::<f32>()?)
            {
                *s += g as f64;
            }
        }
        let mut loss = data_loss.clone();
        if let Some(d) = &d {
            loss = (loss + (weight.as_tensor() * d)?.sum_all()?)?;
            loss = (loss + (bias.as_tensor() * &d_bias)?.sum_all()?)?;
        }
        sgd.backward_step(&loss)?;
        let z = logits.to_device(&Device::Cpu)?.to_vec2::<f32>()?;
        let loss_sum: f64 = z
            .iter()
            .zip(&batch_labels)
            .map(|(z, &l)| link.loss(z, l))
            .sum();
        let correct = z
            .iter()
            .zip(&batch_labels)
            .filter(|&(z, &l)| link.predict(z) == l as usize)
            .count();
        Ok::<_, candle_core::Error>((loss_sum, correct))
    })?;
    model.weight = weight
        .as_tensor()
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    model.bias = bias.as_tensor().to_device(&Device::Cpu)?.to_vec1::<f32>()?;
    let k = steps.max(1) as f64;
    Ok(LocalOutcome {
        epochs,
        mean_grad: (grad_sum / k)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1()?,
        mean_grad_bias: grad_sum_bias.iter().map(|&g| (g / k) as f32).collect(),
        touched: touched_buckets(docs, dim),
    })
}

#[cfg(test)]
mod tests {
    use fedimdb::model::{ClassCounts, ModelConfig, Multiclass};
    use fedimdb::train::{Algorithm, Schedule, train_sparse};

    use super::*;

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Forty-two three-bucket documents over a 1,024-bucket table, `classes` classes said by
    /// bucket `i % classes` (two: half positive).
    fn toy(classes: usize, multiclass: Multiclass) -> (Model, Vec<Vec<u32>>, Vec<u8>) {
        let config = ModelConfig::with_buckets(10, 1).with_classes(classes, multiclass);
        let k = classes as u32;
        let docs: Vec<Vec<u32>> = (0..42u32)
            .map(|i| vec![i % k, 10 + i % 7, 30 + i % 5])
            .collect();
        let labels: Vec<u8> = (0..42).map(|i| (i % k) as u8).collect();
        let counts = ClassCounts::count(classes, config.dim(), &docs, &labels);
        (Model::from_counts(config, &counts), docs, labels)
    }

    /// The three kinds of model: two classes, three with either link.
    fn toys() -> [(Model, Vec<Vec<u32>>, Vec<u8>); 3] {
        [
            toy(2, Multiclass::Softmax),
            toy(3, Multiclass::Softmax),
            toy(3, Multiclass::OneVsRest),
        ]
    }

    #[test]
    fn the_forward_pass_is_the_models_logits() {
        for (mut model, docs, _) in toys() {
            model.weight = (0..model.weight.len())
                .map(|i| 0.5 + (i % 7) as f32 * 0.1)
                .collect();
            let dev = crate::device::for_tests();
            let (rows, dim) = (model.config.rows(), model.config.dim());
            let refs: Vec<&[u32]> = docs.iter().map(Vec::as_slice).collect();
            let logits = forward(
                &Tensor::from_slice(&model.weight, (rows, dim), &dev).unwrap(),
                &Tensor::from_slice(&model.bias, rows, &dev).unwrap(),
                &Tensor::from_slice(&model.nb_ratio, (rows, dim), &dev).unwrap(),
                &SparseBatch::new(&refs, &dev).unwrap(),
            )
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
            for (d, l) in docs.iter().zip(logits) {
                assert!(
                    max_diff(&model.logits(d), &l) < 1e-5,
                    "{:?} vs {l:?}",
                    model.logits(d)
                );
            }
        }
    }

    #[test]
    fn both_engines_train_to_the_same_model() {
        for (model, docs, labels) in toys() {
            both_engines_agree(model, docs, labels);
        }
    }

    fn both_engines_agree(model: Model, docs: Vec<Vec<u32>>, labels: Vec<u8>) {
        let tc = |steps, batch, schedule| TrainConfig {
            algorithm: Algorithm::Scaffold,
            steps,
            epochs: 0,
            batch,
            lr: 0.5,
            schedule,
            seed: 9,
        };
        let device = crate::device::for_tests();
        // Non-zero on buckets no document reads too, so the sparse engine's lazy path counts.
        let (rows, dim) = (model.config.rows(), model.config.dim());
        let correction = Correction {
            weight: (0..rows * dim)
                .map(|j| ((j % 13) as f32 - 6.0) * 1e-3)
                .collect(),
            bias: (0..rows).map(|r| 0.01 - 0.003 * r as f32).collect(),
        };
        for (cfg, corr) in [
            (tc(30, 4, Schedule::Constant), None),
            (tc(30, 4, Schedule::Linear), None),
            (tc(25, 3, Schedule::Linear), Some(&correction)),
        ] {
            let mut sparse = model.clone();
            let s1 = train_sparse(&mut sparse, &docs, &labels, &cfg, corr, |_| {});
            let mut dense = model.clone();
            let s2 = train_candle(&mut dense, &device, &docs, &labels, &cfg, corr, |_| {}).unwrap();
            let diff = max_diff(&dense.weight, &sparse.weight);
            assert!(diff < 1e-5, "engines differ by {diff} with {cfg:?}");
            assert!(max_diff(&dense.bias, &sparse.bias) < 1e-5);
            assert!(
                max_diff(&s1.mean_grad, &s2.mean_grad) < 1e-6,
                "control variates differ"
            );
            assert!(max_diff(&s1.mean_grad_bias, &s2.mean_grad_bias) < 1e-6);
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
