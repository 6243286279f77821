//! SCAFFOLD's control variates: what a worker's correction is made of, and where each part
//! lives on the volume.
//!
//! A worker's control variate `c_i` is its shard's mean gradient along its last round's
//! local steps (SCAFFOLD's "option II"), or at the untrained model before its first round;
//! the global one, `c`, is their sample-weighted mean over *all* shards. In
//! round `R` worker `i` adds `c - c_i` to every local gradient, with both taken from the
//! same earlier model, so its steps follow the gradient of the whole objective instead of
//! its shard's alone.
//!
//! | part | computed by | stored in |
//! |------|-------------|-----------|
//! | `c_i` at the starting model | the aggregator from the worker's round-0 statistics ([`initial_gradient`]) | `round-0000/updates/shard-I.safetensors` (as counts) |
//! | `c_i` along round `R`'s local steps | worker `i` in round `R` ([`crate::train::LocalOutcome`]) | `round-R/updates/shard-I.safetensors` (`grad.*`) |
//! | `c` after round `R` | the aggregator: the mean over every shard's newest `c_i` | `round-R/control.safetensors`, which also names, per shard, the round that `c_i` came from |
//!
//! A shard missing from a round (under `--min-workers`) keeps its older `c_i` in the mean,
//! and its worker corrects with that same `c_i` next time, so `c` and every `c_i` always
//! come from one consistent set.

use anyhow::{Context, Result};

use crate::checkpoint::{
    CONTROL_BIAS, CONTROL_WEIGHT, Checkpoint, GRAD_BIAS, GRAD_WEIGHT, Header, Kind,
    STATS_NEG_SCALED, STATS_POS_SCALED,
};
use crate::layout::Layout;
use crate::model::{ClassCounts, ModelConfig, doc_scale, prior_log_odds, sigmoid};
use crate::verify::load_update;

/// The mean gradient of the logistic loss over a shard at the untrained model (zero
/// weights, bias `bias0`), from its counts: every review has logit `bias0` there, so the
/// gradient at bucket `j` is `r_j / n * (sigmoid(bias0) * (A+_j + A-_j) - A+_j)` with `A±` the
/// per-class sums of the reviews' scales.
pub fn initial_gradient(counts: &ClassCounts, ratio: &[f32], bias0: f32) -> (Vec<f32>, f32) {
    let at = InitialGradient::new(counts.n_pos, counts.n_pos + counts.n_neg, bias0);
    let weight = ratio
        .iter()
        .zip(counts.pos_scaled.iter().zip(&counts.neg_scaled))
        .map(|(&r, (&a_pos, &a_neg))| at.bucket(r, a_pos, a_neg))
        .collect();
    (weight, at.bias())
}

/// [`initial_gradient`] one bucket at a time, for dense and sparse counts alike.
struct InitialGradient {
    n: f64,
    p: f64,
    pos_share: f64,
}

impl InitialGradient {
    fn new(n_pos: u64, n: u64, bias0: f32) -> Self {
        let n = n.max(1) as f64;
        Self {
            n,
            p: sigmoid(bias0) as f64,
            pos_share: n_pos as f64 / n,
        }
    }

    fn bucket(&self, r: f32, a_pos: f32, a_neg: f32) -> f32 {
        (r as f64 / self.n * (self.p * (a_pos as f64 + a_neg as f64) - a_pos as f64)) as f32
    }

    fn bias(&self) -> f32 {
        (self.p - self.pos_share) as f32
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

/// The mean gradient of the logistic loss over a shard's reviews at the model
/// (`weight`, `bias`), dense (zero outside the shard's buckets).
pub fn shard_gradient(
    weight: &[f32],
    bias: f32,
    ratio: &[f32],
    docs: &[Vec<u32>],
    labels: &[u8],
) -> (Vec<f32>, f32) {
    let mut g = vec![0f64; weight.len()];
    let mut g_bias = 0f64;
    for (d, &y) in docs.iter().zip(labels) {
        let s = doc_scale(d.len());
        let z = bias
            + d.iter()
                .map(|&j| weight[j as usize] * ratio[j as usize])
                .sum::<f32>()
                * s;
        let e = (sigmoid(z) - y as f32) as f64;
        for &j in d {
            g[j as usize] += e * (ratio[j as usize] * s) as f64;
        }
        g_bias += e;
    }
    let n = docs.len().max(1) as f64;
    (
        g.into_iter().map(|x| (x / n) as f32).collect(),
        (g_bias / n) as f32,
    )
}

/// The global control variate of a round, with the round each shard's part came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Control {
    pub weight: Vec<f32>,
    pub bias: f32,
    /// Per shard, the round whose update holds its `c_i` (0: its round-0 statistics).
    pub sources: Vec<u32>,
    /// Training reviews in all, and positive ones: the prior `bias0` of the untrained model.
    pub samples: u64,
    pub positive: u64,
}

impl Control {
    /// The untrained model's bias, from which every `c_i` of round-0 statistics is taken.
    pub fn bias0(&self) -> f32 {
        prior_log_odds(self.positive, self.samples - self.positive)
    }

    pub fn to_checkpoint(&self, config: ModelConfig, round: u32) -> Checkpoint {
        let mut header = Header::new(Kind::Control, config, round);
        header.samples = self.samples;
        header.positive = Some(self.positive);
        header.sources = Some(self.sources.clone());
        Checkpoint::dense(
            Kind::Control,
            header,
            [
                (CONTROL_WEIGHT, self.weight.clone()),
                (CONTROL_BIAS, vec![self.bias]),
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
        let positive = ck.header.positives()?;
        Ok(Self {
            bias: ck.tensor(CONTROL_BIAS)[0],
            weight: ck.take_tensor(CONTROL_WEIGHT)?,
            sources,
            samples: ck.header.samples,
            positive,
        })
    }
}

/// Shard `shard`'s control variate `c_i` as counted in `control`: from its update of round
/// `control.sources[shard]`, or from its round-0 statistics. Sparse: the buckets its reviews
/// read (`index`, ascending), its values there, and its bias; it is zero elsewhere.
pub fn worker_control(
    layout: &Layout,
    control: &Control,
    shard: usize,
    ratio: &[f32],
) -> Result<(Vec<u32>, Vec<f32>, f32)> {
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
        let n_pos = ck.header.positives()?;
        let at = InitialGradient::new(n_pos, ck.header.samples, control.bias0());
        let values = ck
            .index
            .iter()
            .zip(
                ck.tensor(STATS_POS_SCALED)
                    .iter()
                    .zip(ck.tensor(STATS_NEG_SCALED)),
            )
            .map(|(&j, (&a_pos, &a_neg))| at.bucket(ratio[j as usize], a_pos, a_neg))
            .collect();
        Ok((ck.index, values, at.bias()))
    } else {
        let (mut ck, _) = load_update(layout, source, shard, Kind::Update).with_context(|| {
            format!("the update of shard {shard} in round {source}, which holds its control variate, is missing or damaged")
        })?;
        let bias = ck.tensor(GRAD_BIAS)[0];
        let values = ck.take_tensor(GRAD_WEIGHT)?;
        Ok((std::mem::take(&mut ck.index), values, bias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_gradient_from_counts_equals_a_pass_over_the_reviews() {
        let docs: Vec<Vec<u32>> = vec![
            vec![1, 2, 3],
            vec![2, 4],
            vec![5, 6, 7, 8],
            vec![1, 5],
            vec![3, 9, 10],
        ];
        let labels = vec![1, 1, 0, 0, 1];
        let counts = ClassCounts::count(16, &docs, &labels);
        let ratio: Vec<f32> = (0..16).map(|j| (j as f32 - 7.0) / 5.0).collect();
        let bias0 = 0.3;
        let (g1, b1) = initial_gradient(&counts, &ratio, bias0);
        let (g2, b2) = shard_gradient(&[0.0; 16], bias0, &ratio, &docs, &labels);
        for (a, b) in g1.iter().zip(&g2) {
            assert!((a - b).abs() < 1e-6, "{g1:?} vs {g2:?}");
        }
        assert!((b1 - b2).abs() < 1e-6);
        assert!(g1.iter().any(|&x| x != 0.0));
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
