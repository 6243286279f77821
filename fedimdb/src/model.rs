//! The classifier: naive-Bayes-weighted logistic regression over hashed word n-grams
//! (NB-LR, after Wang & Manning's NBSVM).
//!
//! A review is the set `S` of its n-gram buckets (see [`crate::featurize`]). Its logit is
//!
//! ```text
//! z = bias + scale(|S|) * Σ_{j ∈ S} weight[j] * nb_ratio[j]
//! ```
//!
//! where `nb_ratio[j] = ln((p_j/|p|₁) / (q_j/|q|₁))` is the naive-Bayes log-count ratio of
//! bucket `j` (p, q: smoothed document counts in positive and negative reviews) and
//! `scale(|S|) = 1/sqrt(|S|)` keeps long and short reviews on one footing. The ratio is fixed
//! before training (round 0 gathers the counts from all workers and sums them); `weight`
//! and `bias` are learnt, from zero. (Starting from `weight = 1`, the naive Bayes classifier
//! itself, looks tempting but trains badly: the ratio memorises the training reviews'
//! rare n-grams, the training loss is near zero from the start and SGD barely moves.)
//!
//! [`Model`] is the one type of the weights: plain vectors that checkpoints serialise
//! ([`crate::checkpoint`], tensors `linear.weight`, `linear.bias`, `nb.ratio`), that the CPU
//! engine trains in place ([`crate::train::train_sparse`]) and that [`Model::scorer`] turns into
//! the fast inference form. Candle appears only in the trainer's CUDA engine, which copies a
//! `Model` to the device and back, so nothing else compiles it.

use serde::{Deserialize, Serialize};

use crate::featurize::FeaturizerConfig;

/// Tensor names in model files.
pub const WEIGHT: &str = "linear.weight";
pub const BIAS: &str = "linear.bias";
pub const NB_RATIO: &str = "nb.ratio";

/// Everything that defines the model's shape and meaning. Stored in every model and update
/// file; files whose configs differ cannot be averaged.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub featurizer: FeaturizerConfig,
    /// Additive smoothing of the naive-Bayes counts.
    pub nb_smoothing: f32,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            featurizer: FeaturizerConfig::default(),
            nb_smoothing: 1.0,
        }
    }
}

impl ModelConfig {
    /// The default model over `2^hash_bits` buckets of 1..=`max_ngram`-grams (small ones
    /// make quick tests).
    pub fn with_buckets(hash_bits: u32, max_ngram: u32) -> Self {
        Self {
            featurizer: FeaturizerConfig {
                hash_bits,
                max_ngram,
            },
            ..Self::default()
        }
    }

    /// The input dimension (number of hash buckets).
    pub fn dim(&self) -> usize {
        self.featurizer.buckets()
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
}

impl ModelArgs {
    /// The model config the flags ask for; see [`ModelArgs::validate`].
    pub fn config(&self) -> ModelConfig {
        ModelConfig::with_buckets(self.hash_bits, self.max_ngram)
    }

    /// Checks the flags, naming them in the message.
    pub fn validate(&self) -> Result<(), String> {
        self.config()
            .featurizer
            .validate()
            .map_err(|e| format!("--hash-bits/--max-ngram: {e}"))
    }

    /// The flags as command-line arguments for the trainer.
    pub fn to_args(&self) -> Vec<String> {
        vec![
            "--hash-bits".to_owned(),
            self.hash_bits.to_string(),
            "--max-ngram".to_owned(),
            self.max_ngram.to_string(),
        ]
    }
}

/// Per-document scale: `1/sqrt(number of distinct n-grams)`.
pub fn doc_scale(n_features: usize) -> f32 {
    1.0 / (n_features.max(1) as f32).sqrt()
}

/// The model's weights. One row of weights today (two classes: the logit of the positive
/// one); the tensors are flat so that a K-class model can keep K rows in the same files.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub config: ModelConfig,
    /// `[dim]` learnt per-bucket weight.
    pub weight: Vec<f32>,
    /// The learnt bias.
    pub bias: f32,
    /// `[dim]` fixed naive-Bayes log-count ratio.
    pub nb_ratio: Vec<f32>,
}

impl Model {
    /// The untrained model for the given naive-Bayes counts: zero weights and the class
    /// prior's log-odds as bias.
    pub fn from_counts(config: ModelConfig, counts: &ClassCounts) -> Self {
        Self {
            config,
            weight: vec![0.0; config.dim()],
            bias: counts.prior(),
            nb_ratio: counts.nb_ratio(config.nb_smoothing),
        }
    }

    /// The model's logit for one document's buckets, straight from the weights (the
    /// reference the engines and the [`Scorer`] are tested against).
    pub fn logit(&self, features: &[u32]) -> f32 {
        let s: f32 = features
            .iter()
            .map(|&j| self.weight[j as usize] * self.nb_ratio[j as usize])
            .sum();
        self.bias + s * doc_scale(features.len())
    }

    /// The fast inference form of this model.
    pub fn scorer(&self) -> Scorer {
        Scorer::new(self.config, &self.weight, self.bias, &self.nb_ratio)
    }
}

/// Per-class document counts of every bucket: the statistics naive Bayes needs. Workers
/// count their own shard; the aggregator sums the counts (federated statistics).
///
/// Beside the counts, the per-class sums of each review's scale `1/sqrt(|S|)`: with them the
/// aggregator knows the gradient of the logistic loss at the starting model (zero weights,
/// the prior as bias, where every review has the same logit) without another pass over the
/// data, and SCAFFOLD's first round starts corrected (see [`crate::control`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ClassCounts {
    pub pos: Vec<f32>,
    pub neg: Vec<f32>,
    pub pos_scaled: Vec<f32>,
    pub neg_scaled: Vec<f32>,
    pub n_pos: u64,
    pub n_neg: u64,
}

impl ClassCounts {
    pub fn zeros(dim: usize) -> Self {
        let z = vec![0.0; dim];
        Self {
            pos: z.clone(),
            neg: z.clone(),
            pos_scaled: z.clone(),
            neg_scaled: z,
            n_pos: 0,
            n_neg: 0,
        }
    }

    /// Counts the documents' buckets by label (1 positive, 0 negative).
    pub fn count(dim: usize, docs: &[Vec<u32>], labels: &[u8]) -> Self {
        let mut c = Self::zeros(dim);
        for (d, &y) in docs.iter().zip(labels) {
            let (counts, scaled, n) = if y == 1 {
                (&mut c.pos, &mut c.pos_scaled, &mut c.n_pos)
            } else {
                (&mut c.neg, &mut c.neg_scaled, &mut c.n_neg)
            };
            *n += 1;
            let s = doc_scale(d.len());
            for &j in d {
                counts[j as usize] += 1.0;
                scaled[j as usize] += s;
            }
        }
        c
    }

    /// Adds another worker's counts.
    pub fn add(&mut self, other: &ClassCounts) {
        for (mine, theirs) in [
            (&mut self.pos, &other.pos),
            (&mut self.neg, &other.neg),
            (&mut self.pos_scaled, &other.pos_scaled),
            (&mut self.neg_scaled, &other.neg_scaled),
        ] {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a += b;
            }
        }
        self.n_pos += other.n_pos;
        self.n_neg += other.n_neg;
    }

    /// The prior log-odds: the bias of the untrained model.
    pub fn prior(&self) -> f32 {
        prior_log_odds(self.n_pos, self.n_neg)
    }

    /// The naive-Bayes log-count ratio with additive smoothing `alpha`.
    pub fn nb_ratio(&self, alpha: f32) -> Vec<f32> {
        let a = alpha as f64;
        let p_norm: f64 = self.pos.iter().map(|&x| x as f64 + a).sum();
        let q_norm: f64 = self.neg.iter().map(|&x| x as f64 + a).sum();
        let offset = (q_norm / p_norm).ln();
        self.pos
            .iter()
            .zip(&self.neg)
            .map(|(&p, &q)| (((p as f64 + a) / (q as f64 + a)).ln() + offset) as f32)
            .collect()
    }
}

/// The log-odds of the classes' document counts: the bias of the untrained model.
pub fn prior_log_odds(n_pos: u64, n_neg: u64) -> f32 {
    ((n_pos.max(1) as f64) / (n_neg.max(1) as f64)).ln() as f32
}

/// The model on plain slices for fast CPU inference: `effective = weight * nb_ratio`.
#[derive(Debug, Clone)]
pub struct Scorer {
    pub config: ModelConfig,
    pub effective: Vec<f32>,
    pub bias: f32,
}

impl Scorer {
    /// The scorer of a model given as plain slices.
    pub fn new(config: ModelConfig, weight: &[f32], bias: f32, nb_ratio: &[f32]) -> Self {
        let effective = weight.iter().zip(nb_ratio).map(|(w, r)| w * r).collect();
        Self {
            config,
            effective,
            bias,
        }
    }

    /// The logit of one document's buckets.
    pub fn logit(&self, features: &[u32]) -> f32 {
        let s: f32 = features.iter().map(|&j| self.effective[j as usize]).sum();
        self.bias + s * doc_scale(features.len())
    }

    /// Probability that the document is positive.
    pub fn probability(&self, features: &[u32]) -> f32 {
        sigmoid(self.logit(features))
    }

    /// How much one occurrence of bucket `j` moves the logit in a document with
    /// `n_features` distinct buckets.
    pub fn contribution(&self, bucket: u32, n_features: usize) -> f32 {
        self.effective[bucket as usize] * doc_scale(n_features)
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
        let c = ClassCounts::count(cfg.dim(), &docs, &labels);
        let r = c.nb_ratio(1.0);
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
    fn scorer_matches_the_model() {
        let (cfg, docs, labels) = tiny();
        let mut m = Model::from_counts(cfg, &ClassCounts::count(cfg.dim(), &docs, &labels));
        m.weight = (0..cfg.dim()).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        let s = m.scorer();
        for d in &docs {
            assert!(
                (s.logit(d) - m.logit(d)).abs() < 1e-5,
                "{} vs {}",
                s.logit(d),
                m.logit(d)
            );
        }
    }
}
