//! The classifier: naive-Bayes-weighted logistic regression over hashed word n-grams
//! (NB-LR, after Wang & Manning's NBSVM), for two classes or K.
//!
//! A review is the set `S` of its n-gram buckets (see [`crate::featurize`]). The model has
//! `R` rows of weights ([`ModelConfig::rows`]: one for two classes, K for K > 2); row `r`'s
//! logit is
//!
//! ```text
//! z_r = bias[r] + scale(|S|) * Σ_{j ∈ S} weight[r][j] * nb_ratio[r][j]
//! ```
//!
//! where `nb_ratio[r][j] = ln((p_j/|p|₁) / (q_j/|q|₁))` is the naive-Bayes log-count ratio of
//! bucket `j` for row `r`'s class against the others (p, q: smoothed document counts in the
//! reviews of that class and of every other class; with two classes, class 1 against class
//! 0) and `scale(|S|) = 1/sqrt(|S|)` keeps long and short reviews on one footing. The ratio is
//! fixed before training (round 0 gathers the counts from all workers and sums them);
//! `weight` and `bias` are learnt. Two-class training starts from the naive-Bayes classifier
//! scaled down, every weight at [`START_WEIGHT`] (0.2): the training loss is about 0.3 there
//! instead of 0.69, so every federated round's local path is short and SCAFFOLD's control
//! variates stay true to the model they correct (docs/BENCHMARKS.md, "the naive-Bayes
//! start"). Starting from `weight = 1`, the naive-Bayes classifier itself, trains badly: the
//! ratio memorises the training reviews' rare n-grams, the training loss is near zero from
//! the start and SGD barely moves. K-class models start from zero ([`start_weight`]).
//!
//! How logits become probabilities is the [`Link`]: the logistic function of the one row for
//! two classes (so a binary model is exactly the model this project always had), and for K
//! classes either K independent one-vs-rest logistic models (the default) or a softmax over
//! the K rows (multinomial logistic regression). The choice was measured on IMDB's 8-class
//! rating task (docs/BENCHMARKS.md).
//!
//! [`Model`] is the one type of the weights: plain row-major vectors that checkpoints
//! serialise ([`crate::checkpoint`], tensors `linear.weight` `[R·dim]`, `linear.bias` `[R]`,
//! `nb.ratio` `[R·dim]`), that the CPU engine trains ([`crate::train::train_sparse`]) and that
//! [`Model::scorer`] turns into the fast inference form. Candle appears only in the
//! trainer's CUDA engine, which copies a `Model` to the device and back, so nothing else
//! compiles it.

use serde::{Deserialize, Serialize};

use crate::featurize::FeaturizerConfig;

/// Tensor names in model files.
pub const WEIGHT: &str = "linear.weight";
pub const BIAS: &str = "linear.bias";
pub const NB_RATIO: &str = "nb.ratio";

/// How a K-class model (K > 2) turns its K logits into probabilities; chosen at round 0
/// (`--multiclass`) and stored in the model config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Multiclass {
    /// Multinomial logistic regression: a softmax over the K rows, trained on the
    /// cross-entropy.
    Softmax,
    /// K independent logistic models, class k against the rest; probabilities are the K
    /// sigmoids normalised to sum to one. The default: on IMDB's rating task it was ahead of
    /// the softmax at 6 of the 8 learning rates and smoothings tried, by 0.1–0.9 points on a
    /// validation split (docs/BENCHMARKS.md).
    #[default]
    OneVsRest,
}

impl std::fmt::Display for Multiclass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Multiclass::Softmax => "softmax",
            Multiclass::OneVsRest => "one-vs-rest",
        })
    }
}

/// How a model's row logits become class probabilities, and the loss training follows: the
/// one place that knows the three forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Two classes, one row: `P(class 1) = sigmoid(z)`.
    Logistic,
    /// K rows, `P(k) = softmax(z)_k`.
    Softmax,
    /// K rows, `P(k) ∝ sigmoid(z_k)`; each row trained on its own logistic loss.
    OneVsRest,
}

impl Link {
    /// The class probabilities from the row logits (K values summing to one).
    pub fn probabilities(self, z: &[f32]) -> Vec<f32> {
        match self {
            Link::Logistic => {
                let p = sigmoid(z[0]);
                vec![1.0 - p, p]
            }
            Link::Softmax => {
                let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = z.iter().map(|&x| (x - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                e.into_iter().map(|x| x / sum).collect()
            }
            Link::OneVsRest => {
                let s: Vec<f32> = z.iter().map(|&x| sigmoid(x)).collect();
                let sum: f32 = s.iter().sum();
                if sum > 0.0 {
                    s.into_iter().map(|x| x / sum).collect()
                } else {
                    vec![1.0 / z.len() as f32; z.len()]
                }
            }
        }
    }

    /// The predicted class: the most probable one (ties: the lower index).
    pub fn predict(self, z: &[f32]) -> usize {
        match self {
            Link::Logistic => usize::from(z[0] >= 0.0),
            Link::Softmax | Link::OneVsRest => {
                let mut best = 0;
                for (k, &x) in z.iter().enumerate() {
                    if x > z[best] {
                        best = k;
                    }
                }
                best
            }
        }
    }

    /// The training loss of one review of class `y` (the binary case is today's logistic
    /// loss; one-vs-rest sums its rows' logistic losses).
    pub fn loss(self, z: &[f32], y: u8) -> f64 {
        match self {
            Link::Logistic => logistic_loss(z[0], y),
            Link::Softmax => {
                let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = max + z.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
                lse - z[y as usize] as f64
            }
            Link::OneVsRest => z
                .iter()
                .enumerate()
                .map(|(k, &x)| logistic_loss(x, u8::from(k == y as usize)))
                .sum(),
        }
    }

    /// The loss's derivative with respect to each row's logit, for a review of class `y`,
    /// into `out` (one value per row).
    pub fn residuals(self, z: &[f32], y: u8, out: &mut [f32]) {
        match self {
            Link::Logistic => out[0] = sigmoid(z[0]) - y as f32,
            Link::Softmax => {
                // The softmax in `out` itself: this runs at every step of training.
                let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for (o, &x) in out.iter_mut().zip(z) {
                    *o = (x - max).exp();
                }
                let sum: f32 = out.iter().sum();
                for (k, o) in out.iter_mut().enumerate() {
                    *o = *o / sum - f32::from(k == y as usize);
                }
            }
            Link::OneVsRest => {
                for (k, (o, &x)) in out.iter_mut().zip(z).enumerate() {
                    *o = sigmoid(x) - f32::from(k == y as usize);
                }
            }
        }
    }

    /// The untrained model's biases for the classes' review counts: the prior log-odds (two
    /// classes), the log prior (softmax), each class's log-odds against the rest (one-vs-rest).
    pub fn prior(self, docs: &[u64]) -> Vec<f32> {
        let total: u64 = docs.iter().sum();
        match self {
            Link::Logistic => vec![prior_log_odds(docs[1], docs[0])],
            Link::Softmax => docs
                .iter()
                .map(|&n| ((n.max(1) as f64) / (total.max(1) as f64)).ln() as f32)
                .collect(),
            Link::OneVsRest => docs.iter().map(|&n| prior_log_odds(n, total - n)).collect(),
        }
    }
}

/// Logistic loss of one example from its logit, stable for large |z|.
pub fn logistic_loss(z: f32, label: u8) -> f64 {
    let z = z as f64;
    let y = label as f64;
    z.max(0.0) - z * y + (-z.abs()).exp().ln_1p()
}

/// The naive-Bayes smoothing of K-class models (K > 2). Each row's ratio sets one class
/// against all the others, so a class's counts are a fraction of the data and 1 (the 2-class
/// default) flattens the ratios of the n-grams that tell neighbouring classes apart: on
/// IMDB's rating task 1 gives 45.6–45.9% on a validation split, 0.1 about 46.3%
/// (docs/BENCHMARKS.md).
pub const MULTICLASS_NB_SMOOTHING: f32 = 0.1;

/// Everything that defines the model's shape and meaning. Stored in every model and update
/// file; files whose configs differ cannot be averaged.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub featurizer: FeaturizerConfig,
    /// Additive smoothing of the naive-Bayes counts.
    pub nb_smoothing: f32,
    /// Number of classes (written only when not 2, so binary files read as they always did).
    #[serde(default = "two_classes", skip_serializing_if = "is_two")]
    pub classes: u32,
    /// K > 2 classes: how the K logits become probabilities (absent for two classes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiclass: Option<Multiclass>,
}

fn two_classes() -> u32 {
    2
}

fn is_two(k: &u32) -> bool {
    *k == 2
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            featurizer: FeaturizerConfig::default(),
            nb_smoothing: 1.0,
            classes: 2,
            multiclass: None,
        }
    }
}

impl ModelConfig {
    /// The default 2-class model over `2^hash_bits` buckets of 1..=`max_ngram`-grams (small
    /// ones make quick tests).
    pub fn with_buckets(hash_bits: u32, max_ngram: u32) -> Self {
        Self {
            featurizer: FeaturizerConfig {
                hash_bits,
                max_ngram,
            },
            ..Self::default()
        }
    }

    /// The same model for `classes` classes (`multiclass` applies when there are more than
    /// 2, with the K-class naive-Bayes smoothing).
    pub fn with_classes(self, classes: usize, multiclass: Multiclass) -> Self {
        Self {
            classes: classes as u32,
            multiclass: (classes > 2).then_some(multiclass),
            nb_smoothing: if classes > 2 {
                MULTICLASS_NB_SMOOTHING
            } else {
                self.nb_smoothing
            },
            ..self
        }
    }

    /// The input dimension (number of hash buckets).
    pub fn dim(&self) -> usize {
        self.featurizer.buckets()
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes as usize
    }

    /// Rows of weights: one logit for two classes, one per class beyond.
    pub fn rows(&self) -> usize {
        if self.classes <= 2 {
            1
        } else {
            self.classes as usize
        }
    }

    /// How the rows' logits become probabilities.
    pub fn link(&self) -> Link {
        if self.classes <= 2 {
            Link::Logistic
        } else {
            match self.multiclass.unwrap_or_default() {
                Multiclass::Softmax => Link::Softmax,
                Multiclass::OneVsRest => Link::OneVsRest,
            }
        }
    }

    /// Checks what a file's header may hold.
    pub fn validate(&self) -> Result<(), String> {
        self.featurizer.validate()?;
        if !(2..=crate::labels::MAX_CLASSES as u32).contains(&self.classes) {
            return Err(format!(
                "classes must be between 2 and {}, not {}",
                crate::labels::MAX_CLASSES,
                self.classes
            ));
        }
        if (self.classes > 2) != self.multiclass.is_some() {
            return Err(format!(
                "a {}-class model {} a multiclass link",
                self.classes,
                if self.classes > 2 { "needs" } else { "has no" }
            ));
        }
        Ok(())
    }
}

/// The model's flags, shared by the trainer and the pipeline: chosen for round 0; later
/// rounds take the config from the global model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct ModelArgs {
    /// Hash buckets are 2^BITS (round 0; later rounds take the config from the global model).
    #[arg(long, default_value_t = FeaturizerConfig::default().hash_bits)]
    pub hash_bits: u32,
    /// Longest word n-gram (round 0; later rounds take the config from the global model).
    #[arg(long, default_value_t = FeaturizerConfig::default().max_ngram)]
    pub max_ngram: u32,
    /// Data with more than two labels: `softmax` (multinomial logistic regression) or
    /// `one-vs-rest` (round 0; later rounds take it from the global model).
    #[arg(long, value_enum, default_value_t = Multiclass::default())]
    pub multiclass: Multiclass,
}

impl ModelArgs {
    /// The model config the flags ask for, for data with `classes` labels; see
    /// [`ModelArgs::validate`].
    pub fn config(&self, classes: usize) -> ModelConfig {
        ModelConfig::with_buckets(self.hash_bits, self.max_ngram)
            .with_classes(classes, self.multiclass)
    }

    /// Checks the flags, naming them in the message.
    pub fn validate(&self) -> Result<(), String> {
        self.config(2)
            .featurizer
            .validate()
            .map_err(|e| format!("--hash-bits/--max-ngram: {e}"))
    }

    /// The flags as command-line arguments for the trainer (`--multiclass` only when not the
    /// default, so a binary command reads as it always did).
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--hash-bits".to_owned(),
            self.hash_bits.to_string(),
            "--max-ngram".to_owned(),
            self.max_ngram.to_string(),
        ];
        if self.multiclass != Multiclass::default() {
            a.extend(["--multiclass".to_owned(), self.multiclass.to_string()]);
        }
        a
    }
}

/// Per-document scale: `1/sqrt(number of distinct n-grams)`.
pub fn doc_scale(n_features: usize) -> f32 {
    1.0 / (n_features.max(1) as f32).sqrt()
}

/// Where a two-class model's weights start: the naive-Bayes classifier scaled by 0.2.
/// Chosen on held-out movies of the training set from 0.15, 0.2, 0.3 and 0.5: 0.5 leaves 64
/// workers 1.25 points behind centralized training, 0.15 to 0.3 keep every cell within 0.4
/// (docs/BENCHMARKS.md).
pub const START_WEIGHT: f32 = 0.2;

/// Where the weights of a model of `classes` classes start: [`START_WEIGHT`] for two; zero
/// for K, whose sharper ratios (smoothing 0.1) make a start of 0.3 cost centralized training
/// a point on the rating task, and whose federated runs hold from zero at the default η.
pub fn start_weight(classes: usize) -> f32 {
    if classes == 2 { START_WEIGHT } else { 0.0 }
}

/// The model's weights: `config.rows()` rows, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub config: ModelConfig,
    /// `[rows · dim]` learnt per-bucket weights.
    pub weight: Vec<f32>,
    /// `[rows]` learnt biases.
    pub bias: Vec<f32>,
    /// `[rows · dim]` fixed naive-Bayes log-count ratios.
    pub nb_ratio: Vec<f32>,
}

impl Model {
    /// The untrained model for the given naive-Bayes counts: every weight at
    /// [`start_weight`] and the class prior as bias ([`Link::prior`]).
    pub fn from_counts(config: ModelConfig, counts: &ClassCounts) -> Self {
        Self {
            config,
            weight: vec![start_weight(config.classes()); config.rows() * config.dim()],
            bias: config.link().prior(&counts.docs),
            nb_ratio: counts.nb_ratio(config.nb_smoothing),
        }
    }

    /// The model's row logits for one document's buckets, straight from the weights (the
    /// reference the engines and the [`Scorer`] are tested against).
    pub fn logits(&self, features: &[u32]) -> Vec<f32> {
        let dim = self.config.dim();
        (0..self.config.rows())
            .map(|r| {
                let s: f32 = features
                    .iter()
                    .map(|&j| {
                        self.weight[r * dim + j as usize] * self.nb_ratio[r * dim + j as usize]
                    })
                    .sum();
                self.bias[r] + s * doc_scale(features.len())
            })
            .collect()
    }

    /// The fast inference form of this model.
    pub fn scorer(&self) -> Scorer {
        Scorer::new(self.config, &self.weight, &self.bias, &self.nb_ratio)
    }
}

/// Per-class document counts of every bucket: the statistics naive Bayes needs. Workers
/// count their own shard; the aggregator sums the counts (federated statistics).
///
/// Beside the counts, the per-class sums of each review's scale `1/sqrt(|S|)`: with them the
/// aggregator knows the gradient of the loss at the starting model (zero weights, the prior
/// as bias, where every review of a class has the same logits) without another pass over the
/// data, and SCAFFOLD's first round starts corrected (see [`crate::control`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ClassCounts {
    /// Per class, the documents containing each bucket (`[dim]`, or a sparse file's buckets).
    pub counts: Vec<Vec<f32>>,
    /// Per class, the sum of those documents' scales at each bucket.
    pub scaled: Vec<Vec<f32>>,
    /// Per class, the documents.
    pub docs: Vec<u64>,
}

impl ClassCounts {
    pub fn zeros(classes: usize, dim: usize) -> Self {
        Self {
            counts: (0..classes).map(|_| crate::dense::zeros(dim)).collect(),
            scaled: (0..classes).map(|_| crate::dense::zeros(dim)).collect(),
            docs: vec![0; classes],
        }
    }

    /// Counts the documents' buckets by class (`labels` are class indices below `classes`).
    pub fn count(classes: usize, dim: usize, docs: &[Vec<u32>], labels: &[u8]) -> Self {
        let mut c = Self::zeros(classes, dim);
        for (d, &y) in docs.iter().zip(labels) {
            let y = y as usize;
            c.docs[y] += 1;
            let s = doc_scale(d.len());
            for &j in d {
                c.counts[y][j as usize] += 1.0;
                c.scaled[y][j as usize] += s;
            }
        }
        c
    }

    pub fn classes(&self) -> usize {
        self.docs.len()
    }

    /// All documents.
    pub fn samples(&self) -> u64 {
        self.docs.iter().sum()
    }

    /// The naive-Bayes log-count ratios with additive smoothing `alpha`, row-major: for two
    /// classes one row (class 1 against class 0), for K classes one row per class (against
    /// all the others).
    pub fn nb_ratio(&self, alpha: f32) -> Vec<f32> {
        let k = self.classes();
        if k == 2 {
            return log_count_ratio(&self.counts[1], &self.counts[0], alpha);
        }
        let dim = self.counts[0].len();
        let mut total = crate::dense::zeros::<f32>(dim);
        for c in &self.counts {
            for (t, x) in total.iter_mut().zip(c) {
                *t += x;
            }
        }
        let mut out = Vec::with_capacity(k * dim);
        for c in &self.counts {
            let rest: Vec<f32> = total.iter().zip(c).map(|(t, x)| t - x).collect();
            out.extend(log_count_ratio(c, &rest, alpha));
        }
        out
    }
}

/// `ln((p_j+α)/|p+α|₁ / ((q_j+α)/|q+α|₁))` for every bucket.
fn log_count_ratio(p: &[f32], q: &[f32], alpha: f32) -> Vec<f32> {
    let a = alpha as f64;
    let p_norm: f64 = p.iter().map(|&x| x as f64 + a).sum();
    let q_norm: f64 = q.iter().map(|&x| x as f64 + a).sum();
    let offset = (q_norm / p_norm).ln();
    p.iter()
        .zip(q)
        .map(|(&p, &q)| (((p as f64 + a) / (q as f64 + a)).ln() + offset) as f32)
        .collect()
}

/// The log-odds of two document counts: the bias of the untrained 2-class model.
pub fn prior_log_odds(n_pos: u64, n_neg: u64) -> f32 {
    ((n_pos.max(1) as f64) / (n_neg.max(1) as f64)).ln() as f32
}

/// The model on plain slices for fast CPU inference: `effective = weight * nb_ratio`, laid
/// out bucket-major (a bucket's R values side by side) so a review reads one place per
/// bucket whatever the number of classes.
#[derive(Debug, Clone)]
pub struct Scorer {
    pub config: ModelConfig,
    /// `[dim · rows]`, bucket-major.
    effective: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Scorer {
    /// The scorer of a model given as plain row-major slices.
    pub fn new(config: ModelConfig, weight: &[f32], bias: &[f32], nb_ratio: &[f32]) -> Self {
        let (rows, dim) = (config.rows(), config.dim());
        let effective = if rows == 1 {
            weight.iter().zip(nb_ratio).map(|(w, r)| w * r).collect()
        } else {
            let mut e = vec![0.0; rows * dim];
            for r in 0..rows {
                for j in 0..dim {
                    e[j * rows + r] = weight[r * dim + j] * nb_ratio[r * dim + j];
                }
            }
            e
        };
        Self {
            config,
            effective,
            bias: bias.to_vec(),
        }
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.config.classes()
    }

    /// The row logits of one document's buckets.
    pub fn logits(&self, features: &[u32]) -> Vec<f32> {
        let rows = self.config.rows();
        let scale = doc_scale(features.len());
        if rows == 1 {
            let s: f32 = features
                .iter()
                .enumerate()
                .map(|(p, &j)| {
                    crate::prefetch::ahead(&self.effective, features, p, 1);
                    self.effective[j as usize]
                })
                .sum();
            return vec![self.bias[0] + s * scale];
        }
        let mut s = vec![0.0f32; rows];
        for (p, &j) in features.iter().enumerate() {
            crate::prefetch::ahead(&self.effective, features, p, rows);
            let e = &self.effective[j as usize * rows..(j as usize + 1) * rows];
            for (a, b) in s.iter_mut().zip(e) {
                *a += b;
            }
        }
        s.iter()
            .zip(&self.bias)
            .map(|(s, b)| b + s * scale)
            .collect()
    }

    /// The probability of each class.
    pub fn probabilities(&self, features: &[u32]) -> Vec<f32> {
        self.config.link().probabilities(&self.logits(features))
    }

    /// The predicted class.
    pub fn predict(&self, features: &[u32]) -> usize {
        self.config.link().predict(&self.logits(features))
    }

    /// How much one occurrence of bucket `j` moves the score of `class` in a document with
    /// `n_features` distinct buckets: its row's logit (K classes), or the one logit, signed
    /// toward `class` (two classes).
    pub fn contribution(&self, class: usize, bucket: u32, n_features: usize) -> f32 {
        let rows = self.config.rows();
        let e = if rows == 1 {
            let e = self.effective[bucket as usize];
            if class == 1 { e } else { -e }
        } else {
            self.effective[bucket as usize * rows + class]
        };
        e * doc_scale(n_features)
    }
}

/// The logistic function, stable for large |z|.
pub fn sigmoid(z: f32) -> f32 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (ModelConfig, Vec<Vec<u32>>, Vec<u8>) {
        let cfg = ModelConfig::with_buckets(10, 1);
        let docs = vec![vec![1, 2, 3], vec![2, 4], vec![5, 6, 7, 8], vec![1, 5]];
        (cfg, docs, vec![1, 1, 0, 0])
    }

    #[test]
    fn nb_ratio_points_the_right_way() {
        let (cfg, docs, labels) = tiny();
        let c = ClassCounts::count(2, cfg.dim(), &docs, &labels);
        let r = c.nb_ratio(1.0);
        assert_eq!(r.len(), cfg.dim(), "two classes: one row");
        // bucket 1 is in one positive and one negative review: neutral up to the tiny
        // normalisation offset (the classes hold 5 and 6 feature occurrences)
        assert!(
            r[2] > 0.3 && r[6] < -0.3 && r[1].abs() < 1e-2,
            "{} {} {}",
            r[2],
            r[6],
            r[1]
        );
        assert!(
            (r[100] - r[1]).abs() < 1e-6,
            "unseen buckets weigh like balanced ones"
        );
    }

    #[test]
    fn k_class_ratios_are_one_row_per_class_against_the_rest() {
        let cfg = ModelConfig::with_buckets(6, 1).with_classes(3, Multiclass::Softmax);
        let docs = vec![vec![1, 9], vec![2, 9], vec![3, 9], vec![1, 8]];
        let c = ClassCounts::count(3, cfg.dim(), &docs, &[0, 1, 2, 0]);
        let r = c.nb_ratio(1.0);
        let dim = cfg.dim();
        assert_eq!(r.len(), 3 * dim);
        // bucket 1 says class 0, bucket 2 class 1, bucket 3 class 2
        for (class, bucket) in [(0, 1), (1, 2), (2, 3)] {
            for row in 0..3 {
                let v = r[row * dim + bucket];
                assert_eq!(v > 0.3, row == class, "row {row} bucket {bucket}: {v}");
            }
        }
        let m = Model::from_counts(cfg, &c);
        assert_eq!((m.weight.len(), m.bias.len()), (3 * dim, 3));
        // the softmax prior: class 0 has two of four reviews
        let p = cfg.link().probabilities(&m.bias);
        assert!(
            (p[0] - 0.5).abs() < 1e-6 && (p[1] - 0.25).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn scorer_matches_the_model_for_two_and_k_classes() {
        let (cfg, docs, labels) = tiny();
        for (cfg, labels) in [
            (cfg, labels),
            (cfg.with_classes(3, Multiclass::Softmax), vec![0, 1, 2, 1]),
            (cfg.with_classes(3, Multiclass::OneVsRest), vec![2, 1, 0, 1]),
        ] {
            let counts = ClassCounts::count(cfg.classes(), cfg.dim(), &docs, &labels);
            let mut m = Model::from_counts(cfg, &counts);
            m.weight = (0..m.weight.len())
                .map(|i| 0.5 + (i % 7) as f32 * 0.1)
                .collect();
            let s = m.scorer();
            for d in &docs {
                let (a, b) = (s.logits(d), m.logits(d));
                assert_eq!(a.len(), cfg.rows());
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
                }
                let p = s.probabilities(d);
                assert_eq!(p.len(), cfg.classes());
                assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{p:?}");
                let best = (0..p.len())
                    .max_by(|&i, &j| p[i].total_cmp(&p[j]).then(j.cmp(&i)))
                    .unwrap();
                assert_eq!(s.predict(d), best);
                // contributions add up to the logits (less the bias)
                let k = cfg.rows() - 1;
                let sum: f32 = d
                    .iter()
                    .map(|&j| s.contribution(k.max(1), j, d.len()))
                    .sum();
                let row = if cfg.rows() == 1 { 0 } else { k };
                assert!((sum - (a[row] - m.bias[row])).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn residuals_are_the_losses_derivatives() {
        let z = [0.3f32, -1.2, 2.0];
        for link in [Link::Softmax, Link::OneVsRest, Link::Logistic] {
            let z = if link == Link::Logistic {
                &z[..1]
            } else {
                &z[..]
            };
            for y in 0..z.len().max(2) as u8 {
                if link != Link::Logistic && y as usize >= z.len() {
                    continue;
                }
                let mut g = vec![0.0; z.len()];
                link.residuals(z, y, &mut g);
                for k in 0..z.len() {
                    let h = 1e-3;
                    let mut up = z.to_vec();
                    up[k] += h;
                    let mut down = z.to_vec();
                    down[k] -= h;
                    let numeric = (link.loss(&up, y) - link.loss(&down, y)) / (2.0 * h as f64);
                    assert!(
                        (numeric - g[k] as f64).abs() < 1e-3,
                        "{link:?} y={y} k={k}: {numeric} vs {}",
                        g[k]
                    );
                }
            }
        }
    }

    #[test]
    fn configs_say_what_they_hold() {
        let two = ModelConfig::default();
        assert_eq!((two.rows(), two.link()), (1, Link::Logistic));
        let json = serde_json::to_string(&two).unwrap();
        assert!(
            !json.contains("classes"),
            "binary configs read as before: {json}"
        );
        let eight = two.with_classes(8, Multiclass::OneVsRest);
        assert_eq!((eight.rows(), eight.link()), (8, Link::OneVsRest));
        let back: ModelConfig =
            serde_json::from_str(&serde_json::to_string(&eight).unwrap()).unwrap();
        assert_eq!(back, eight);
        let bad = ModelConfig {
            multiclass: None,
            ..eight
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .contains("needs a multiclass link")
        );
    }
}
