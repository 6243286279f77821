//! Combining a round's updates into the next global model by the rule of
//! [`fedimdb::strategy::Strategy`]: FedAvg, or one of two robust rules, the coordinate-wise median and the coordinate-wise trimmed mean (Flower's
//! `FedMedian` and `FedTrimmedAvg`).
//!
//! FedAvg streams: each update is added to a running f64 sum and dropped (see
//! [`WeightedSum`]), so memory stays at about two models whatever the number of workers.
//! The robust rules need every update's value of a coordinate at once, so they hold all the
//! updates, but as the workers wrote them: the values at the buckets a shard touched, and a
//! [`Fill`] that computes every other bucket on demand from the global model and the
//! control variate, which all updates share. Memory then follows the buckets the shards
//! touch, which grows with the data, not with the number of workers (dense, 64 workers
//! would need 64 × 16 MiB).
//!
//! The robust rules are unweighted, like Flower's: a worker's sample count is the one thing
//! it could lie about most cheaply, and weighting by it would hand a poisoner the vote.
//! Their output is deterministic: the values of a coordinate are sorted with
//! [`f32::total_cmp`] (a total order, so the sorted sequence does not depend on the order of
//! the updates or of the threads), averages are taken in f64 in that order, and the median of
//! an even count is the mean of the two middle values, as `numpy.median` computes it.
//! Inputs are finite (checkpoints holding NaN or infinity are refused when read), so the
//! results are finite too: every result lies between the smallest and largest input.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Result, ensure};
use fedimdb::checkpoint::{Checkpoint, Values};
use fedimdb::model::{BIAS, WEIGHT};
use fedimdb::strategy::Strategy;
use fedimdb::train::Drift;

use crate::average::{WeightedSum, add_scaled};

/// How many of `n` values a trimmed mean cuts from each end: `floor(trim · n)`, as Flower's
/// `FedTrimmedAvg` (and `scipy.stats.trim_mean`) count. Below 0.5 this always leaves at least
/// one value.
pub fn trim_count(n: usize, trim: f64) -> usize {
    (trim * n as f64).floor() as usize
}

/// The median of `values`, reordering them; the mean of the two middle values (in f64) when
/// their number is even. `values` must be non-empty and finite.
pub fn median(values: &mut [f32]) -> f32 {
    debug_assert!(!values.is_empty());
    values.sort_unstable_by(f32::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        ((f64::from(values[n / 2 - 1]) + f64::from(values[n / 2])) / 2.0) as f32
    }
}

/// The mean of `values` without the `cut` smallest and the `cut` largest, reordering them;
/// summed in f64 in ascending order. Needs `2 · cut < values.len()`.
pub fn trimmed_mean(values: &mut [f32], cut: usize) -> f32 {
    debug_assert!(2 * cut < values.len());
    values.sort_unstable_by(f32::total_cmp);
    let kept = &values[cut..values.len() - cut];
    (kept.iter().map(|&x| f64::from(x)).sum::<f64>() / kept.len() as f64) as f32
}

/// How far the round's workers moved the biases, combined by the strategy's rule: the
/// spread the agreement step measures the combined move against
/// ([`fedimdb::server_optimizer::ServerOptimizer::step_bias`]). FedAvg takes the
/// sample-weighted mean of the workers' `|Δ_k|` (their bias minus the global one); the robust
/// rules take the median or trimmed mean of them, unweighted, so an outlier's move is left
/// out of the spread as its bias is left out of the combined one.
#[derive(Debug, Clone)]
pub struct BiasSpread {
    strategy: Strategy,
    /// Per worker: its weight and `|Δ_k|` per row.
    moves: Vec<(f64, Vec<f32>)>,
}

impl BiasSpread {
    pub fn new(strategy: Strategy) -> Self {
        Self {
            strategy,
            moves: Vec::new(),
        }
    }

    /// Adds a worker's trained biases against the round's global ones, `base`; `samples`
    /// weighs it under FedAvg.
    pub fn add(&mut self, base: &[f32], bias: &[f32], samples: f64) {
        assert_eq!(base.len(), bias.len(), "one bias per row");
        let m = base.iter().zip(bias).map(|(b, x)| (x - b).abs()).collect();
        self.moves.push((samples, m));
    }

    /// The spread of each of `rows` rows (zero without workers). Fails as the combiner does
    /// when `--trim` leaves no value.
    pub fn finish(self, rows: usize) -> Result<Vec<f64>> {
        if self.moves.is_empty() {
            return Ok(vec![0.0; rows]);
        }
        let spread = match Rule::of(self.strategy, self.moves.len())? {
            None => {
                let total: f64 = self.moves.iter().map(|(p, _)| p).sum();
                (0..rows)
                    .map(|r| {
                        let sum: f64 = self.moves.iter().map(|(p, m)| p * f64::from(m[r])).sum();
                        if total > 0.0 { sum / total } else { 0.0 }
                    })
                    .collect()
            }
            Some(rule) => (0..rows)
                .map(|r| {
                    let mut v: Vec<f32> = self.moves.iter().map(|(_, m)| m[r]).collect();
                    f64::from(rule.apply(&mut v))
                })
                .collect(),
        };
        Ok(spread)
    }
}

/// What a sparse update stands for at a bucket it does not list: the global weight, moved
/// by the correction alone as the worker's own steps moved every bucket it never read
/// ([`Drift`]). The tables are shared by all the updates of a round.
#[derive(Debug, Clone)]
pub struct Fill {
    /// The round's global weights.
    pub base: Arc<Vec<f32>>,
    /// The correction the worker applied (the control variate's weights) and its drift over
    /// the worker's steps; `None` for an update trained without a correction.
    pub drift: Option<(Arc<Values>, Drift)>,
}

impl Fill {
    /// The update's value at bucket `j` when the worker did not write it.
    #[inline]
    fn at(&self, j: usize) -> f32 {
        match &self.drift {
            Some((d, drift)) => drift.apply(self.base[j], d[j]),
            None => self.base[j],
        }
    }

    /// Whether `other` stands for the same values at every place: the same tables and the
    /// same drift. All of a round's workers that took the same steps share one fill.
    fn same(&self, other: &Fill) -> bool {
        Arc::ptr_eq(&self.base, &other.base)
            && match (&self.drift, &other.drift) {
                (None, None) => true,
                (Some((a, x)), Some((b, y))) => Arc::ptr_eq(a, b) && x == y,
                _ => false,
            }
    }

    /// [`Self::at`] at the places `range`, in f64, into `out`.
    fn values_into(&self, range: std::ops::Range<usize>, out: &mut Vec<f64>) {
        out.clear();
        out.extend(range.map(|j| self.at(j) as f64));
    }

    /// The dense weights a sparse update stands for (what FedAvg adds, as a table).
    #[cfg(test)]
    pub fn dense(&self, index: &[u32], values: &[f32]) -> Vec<f32> {
        let mut w: Vec<f32> = (0..self.base.len()).map(|j| self.at(j)).collect();
        for (&j, &v) in index.iter().zip(values) {
            w[j as usize] = v;
        }
        w
    }
}

/// A sparse update's buckets as places in its row-major weights: `r · dim + j` for every row
/// `r` and listed bucket `j`, ascending like the values the update lists.
pub fn flat_index(index: &[u32], rows: usize, dim: usize) -> Vec<u32> {
    (0..rows)
        .flat_map(|r| index.iter().map(move |&j| (r * dim) as u32 + j))
        .collect()
}

/// One tensor of one update as the robust rules hold it.
#[derive(Debug)]
pub enum Held {
    /// Every value.
    Dense(Vec<f32>),
    /// The values at the ascending buckets of `index`; `fill` gives the others.
    Sparse {
        index: Vec<u32>,
        values: Vec<f32>,
        fill: Fill,
    },
}

impl Held {
    fn len(&self) -> usize {
        match self {
            Held::Dense(values) => values.len(),
            Held::Sparse { fill, .. } => fill.base.len(),
        }
    }

    /// The value at bucket `j`, for a walk in ascending `j`: `cursor` is the position in
    /// `index` of the first listed bucket not below `j`, and moves past `j` when it is listed.
    #[inline]
    fn value(&self, j: usize, cursor: &mut usize) -> f32 {
        match self {
            Held::Dense(values) => values[j],
            Held::Sparse { index, values, .. }
                if index.get(*cursor).is_some_and(|&i| i as usize == j) =>
            {
                *cursor += 1;
                values[*cursor - 1]
            }
            Held::Sparse { fill, .. } => fill.at(j),
        }
    }

    /// Where a walk from bucket `offset` starts in `index`.
    fn cursor_at(&self, offset: usize) -> usize {
        match self {
            Held::Dense(_) => 0,
            Held::Sparse { index, .. } => index.partition_point(|&i| (i as usize) < offset),
        }
    }
}

/// How many sparse updates FedAvg adds to its sum in one walk over the model.
const GROUP: usize = 8;

/// Places per block of that walk: a block's running sums (64 KiB) stay in cache while the
/// group's updates are added to them, where one walk per update streamed the whole
/// model-sized sum, base and correction through memory again for every worker.
const BLOCK: usize = 8192;

/// A sparse update FedAvg has checked and counted, its weights not yet added to the sum.
#[derive(Debug)]
pub struct Pending {
    index: Vec<u32>,
    values: Vec<f32>,
    fill: Fill,
    weight: f64,
}

/// Adds the weights of the `pending` updates to `sum`, in the order they came, block by
/// block: every place of the sum gets the same additions in the same order as when each
/// update was added whole, so the bits are the same. A block's fill values are computed once
/// for all the updates that share the fill, instead of once per update.
fn add_pending(sum: &mut WeightedSum, pending: &mut Vec<Pending>) {
    let Some(table) = sum.sum_mut(WEIGHT).filter(|_| !pending.is_empty()) else {
        return;
    };
    let mut at = vec![0; pending.len()];
    let (mut fill, mut before) = (Vec::with_capacity(BLOCK), Vec::new());
    for (block, start) in table.chunks_mut(BLOCK).zip((0..).step_by(BLOCK)) {
        let end = start + block.len();
        let mut filled: Option<&Fill> = None;
        for (p, at) in pending.iter().zip(&mut at) {
            if !filled.is_some_and(|f| f.same(&p.fill)) {
                p.fill.values_into(start..end, &mut fill);
                filled = Some(&p.fill);
            }
            let to = *at + p.index[*at..].partition_point(|&j| (j as usize) < end);
            let (index, values) = (&p.index[*at..to], &p.values[*at..to]);
            add_sparse_block(block, start, p.weight, index, values, &fill, &mut before);
            *at = to;
        }
    }
    pending.clear();
}

/// Adds `weight` times a sparse update to `sum`, the sums of the places from `offset`: its
/// `values` at the strictly ascending places `index` (all in the span; checked when the
/// update was read), and `fill` (what it stands for at every place of the span, in f64) at
/// the others: at every place the one operation adding its dense table would do. The fill
/// is added everywhere in one long loop, which the compiler vectorises, and the listed
/// places are then set from their sums before it; the short runs between listed places cost
/// more in loop overhead than in additions.
fn add_sparse_block(
    sum: &mut [f64],
    offset: usize,
    weight: f64,
    index: &[u32],
    values: &[f32],
    fill: &[f64],
    before: &mut Vec<f64>,
) {
    before.clear();
    before.extend(index.iter().map(|&j| sum[j as usize - offset]));
    for (s, &f) in sum.iter_mut().zip(fill) {
        *s += weight * f;
    }
    for ((&j, &v), &s) in index.iter().zip(values).zip(before.iter()) {
        sum[j as usize - offset] = s + weight * v as f64;
    }
}

/// Collects a round's updates and combines them with a [`Strategy`].
#[derive(Debug)]
pub enum Combiner {
    /// FedAvg: a running weighted sum; at most [`GROUP`] sparse updates in memory at a time.
    Streaming {
        sum: WeightedSum,
        pending: Vec<Pending>,
    },
    /// Median and trimmed mean: every update's tensors, in the order they were added.
    Holding {
        strategy: Strategy,
        updates: Vec<BTreeMap<String, Held>>,
    },
}

impl Combiner {
    pub fn new(strategy: Strategy) -> Self {
        match strategy {
            Strategy::FedAvg => Combiner::Streaming {
                sum: WeightedSum::default(),
                pending: Vec::new(),
            },
            _ => Combiner::Holding {
                strategy,
                updates: Vec::new(),
            },
        }
    }

    /// Adds every tensor of the dense checkpoint `ck`; `weight` (its sample count) counts
    /// for FedAvg only. The first update fixes the tensor names and shapes; later ones must
    /// match.
    pub fn add(&mut self, ck: &Checkpoint, weight: f64) -> Result<()> {
        match self {
            Combiner::Streaming { sum, pending } => {
                add_pending(sum, pending);
                sum.add(ck, weight)
            }
            Combiner::Holding { updates, .. } => {
                let held = ck
                    .tensors
                    .iter()
                    .map(|(name, v)| (name.clone(), Held::Dense(v.to_vec())))
                    .collect();
                hold(updates, held, weight)
            }
        }
    }

    /// Adds a worker's sparse update `ck` (its weights at the buckets of `ck.index`, and
    /// its bias), the other buckets given by `fill`. FedAvg adds the dense weights it stands
    /// for to its sum; the robust rules keep it sparse.
    pub fn add_sparse(&mut self, ck: &Checkpoint, fill: Fill, weight: f64) -> Result<()> {
        let index = flat_index(&ck.index, ck.header.config.rows(), ck.header.config.dim());
        self.add_parts(index, ck.tensor(WEIGHT), ck.tensor(BIAS), fill, weight)
    }

    /// Adds a sparse table given by its parts, as [`Self::add_sparse`] adds an update's:
    /// `values` at the ascending row-major places `index` ([`flat_index`]), `fill` at the
    /// others, and `bias`. The aggregator combines the workers' gradients (the control
    /// variate) this way too.
    pub fn add_parts(
        &mut self,
        index: Vec<u32>,
        values: &[f32],
        bias: &[f32],
        fill: Fill,
        weight: f64,
    ) -> Result<()> {
        let bias = bias.to_vec();
        match self {
            Combiner::Streaming { sum, pending } => {
                // Checked and counted now, with its bias; its weights join the pending
                // group, added with the others in one walk over the model.
                let shapes = [(BIAS, bias.len()), (WEIGHT, fill.base.len())];
                sum.add_with(&shapes, weight, |name, sum| {
                    if name == BIAS {
                        add_scaled(sum, weight, &bias);
                    }
                })?;
                pending.push(Pending {
                    index,
                    values: values.to_vec(),
                    fill,
                    weight,
                });
                if pending.len() == GROUP {
                    add_pending(sum, pending);
                }
                Ok(())
            }
            Combiner::Holding { updates, .. } => {
                let weights = Held::Sparse {
                    index,
                    values: values.to_vec(),
                    fill,
                };
                let held = BTreeMap::from([
                    (WEIGHT.to_owned(), weights),
                    (BIAS.to_owned(), Held::Dense(bias)),
                ]);
                hold(updates, held, weight)
            }
        }
    }

    /// The combined value of every tensor.
    pub fn combine(self) -> Result<BTreeMap<String, Vec<f32>>> {
        match self {
            Combiner::Streaming {
                mut sum,
                mut pending,
            } => {
                add_pending(&mut sum, &mut pending);
                Ok(sum.mean())
            }
            Combiner::Holding { strategy, updates } => {
                ensure!(!updates.is_empty(), "no updates to combine");
                let rule = Rule::of(strategy, updates.len())?.expect("FedAvg streams");
                let names: Vec<String> = updates[0].keys().cloned().collect();
                Ok(names
                    .into_iter()
                    .map(|name| {
                        let columns: Vec<&Held> = updates.iter().map(|u| &u[&name]).collect();
                        let out = coordinate_wise(&columns, rule);
                        (name, out)
                    })
                    .collect())
            }
        }
    }
}

/// Keeps one update's tensors after checking them against the first update's.
fn hold(
    updates: &mut Vec<BTreeMap<String, Held>>,
    held: BTreeMap<String, Held>,
    weight: f64,
) -> Result<()> {
    ensure!(
        weight > 0.0,
        "an update with {weight} samples cannot be combined"
    );
    if let Some(first) = updates.first() {
        let names: Vec<&String> = held.keys().collect();
        let expect: Vec<&String> = first.keys().collect();
        ensure!(
            names == expect,
            "tensors {names:?} differ from the first update's {expect:?}"
        );
        for (name, v) in &held {
            let n = first[name].len();
            ensure!(
                v.len() == n,
                "tensor `{name}` has {} values, the first update's has {n}",
                v.len()
            );
        }
    }
    updates.push(held);
    Ok(())
}

/// A robust strategy's rule for one coordinate's `n` values.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Median,
    Trimmed(usize),
}

impl Rule {
    /// The rule `strategy` applies to `n` values; `None` for FedAvg, the weighted mean.
    /// Fails when `--trim` would cut every value.
    fn of(strategy: Strategy, n: usize) -> Result<Option<Rule>> {
        Ok(match strategy {
            Strategy::FedAvg => None,
            Strategy::Median => Some(Rule::Median),
            Strategy::TrimmedMean { trim } => {
                let cut = trim_count(n, trim);
                ensure!(
                    2 * cut < n,
                    "--trim {trim} cuts {cut} of {n} values from each end and leaves none; use a smaller --trim"
                );
                Some(Rule::Trimmed(cut))
            }
        })
    }

    /// The combined value of one coordinate's `values`, reordering them.
    fn apply(self, values: &mut [f32]) -> f32 {
        match self {
            Rule::Median => median(values),
            Rule::Trimmed(cut) => trimmed_mean(values, cut),
        }
    }
}

/// Applies `rule` to every coordinate of same-length tensors, on all cores. Each output
/// value depends only on its coordinate's values, so the split over threads cannot change
/// it.
fn coordinate_wise(inputs: &[&Held], rule: Rule) -> Vec<f32> {
    let len = inputs[0].len();
    let mut out = vec![0f32; len];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = len.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let offset = c * chunk;
                let mut scratch = vec![0f32; inputs.len()];
                let mut cursors: Vec<usize> = inputs.iter().map(|h| h.cursor_at(offset)).collect();
                for (i, o) in part.iter_mut().enumerate() {
                    for ((x, input), cursor) in scratch.iter_mut().zip(inputs).zip(&mut cursors) {
                        *x = input.value(offset + i, cursor);
                    }
                    *o = rule.apply(&mut scratch);
                }
            });
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::update as ck;
    use fedimdb::checkpoint::Kind;

    fn combine(
        strategy: Strategy,
        cks: &[Checkpoint],
        weights: &[f64],
    ) -> BTreeMap<String, Vec<f32>> {
        let mut c = Combiner::new(strategy);
        for (ck, &w) in cks.iter().zip(weights) {
            c.add(ck, w).unwrap();
        }
        c.combine().unwrap()
    }

    #[test]
    fn the_bias_spread_is_combined_by_the_strategy() {
        let spread = |strategy| {
            let mut s = BiasSpread::new(strategy);
            // Moves of +1, -2 and an outlier's +30, with 5, 3 and 2 samples.
            for (b, n) in [(1.5f32, 5.0), (-1.5, 3.0), (30.5, 2.0)] {
                s.add(&[0.5], &[b], n);
            }
            s.finish(1).unwrap()[0]
        };
        assert_eq!(spread(Strategy::FedAvg), (5.0 + 6.0 + 60.0) / 10.0);
        assert_eq!(spread(Strategy::Median), 2.0);
        assert_eq!(spread(Strategy::TrimmedMean { trim: 0.34 }), 2.0);
        assert_eq!(
            BiasSpread::new(Strategy::FedAvg).finish(2).unwrap(),
            vec![0.0, 0.0]
        );
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0]), 3.0);
        assert_eq!(median(&mut [5.0, -1.0, 2.0]), 2.0);
        assert_eq!(
            median(&mut [4.0, 1.0, 100.0, 2.0]),
            3.0,
            "mean of the two middle values"
        );
        assert_eq!(median(&mut [1.0, 2.0]), 1.5);
        assert_eq!(median(&mut [7.0, 7.0, 7.0, -7.0]), 7.0);
        // The two middle values are averaged in f64: in f32, (a + b) / 2 overflows.
        assert_eq!(median(&mut [f32::MAX, f32::MAX, 0.0, f32::MAX]), f32::MAX);
        // f32::total_cmp puts -0.0 before 0.0: a fixed order, so the result does not depend
        // on the input order.
        assert_eq!(median(&mut [0.0, -0.0, 1.0]).to_bits(), 0f32.to_bits());
        assert_eq!(median(&mut [-0.0, 0.0, -1.0]).to_bits(), (-0f32).to_bits());
    }

    #[test]
    fn trimmed_mean_cuts_floor_of_trim_times_n_from_each_end() {
        assert_eq!(trim_count(5, 0.2), 1);
        assert_eq!(
            trim_count(4, 0.2),
            0,
            "0.8 values: nothing is cut, the plain mean"
        );
        assert_eq!(trim_count(10, 0.25), 2);
        assert_eq!(trim_count(3, 0.49), 1);
        assert_eq!(trim_count(1, 0.49), 0);
        assert_eq!(trimmed_mean(&mut [1.0, 100.0, 2.0, 3.0, -50.0], 1), 2.0);
        assert_eq!(trimmed_mean(&mut [1.0, 2.0, 3.0, 10.0], 0), 4.0);
        assert_eq!(trimmed_mean(&mut [1.0, 2.0, 4.0, 10.0], 1), 3.0);
        assert_eq!(trimmed_mean(&mut [9.0, 1.0, 5.0], 1), 5.0, "one value left");
        // Summed in f64: the f32 sum of these would overflow.
        assert_eq!(
            trimmed_mean(&mut [f32::MAX, f32::MAX, f32::MAX], 0),
            f32::MAX
        );
    }

    #[test]
    fn a_trim_below_one_half_leaves_a_value() {
        // Below 0.5 (what `fedimdb::strategy::parse_trim` admits) at least one value is
        // left, whatever the count.
        for n in 1..200 {
            for trim in [0.0, 0.1, 0.2, 0.25, 0.33, 0.4, 0.49, 0.4999999] {
                assert!(2 * trim_count(n, trim) < n, "n {n} trim {trim}");
            }
        }
    }

    #[test]
    fn strategies_combine_every_tensor_coordinate_wise() {
        // Five updates; the fifth is an outlier in every coordinate.
        let cks: Vec<Checkpoint> = [1.0f32, 2.0, 3.0, 4.0, 1000.0]
            .iter()
            .map(|&b| ck(b, move |i| if i % 2 == 0 { b } else { -b * i as f32 }))
            .collect();
        let w = [1.0, 1.0, 1.0, 1.0, 1.0];

        let avg = combine(Strategy::FedAvg, &cks, &w);
        assert_eq!(avg["linear.bias"], vec![202.0]);

        let med = combine(Strategy::Median, &cks, &w);
        assert_eq!(med["linear.bias"], vec![3.0]);
        assert_eq!(med["linear.weight"][0], 3.0);
        assert_eq!(med["linear.weight"][7], -21.0);

        let tm = combine(Strategy::TrimmedMean { trim: 0.2 }, &cks, &w);
        assert_eq!(tm["linear.bias"], vec![3.0]);
        assert_eq!(tm["linear.weight"][9], -27.0);

        // With four updates the median is the mean of the middle two, the 0.2-trimmed mean
        // cuts nothing (floor(0.8) = 0), the 0.25-trimmed mean cuts one from each end.
        let med4 = combine(Strategy::Median, &cks[1..], &w[1..]);
        assert_eq!(med4["linear.bias"], vec![3.5]);
        let tm4 = combine(Strategy::TrimmedMean { trim: 0.2 }, &cks[1..], &w[1..]);
        assert_eq!(tm4["linear.bias"], vec![252.25]);
        let tm4 = combine(Strategy::TrimmedMean { trim: 0.25 }, &cks[1..], &w[1..]);
        assert_eq!(tm4["linear.bias"], vec![3.5]);

        // One update: every strategy returns it.
        for s in [
            Strategy::FedAvg,
            Strategy::Median,
            Strategy::TrimmedMean { trim: 0.4 },
        ] {
            assert_eq!(
                combine(s, &cks[2..3], &[5.0])["linear.weight"],
                cks[2].tensors["linear.weight"].to_vec(),
                "{s}"
            );
        }
    }

    #[test]
    fn robust_strategies_ignore_sample_counts_and_input_order() {
        let cks: Vec<Checkpoint> = [5.0f32, -1.0, 2.0]
            .iter()
            .map(|&b| ck(b, move |i| b + i as f32))
            .collect();
        let a = combine(Strategy::Median, &cks, &[1.0, 1.0, 1.0]);
        let b = combine(
            Strategy::Median,
            &[cks[2].clone(), cks[0].clone(), cks[1].clone()],
            &[1000.0, 1.0, 7.0],
        );
        assert_eq!(a, b);
        assert_eq!(a["linear.bias"], vec![2.0]);
        // FedAvg does weight by sample count.
        assert_eq!(
            combine(Strategy::FedAvg, &cks, &[1.0, 2.0, 1.0])["linear.bias"],
            vec![1.25]
        );
    }

    #[test]
    fn sparse_updates_combine_as_the_dense_models_they_stand_for() {
        use fedimdb::checkpoint::Header;
        use fedimdb::model::ModelConfig;
        use fedimdb::train::Schedule;
        let dim = 1024;
        let base = Arc::new((0..dim).map(|j| (j % 7) as f32 * 0.1).collect::<Vec<f32>>());
        let d = Arc::new(Values::from(
            (0..dim)
                .map(|j| ((j % 5) as f32 - 2.0) * 1e-3)
                .collect::<Vec<f32>>(),
        ));
        let drift = Drift::new(50, 0.5, Schedule::Linear);
        // Three workers writing different buckets (across the threads' chunk boundaries);
        // the third trained without a correction, so its silent buckets are the base's.
        let updates: Vec<(Checkpoint, Fill)> = (0..3usize)
            .map(|k| {
                let index: Vec<u32> = (k as u32..dim as u32).step_by(k + 2).collect();
                let values: Vec<f32> = index.iter().map(|&j| j as f32 * (k as f32 - 1.0)).collect();
                let ck = Checkpoint {
                    header: Header::new(Kind::Update, ModelConfig::with_buckets(10, 3), 1),
                    tensors: BTreeMap::from([
                        (WEIGHT.to_owned(), values.into()),
                        (BIAS.to_owned(), vec![k as f32].into()),
                    ]),
                    index,
                    sha256: String::new(),
                };
                let fill = Fill {
                    base: Arc::clone(&base),
                    drift: (k != 2).then(|| (Arc::clone(&d), drift)),
                };
                (ck, fill)
            })
            .collect();
        for strategy in [
            Strategy::Median,
            Strategy::TrimmedMean { trim: 0.34 },
            Strategy::FedAvg,
        ] {
            let (mut sparse, mut dense) = (Combiner::new(strategy), Combiner::new(strategy));
            for (ck, fill) in &updates {
                sparse.add_sparse(ck, fill.clone(), 10.0).unwrap();
                let w = fill.dense(&ck.index, ck.tensor(WEIGHT));
                let full = Checkpoint::dense(
                    Kind::Update,
                    ck.header.clone(),
                    [(WEIGHT, w), (BIAS, ck.tensor(BIAS).to_vec())],
                );
                dense.add(&full, 10.0).unwrap();
            }
            let (a, b) = (sparse.combine().unwrap(), dense.combine().unwrap());
            assert_eq!(a, b, "{strategy}");
            // Not all silent: a bucket none of the three wrote moved by the drift.
            let j = (0..dim)
                .find(|j| j % 2 != 0 && j % 3 != 1 && j % 4 != 2)
                .unwrap();
            assert_ne!(a[WEIGHT][j], base[j], "{strategy} at {j}");
        }
    }

    #[test]
    fn fedavg_adds_groups_of_sparse_updates_block_by_block_to_the_same_bits() {
        use fedimdb::checkpoint::Header;
        use fedimdb::model::ModelConfig;
        use fedimdb::train::Schedule;
        // More updates than a group, more places than a block; fills shared, differing in
        // drift, or without one; updates listing no place of a block, or every place.
        let dim = 2 * BLOCK + 100;
        let base = Arc::new(
            (0..dim)
                .map(|j| (j % 11) as f32 * 0.37)
                .collect::<Vec<f32>>(),
        );
        let d = Arc::new(Values::from(
            (0..dim)
                .map(|j| ((j % 13) as f32 - 6.0) * 1e-3)
                .collect::<Vec<f32>>(),
        ));
        let n = 2 * GROUP + 3;
        let (mut sparse, mut dense) = (
            Combiner::new(Strategy::FedAvg),
            Combiner::new(Strategy::FedAvg),
        );
        for k in 0..n {
            let index: Vec<u32> = match k % 4 {
                0 => (k as u32..dim as u32).step_by(k + 2).collect(),
                1 => (BLOCK as u32..BLOCK as u32 + 50).collect(),
                2 => (0..dim as u32).collect(),
                _ => vec![],
            };
            let values: Vec<f32> = index.iter().map(|&j| (j as f32).sin() * k as f32).collect();
            let ck = Checkpoint {
                header: Header::new(Kind::Update, ModelConfig::with_buckets(10, 3), 1),
                tensors: BTreeMap::from([
                    (WEIGHT.to_owned(), values.into()),
                    (BIAS.to_owned(), vec![k as f32 * 0.1].into()),
                ]),
                index,
                sha256: String::new(),
            };
            let steps = if k % 3 == 0 { 40 } else { 50 };
            let fill = Fill {
                base: Arc::clone(&base),
                drift: (k % 5 != 4)
                    .then(|| (Arc::clone(&d), Drift::new(steps, 0.5, Schedule::Linear))),
            };
            let weight = 7.0 + k as f64 * 1.3;
            sparse.add_sparse(&ck, fill.clone(), weight).unwrap();
            let w = fill.dense(&ck.index, ck.tensor(WEIGHT));
            let full = Checkpoint::dense(
                Kind::Update,
                ck.header.clone(),
                [(WEIGHT, w), (BIAS, ck.tensor(BIAS).to_vec())],
            );
            dense.add(&full, weight).unwrap();
        }
        let (a, b) = (sparse.combine().unwrap(), dense.combine().unwrap());
        for (name, x) in &a {
            let y = &b[name];
            assert!(
                x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} differs from the sum of the dense tables"
            );
        }
    }

    #[test]
    fn refuses_mismatched_updates() {
        let mut c = Combiner::new(Strategy::Median);
        c.add(&ck(1.0, |_| 1.0), 1.0).unwrap();
        let mut short = ck(1.0, |_| 1.0);
        short
            .tensors
            .get_mut("linear.weight")
            .unwrap()
            .to_mut()
            .pop();
        assert!(format!("{:#}", c.add(&short, 1.0).unwrap_err()).contains("1023 values"));
        let mut renamed = ck(1.0, |_| 1.0);
        let v = renamed.tensors.remove("linear.bias").unwrap();
        renamed.tensors.insert("other".into(), v);
        assert!(
            format!("{:#}", c.add(&renamed, 1.0).unwrap_err())
                .contains("differ from the first update's")
        );
        assert!(Combiner::new(Strategy::Median).combine().is_err());
    }

    #[test]
    fn names_for_reports() {
        assert_eq!(Strategy::FedAvg.to_string(), "fedavg");
        assert_eq!(Strategy::Median.to_string(), "median");
        assert_eq!(
            Strategy::TrimmedMean { trim: 0.2 }.to_string(),
            "trimmed-mean(0.2)"
        );
        assert_eq!(
            Strategy::TrimmedMean { trim: 0.0 }.to_string(),
            "trimmed-mean(0)"
        );
    }
}
