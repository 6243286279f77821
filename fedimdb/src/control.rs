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
};
use crate::layout::Layout;
use crate::model::{ClassCounts, ModelConfig, doc_scale, prior_log_odds, sigmoid};
use crate::verify::load_update;

/// The mean gradient of the logistic loss over a shard at the untrained model (zero
/// weights, bias `bias0`), from its counts: every review has logit `bias0` there, so the
/// gradient at bucket `j` is `r_j / n * (sigmoid(bias0) * (A+_j + A-_j) - A+_j)` with `A±` the
/// per-class sums of the reviews' scales.
pub fn initial_gradient(counts: &ClassCounts, ratio: &[f32], bias0: f32) -> (Vec<f32>, f32) {
    let n = (counts.n_pos + counts.n_neg).max(1) as f64;
    let p = sigmoid(bias0) as f64;
    let weight = ratio
        .iter()
        .zip(counts.pos_scaled.iter().zip(&counts.neg_scaled))
        .map(|(&r, (&a_pos, &a_neg))| {
            (r as f64 / n * (p * (a_pos as f64 + a_neg as f64) - a_pos as f64)) as f32
        })
        .collect();
    let bias = (p - counts.n_pos as f64 / n) as f32;
    (weight, bias)
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
/// `control.sources[shard]`, or from its round-0 statistics. Dense.
pub fn worker_control(
    layout: &Layout,
    control: &Control,
    shard: usize,
    ratio: &[f32],
) -> Result<(Vec<f32>, f32)> {
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
        Ok(initial_gradient(&ck.to_counts()?, ratio, control.bias0()))
    } else {
        let (ck, _) = load_update(layout, source, shard, Kind::Update).with_context(|| {
            format!("the update of shard {shard} in round {source}, which holds its control variate, is missing or damaged")
        })?;
        Ok((ck.scatter(GRAD_WEIGHT), ck.tensor(GRAD_BIAS)[0]))
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
}
