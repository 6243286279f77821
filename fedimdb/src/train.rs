//! Local training: minibatch SGD on the logistic loss of [`crate::model`],
//! with SCAFFOLD's drift correction.
//!
//! Two engines compute the same update:
//!
//! * [`train_sparse`] (CPU, the default): a review touches only its few hundred buckets, so
//!   the gradient of a batch is zero everywhere else. Updating just those buckets costs
//!   O(non-zeros) per step instead of O(2^22) for a dense gradient over the whole table —
//!   hundreds of times less work on a CPU.
//! * the trainer's candle engine (`trainer/src/candle_engine.rs`, any candle device, used
//!   for CUDA): the model's candle forward pass, autograd and candle-nn's SGD, dense. On a
//!   GPU the dense update is cheap. It lives in the trainer so that no other binary compiles
//!   candle, and walks the same steps through [`run_steps`].
//!
//! Both train a [`Model`] in place; tests pin them to the same weights and control variates.

use serde::{Deserialize, Serialize};

pub use crate::model::logistic_loss;
use crate::model::{Link, Model, doc_scale};
use crate::prefetch;

/// The defaults of federated training, shared by the trainer, the aggregator and both
/// pipelines. Chosen on a validation split held out of the training reviews over every
/// worker count and partition of the heterogeneity grid (docs/BENCHMARKS.md), not on the
/// test set.
pub mod defaults {
    use super::{Algorithm, Schedule};
    /// The run's seed (copier partition, worker shuffles).
    pub const SEED: u64 = 42;
    /// Workers (shards) of a run.
    pub const WORKERS: usize = 5;
    /// Rounds after the statistics round. With SCAFFOLD the first is the gradient round
    /// ([`super::GRADIENT_ROUND`]), so the default trains five.
    pub const ROUNDS: u32 = 6;
    /// SGD steps each worker takes per round, whatever the size of its shard.
    pub const STEPS: u64 = 20_000;
    pub const BATCH: usize = 1;
    pub const LR: f32 = 16.0;
    /// The learning rate of a K-class model (K > 2): its K rows take larger steps on the
    /// sharper naive-Bayes ratios of K-class data (see `MULTICLASS_NB_SMOOTHING` in
    /// `crate::model`), and on IMDB's rating task 16 overfits in the first round.
    pub const LR_MULTICLASS: f32 = 2.0;

    /// The default learning rate for data with `classes` classes.
    pub fn lr(classes: usize) -> f32 {
        if classes > 2 { LR_MULTICLASS } else { LR }
    }
    pub const SCHEDULE: Schedule = Schedule::Linear;
    pub const ALGORITHM: Algorithm = Algorithm::Scaffold;
}

/// How workers correct for the drift of their local training (see the README's "How it
/// learns").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Plain local SGD, averaged: each worker drifts toward its own shard's optimum.
    #[value(name = "fedavg")]
    FedAvg,
    /// SCAFFOLD (Karimireddy et al., 2020): every local gradient is corrected by the
    /// difference between the global and the worker's control variate (mean gradients of
    /// the last round), so local steps follow the global objective.
    #[default]
    Scaffold,
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Algorithm::FedAvg => "fedavg",
            Algorithm::Scaffold => "scaffold",
        })
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
        })
    }
}

/// The training flags every binary that starts or runs a worker takes (`trainer`, `pipeline
/// local`, `pipeline k8s`): declared, defaulted and validated here once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
pub struct TrainArgs {
    /// How workers correct the drift of local training: `scaffold` (control variates) or
    /// `fedavg` (none).
    #[arg(long, value_enum, default_value_t = defaults::ALGORITHM)]
    pub algorithm: Algorithm,
    /// SGD steps each worker takes per round, whatever the size of its shard.
    #[arg(long, default_value_t = defaults::STEPS)]
    pub steps: u64,
    /// Passes over the shard per round instead of a step budget (replaces --steps).
    #[arg(long, visible_alias = "epoch")]
    pub epochs: Option<u32>,
    /// Reviews per SGD step.
    #[arg(long, default_value_t = defaults::BATCH)]
    pub batch: usize,
    /// SGD learning rate at the start of each round (default: 16 for two classes, 2 for
    /// more).
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f32>,
    /// Learning rate over a round: `linear` (down to zero) or `constant`.
    #[arg(long, value_enum, default_value_t = defaults::SCHEDULE)]
    pub schedule: Schedule,
    /// Seed of every random choice (shards, shuffles); the same seed gives the same bytes.
    #[arg(long, default_value_t = defaults::SEED)]
    pub seed: u64,
}

impl Default for TrainArgs {
    fn default() -> Self {
        Self {
            algorithm: defaults::ALGORITHM,
            steps: defaults::STEPS,
            epochs: None,
            batch: defaults::BATCH,
            lr: None,
            schedule: defaults::SCHEDULE,
            seed: defaults::SEED,
        }
    }
}

impl TrainArgs {
    /// Checks the values; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.steps == 0 {
            return Err("--steps must be at least 1".into());
        }
        if self.steps > u32::MAX as u64 {
            return Err(format!("--steps must be at most {}", u32::MAX));
        }
        if self.epochs == Some(0) {
            return Err("--epochs must be at least 1".into());
        }
        if self.batch == 0 {
            return Err("--batch must be at least 1".into());
        }
        if let Some(lr) = self.lr
            && !(lr > 0.0 && lr.is_finite())
        {
            return Err(format!("--lr must be a positive number, got {lr}"));
        }
        Ok(())
    }

    /// Worker `shard`'s training config in `round`, for data with `classes` classes: no
    /// steps in SCAFFOLD's gradient round ([`GRADIENT_ROUND`]).
    pub fn config(&self, round: u32, shard: usize, classes: usize) -> TrainConfig {
        let gradient = self.is_gradient_round(round);
        TrainConfig {
            algorithm: self.algorithm,
            steps: if self.epochs.is_some() || gradient {
                0
            } else {
                self.steps
            },
            epochs: if gradient {
                0
            } else {
                self.epochs.unwrap_or(0)
            },
            batch: self.batch,
            lr: self.lr.unwrap_or_else(|| defaults::lr(classes)),
            schedule: self.schedule,
            seed: worker_seed(self.seed, round, shard),
        }
    }

    /// Whether `round` is SCAFFOLD's gradient round under these flags ([`GRADIENT_ROUND`]).
    pub fn is_gradient_round(&self, round: u32) -> bool {
        self.algorithm == Algorithm::Scaffold && round == GRADIENT_ROUND
    }

    /// The same flags as command-line arguments, for a worker process or a Job.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec!["--algorithm".into(), self.algorithm.to_string()];
        match self.epochs {
            Some(e) => a.extend(["--epochs".into(), e.to_string()]),
            None => a.extend(["--steps".into(), self.steps.to_string()]),
        }
        a.extend(["--batch".into(), self.batch.to_string()]);
        if let Some(lr) = self.lr {
            a.extend(["--lr".into(), lr.to_string()]);
        }
        a.extend([
            "--schedule".into(),
            self.schedule.to_string(),
            "--seed".into(),
            self.seed.to_string(),
        ]);
        a
    }
}

/// SCAFFOLD's gradient round: round 1 takes no local steps. Each worker writes its shard's
/// exact mean gradient at the starting model (its first control variate) and the model stays
/// where round 0 put it. The gradient there depends on the global naive-Bayes ratios, which
/// exist only once round 0 is aggregated, so it takes a round of its own; without it the
/// first training round would run uncorrected, or corrected by gradients taken elsewhere, and
/// skewed shards pull apart (docs/BENCHMARKS.md, "the naive-Bayes start").
pub const GRADIENT_ROUND: u32 = 1;

/// Hyper-parameters of one worker's local training in one round. Recorded in update
/// headers and reports; the fields are in alphabetical order, the order in which update
/// files have always held them, so files stay byte for byte what they were.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub algorithm: Algorithm,
    pub batch: usize,
    /// Passes over the shard per round, when `steps` is 0.
    pub epochs: u32,
    /// The learning rate at the start of the round.
    pub lr: f32,
    pub schedule: Schedule,
    pub seed: u64,
    /// SGD steps (minibatches) per round, whatever the shard's size; 0: `epochs` passes
    /// (both 0: none, the gradient round).
    pub steps: u64,
}

impl TrainConfig {
    /// A round of no steps at all, whatever the shard: the gradient round's config, as
    /// [`TrainArgs::config`] makes it and update reports record it.
    pub fn takes_no_steps(&self) -> bool {
        self.steps == 0 && self.epochs == 0
    }

    /// The number of SGD steps this config takes on a shard of `n` reviews.
    pub fn steps_for(&self, n: usize) -> u64 {
        if self.steps > 0 {
            self.steps
        } else {
            self.epochs as u64 * n.div_ceil(self.batch.max(1)) as u64
        }
    }
}

/// A worker's seed for one round: distinct per round and shard, fixed by the run's seed.
pub fn worker_seed(seed: u64, round: u32, shard: usize) -> u64 {
    seed ^ (round as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (shard as u64 + 1).wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
}

/// What one pass over the shard measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    pub epoch: u32,
    /// Mean logistic loss over the pass's examples, each measured just before its step.
    pub loss: f64,
    /// Fraction of the pass's examples classified right just before their step.
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

/// SCAFFOLD's drift correction for one worker's round: `c - c_i`, the global control
/// variate minus the worker's own, added to every local gradient: one value per row and
/// bucket (row-major; buckets of the model for [`train_sparse`], of the shard's own buckets
/// for [`train_local`]), plus one per row for the bias.
#[derive(Debug, Clone, PartialEq)]
pub struct Correction {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// What a round of local work returns besides the trained weights.
#[derive(Debug, Clone)]
pub struct LocalOutcome {
    /// One entry per pass over the shard (the last pass may be partial).
    pub epochs: Vec<EpochStats>,
    /// The mean data-loss gradient along the local path: SCAFFOLD's next control variate
    /// of the worker (its "option II"), zero outside the buckets the shard touches;
    /// row-major like the weights.
    pub mean_grad: Vec<f32>,
    pub mean_grad_bias: Vec<f32>,
    /// The buckets the shard's reviews read, ascending ([`touched_buckets`]): what a sparse
    /// update holds.
    pub touched: Vec<u32>,
}

/// The learning rate over a round's steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// `lr` at every step.
    Constant,
    /// From `lr` down to zero over the round's steps, so the round ends on a quiet iterate
    /// instead of wherever the last noisy steps left it.
    #[default]
    Linear,
}

/// How a weight that no review reads moves over a round: each step applies
/// `w <- w - lr_t * d` (the constant correction `d`), so over the round it moves by
/// `-d * S_T`, with `S_T = lr_0 + … + lr_(T-1)`. A worker's sparse update leaves out the
/// buckets its shard never touches; the aggregator rebuilds them with this, from the global
/// model and the worker's correction, to the same bits as [`train_local`] moved them (both
/// add the rates up in step order, in f64).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Drift {
    /// `S_T`, the round's learning rates summed.
    lr_sum: f64,
}

impl Drift {
    /// The drift of a round of `steps` steps.
    pub fn new(steps: u64, lr: f32, schedule: Schedule) -> Self {
        let mut lr_sum = 0.0f64;
        for t in 0..steps {
            lr_sum += Self::rate(lr, schedule, t, steps) as f64;
        }
        Self { lr_sum }
    }

    /// The learning rate of step `t` of `steps`.
    pub fn rate(lr: f32, schedule: Schedule, t: u64, steps: u64) -> f32 {
        match schedule {
            Schedule::Constant => lr,
            Schedule::Linear => lr * (1.0 - t as f32 / steps as f32),
        }
    }

    /// `w` at the end of the round, not read during it, with correction `d`.
    #[inline]
    pub fn apply(&self, w: f32, d: f32) -> f32 {
        (w as f64 - d as f64 * self.lr_sum) as f32
    }
}

/// Documents laid out for fast SGD: for each document, its buckets and their fixed input
/// values `nb_ratio[r][j] * scale` side by side (CSR layout; with R rows, a non-zero's R
/// values are adjacent). Precomputing the values means a step reads only the weight table at
/// random places instead of weight and ratio tables.
struct Csr {
    rows: usize,
    offsets: Vec<usize>,
    indices: Vec<u32>,
    /// `[non-zeros · rows]`.
    values: Vec<f32>,
}

impl Csr {
    /// `docs` in model buckets, stored in the shard's numbering `buckets`; `ratio` is
    /// bucket-major in that numbering: `ratio[j * rows + r]`.
    fn new(docs: &[Vec<u32>], buckets: &ShardBuckets, ratio: &[f32], rows: usize) -> Self {
        let nnz = docs.iter().map(Vec::len).sum();
        let mut offsets = Vec::with_capacity(docs.len() + 1);
        let (mut indices, mut values) = (Vec::with_capacity(nnz), Vec::with_capacity(nnz * rows));
        offsets.push(0);
        for doc in docs {
            let s = doc_scale(doc.len());
            let first = indices.len();
            indices.extend(doc.iter().map(|&j| buckets.position(j)));
            if rows == 1 {
                // Two classes, the common case. The reviews' buckets are renumbered first
                // and their values read in a loop of their own: the reads of `ratio`, at
                // scattered places, then overlap, where a loop over rows around each value
                // waited on every read (15% of a trainer's time before).
                let row = &indices[first..];
                values.extend(row.iter().enumerate().map(|(p, &l)| {
                    prefetch::ahead(ratio, row, p, 1);
                    ratio[l as usize] * s
                }));
            } else {
                for &l in &indices[first..] {
                    let at = l as usize * rows;
                    values.extend(ratio[at..at + rows].iter().map(|r| r * s));
                }
            }
            offsets.push(indices.len());
        }
        Self {
            rows,
            offsets,
            indices,
            values,
        }
    }

    fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.offsets[i], self.offsets[i + 1]);
        (
            &self.indices[a..b],
            &self.values[a * self.rows..b * self.rows],
        )
    }
}

/// The sorted distinct buckets of a set of documents: where a worker's update can differ
/// from what the aggregator predicts for it ([`Drift`]).
pub fn touched_buckets(docs: &[Vec<u32>], dim: usize) -> Vec<u32> {
    let mut seen = vec![false; dim];
    for d in docs {
        for &j in d {
            seen[j as usize] = true;
        }
    }
    seen.iter()
        .enumerate()
        .filter(|(_, s)| **s)
        .map(|(j, _)| j as u32)
        .collect()
}

/// The step loop both engines share: `cfg.steps_for(n)` minibatches of `cfg.batch` row
/// indices, visiting the documents in a fresh seeded order each pass, handed to `step`,
/// which returns the batch's summed loss and number correct.
pub fn run_steps<E>(
    n_docs: usize,
    cfg: &TrainConfig,
    mut on_epoch: impl FnMut(&EpochStats),
    mut step: impl FnMut(u32, &[usize]) -> Result<(f64, usize), E>,
) -> Result<Vec<EpochStats>, E> {
    let steps = cfg.steps_for(n_docs);
    let (mut t, mut pass) = (0u64, 0u32);
    let mut stats = Vec::new();
    while t < steps && n_docs > 0 {
        let start = std::time::Instant::now();
        let order = shuffled(n_docs, cfg.seed.wrapping_add(pass as u64));
        let (mut loss, mut correct, mut seen) = (0.0, 0, 0);
        for rows in order.chunks(cfg.batch.max(1)) {
            if t == steps {
                break;
            }
            let (l, c) = step(t as u32, rows)?;
            loss += l;
            correct += c;
            seen += rows.len();
            t += 1;
        }
        pass += 1;
        let s = EpochStats {
            epoch: pass,
            loss: loss / seen.max(1) as f64,
            accuracy: correct as f64 / seen.max(1) as f64,
            samples: seen,
            seconds: start.elapsed().as_secs_f64(),
        };
        on_epoch(&s);
        stats.push(s);
    }
    Ok(stats)
}

/// A shard's reviews over its own buckets: the buckets its reviews read (ascending) and the
/// reviews renumbered onto them, with their fixed input values `ratio · scale`. A worker's
/// round only ever reads and changes these buckets, so its tables are this small: a few
/// percent of the model's for a small shard, read in cache instead of at random places of
/// 4M-entry tables.
pub struct LocalShard {
    /// Model bucket of each local one, ascending: what a sparse update's index holds.
    pub touched: Vec<u32>,
    /// The model's buckets per row.
    dim: usize,
    csr: Csr,
}

impl LocalShard {
    /// `docs` are model buckets; `nb_ratio` is the model's (`rows` rows of `dim`, row-major).
    pub fn new(docs: &[Vec<u32>], nb_ratio: &[f32], rows: usize) -> Self {
        let dim = nb_ratio.len() / rows;
        let buckets = ShardBuckets::new(docs, dim);
        let n = buckets.len();
        let ratio = interleave(&gather_rows(buckets.touched(), nb_ratio, dim), rows, n);
        let csr = Csr::new(docs, &buckets, &ratio, rows);
        Self {
            touched: buckets.into_touched(),
            dim,
            csr,
        }
    }

    /// The values of a model-wide row-major table (`rows · dim`) at the shard's buckets,
    /// row-major (`rows · touched`).
    pub fn gather(&self, table: &[f32]) -> Vec<f32> {
        gather_rows(&self.touched, table, self.dim)
    }

    /// Number of reviews.
    pub fn len(&self) -> usize {
        self.csr.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A shard's own numbering of the model's buckets: the buckets its reviews read, ascending
/// ([`Self::touched`]), and each one's position in that list ([`Self::position`]).
///
/// Which buckets are read is kept as one bit each (0.5 MB for 2^22 buckets, so it stays in
/// cache), and before each word of bits the number of buckets read below it: a bucket's
/// position is that count plus the bits set below it in its word. A model-sized table of
/// positions would fault in 16 MB of fresh pages per trainer, and a renumbered copy of every
/// review as many bytes as the reviews' buckets, so callers renumber as they read.
pub struct ShardBuckets {
    read: Vec<u64>,
    below: Vec<u32>,
    touched: Vec<u32>,
}

impl ShardBuckets {
    /// The numbering of the buckets that `docs` (model buckets below `dim`) read.
    pub fn new(docs: &[Vec<u32>], dim: usize) -> Self {
        let mut read = vec![0u64; dim.div_ceil(64)];
        for d in docs {
            for &j in d {
                read[j as usize / 64] |= 1 << (j % 64);
            }
        }
        let mut below = Vec::with_capacity(read.len());
        let mut touched = Vec::new();
        for (w, &bits) in read.iter().enumerate() {
            below.push(touched.len() as u32);
            let mut rest = bits;
            while rest != 0 {
                touched.push((w * 64) as u32 + rest.trailing_zeros());
                rest &= rest - 1;
            }
        }
        Self {
            read,
            below,
            touched,
        }
    }

    /// The position of bucket `j`, which the reviews read, among [`Self::touched`].
    pub fn position(&self, j: u32) -> u32 {
        let (w, bit) = (j as usize / 64, j % 64);
        self.below[w] + (self.read[w] & ((1u64 << bit) - 1)).count_ones()
    }

    /// The buckets read, ascending.
    pub fn into_touched(self) -> Vec<u32> {
        self.touched
    }

    /// How many buckets are read.
    pub fn len(&self) -> usize {
        self.touched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.touched.is_empty()
    }

    /// The buckets read, ascending.
    pub fn touched(&self) -> &[u32] {
        &self.touched
    }
}

/// A row-major table of rows of `dim` at `buckets`, row-major.
fn gather_rows(buckets: &[u32], table: &[f32], dim: usize) -> Vec<f32> {
    table
        .chunks_exact(dim)
        .flat_map(|row| buckets.iter().map(move |&j| row[j as usize]))
        .collect()
}

/// Row-major `[rows · n]` to bucket-major `[n · rows]` (the same values for one row).
fn interleave(v: &[f32], rows: usize, n: usize) -> Vec<f32> {
    if rows == 1 {
        return v.to_vec();
    }
    let mut out = vec![0.0; v.len()];
    for r in 0..rows {
        for j in 0..n {
            out[j * rows + r] = v[r * n + j];
        }
    }
    out
}

/// What a round of [`train_local`] returns besides the trained weights.
#[derive(Debug, Clone)]
pub struct LocalRound {
    /// One entry per pass over the shard (the last pass may be partial).
    pub epochs: Vec<EpochStats>,
    /// The mean data-loss gradient along the local path at the shard's buckets (row-major,
    /// like the weights): SCAFFOLD's next control variate of the worker (its "option II").
    pub mean_grad: Vec<f32>,
    pub mean_grad_bias: Vec<f32>,
    /// How a bucket no review read moved over the round.
    pub drift: Drift,
}

/// One round of local work on the shard's own buckets: minibatch SGD on the loss of `link`
/// ([`Link::loss`]: logistic for two classes, cross-entropy or one-vs-rest for K), with
/// every gradient corrected by `correction` (SCAFFOLD) when given. `weight` and
/// `correction.weight` hold one value per row and bucket of `shard.touched` (row-major),
/// `bias` one per row. Step `t` is
///
/// ```text
/// w <- w - lr_t * (grad_batch(w) + d)        b <- b - lr_t * (grad_batch(b) + d_b)
/// ```
///
/// with `lr_t` from the schedule. The correction `d` is the same at every step, so it is
/// taken out of the loop by a change of variables: with `S_t = lr_0 + … + lr_(t-1)` and
/// `u = w + d * S_t`, the step becomes plain SGD on `u` (`u <- u - lr_t * grad_batch`), and
/// a review's logit is `b + <u, x> - S_t * <d, x>`, where `<d, x>` is fixed for the round
/// and computed once per review. A step therefore costs what an uncorrected one does,
/// O(non-zeros · rows); `w = u - d * S_T` at the end.
///
/// The mean data gradient along the path (the worker's next control variate) is
/// `Σ_t g_t x_(i_t) / T`: the loop adds up each review's residuals `g_t` (one per row) and
/// the sum over the shard is taken once, at the end. A round of no steps (the gradient
/// round, [`GRADIENT_ROUND`]) has a path of one point: its mean gradient is the shard's
/// exact mean gradient at the model it was given, and the weights do not move.
#[allow(clippy::too_many_arguments)]
pub fn train_local(
    shard: &LocalShard,
    weight: &mut [f32],
    bias: &mut [f32],
    labels: &[u8],
    link: Link,
    cfg: &TrainConfig,
    correction: Option<&Correction>,
    on_epoch: impl FnMut(&EpochStats),
) -> LocalRound {
    // One row (two classes) is the hot case: with the row count a constant the compiler
    // drops the inner loops over rows, and a step costs what it did before K classes.
    if bias.len() == 1 {
        train_rows::<1>(shard, weight, bias, labels, link, cfg, correction, on_epoch)
    } else {
        train_rows::<0>(shard, weight, bias, labels, link, cfg, correction, on_epoch)
    }
}

/// [`train_local`] for `ROWS` rows (0: as many as `bias` holds).
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn train_rows<const ROWS: usize>(
    shard: &LocalShard,
    weight: &mut [f32],
    bias: &mut [f32],
    labels: &[u8],
    link: Link,
    cfg: &TrainConfig,
    correction: Option<&Correction>,
    on_epoch: impl FnMut(&EpochStats),
) -> LocalRound {
    let rows = if ROWS > 0 { ROWS } else { bias.len() };
    assert_eq!(
        rows, shard.csr.rows,
        "one bias per row of the shard's ratios"
    );
    let n = shard.touched.len();
    assert_eq!(
        weight.len(),
        rows * n,
        "one weight per row and bucket of the shard"
    );
    let n_docs = shard.len();
    let steps = cfg.steps_for(n_docs);
    let csr = &shard.csr;
    let (d, d_bias) = match correction {
        Some(c) => {
            assert_eq!(
                c.weight.len(),
                rows * n,
                "one correction per row and bucket"
            );
            (interleave(&c.weight, rows, n), c.bias.clone())
        }
        None => (Vec::new(), vec![0.0; rows]),
    };
    let corrected = !d.is_empty();
    // `<d, x>` of every review and row (zero without a correction).
    let mut dx = vec![0.0f64; n_docs * rows];
    if corrected {
        for i in 0..n_docs {
            let (idx, val) = csr.row(i);
            let out = &mut dx[i * rows..(i + 1) * rows];
            for (p, &j) in idx.iter().enumerate() {
                prefetch::ahead(&d, idx, p, rows);
                for r in 0..rows {
                    out[r] += d[j as usize * rows + r] as f64 * val[p * rows + r] as f64;
                }
            }
        }
    }
    // `u` in f64 (bucket-major): it carries `d * S_t`, which can be far larger than the
    // weight itself.
    let mut u: Vec<f64> = interleave(weight, rows, n)
        .iter()
        .map(|&w| w as f64)
        .collect();
    let mut g_doc = vec![0.0f64; n_docs * rows];
    let mut logits = vec![0.0f32; cfg.batch * rows];
    let mut dot = vec![0.0f64; rows];
    let mut g = vec![0.0f32; rows];
    let mut grad_bias = vec![0.0f32; rows];
    let mut grad_sum_bias = vec![0.0f64; rows];
    let mut s_t = 0.0f64;
    let Ok(epochs) = run_steps(n_docs, cfg, on_epoch, |t, batch| {
        let lr = Drift::rate(cfg.lr, cfg.schedule, t as u64, steps);
        for (b, &i) in batch.iter().enumerate() {
            let (idx, val) = csr.row(i);
            if ROWS == 1 {
                // The sum in a register: a loop over a one-entry buffer would store and
                // reload it at every non-zero.
                let dot: f64 = idx
                    .iter()
                    .zip(val)
                    .enumerate()
                    .map(|(p, (&j, &v))| {
                        prefetch::ahead(&u, idx, p, 1);
                        u[j as usize] * v as f64
                    })
                    .sum();
                logits[b] = (bias[0] as f64 + dot - s_t * dx[i]) as f32;
                continue;
            }
            dot.fill(0.0);
            for (p, &j) in idx.iter().enumerate() {
                prefetch::ahead(&u, idx, p, rows);
                for r in 0..rows {
                    dot[r] += u[j as usize * rows + r] * val[p * rows + r] as f64;
                }
            }
            for r in 0..rows {
                logits[b * rows + r] = (bias[r] as f64 + dot[r] - s_t * dx[i * rows + r]) as f32;
            }
        }
        let inv_b = 1.0 / batch.len() as f32;
        let (mut loss, mut correct) = (0.0, 0);
        grad_bias.fill(0.0);
        for (b, &i) in batch.iter().enumerate() {
            let y = labels[i];
            let z = &logits[b * rows..(b + 1) * rows];
            loss += link.loss(z, y);
            correct += usize::from(link.predict(z) == y as usize);
            link.residuals(z, y, &mut g);
            for r in 0..rows {
                g[r] *= inv_b;
                grad_bias[r] += g[r];
                g_doc[i * rows + r] += g[r] as f64;
            }
            let (idx, val) = csr.row(i);
            if ROWS == 1 {
                let step = (lr * g[0]) as f64;
                for (&j, &v) in idx.iter().zip(val) {
                    u[j as usize] -= step * v as f64;
                }
                continue;
            }
            for (p, &j) in idx.iter().enumerate() {
                for r in 0..rows {
                    u[j as usize * rows + r] -= (lr * g[r]) as f64 * val[p * rows + r] as f64;
                }
            }
        }
        for r in 0..rows {
            bias[r] -= lr * (grad_bias[r] + d_bias[r]);
            grad_sum_bias[r] += grad_bias[r] as f64;
        }
        s_t += lr as f64;
        Ok::<_, std::convert::Infallible>((loss, correct))
    });
    if steps == 0 {
        // Every review's residuals at the given model, for the exact mean gradient.
        for i in 0..n_docs {
            let (idx, val) = csr.row(i);
            let z = &mut logits[..rows];
            for r in 0..rows {
                let dot: f64 = idx
                    .iter()
                    .enumerate()
                    .map(|(p, &j)| {
                        prefetch::ahead(&u[r..], idx, p, rows);
                        u[j as usize * rows + r] * val[p * rows + r] as f64
                    })
                    .sum();
                z[r] = (bias[r] as f64 + dot) as f32;
            }
            link.residuals(z, labels[i], &mut g);
            for r in 0..rows {
                g_doc[i * rows + r] = g[r] as f64;
                grad_sum_bias[r] += g[r] as f64;
            }
        }
    }
    let taken = if steps == 0 { n_docs } else { steps as usize }.max(1) as f64;
    let mut grad_sum = vec![0.0f64; n * rows];
    for i in 0..n_docs {
        let gi = &g_doc[i * rows..(i + 1) * rows];
        if gi.iter().any(|&g| g != 0.0) {
            let (idx, val) = csr.row(i);
            for (p, &j) in idx.iter().enumerate() {
                prefetch::ahead(&grad_sum, idx, p, rows);
                for r in 0..rows {
                    grad_sum[j as usize * rows + r] += gi[r] * val[p * rows + r] as f64;
                }
            }
        }
    }
    for r in 0..rows {
        for j in 0..n {
            let dj = if corrected {
                d[j * rows + r] as f64
            } else {
                0.0
            };
            weight[r * n + j] = (u[j * rows + r] - dj * s_t) as f32;
        }
    }
    let mut mean_grad = vec![0.0f32; n * rows];
    for r in 0..rows {
        for j in 0..n {
            mean_grad[r * n + j] = (grad_sum[j * rows + r] / taken) as f32;
        }
    }
    LocalRound {
        epochs,
        mean_grad,
        mean_grad_bias: grad_sum_bias.iter().map(|&g| (g / taken) as f32).collect(),
        drift: Drift { lr_sum: s_t },
    }
}

/// [`train_local`] on a whole model, in place, with a correction per model row and bucket:
/// the shard's buckets are trained, every other bucket moves by the correction alone
/// (`-d · S_T`, as the aggregator recomputes it for a sparse update). For callers that hold
/// the dense model (the trainer's whole-model form, tests, simulations).
pub fn train_sparse(
    model: &mut Model,
    docs: &[Vec<u32>],
    labels: &[u8],
    cfg: &TrainConfig,
    correction: Option<&Correction>,
    on_epoch: impl FnMut(&EpochStats),
) -> LocalOutcome {
    let (rows, dim) = (model.config.rows(), model.config.dim());
    let shard = LocalShard::new(docs, &model.nb_ratio, rows);
    let local = correction.map(|c| {
        assert_eq!(
            c.weight.len(),
            rows * dim,
            "one correction per row and bucket"
        );
        Correction {
            weight: shard.gather(&c.weight),
            bias: c.bias.clone(),
        }
    });
    let mut w = shard.gather(&model.weight);
    let round = train_local(
        &shard,
        &mut w,
        &mut model.bias,
        labels,
        model.config.link(),
        cfg,
        local.as_ref(),
        on_epoch,
    );
    if let Some(c) = correction {
        for (x, &dj) in model.weight.iter_mut().zip(&c.weight) {
            *x = round.drift.apply(*x, dj);
        }
    }
    let n = shard.touched.len();
    let mut mean_grad = vec![0.0f32; rows * dim];
    for r in 0..rows {
        for (k, &j) in shard.touched.iter().enumerate() {
            model.weight[r * dim + j as usize] = w[r * n + k];
            mean_grad[r * dim + j as usize] = round.mean_grad[r * n + k];
        }
    }
    LocalOutcome {
        epochs: round.epochs,
        mean_grad,
        mean_grad_bias: round.mean_grad_bias,
        touched: shard.touched,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClassCounts, ModelConfig, Multiclass};

    fn tiny_cfg() -> ModelConfig {
        ModelConfig::with_buckets(10, 1)
    }

    fn tc(steps: u64, batch: usize, lr: f32, schedule: Schedule) -> TrainConfig {
        TrainConfig {
            algorithm: Algorithm::Scaffold,
            steps,
            epochs: 0,
            batch,
            lr,
            schedule,
            seed: 9,
        }
    }

    /// `n` three-bucket documents, alternately negative and positive: bucket `i % 2` says
    /// the label, the other two (`10 + i % spread`, `offset + i % 5`) are noise.
    fn corpus(n: u32, spread: u32, offset: u32) -> (Model, Vec<Vec<u32>>, Vec<u8>) {
        let docs: Vec<Vec<u32>> = (0..n)
            .map(|i| vec![i % 2, 10 + i % spread, offset + i % 5])
            .collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 2) as u8).collect();
        let model = Model::from_counts(
            tiny_cfg(),
            &ClassCounts::count(2, tiny_cfg().dim(), &docs, &labels),
        );
        (model, docs, labels)
    }

    fn toy() -> (Model, Vec<Vec<u32>>, Vec<u8>) {
        corpus(40, 7, 30)
    }

    /// The toy corpus with three classes (`i % 3`, said by bucket `i % 3`).
    fn toy3(multiclass: Multiclass) -> (Model, Vec<Vec<u32>>, Vec<u8>) {
        let cfg = tiny_cfg().with_classes(3, multiclass);
        let docs: Vec<Vec<u32>> = (0..45u32)
            .map(|i| vec![i % 3, 10 + i % 7, 30 + i % 5])
            .collect();
        let labels: Vec<u8> = (0..45).map(|i| (i % 3) as u8).collect();
        let model = Model::from_counts(cfg, &ClassCounts::count(3, cfg.dim(), &docs, &labels));
        (model, docs, labels)
    }

    /// A correction that is non-zero on buckets no document reads, so the lazy path matters.
    fn correction(rows: usize, dim: usize) -> Correction {
        Correction {
            weight: (0..rows * dim)
                .map(|j| ((j % 13) as f32 - 6.0) * 1e-3)
                .collect(),
            bias: (0..rows).map(|r| 0.01 - r as f32 * 0.004).collect(),
        }
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn the_sparse_engine_equals_dense_steps_and_untouched_buckets_follow_drift() {
        // The sparse engine against a direct dense loop of the documented step, for two
        // classes and for three with either link.
        for (model, docs, labels) in [
            toy(),
            toy3(Multiclass::Softmax),
            toy3(Multiclass::OneVsRest),
        ] {
            let (rows, dim) = (model.config.rows(), model.config.dim());
            let link = model.config.link();
            let corr = correction(rows, dim);
            let cfg = tc(17, 1, 0.3, Schedule::Linear);
            let mut sparse = model.clone();
            let out = train_sparse(&mut sparse, &docs, &labels, &cfg, Some(&corr), |_| {});
            let ratio = &model.nb_ratio;
            let mut dense = model.clone();
            let mut grad_sum = vec![0f32; rows * dim];
            let order = shuffled(docs.len(), cfg.seed);
            for (t, &i) in order.iter().take(17).enumerate() {
                let lr = Drift::rate(cfg.lr, cfg.schedule, t as u64, 17);
                let s = doc_scale(docs[i].len());
                let mut g = vec![0f32; rows];
                link.residuals(&dense.logits(&docs[i]), labels[i], &mut g);
                let mut grad = vec![0f32; rows * dim];
                for r in 0..rows {
                    for &j in &docs[i] {
                        let at = r * dim + j as usize;
                        grad[at] = g[r] * ratio[at] * s;
                        grad_sum[at] += grad[at];
                    }
                }
                for (x, (g, c)) in dense.weight.iter_mut().zip(grad.iter().zip(&corr.weight)) {
                    *x -= lr * (g + c);
                }
                for r in 0..rows {
                    dense.bias[r] -= lr * (g[r] + corr.bias[r]);
                }
            }
            let diff = max_diff(&dense.weight, &sparse.weight);
            assert!(diff < 1e-5, "{link:?}: lazy and dense differ by {diff}");
            assert!(max_diff(&dense.bias, &sparse.bias) < 1e-5);
            // The control variate: the mean data gradient along the path.
            let mean: Vec<f32> = grad_sum.iter().map(|g| g / 17.0).collect();
            assert!(
                max_diff(&mean, &out.mean_grad) < 1e-6,
                "{link:?}: mean gradients differ by {}",
                max_diff(&mean, &out.mean_grad)
            );
            assert!(mean.iter().any(|&g| g != 0.0));
            // A bucket no document reads moved exactly as Drift predicts from its start.
            let drift = Drift::new(17, cfg.lr, cfg.schedule);
            let touched = touched_buckets(&docs, dim);
            let untouched = (0..dim as u32).find(|j| !touched.contains(j)).unwrap() as usize;
            for r in 0..rows {
                let at = r * dim + untouched;
                assert_eq!(
                    sparse.weight[at],
                    drift.apply(model.weight[at], corr.weight[at])
                );
                assert_ne!(sparse.weight[at], model.weight[at]);
            }
        }
    }

    #[test]
    fn the_gradient_round_writes_the_exact_gradient_and_moves_nothing() {
        for (mut model, docs, labels) in [
            toy(),
            toy3(Multiclass::Softmax),
            toy3(Multiclass::OneVsRest),
        ] {
            // Away from the start, so every row's gradient is its own.
            for (j, w) in model.weight.iter_mut().enumerate() {
                *w += (j % 7) as f32 * 0.05 - 0.1;
            }
            let link = model.config.link();
            let args = TrainArgs::default();
            let cfg = args.config(GRADIENT_ROUND, 3, model.config.classes());
            assert_eq!(
                cfg.steps_for(docs.len()),
                0,
                "{link:?}: the gradient round steps"
            );
            assert!(cfg.takes_no_steps() && args.is_gradient_round(GRADIENT_ROUND));
            assert!(!args.is_gradient_round(GRADIENT_ROUND + 1));
            assert_ne!(args.config(GRADIENT_ROUND + 1, 3, 2).steps, 0);
            let fedavg = TrainArgs {
                algorithm: Algorithm::FedAvg,
                ..TrainArgs::default()
            };
            assert_ne!(
                fedavg.config(GRADIENT_ROUND, 3, 2).steps,
                0,
                "FedAvg has none"
            );
            let corr = correction(model.config.rows(), model.config.dim());
            let mut trained = model.clone();
            let out = train_sparse(&mut trained, &docs, &labels, &cfg, Some(&corr), |_| {});
            assert_eq!(
                trained, model,
                "{link:?}: the gradient round moved the model"
            );
            assert!(out.epochs.is_empty());
            let (g, g_bias) = crate::control::shard_gradient(&model, &docs, &labels);
            assert!(
                max_diff(&g, &out.mean_grad) < 1e-6,
                "{link:?}: the gradients differ by {}",
                max_diff(&g, &out.mean_grad)
            );
            assert!(max_diff(&g_bias, &out.mean_grad_bias) < 1e-6);
            assert!(g.iter().any(|&x| x != 0.0));
        }
    }

    #[test]
    fn three_classes_are_learnt_with_either_link() {
        for multiclass in [Multiclass::Softmax, Multiclass::OneVsRest] {
            let (mut model, docs, labels) = toy3(multiclass);
            let cfg = tc(400, 1, 1.0, Schedule::Linear);
            let out = train_sparse(&mut model, &docs, &labels, &cfg, None, |_| {});
            let last = out.epochs.last().unwrap();
            assert!(
                out.epochs[0].loss > last.loss * 2.0,
                "{multiclass}: {:?}",
                out.epochs
            );
            let scorer = model.scorer();
            let right = docs
                .iter()
                .zip(&labels)
                .filter(|&(d, &y)| scorer.predict(d) == y as usize)
                .count();
            assert_eq!(right, docs.len(), "{multiclass}");
        }
    }

    #[test]
    fn training_lowers_the_loss() {
        let (mut model, docs, labels) = corpus(200, 17, 40);
        let cfg = TrainConfig {
            epochs: 5,
            ..tc(0, 8, 1.0, Schedule::Constant)
        };
        let out = train_sparse(&mut model, &docs, &labels, &cfg, None, |_| {});
        assert_eq!(out.epochs.len(), 5, "epochs mode makes whole passes");
        assert!(
            out.epochs.last().unwrap().loss < out.epochs[0].loss * 0.8,
            "{:?}",
            out.epochs
        );
    }

    #[test]
    fn a_step_budget_is_independent_of_the_shard_size() {
        let (mut model, docs, labels) = toy();
        let out = train_sparse(
            &mut model,
            &docs,
            &labels,
            &tc(100, 1, 0.1, Schedule::Linear),
            None,
            |_| {},
        );
        // 40 documents: two whole passes and a partial one of 20.
        assert_eq!(
            out.epochs.iter().map(|e| e.samples).collect::<Vec<_>>(),
            vec![40, 40, 20]
        );
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
