//! Spreading training reviews over worker shards: pure functions from labels to index
//! lists, so the statistical properties are unit-tested without any files.
//!
//! * [`iid`]: stratified; every shard sees the same label balance (the baseline of
//!   federated learning papers).
//! * [`dirichlet`]: label skew; each label's reviews are split by proportions drawn from a
//!   symmetric Dirichlet(alpha), as the Dirichlet label partitioners of Flower
//!   (`DirichletPartitioner`) and FedLab (`hetero_dir_partition`) do. Small alpha gives
//!   shards dominated by one label; large alpha approaches IID.
//!
//! Randomness comes from one `StdRng` (ChaCha12 in rand 0.9, pinned by `Cargo.lock`) seeded
//! from `--seed`, consumed in a fixed order, and shuffles use [`shuffle`] below rather than
//! `SliceRandom`, so the shards depend only on the seed, the arguments and the canonical
//! review order.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use rand_distr::{Beta, Distribution, Gamma};

/// Why a partition cannot be made. Messages say what to change.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PartitionError {
    #[error("--workers must be at least 1 (one shard per worker)")]
    NoWorkers,
    #[error(
        "--workers {workers} is more than the {reviews} training reviews; every shard needs at least one review, so lower --workers"
    )]
    TooManyWorkers { workers: usize, reviews: usize },
    #[error(
        "--alpha must be a positive finite number (got {0}); typical values are 0.1 (strong label skew) to 10 (nearly IID)"
    )]
    BadAlpha(f64),
    #[error(
        "the Dirichlet partition left at least one of the {workers} shards empty in all {attempts} draws with alpha {alpha}; \
         raise --alpha (less skew) or lower --workers"
    )]
    EmptyShard {
        workers: usize,
        alpha: f64,
        attempts: usize,
    },
}

/// How many Dirichlet draws are tried before giving up on finding one with no empty shard.
pub const MAX_ATTEMPTS: usize = 1000;

/// Checks the arguments every partition shares.
fn check(n: usize, workers: usize) -> Result<(), PartitionError> {
    if workers == 0 {
        return Err(PartitionError::NoWorkers);
    }
    if workers > n {
        return Err(PartitionError::TooManyWorkers {
            workers,
            reviews: n,
        });
    }
    Ok(())
}

/// Checks `--alpha`: positive and finite (NaN fails the comparison).
pub fn check_alpha(alpha: f64) -> Result<(), PartitionError> {
    if alpha > 0.0 && alpha.is_finite() && alpha.is_normal() {
        Ok(())
    } else {
        Err(PartitionError::BadAlpha(alpha))
    }
}

/// Indices of each label value, ascending by label, each list in canonical order.
fn by_label(labels: &[u8]) -> Vec<Vec<usize>> {
    let mut groups: BTreeMap<u8, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        groups.entry(l).or_default().push(i);
    }
    groups.into_values().collect()
}

/// A uniform integer in `0..n` (n > 0), without modulo bias (Lemire's method).
fn below(rng: &mut impl RngCore, n: u64) -> u64 {
    let mut m = u128::from(rng.next_u64()) * u128::from(n);
    if (m as u64) < n {
        let threshold = n.wrapping_neg() % n;
        while (m as u64) < threshold {
            m = u128::from(rng.next_u64()) * u128::from(n);
        }
    }
    (m >> 64) as u64
}

/// Fisher–Yates shuffle.
pub fn shuffle<T>(items: &mut [T], rng: &mut impl RngCore) {
    for i in (1..items.len()).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// Stratified IID partition of `labels.len()` items over `workers` shards.
///
/// Each label's items are shuffled, then all labels are dealt round-robin as one sequence
/// (the second label continues where the first stopped), so shard sizes differ by at most
/// one and so do each label's counts. Each shard is then shuffled so that a trainer reading
/// it in file order sees the labels mixed.
pub fn iid(labels: &[u8], workers: usize, seed: u64) -> Result<Vec<Vec<usize>>, PartitionError> {
    check(labels.len(), workers)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut shards = vec![Vec::with_capacity(labels.len() / workers + 1); workers];
    let mut next = 0;
    for mut group in by_label(labels) {
        shuffle(&mut group, &mut rng);
        for i in group {
            shards[next].push(i);
            next = (next + 1) % workers;
        }
    }
    for shard in &mut shards {
        shuffle(shard, &mut rng);
    }
    Ok(shards)
}

/// One draw of proportions from a symmetric Dirichlet(alpha) over `n` parts, or `None` if
/// floating point failed (all parts underflowed), which the caller treats as a failed
/// attempt.
///
/// `rand_distr::Dirichlet` fixes the dimension at compile time, so this follows its two
/// methods for a run-time `n`: normalised Gamma(alpha, 1) draws, and for alpha <= 0.1,
/// where those underflow, stick-breaking with Beta draws.
pub fn sample_dirichlet(alpha: f64, n: usize, rng: &mut StdRng) -> Option<Vec<f64>> {
    if n == 1 {
        return Some(vec![1.0]);
    }
    let mut p = Vec::with_capacity(n);
    if alpha > 0.1 {
        let gamma = Gamma::new(alpha, 1.0).ok()?;
        p.extend((0..n).map(|_| gamma.sample(rng)));
        let sum: f64 = p.iter().sum();
        if !(sum > 0.0 && sum.is_finite()) {
            return None;
        }
        p.iter_mut().for_each(|x| *x /= sum);
    } else {
        let mut rest = 1.0;
        for i in 0..n - 1 {
            let beta = Beta::new(alpha, alpha * (n - 1 - i) as f64).ok()?;
            let x: f64 = beta.sample(rng);
            p.push(rest * x);
            rest *= 1.0 - x;
        }
        p.push(rest);
    }
    p.iter().all(|x| x.is_finite() && *x >= 0.0).then_some(p)
}

/// Splits `m` items by proportions `p` with cumulative rounding: boundary k is
/// `round(m * (p_0 + … + p_k))`, the last boundary is exactly `m`, so the counts sum to `m`
/// and each count is within one of `m * p_k`.
pub fn counts_from_proportions(m: usize, p: &[f64]) -> Vec<usize> {
    let mut counts = Vec::with_capacity(p.len());
    let (mut cum, mut prev) = (0.0, 0usize);
    for (k, x) in p.iter().enumerate() {
        cum += x;
        let bound = if k + 1 == p.len() {
            m
        } else {
            ((m as f64 * cum).round() as usize).clamp(prev, m)
        };
        counts.push(bound - prev);
        prev = bound;
    }
    counts
}

/// The smallest shard a Dirichlet partition makes unless told otherwise (`--min-shard`).
///
/// Without a floor, strong skew over many workers leaves some shards empty or with a
/// handful of reviews (at alpha 0.1 and 64 workers most draws do), and such a shard can
/// neither be trained on nor stand for anyone's data.
pub const DEFAULT_MIN_SHARD: usize = 32;

/// The partition flags, shared by the copier and the pipeline (which passes them on).
#[derive(Debug, Clone, Copy, PartialEq, clap::Args)]
pub struct PartitionArgs {
    /// How training reviews are spread: iid (stratified) or dirichlet (label skew).
    #[arg(long, value_enum, ignore_case = true, default_value = "iid")]
    pub partition: crate::manifest::Partition,
    /// Dirichlet concentration (dirichlet only): small = strong label skew.
    #[arg(long, default_value_t = 0.5, value_name = "A")]
    pub alpha: f64,
    /// Dirichlet only: the fewest reviews a shard gets. Shards drawn smaller are topped up
    /// with reviews from the end of the largest shard, which makes the smallest shards a
    /// little less skewed than drawn (docs: README "Partitions").
    #[arg(long, default_value_t = DEFAULT_MIN_SHARD, value_name = "N")]
    pub min_shard: usize,
}

impl Default for PartitionArgs {
    fn default() -> Self {
        Self {
            partition: crate::manifest::Partition::Iid,
            alpha: 0.5,
            min_shard: DEFAULT_MIN_SHARD,
        }
    }
}

impl PartitionArgs {
    /// Checks the flags before anything is read or written.
    pub fn validate(&self) -> Result<(), PartitionError> {
        check_alpha(self.alpha)
    }

    /// The alpha that shaped the shards: `None` for IID.
    pub fn dirichlet_alpha(&self) -> Option<f64> {
        (self.partition == crate::manifest::Partition::Dirichlet).then_some(self.alpha)
    }

    /// The flags as arguments for the copier's command line (alpha and the floor only
    /// where they apply, so an IID command reads as one).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["--partition".to_owned(), self.partition.to_string()];
        if let Some(alpha) = self.dirichlet_alpha() {
            args.extend([
                "--alpha".to_owned(),
                alpha.to_string(),
                "--min-shard".to_owned(),
                self.min_shard.to_string(),
            ]);
        }
        args
    }
}

/// Dirichlet label-skew partition with a floor of `min_size` reviews per shard (at most
/// half the mean shard size, so that small datasets keep their skew).
///
/// Each label's items are shuffled once; then for each label, in ascending label order,
/// proportions over the shards are drawn from Dirichlet(alpha) and the label's items are
/// cut into consecutive runs of those sizes. A draw whose floating point underflowed is
/// discarded and the next one from the same generator tried (so the result is still a
/// function of the seed), up to [`MAX_ATTEMPTS`].
///
/// Then every shard below `min_size` is topped up, smallest first, with reviews taken
/// from the end of the currently largest shard. This bends the Dirichlet draw in one
/// known way: the smallest shards gain reviews whose labels follow the largest shards'
/// mix, so they are a little less skewed than drawn, and the largest a little smaller.
/// With `min_size` 0 a shard may stay empty, which is an error. Each shard is finally
/// shuffled.
pub fn dirichlet(
    labels: &[u8],
    workers: usize,
    alpha: f64,
    min_size: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, PartitionError> {
    check(labels.len(), workers)?;
    check_alpha(alpha)?;
    // Never more than half the mean shard: the floor bends the draw, it must not replace it.
    let min_size = min_size.min(labels.len() / workers / 2);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut groups = by_label(labels);
    for group in &mut groups {
        shuffle(group, &mut rng);
    }
    for _ in 0..MAX_ATTEMPTS {
        let mut shards: Vec<Vec<usize>> = vec![Vec::new(); workers];
        let mut ok = true;
        for group in &groups {
            let Some(p) = sample_dirichlet(alpha, workers, &mut rng) else {
                ok = false;
                break;
            };
            let mut rest = group.as_slice();
            for (shard, count) in shards
                .iter_mut()
                .zip(counts_from_proportions(group.len(), &p))
            {
                let (head, tail) = rest.split_at(count);
                shard.extend_from_slice(head);
                rest = tail;
            }
        }
        if !ok {
            continue;
        }
        top_up(&mut shards, min_size);
        if shards.iter().all(|s| !s.is_empty()) {
            for shard in &mut shards {
                shuffle(shard, &mut rng);
            }
            return Ok(shards);
        }
    }
    Err(PartitionError::EmptyShard {
        workers,
        alpha,
        attempts: MAX_ATTEMPTS,
    })
}

/// Moves items from the largest shards to every shard smaller than `min_size` (smallest
/// first, ties by index), one at a time from the end of the largest shard (ties by the
/// lowest index). Needs `min_size * shards <= items`, checked by the caller.
fn top_up(shards: &mut [Vec<usize>], min_size: usize) {
    loop {
        let Some((small, _)) = shards
            .iter()
            .enumerate()
            .filter(|(_, s)| s.len() < min_size)
            .min_by_key(|(i, s)| (s.len(), *i))
        else {
            return;
        };
        let (large, _) = shards
            .iter()
            .enumerate()
            .max_by_key(|(i, s)| (s.len(), std::cmp::Reverse(*i)))
            .expect("shards");
        let item = shards[large]
            .pop()
            .expect("the largest shard holds more than the floor");
        shards[small].push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` labels, `pos_every`-th one positive.
    fn labels(n: usize, pos_every: usize) -> Vec<u8> {
        (0..n).map(|i| u8::from(i % pos_every == 0)).collect()
    }

    fn assert_exactly_once(shards: &[Vec<usize>], n: usize) {
        let mut seen = vec![0u32; n];
        for &i in shards.iter().flatten() {
            seen[i] += 1;
        }
        assert!(
            seen.iter().all(|&c| c == 1),
            "some item is missing or repeated"
        );
    }

    fn spread(xs: impl Iterator<Item = usize>) -> usize {
        let v: Vec<usize> = xs.collect();
        v.iter().max().unwrap() - v.iter().min().unwrap()
    }

    #[test]
    fn iid_sizes_and_label_counts_are_within_one() {
        for (n, pos_every, workers) in [
            (1000, 2, 5),
            (1003, 3, 7),
            (10, 2, 10),
            (17, 5, 4),
            (1, 1, 1),
            (25, 1, 4),
        ] {
            let l = labels(n, pos_every);
            let shards = iid(&l, workers, 42).unwrap();
            assert_eq!(shards.len(), workers);
            assert_exactly_once(&shards, n);
            assert!(spread(shards.iter().map(Vec::len)) <= 1, "{n} {workers}");
            for label in [0, 1] {
                assert!(
                    spread(
                        shards
                            .iter()
                            .map(|s| s.iter().filter(|&&i| l[i] == label).count())
                    ) <= 1
                );
            }
        }
    }

    #[test]
    fn iid_is_deterministic_and_seeded_and_shuffles_within_shards() {
        let l = labels(500, 2);
        assert_eq!(iid(&l, 4, 7).unwrap(), iid(&l, 4, 7).unwrap());
        assert_ne!(iid(&l, 4, 7).unwrap(), iid(&l, 4, 8).unwrap());
        let shard = &iid(&l, 1, 7).unwrap()[0];
        assert!(
            shard.windows(2).any(|w| w[0] > w[1]),
            "shard rows are not shuffled"
        );
        // Labels are mixed within a shard, not all negatives then all positives.
        let first_half_pos = shard[..250].iter().filter(|&&i| l[i] == 1).count();
        assert!((60..190).contains(&first_half_pos), "{first_half_pos}");
    }

    #[test]
    fn bad_worker_counts_and_alphas_are_refused() {
        let l = labels(10, 2);
        assert_eq!(iid(&l, 0, 1), Err(PartitionError::NoWorkers));
        assert_eq!(
            iid(&l, 11, 1),
            Err(PartitionError::TooManyWorkers {
                workers: 11,
                reviews: 10
            })
        );
        assert_eq!(
            dirichlet(&l, 11, 0.5, 0, 1),
            Err(PartitionError::TooManyWorkers {
                workers: 11,
                reviews: 10
            })
        );
        for a in [0.0, -1.0, f64::INFINITY, 1e-320] {
            assert_eq!(dirichlet(&l, 2, a, 0, 1), Err(PartitionError::BadAlpha(a)));
        }
        assert!(matches!(
            dirichlet(&l, 2, f64::NAN, 0, 1),
            Err(PartitionError::BadAlpha(_))
        ));
    }

    #[test]
    fn dirichlet_covers_exactly_once_without_empty_shards_and_is_deterministic() {
        for (n, workers, alpha) in [
            (2000, 5, 0.5),
            (2000, 10, 0.1),
            (300, 3, 0.05),
            (50, 1, 0.5),
            (40, 20, 1.0),
            (1000, 4, 100.0),
        ] {
            let l = labels(n, 2);
            let shards = dirichlet(&l, workers, alpha, 1, 42).unwrap();
            assert_eq!(shards.len(), workers);
            assert_exactly_once(&shards, n);
            assert!(
                shards.iter().all(|s| !s.is_empty()),
                "{n} {workers} {alpha}"
            );
            assert_eq!(shards, dirichlet(&l, workers, alpha, 1, 42).unwrap());
            assert_ne!(shards, dirichlet(&l, workers, alpha, 1, 43).unwrap());
        }
    }

    #[test]
    fn dirichlet_skew_follows_alpha() {
        let l = labels(10_000, 2);
        let max_imbalance = |alpha: f64| {
            let shards = dirichlet(&l, 10, alpha, 0, 3).unwrap();
            shards
                .iter()
                .map(|s| {
                    let pos = s.iter().filter(|&&i| l[i] == 1).count() as f64 / s.len() as f64;
                    (pos - 0.5).abs()
                })
                .fold(0.0, f64::max)
        };
        assert!(
            max_imbalance(0.1) > 0.3,
            "alpha 0.1 should give label-skewed shards"
        );
        assert!(
            max_imbalance(1000.0) < 0.05,
            "alpha 1000 should be nearly balanced"
        );
    }

    #[test]
    fn min_shard_floor_holds_where_plain_draws_leave_shards_empty() {
        let l = labels(25_000, 2);
        // The case of the issue: 64 workers at alpha 0.1 left a shard empty in every draw.
        assert!(matches!(
            dirichlet(&l, 64, 0.1, 0, 42),
            Err(PartitionError::EmptyShard { .. })
        ));
        let shards = dirichlet(&l, 64, 0.1, 32, 42).unwrap();
        assert_exactly_once(&shards, l.len());
        assert!(
            shards.iter().all(|s| s.len() >= 32),
            "{:?}",
            shards.iter().map(Vec::len).collect::<Vec<_>>()
        );
        // Still skewed: many shards are dominated by one label.
        let skewed = shards
            .iter()
            .filter(|s| {
                let pos = s.iter().filter(|&&i| l[i] == 1).count() as f64 / s.len() as f64;
                !(0.1..=0.9).contains(&pos)
            })
            .count();
        assert!(skewed > 20, "only {skewed} of 64 shards are skewed");
        assert_eq!(shards, dirichlet(&l, 64, 0.1, 32, 42).unwrap());
        // A floor above half the mean shard (390 reviews) is lowered to it.
        let shards = dirichlet(&l, 64, 0.1, 1000, 42).unwrap();
        assert!(
            shards.iter().all(|s| s.len() >= 195),
            "{:?}",
            shards.iter().map(Vec::len).min()
        );
    }

    #[test]
    fn impossible_dirichlet_fails_with_advice() {
        let l = labels(30, 2);
        let err = dirichlet(&l, 30, 0.001, 0, 1).unwrap_err();
        assert_eq!(
            err,
            PartitionError::EmptyShard {
                workers: 30,
                alpha: 0.001,
                attempts: MAX_ATTEMPTS
            }
        );
        assert!(err.to_string().contains("raise --alpha"));
    }

    #[test]
    fn cumulative_rounding_sums_exactly() {
        assert_eq!(
            counts_from_proportions(10, &[0.25, 0.25, 0.5]),
            vec![3, 2, 5]
        );
        assert_eq!(counts_from_proportions(7, &[1.0]), vec![7]);
        assert_eq!(counts_from_proportions(3, &[0.0, 0.0, 1.0]), vec![0, 0, 3]);
        let p = [0.1234, 0.3, 0.0001, 0.5765];
        for m in [0, 1, 9, 1001] {
            let c = counts_from_proportions(m, &p);
            assert_eq!(c.iter().sum::<usize>(), m);
            for (ci, pi) in c.iter().zip(p) {
                assert!((*ci as f64 - m as f64 * pi).abs() <= 1.0);
            }
        }
    }

    #[test]
    fn dirichlet_samples_are_proportions() {
        let mut rng = StdRng::seed_from_u64(0);
        for alpha in [0.01, 0.1, 0.5, 5.0] {
            let p = sample_dirichlet(alpha, 8, &mut rng).unwrap();
            assert_eq!(p.len(), 8);
            assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{alpha}: {p:?}");
        }
    }

    #[test]
    fn below_is_in_range_and_covers_it() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            seen[below(&mut rng, 7) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }
}
