//! Local training: minibatch SGD on the logistic loss of [`crate::model`].
//!
//! Two engines compute the same update:
//!
//! * [`SparseSgd`] (CPU, the default): a review touches only its few hundred buckets, so
//!   the gradient of a batch is zero everywhere else. Updating just those buckets costs
//!   O(non-zeros) per step instead of O(2^22) for a dense gradient over the whole table —
//!   hundreds of times less work on a CPU.
//! * [`candle_step`] (any candle device, used for CUDA): the model's candle forward pass,
//!   autograd and a dense SGD step. On a GPU the dense update is cheap.
//!
//! A test checks that both give the same weights after a step.

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::model::{Model, SparseBatch, doc_scale, forward_with, sigmoid};

/// The defaults of local training, chosen by the sweep in `docs/BENCHMARKS.md` so that
/// `pipeline local --workers 5` reaches its accuracy targets.
pub mod defaults {
    /// Training rounds after the statistics round (the pipeline's default).
    pub const ROUNDS: u32 = 5;
    pub const EPOCHS: u32 = 8;
    pub const BATCH: usize = 1;
    pub const LR: f32 = 8.0;
}

/// Hyper-parameters of one worker's local training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: u32,
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
}

/// A worker's seed for one round: distinct per round and shard, fixed by the run's seed.
pub fn worker_seed(seed: u64, round: u32, shard: usize) -> u64 {
    seed ^ (round as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (shard as u64 + 1).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
}

/// What one epoch of local training measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    pub epoch: u32,
    /// Mean logistic loss over the epoch's examples, each measured just before its step.
    pub loss: f64,
    /// Fraction of the epoch's examples classified right just before their step.
    pub accuracy: f64,
    pub samples: usize,
    pub seconds: f64,
}

/// A deterministic permutation of `0..n` (Fisher–Yates driven by splitmix64).
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut state = seed ^ 0x5851_f42d_4c95_7f2d;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Logistic loss of one example from its logit, stable for large |z|.
pub fn logistic_loss(z: f32, label: u8) -> f64 {
    let z = z as f64;
    let y = label as f64;
    z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
}

/// Documents laid out for fast SGD: for each document, its buckets and their fixed input
/// values `nb_ratio[j] * scale` side by side (CSR layout). Precomputing the values means a
/// step reads only the weight table at random places instead of weight and ratio tables.
struct Csr {
    offsets: Vec<usize>,
    indices: Vec<u32>,
    values: Vec<f32>,
}

impl Csr {
    fn new<'a>(docs: impl IntoIterator<Item = &'a [u32]>, ratio: &[f32]) -> Self {
        let (mut offsets, mut indices, mut values) = (vec![0], Vec::new(), Vec::new());
        for doc in docs {
            let s = doc_scale(doc.len());
            indices.extend_from_slice(doc);
            values.extend(doc.iter().map(|&j| ratio[j as usize] * s));
            offsets.push(indices.len());
        }
        Self { offsets, indices, values }
    }

    fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.offsets[i], self.offsets[i + 1]);
        (&self.indices[a..b], &self.values[a..b])
    }
}

/// The epoch loop both engines share: each epoch visits the documents in a fresh seeded
/// order, in minibatches of `cfg.batch` row indices handed to `step`, which returns the
/// batch's summed loss and number correct.
fn run_epochs<E>(
    n_docs: usize,
    cfg: &TrainConfig,
    mut on_epoch: impl FnMut(&EpochStats),
    mut step: impl FnMut(&[usize]) -> Result<(f64, usize), E>,
) -> Result<Vec<EpochStats>, E> {
    let mut stats = Vec::new();
    for epoch in 0..cfg.epochs {
        let start = std::time::Instant::now();
        let order = shuffled(n_docs, cfg.seed.wrapping_add(epoch as u64));
        let (mut loss, mut correct) = (0.0, 0);
        for rows in order.chunks(cfg.batch) {
            let (l, c) = step(rows)?;
            loss += l;
            correct += c;
        }
        let n = n_docs.max(1) as f64;
        let s = EpochStats {
            epoch: epoch + 1,
            loss: loss / n,
            accuracy: correct as f64 / n,
            samples: n_docs,
            seconds: start.elapsed().as_secs_f64(),
        };
        on_epoch(&s);
        stats.push(s);
    }
    Ok(stats)
}

/// CPU training state: the model's tensors as plain vectors, updated sparsely.
pub struct SparseSgd {
    pub weight: Vec<f32>,
    pub bias: f32,
    ratio: Vec<f32>,
}

impl SparseSgd {
    pub fn new(model: &Model) -> candle_core::Result<Self> {
        Ok(Self {
            weight: model.weight.to_device(&Device::Cpu)?.to_vec1()?,
            bias: model.bias.to_device(&Device::Cpu)?.to_vec1::<f32>()?[0],
            ratio: model.nb_ratio.to_device(&Device::Cpu)?.to_vec1()?,
        })
    }

    /// Training state from the plain vectors of a model file, without copying them.
    pub fn from_parts(weight: Vec<f32>, bias: f32, ratio: Vec<f32>) -> Self {
        assert_eq!(weight.len(), ratio.len(), "weight and ratio have one value per bucket");
        Self { weight, bias, ratio }
    }

    /// One SGD step on a minibatch (see [`Self::step_rows`]).
    pub fn step(&mut self, docs: &[&[u32]], labels: &[u8], lr: f32) -> (f64, usize) {
        let csr = Csr::new(docs.iter().copied(), &self.ratio);
        let rows: Vec<usize> = (0..docs.len()).collect();
        self.step_rows(&csr, &rows, labels, lr)
    }

    /// One SGD step on the minibatch `rows` of `csr`: all logits are taken with the weights
    /// before the step, then each document's gradient is applied to its buckets only.
    /// Returns the batch's summed loss and number correct.
    fn step_rows(&mut self, csr: &Csr, rows: &[usize], labels: &[u8], lr: f32) -> (f64, usize) {
        let w = &mut self.weight;
        let mut logits = [0f32; 64];
        let mut logits_vec = Vec::new();
        let logits: &mut [f32] = if rows.len() <= 64 {
            &mut logits[..rows.len()]
        } else {
            logits_vec.resize(rows.len(), 0.0);
            &mut logits_vec
        };
        for (z, &i) in logits.iter_mut().zip(rows) {
            let (idx, val) = csr.row(i);
            *z = self.bias + idx.iter().zip(val).map(|(&j, &v)| w[j as usize] * v).sum::<f32>();
        }
        let inv_b = 1.0 / rows.len() as f32;
        let (mut loss, mut correct, mut grad_bias) = (0.0, 0, 0.0f32);
        for ((&i, &y), &z) in rows.iter().zip(labels).zip(logits.iter()) {
            loss += logistic_loss(z, y);
            correct += usize::from((z >= 0.0) == (y == 1));
            let g = (sigmoid(z) - y as f32) * inv_b;
            grad_bias += g;
            let step = lr * g;
            let (idx, val) = csr.row(i);
            for (&j, &v) in idx.iter().zip(val) {
                w[j as usize] -= step * v;
            }
        }
        self.bias -= lr * grad_bias;
        (loss, correct)
    }

    /// Runs `epochs` epochs of minibatch SGD over the documents, shuffled anew each epoch
    /// from the seed; calls `on_epoch` after each.
    pub fn train(
        &mut self,
        docs: &[Vec<u32>],
        labels: &[u8],
        cfg: &TrainConfig,
        on_epoch: impl FnMut(&EpochStats),
    ) -> Vec<EpochStats> {
        let csr = Csr::new(docs.iter().map(Vec::as_slice), &self.ratio);
        let mut batch_labels = Vec::with_capacity(cfg.batch);
        let Ok(stats) = run_epochs(docs.len(), cfg, on_epoch, |rows| {
            batch_labels.clear();
            batch_labels.extend(rows.iter().map(|&i| labels[i]));
            Ok::<_, std::convert::Infallible>(self.step_rows(&csr, rows, &batch_labels, cfg.lr))
        });
        stats
    }

    /// Writes the trained weights into the model's tensors.
    pub fn write_into(&self, model: &mut Model) -> candle_core::Result<()> {
        let device = model.weight.device().clone();
        model.weight = Tensor::from_slice(&self.weight, self.weight.len(), &device)?;
        model.bias = Tensor::new(&[self.bias], &device)?;
        Ok(())
    }
}

/// One dense SGD step with candle autograd on the model's own device: the same update as
/// [`SparseSgd::step`], computed the way a GPU likes it.
pub fn candle_step(weight: &Var, bias: &Var, nb_ratio: &Tensor, docs: &[&[u32]], labels: &[u8], lr: f32) -> candle_core::Result<(f64, usize)> {
    let device = weight.device();
    let batch = SparseBatch::new(docs)?;
    let logits = forward_with(weight.as_tensor(), bias.as_tensor(), nb_ratio, &batch)?;
    let y: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
    let y = Tensor::from_vec(y, labels.len(), device)?;
    let loss = candle_nn::loss::binary_cross_entropy_with_logit(&logits, &y)?;
    let grads = loss.backward()?;
    for var in [weight, bias] {
        if let Some(g) = grads.get(var.as_tensor()) {
            var.set(&(var.as_tensor() - (g * lr as f64)?)?)?;
        }
    }
    let z = logits.to_device(&Device::Cpu)?.to_vec1::<f32>()?;
    let loss_sum: f64 = z.iter().zip(labels).map(|(&z, &l)| logistic_loss(z, l)).sum();
    let correct = z.iter().zip(labels).filter(|&(&z, &l)| (z >= 0.0) == (l == 1)).count();
    Ok((loss_sum, correct))
}

/// Local training with candle autograd on `device` (the CUDA path): the same epochs,
/// batches and order as [`SparseSgd::train`], with dense steps.
pub fn train_candle(
    model: &mut Model,
    docs: &[Vec<u32>],
    labels: &[u8],
    cfg: &TrainConfig,
    device: &Device,
    on_epoch: impl FnMut(&EpochStats),
) -> candle_core::Result<Vec<EpochStats>> {
    let weight = Var::from_tensor(&model.weight.to_device(device)?)?;
    let bias = Var::from_tensor(&model.bias.to_device(device)?)?;
    let ratio = model.nb_ratio.to_device(device)?;
    let stats = run_epochs(docs.len(), cfg, on_epoch, |rows| {
        let batch_docs: Vec<&[u32]> = rows.iter().map(|&i| docs[i].as_slice()).collect();
        let batch_labels: Vec<u8> = rows.iter().map(|&i| labels[i]).collect();
        candle_step(&weight, &bias, &ratio, &batch_docs, &batch_labels, cfg.lr)
    })?;
    model.weight = weight.as_tensor().to_device(&Device::Cpu)?;
    model.bias = bias.as_tensor().to_device(&Device::Cpu)?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::featurize::FeaturizerConfig;
    use crate::model::{ClassCounts, ModelConfig};

    #[test]
    fn sparse_step_equals_candle_autograd_step() {
        let cfg = ModelConfig { featurizer: FeaturizerConfig { hash_bits: 10, max_ngram: 1 }, nb_smoothing: 1.0 };
        let docs: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![2, 4, 9], vec![5, 6, 7, 8], vec![1, 5], vec![3, 9]];
        let labels = vec![1, 1, 0, 0, 1];
        let model = Model::from_counts(cfg, &ClassCounts::count(cfg.dim(), &docs[..4], &labels[..4])).unwrap();
        let refs: Vec<&[u32]> = docs.iter().map(|d| d.as_slice()).collect();

        let mut sparse = SparseSgd::new(&model).unwrap();
        let (l1, c1) = sparse.step(&refs, &labels, 0.7);

        let w = Var::from_tensor(&model.weight).unwrap();
        let b = Var::from_tensor(&model.bias).unwrap();
        let (l2, c2) = candle_step(&w, &b, &model.nb_ratio, &refs, &labels, 0.7).unwrap();

        assert!((l1 - l2).abs() < 1e-5 && c1 == c2, "{l1} {l2} {c1} {c2}");
        let dense_w = w.as_tensor().to_vec1::<f32>().unwrap();
        let max_diff = dense_w.iter().zip(&sparse.weight).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(max_diff < 1e-6, "weights differ by {max_diff}");
        assert!(dense_w.iter().any(|&x| x != 1.0), "the step changed nothing");
        let db = b.as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((db - sparse.bias).abs() < 1e-6);
    }

    #[test]
    fn both_engines_train_to_the_same_model() {
        let cfg = ModelConfig { featurizer: FeaturizerConfig { hash_bits: 10, max_ngram: 1 }, nb_smoothing: 1.0 };
        let docs: Vec<Vec<u32>> = (0..40u32).map(|i| vec![i % 2, 10 + i % 7, 30 + i % 5]).collect();
        let labels: Vec<u8> = (0..40).map(|i| (i % 2) as u8).collect();
        let model = Model::from_counts(cfg, &ClassCounts::count(cfg.dim(), &docs, &labels)).unwrap();
        let tc = TrainConfig { epochs: 3, batch: 4, lr: 0.5, seed: 9 };
        let mut sparse = SparseSgd::new(&model).unwrap();
        let s1 = sparse.train(&docs, &labels, &tc, |_| {});
        let mut dense = model.clone();
        let s2 = train_candle(&mut dense, &docs, &labels, &tc, &Device::Cpu, |_| {}).unwrap();
        let w = dense.weight.to_vec1::<f32>().unwrap();
        let diff = w.iter().zip(&sparse.weight).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-5, "engines differ by {diff}");
        for (a, b) in s1.iter().zip(&s2) {
            assert!((a.loss - b.loss).abs() < 1e-5 && a.accuracy == b.accuracy, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn training_lowers_the_loss() {
        let cfg = ModelConfig { featurizer: FeaturizerConfig { hash_bits: 10, max_ngram: 1 }, nb_smoothing: 1.0 };
        let docs: Vec<Vec<u32>> = (0..200u32).map(|i| vec![i % 2, 10 + i % 17, 40 + i % 5]).collect();
        let labels: Vec<u8> = (0..200).map(|i| (i % 2) as u8).collect();
        let model = Model::from_counts(cfg, &ClassCounts::count(cfg.dim(), &docs, &labels)).unwrap();
        let mut sgd = SparseSgd::new(&model).unwrap();
        let tc = TrainConfig { epochs: 5, batch: 8, lr: 1.0, seed: 1 };
        let stats = sgd.train(&docs, &labels, &tc, |_| {});
        assert!(stats.last().unwrap().loss < stats[0].loss * 0.8, "{stats:?}");
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let a = shuffled(100, 7);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, shuffled(100, 7));
        assert_ne!(a, shuffled(100, 8));
    }
}
