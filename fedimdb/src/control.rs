//! SCAFFOLD's control variates: what a worker's correction is made of, and where each part
//! lives on the volume.
//!
//! A worker's control variate `c_i` is its shard's mean gradient along its last round's
//! local steps (SCAFFOLD's "option II"); in the gradient round
//! ([`crate::train::GRADIENT_ROUND`], round 1), which takes no steps, the exact gradient at
//! the starting model. The global one, `c`, is their sample-weighted mean over *all* shards. In
//! round `R` worker `i` adds `c - c_i` to every local gradient, with both taken from the
//! same earlier model, so its steps follow the gradient of the whole objective instead of
//! its shard's alone.
//!
//! | part | computed by | stored in |
//! |------|-------------|-----------|
//! | `c_i` at zero weights, the biases at the prior | the aggregator from the worker's round-0 statistics ([`initial_gradient`]) | `round-0000/updates/shard-I.safetensors` (as counts) |
//! | `c_i` at the starting model | worker `i` in the gradient round, round 1 | `round-0001/updates/shard-I.safetensors` (`grad.*`) |
//! | `c_i` along round `R`'s local steps | worker `i` in round `R` ([`crate::train::LocalOutcome`]) | `round-R/updates/shard-I.safetensors` (`grad.*`) |
//! | `c` after round `R` | the aggregator: the mean over every shard's newest `c_i` | `round-R/control.safetensors`, which also names, per shard, the round that `c_i` came from |
//!
//! A shard missing from a round (under `--min-workers`) keeps its older `c_i` in the mean,
//! and its worker corrects with that same `c_i` next time, so `c` and every `c_i` always
//! come from one consistent set. Round 0's counts give every shard's gradient at zero
//! weights: the starting model's when it starts there (K classes), and for a two-class model
//! ([`crate::model::start_weight`]) an older point's, which only a shard missing from the
//! gradient round is counted with.

use anyhow::{Context, Result, ensure};

use crate::checkpoint::{
    CONTROL_BIAS, CONTROL_WEIGHT, Checkpoint, GRAD_BIAS, GRAD_WEIGHT, Header, Kind, STATS_SCALED,
    Values,
};
use crate::layout::Layout;
use crate::model::{ClassCounts, Link, Model, ModelConfig, doc_scale};
use crate::verify::load_update;

/// The mean gradient of the loss over a shard at the untrained model (zero weights, biases
/// `bias0`), from its counts: every review of class `c` has the logits `bias0` there, so its
/// residual is the same vector `e_c` ([`Link::residuals`]), and the gradient of row `r` at
/// bucket `j` is `ratio[r][j] / n * Σ_c e_c[r] * A_c[j]`, with `A_c` the class's sums of its
/// reviews' scales. Row-major like the model; one bias value per row.
pub fn initial_gradient(
    counts: &ClassCounts,
    ratio: &[f32],
    bias0: &[f32],
    link: Link,
) -> (Vec<f32>, Vec<f32>) {
    let at = InitialGradient::new(&counts.docs, bias0, link);
    let dim = counts.scaled[0].len();
    let mut weight = Vec::with_capacity(ratio.len());
    let mut scaled = vec![0.0; counts.classes()];
    for (r, row) in ratio.chunks_exact(dim).enumerate() {
        weight.extend(row.iter().enumerate().map(|(j, &q)| {
            for (a, c) in scaled.iter_mut().zip(&counts.scaled) {
                *a = c[j];
            }
            at.bucket(r, q, &scaled)
        }));
    }
    (weight, at.bias())
}

/// [`initial_gradient`] one bucket at a time, for dense and sparse counts alike.
struct InitialGradient {
    n: f64,
    /// Per class, its residual at the starting model (one value per row).
    residual: Vec<Vec<f32>>,
    /// Per row, the bias gradient.
    bias: Vec<f32>,
    link: Link,
}

impl InitialGradient {
    fn new(docs: &[u64], bias0: &[f32], link: Link) -> Self {
        let total: u64 = docs.iter().sum();
        let n = total.max(1) as f64;
        let rows = bias0.len();
        let residual: Vec<Vec<f32>> = (0..docs.len())
            .map(|c| {
                let mut e = vec![0.0; rows];
                link.residuals(bias0, c as u8, &mut e);
                e
            })
            .collect();
        let bias = if link == Link::Logistic {
            // sigmoid(bias0) minus the positive share, as this formula has always been.
            vec![(crate::model::sigmoid(bias0[0]) as f64 - docs[1] as f64 / n) as f32]
        } else {
            (0..rows)
                .map(|r| {
                    (docs
                        .iter()
                        .zip(&residual)
                        .map(|(&k, e)| k as f64 * e[r] as f64)
                        .sum::<f64>()
                        / n) as f32
                })
                .collect()
        };
        Self {
            n,
            residual,
            bias,
            link,
        }
    }

    /// Row `r` at a bucket with ratio `q` and per-class scale sums `a`.
    fn bucket(&self, r: usize, q: f32, a: &[f32]) -> f32 {
        if self.link == Link::Logistic {
            // e_0 = p, e_1 = p - 1: `p (A+ + A-) - A+`, as this formula has always been.
            let p = self.residual[0][0] as f64;
            let (a_neg, a_pos) = (a[0] as f64, a[1] as f64);
            return (q as f64 / self.n * (p * (a_pos + a_neg) - a_pos)) as f32;
        }
        let s: f64 = self
            .residual
            .iter()
            .zip(a)
            .map(|(e, &a)| e[r] as f64 * a as f64)
            .sum();
        (q as f64 / self.n * s) as f32
    }

    fn bias(&self) -> Vec<f32> {
        self.bias.clone()
    }
}

/// The values of a sparse vector (`index` ascending, `values`) at `buckets` (ascending),
/// zero where it has none.
pub fn values_at(index: &[u32], values: &[f32], buckets: &[u32]) -> Vec<f32> {
    let mut out = vec![0.0; buckets.len()];
    let mut k = 0;
    for (&j, &v) in index.iter().zip(values) {
        while k < buckets.len() && buckets[k] < j {
            k += 1;
        }
        if k == buckets.len() {
            break;
        }
        if buckets[k] == j {
            out[k] = v;
        }
    }
    out
}

/// The mean gradient of the loss over a shard's reviews at `model`, dense (zero outside the
/// shard's buckets), row-major, and one bias value per row.
pub fn shard_gradient(model: &Model, docs: &[Vec<u32>], labels: &[u8]) -> (Vec<f32>, Vec<f32>) {
    let (rows, dim) = (model.config.rows(), model.config.dim());
    let link = model.config.link();
    let mut g = crate::dense::zeros::<f64>(rows * dim);
    let mut g_bias = vec![0f64; rows];
    let mut e = vec![0f32; rows];
    for (d, &y) in docs.iter().zip(labels) {
        let s = doc_scale(d.len());
        link.residuals(&model.logits(d), y, &mut e);
        for r in 0..rows {
            for &j in d {
                let at = r * dim + j as usize;
                g[at] += e[r] as f64 * (model.nb_ratio[at] * s) as f64;
            }
            g_bias[r] += e[r] as f64;
        }
    }
    let n = docs.len().max(1) as f64;
    (
        g.into_iter().map(|x| (x / n) as f32).collect(),
        g_bias.into_iter().map(|x| (x / n) as f32).collect(),
    )
}

/// How many rounds a shard missing from a round still stands in the control variate's mean
/// with its newest gradient: one.
///
/// SCAFFOLD keeps an absent worker's control variate in the global one. That suits a worker
/// that misses a round: its gradient of the round before is a fair stand-in for the one it did
/// not send. A worker gone for longer leaves a gradient of a model the run has left, and its
/// share of the mean turns every other worker's correction towards that model: with one of 5
/// workers gone from round 1 on (its gradient the round-0 one, at zero weights), `--min-workers
/// 4` runs ended 1.9 points below their clean run on the test set (docs/BENCHMARKS.md). After
/// this many rounds the gradient leaves the mean, which is then over the shards it holds
/// ([`Control::holds`]); the shard's own gradient stays on the volume, and when the shard
/// comes back it trains one round without a correction (its `c_i` taken as `c`), so the
/// corrections of the round still sum to zero, and its fresh gradient joins the mean again.
pub const STAND_IN_ROUNDS: u32 = 1;

/// The global control variate of a round, with the round each shard's part came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Control {
    /// Row-major, like the model's weights; read in place from the file it was loaded from.
    pub weight: Values,
    pub bias: Vec<f32>,
    /// Per shard, the round whose update holds its `c_i` (0: its round-0 statistics).
    pub sources: Vec<u32>,
    /// Training reviews of each class: the prior `bias0` of the untrained model.
    pub class_samples: Vec<u64>,
}

impl Control {
    /// Whether the control variate of round `round` holds shard `shard`'s newest gradient in
    /// its mean: the shard sent it in that round or, missing, at most [`STAND_IN_ROUNDS`]
    /// before. The sources and the round decide it, so the trainers and the aggregator agree
    /// without another record.
    pub fn holds(&self, shard: usize, round: u32) -> bool {
        self.sources
            .get(shard)
            .is_some_and(|&source| round.saturating_sub(source) <= STAND_IN_ROUNDS)
    }

    /// The untrained model's biases, at which every `c_i` of round-0 statistics is taken.
    pub fn bias0(&self, link: Link) -> Vec<f32> {
        link.prior(&self.class_samples)
    }

    pub fn to_checkpoint(&self, config: ModelConfig, round: u32) -> Checkpoint {
        let mut header = Header::new(Kind::Control, config, round);
        header.samples = self.class_samples.iter().sum();
        header.class_samples = Some(self.class_samples.clone());
        header.sources = Some(self.sources.clone());
        Checkpoint::dense(
            Kind::Control,
            header,
            [
                (CONTROL_WEIGHT, self.weight.to_vec()),
                (CONTROL_BIAS, self.bias.clone()),
            ],
        )
    }

    pub fn from_checkpoint(mut ck: Checkpoint) -> Result<Self> {
        ck.holds(Kind::Control, "control variate")?;
        let sources = ck
            .header
            .sources
            .clone()
            .context("control file without `sources`")?;
        let class_samples = ck.header.class_samples()?;
        Ok(Self {
            bias: ck.take_tensor(CONTROL_BIAS)?,
            weight: ck
                .tensors
                .remove(CONTROL_WEIGHT)
                .context("control file without `control.weight`")?,
            sources,
            class_samples,
        })
    }
}

/// Shard `shard`'s control variate `c_i` as counted in `control`: from its update of round
/// `control.sources[shard]`, or from its round-0 statistics. Sparse: the buckets its reviews
/// read (`index`, ascending), its values there (row-major: `rows · index`), and its biases;
/// it is zero elsewhere. `ratio` is the model's (row-major) and `config` its config.
pub fn worker_control(
    layout: &Layout,
    control: &Control,
    shard: usize,
    ratio: &[f32],
    config: &ModelConfig,
) -> Result<(Vec<u32>, Vec<f32>, Vec<f32>)> {
    let source = *control
        .sources
        .get(shard)
        .with_context(|| format!("the control variate has no entry for shard {shard}"))?;
    if source == 0 {
        let (ck, _) = load_update(layout, 0, shard, Kind::Stats).with_context(|| {
            format!(
                "the statistics of shard {shard} (its first control variate) are missing or damaged"
            )
        })?;
        let link = config.link();
        let class_samples = ck.header.class_samples()?;
        let at = InitialGradient::new(&class_samples, &control.bias0(link), link);
        let (n, dim, classes) = (ck.index.len(), config.dim(), config.classes());
        let scaled = ck.tensor(STATS_SCALED);
        ensure!(
            scaled.len() == classes * n,
            "the statistics of shard {shard} hold {} classes, the model {classes}",
            scaled.len() / n.max(1)
        );
        let mut a = vec![0.0; classes];
        let mut values = Vec::with_capacity(config.rows() * n);
        for r in 0..config.rows() {
            for (k, &j) in ck.index.iter().enumerate() {
                for (c, a) in a.iter_mut().enumerate() {
                    *a = scaled[c * n + k];
                }
                values.push(at.bucket(r, ratio[r * dim + j as usize], &a));
            }
        }
        Ok((ck.index, values, at.bias()))
    } else {
        let (mut ck, _) = load_update(layout, source, shard, Kind::Update).with_context(|| {
            format!("the update of shard {shard} in round {source}, which holds its control variate, is missing or damaged")
        })?;
        let bias = ck.take_tensor(GRAD_BIAS)?;
        let values = ck.take_tensor(GRAD_WEIGHT)?;
        Ok((std::mem::take(&mut ck.index), values, bias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Multiclass;

    #[test]
    fn initial_gradient_from_counts_equals_a_pass_over_the_reviews() {
        let docs: Vec<Vec<u32>> = vec![
            vec![1, 2, 3],
            vec![2, 4],
            vec![5, 6, 7, 8],
            vec![1, 5],
            vec![3, 9, 10],
        ];

        // Two classes, and three with either link.
        for (config, labels) in [
            (ModelConfig::with_buckets(4, 1), vec![1, 1, 0, 0, 1]),
            (
                ModelConfig::with_buckets(4, 1).with_classes(3, Multiclass::Softmax),
                vec![2, 1, 0, 0, 1],
            ),
            (
                ModelConfig::with_buckets(4, 1).with_classes(3, Multiclass::OneVsRest),
                vec![2, 1, 0, 2, 1],
            ),
        ] {
            let (rows, dim) = (config.rows(), config.dim());
            let counts = ClassCounts::count(config.classes(), dim, &docs, &labels);
            let mut model = Model::from_counts(config, &counts);
            // The counts give the gradient at zero weights.
            model.weight.fill(0.0);
            model.nb_ratio = (0..rows * dim)
                .map(|j| ((j % 16) as f32 - 7.0) / 5.0)
                .collect();
            model.bias = model.bias.iter().map(|b| b + 0.3).collect();
            let link = config.link();
            let (g1, b1) = initial_gradient(&counts, &model.nb_ratio, &model.bias, link);
            let (g2, b2) = shard_gradient(&model, &docs, &labels);
            for (a, b) in g1.iter().zip(&g2) {
                assert!((a - b).abs() < 1e-6, "{link:?}: {g1:?} vs {g2:?}");
            }
            for (a, b) in b1.iter().zip(&b2) {
                assert!((a - b).abs() < 1e-6, "{link:?}: {b1:?} vs {b2:?}");
            }
            assert!(g1.iter().any(|&x| x != 0.0));
        }
    }

    #[test]
    fn values_at_picks_a_sparse_vector_at_other_buckets() {
        let (index, values) = ([2, 5, 9, 12], [0.2, 0.5, 0.9, 1.2]);
        assert_eq!(
            values_at(&index, &values, &[1, 2, 9, 10, 12, 40]),
            [0.0, 0.2, 0.9, 0.0, 1.2, 0.0]
        );
        assert_eq!(values_at(&index, &values, &[]), Vec::<f32>::new());
        assert_eq!(values_at(&[], &[], &[3]), [0.0]);
    }
}
