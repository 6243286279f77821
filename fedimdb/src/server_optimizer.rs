//! The server's step: how the aggregator moves the global model by what a round's updates
//! agree on. The strategy ([`crate::strategy`]) combines the workers' weights into one
//! candidate; its difference from the round's global model, the displacement `Δ`, is what
//! the workers jointly ask for, and the server optimizer decides how far to go.
//!
//! * `adam` (the default): FedAdam's server step (Reddi et al., *Adaptive Federated
//!   Optimization*, ICLR 2021) on every weight, `m ← β1·m + (1−β1)·Δ`,
//!   `v ← β2·v + (1−β2)·Δ²`, `w ← w + η·m / (√v + τ)`, with β1 = 0.9 and β2 = 0.99.
//!   The biases take the **agreement step** ([`ServerOptimizer::step_bias`]).
//! * `none`: the combined weights and biases are the next global model (plain FedAvg,
//!   median, trimmed mean).
//!
//! Why the biases move by the workers' agreement: a bias is read by every review, so it is
//! where a shard's label skew shows most. Under SCAFFOLD a worker whose shard leans
//! positive ends its round with its bias pushed down (its correction keeps pushing after its
//! own gradient has faded) and its weights pushed up to make up for it, and a shard that
//! leans negative the other way. The mean of those bias moves is a small difference of
//! large, opposite ones; round after round it let the weights carry part of the shards'
//! label skew, and on reviews of new movies (which lack the training movies' n-grams) the
//! threshold drifted by up to 2.6 points of accuracy while every model still predicted half
//! of its training reviews positive (docs/BENCHMARKS.md, "the bias's agreement step"). So a
//! bias moves by the combined displacement `D` times `a²`, where `a = |D| / S` is the
//! workers' agreement on it and `S` combines the workers' own bias moves `|Δ_k|` by the
//! strategy's rule (the sample-weighted mean `Σ p_k |Δ_k|` under FedAvg, their median or
//! trimmed mean under the robust rules, so that an outlier's move stays out of it as its
//! bias does): fully when every worker moves it the same way (IID shards, `a ≈ 1`), barely
//! when skewed shards pull it apart.
//!
//! Why squared: SCAFFOLD's bias correction feeds on itself under label skew. A worker's
//! correction sets the residual its local model ends at, and as the model's logit scale
//! grows from round to round, reaching it takes a longer bias move (±2–12 logits in the
//! first training round, ±23–54 in the fifth, on held-out movies). Where large shards of
//! opposite labels pull against each other, `a` is about 0.05 and that does not matter.
//! Where one large mixed shard moves with a small single-label one, `a` stayed at 0.3–0.5,
//! the global bias climbed by 6 logits in five rounds, and the threshold on new movies moved
//! by up to a point of accuracy. With `a²` that factor is 0.1–0.25. IID rounds keep `a`
//! at 0.93–1 while the bias still has a long way to go; only their last rounds, where the
//! bias moves are small and go both ways, take smaller steps than before
//! (docs/BENCHMARKS.md, "the agreement squared"). (A related rule, a server
//! learning rate that depends on the workers' sign agreement, is Ozdayi et al.'s robust
//! learning rate, AAAI 2021.)
//!
//! Why Adam, and why a τ of the order of 1 rather than the paper's 10⁻³ (docs/BENCHMARKS.md,
//! "server Adam"): on label-skewed shards SCAFFOLD's workers under-shoot, each round's
//! displacement points the right way but is short, and the model is still far from the
//! centralized optimum after five rounds. Momentum over rounds lengthens the steps; dividing
//! by `√v + τ` caps them in the buckets whose displacement is large (the ones that swing
//! between rounds). A bucket whose `√v` is small against τ moves by about `η/τ · m`, a
//! heavy-ball step of gain η/τ (20 by default, about `2·Σ 0.9ᵏ Δ`); one whose `√v` is large
//! moves by about η (up to about 2η after five rounds of the same move: `m` builds up
//! faster than `√v`). With the paper's tiny τ every step is about ±η whatever the
//! displacement (a sign step), which overshot every IID cell measured. The two parameters
//! were chosen as a gain and a cap: the gain by the skewed cells, which need their short
//! displacements lengthened, the cap by the IID cells, which gained accuracy on new movies
//! from a lower cap at the same gain (docs/BENCHMARKS.md, "the cap and the heavy-ball
//! gain").
//!
//! The moments are state carried from round to round, so the aggregator writes them
//! ([`Moments`], `rounds/round-R/moments.safetensors`) atomically, records their checksum in
//! the round report, and reads them back verified in the next round, as it does the control
//! variate. A bucket no worker moved and whose `m` is zero keeps its moments as they are
//! (they are zero: it has never moved), so buckets no review touches cost nothing but the
//! walk.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, ensure};

use crate::checkpoint::{Checkpoint, Header, Kind, MOMENTS_FIRST, MOMENTS_SECOND};
use crate::model::ModelConfig;

/// Decay of the first moment (Reddi et al.'s value).
pub const BETA1: f32 = 0.9;
/// Decay of the second moment (Reddi et al.'s value).
pub const BETA2: f32 = 0.99;
/// Default server step η for two classes: the cap on a bucket's move in a round. Chosen on
/// whole movies held out of the training split, together with [`DEFAULT_TAU`], over every
/// cell of the grid on thirteen seeds (docs/BENCHMARKS.md, "the cap and the heavy-ball gain").
pub const DEFAULT_LR: f32 = 30.0;
/// Default τ for two classes. η/τ = 20 is the heavy-ball gain that small displacements get,
/// the same as at η 60 and τ 3 (the default until 2026-12-04); what changed is the cap η on
/// large ones. The cells whose workers fit their shards (few IID workers) and the ones
/// whose workers are under-trained (many small shards) both gained from the lower cap at
/// the same gain, where a lower η alone had cost the under-trained ones.
pub const DEFAULT_TAU: f32 = 1.5;
/// Default η for K > 2 classes. The same held-out movies put 30 ahead of 60 on IMDB's
/// rating task in every cell measured: with the K-class model's sharper naive-Bayes ratios
/// the larger step overshoots from round 3 on.
pub const DEFAULT_LR_MULTICLASS: f32 = 30.0;
/// Default τ for K > 2 classes (the rating task was measured with it).
pub const DEFAULT_TAU_MULTICLASS: f32 = 3.0;

/// The default step (η, τ) of a model with `classes` classes.
pub fn default_step(classes: usize) -> (f32, f32) {
    if classes > 2 {
        (DEFAULT_LR_MULTICLASS, DEFAULT_TAU_MULTICLASS)
    } else {
        (DEFAULT_LR, DEFAULT_TAU)
    }
}

/// How the aggregator turns the combined weights into the next global model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ServerOptimizer {
    /// The combined weights are the next global model.
    None,
    /// FedAdam's step of size about `lr` per bucket, normalised beyond `tau`.
    Adam { lr: f32, tau: f32 },
}

impl ServerOptimizer {
    /// What the aggregator runs without flags, for a model of `classes` classes.
    pub fn default_for(classes: usize) -> Self {
        let (lr, tau) = default_step(classes);
        ServerOptimizer::Adam { lr, tau }
    }
}

impl fmt::Display for ServerOptimizer {
    /// The text round reports hold: `none`, `adam(lr=30,tau=1.5)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerOptimizer::None => f.write_str("none"),
            ServerOptimizer::Adam { lr, tau } => write!(f, "adam(lr={lr},tau={tau})"),
        }
    }
}

impl FromStr for ServerOptimizer {
    type Err = String;

    /// Reads what [`Display`](fmt::Display) writes.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "none" {
            return Ok(ServerOptimizer::None);
        }
        let bad = || format!("`{s}` is not a server optimizer: expected none or adam(lr=X,tau=Y)");
        let inner = s
            .strip_prefix("adam(")
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(bad)?;
        let (lr, tau) = inner.split_once(',').ok_or_else(bad)?;
        let lr = lr.strip_prefix("lr=").ok_or_else(bad)?;
        let tau = tau.strip_prefix("tau=").ok_or_else(bad)?;
        Ok(ServerOptimizer::Adam {
            lr: parse_positive(lr)?,
            tau: parse_positive(tau)?,
        })
    }
}

impl serde::Serialize for ServerOptimizer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ServerOptimizer {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <String as serde::Deserialize>::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Checks `--server-lr` and `--server-tau`: a finite number above zero.
pub fn parse_positive(s: &str) -> Result<f32, String> {
    let x: f32 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if !(x.is_finite() && x > 0.0) {
        return Err(format!("must be a finite number above 0, got {s}"));
    }
    Ok(x)
}

/// The server optimizer's name on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServerOptimizerName {
    /// FedAdam's server step (the default).
    Adam,
    /// The combined weights are the next global model.
    None,
}

impl ServerOptimizer {
    /// Moves the global weights `w` towards the combined weights `combined`; `moments` is
    /// the state from the round before (zero in the first round), updated in place. Takes
    /// `combined` as is for `None`. Returns whether any weight changed (not in SCAFFOLD's
    /// gradient round, whose model the aggregator then need not score again).
    pub fn step(self, w: &mut [f32], combined: &[f32], moments: Option<&mut Moments>) -> bool {
        assert_eq!(
            w.len(),
            combined.len(),
            "weights and combined weights differ in length"
        );
        let (lr, tau, moments) = match (self, moments) {
            (ServerOptimizer::Adam { lr, tau }, Some(m)) => (lr, tau, m),
            (ServerOptimizer::None, _) => {
                let moved = w != combined;
                w.copy_from_slice(combined);
                return moved;
            }
            (ServerOptimizer::Adam { .. }, None) => panic!("an Adam step needs its moments"),
        };
        assert_eq!(
            moments.first.len(),
            w.len(),
            "moments and weights differ in length"
        );
        let mut moved = false;
        for (((wj, &cj), mj), vj) in w
            .iter_mut()
            .zip(combined)
            .zip(moments.first.iter_mut())
            .zip(moments.second.iter_mut())
        {
            let d = cj - *wj;
            if d == 0.0 && *mj == 0.0 {
                continue;
            }
            *mj = BETA1 * *mj + (1.0 - BETA1) * d;
            *vj = BETA2 * *vj + (1.0 - BETA2) * d * d;
            let next = *wj + lr * *mj / (vj.sqrt() + tau);
            moved |= next != *wj;
            *wj = next;
        }
        moved
    }

    /// Moves the global biases `b` towards the combined biases `combined`. `None` takes them
    /// as they are. Adam's configuration takes the agreement step (module doc): each row
    /// moves by its displacement `D` times `a²`, where `a = |D| / spread` is the workers'
    /// agreement on it, capped at 1 (a robust rule's `D` can exceed the combined spread),
    /// and by all of `D` when no worker moved it (`spread` 0). `spread` is the workers'
    /// `|Δ_k|` combined by the strategy, one per row (the aggregator's `BiasSpread`).
    /// Returns the agreement `a` of each row.
    pub fn step_bias(self, b: &mut [f32], combined: &[f32], spread: &[f64]) -> Vec<f64> {
        assert_eq!(b.len(), combined.len(), "biases and combined biases differ");
        assert_eq!(b.len(), spread.len(), "one spread per bias");
        b.iter_mut()
            .zip(combined)
            .zip(spread)
            .map(|((bj, &cj), &s)| {
                let d = f64::from(cj) - f64::from(*bj);
                let a = match self {
                    ServerOptimizer::None => 1.0,
                    ServerOptimizer::Adam { .. } if s > 0.0 => (d.abs() / s).min(1.0),
                    ServerOptimizer::Adam { .. } => 1.0,
                };
                *bj = (f64::from(*bj) + a * a * d) as f32;
                a
            })
            .collect()
    }
}

/// The server optimizer's flags, part of the strategy flags the aggregator and the pipeline
/// share (`fedimdb::strategy::StrategyArgs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, clap::Args)]
pub struct ServerOptimizerArgs {
    /// How the combined weights move the global model (rounds ≥ 1): `adam`, FedAdam's server
    /// step over rounds, or `none`, the combined weights as they are [default: adam].
    #[arg(long, value_enum, value_name = "NAME")]
    pub server_optimizer: Option<ServerOptimizerName>,
    /// With adam: the step η [default: 30].
    #[arg(long, value_name = "LR", value_parser = parse_positive)]
    pub server_lr: Option<f32>,
    /// With adam: τ, the displacement beyond which steps are normalised [default: 1.5 for
    /// two classes, 3 for more].
    #[arg(long, value_name = "TAU", value_parser = parse_positive)]
    pub server_tau: Option<f32>,
}

impl ServerOptimizerArgs {
    /// The optimizer the flags ask for, for a model of `classes` classes (the default η
    /// depends on it); `--server-lr` and `--server-tau` go with adam only.
    pub fn optimizer(&self, classes: usize) -> Result<ServerOptimizer, String> {
        match self.server_optimizer.unwrap_or(ServerOptimizerName::Adam) {
            ServerOptimizerName::Adam => {
                let (lr, tau) = default_step(classes);
                Ok(ServerOptimizer::Adam {
                    lr: self.server_lr.unwrap_or(lr),
                    tau: self.server_tau.unwrap_or(tau),
                })
            }
            ServerOptimizerName::None if self.server_lr.is_some() || self.server_tau.is_some() => {
                Err("--server-lr and --server-tau only apply to --server-optimizer adam".into())
            }
            ServerOptimizerName::None => Ok(ServerOptimizer::None),
        }
    }

    /// Checks the flags together, before the number of classes is known (it only picks
    /// a default).
    pub fn check(&self) -> Result<(), String> {
        self.optimizer(2).map(|_| ())
    }

    /// The flags given, as arguments for the aggregator's command line.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(name) = self.server_optimizer {
            let name = clap::ValueEnum::to_possible_value(&name).expect("no skipped variants");
            args.extend(["--server-optimizer".to_owned(), name.get_name().to_owned()]);
        }
        if let Some(lr) = self.server_lr {
            args.extend(["--server-lr".to_owned(), lr.to_string()]);
        }
        if let Some(tau) = self.server_tau {
            args.extend(["--server-tau".to_owned(), tau.to_string()]);
        }
        args
    }
}

/// Adam's moments, one value per weight (row-major, like the model's weights).
#[derive(Debug, Clone, PartialEq)]
pub struct Moments {
    /// `m`: the decayed mean of the displacements.
    pub first: Vec<f32>,
    /// `v`: the decayed mean of their squares (never negative).
    pub second: Vec<f32>,
}

impl Moments {
    pub fn zeros(len: usize) -> Self {
        Self {
            first: crate::dense::zeros(len),
            second: crate::dense::zeros(len),
        }
    }

    pub fn to_checkpoint(&self, config: ModelConfig, round: u32) -> Checkpoint {
        Checkpoint::dense(
            Kind::Moments,
            Header::new(Kind::Moments, config, round),
            [
                (MOMENTS_FIRST, self.first.clone()),
                (MOMENTS_SECOND, self.second.clone()),
            ],
        )
    }

    pub fn from_checkpoint(mut ck: Checkpoint) -> Result<Self> {
        ck.holds(Kind::Moments, "server optimizer moments")?;
        let second = ck.take_tensor(MOMENTS_SECOND)?;
        ensure!(
            second.iter().all(|&x| x >= 0.0),
            "`{MOMENTS_SECOND}` holds a negative second moment"
        );
        Ok(Self {
            first: ck.take_tensor(MOMENTS_FIRST)?,
            second,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn biases_move_by_the_workers_agreement() {
        let adam = ServerOptimizer::default_for(2);
        // Two rows: every worker moves row 0 by +1 (spread 1); row 1 by +3 and -1 (equal
        // weights: the mean +1, the spread 2, the agreement 0.5, the step 0.5² of the mean).
        let base = [0.5f32, -1.0];
        let combined = [1.5f32, 0.0];
        let mut b = base;
        let a = adam.step_bias(&mut b, &combined, &[1.0, 2.0]);
        assert_eq!(a, vec![1.0, 0.5]);
        assert_eq!(b, [1.5, -0.75]);
        // Agreement 0.1 (a mean move of 0.4 against a spread of 4): a hundredth of it.
        let mut b = [0.0f32];
        let a = adam.step_bias(&mut b, &[0.4], &[4.0]);
        assert!((a[0] - 0.1).abs() < 1e-7, "{a:?}");
        assert!((b[0] - 0.004).abs() < 1e-7, "{b:?}");
        // Opposite moves that cancel leave the bias where it was.
        let mut b = [0.0f32];
        assert_eq!(adam.step_bias(&mut b, &[0.0], &[2.4]), vec![0.0]);
        assert_eq!(b, [0.0]);
        // A spread of zero (no worker moved it, or a robust rule's spread is zero): the
        // combined value, whatever it is.
        let mut b = [0.25f32];
        assert_eq!(adam.step_bias(&mut b, &[0.75], &[0.0]), vec![1.0]);
        assert_eq!(b, [0.75]);
        // `none` takes the combined biases as they are.
        let mut b = base;
        let a = ServerOptimizer::None.step_bias(&mut b, &combined, &[1.0, 2.0]);
        assert_eq!((a, b), (vec![1.0, 1.0], combined));
        // A robust rule's displacement beyond the mean spread is capped at the displacement.
        let mut b = [0.0f32];
        assert_eq!(adam.step_bias(&mut b, &[2.0], &[1.0]), vec![1.0]);
        assert_eq!(b, [2.0]);
    }

    #[test]
    fn report_text_reads_back() {
        for o in [
            ServerOptimizer::None,
            ServerOptimizer::default_for(2),
            ServerOptimizer::Adam { lr: 0.5, tau: 1e-3 },
        ] {
            let json = serde_json::to_string(&o).unwrap();
            assert_eq!(serde_json::from_str::<ServerOptimizer>(&json).unwrap(), o);
        }
        assert_eq!(
            ServerOptimizer::default_for(2).to_string(),
            "adam(lr=30,tau=1.5)"
        );
        assert_eq!(
            ServerOptimizer::default_for(8).to_string(),
            "adam(lr=30,tau=3)"
        );
        for bad in [
            "adam",
            "adam(lr=1)",
            "adam(lr=-1,tau=3)",
            "sgd",
            "adam(tau=3,lr=1)",
        ] {
            assert!(bad.parse::<ServerOptimizer>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn flags_resolve_to_one_optimizer() {
        let args = |server_optimizer, server_lr, server_tau| ServerOptimizerArgs {
            server_optimizer,
            server_lr,
            server_tau,
        };
        assert_eq!(
            args(None, None, None).optimizer(2),
            Ok(ServerOptimizer::default_for(2))
        );
        assert_eq!(
            args(None, None, None).optimizer(3),
            Ok(ServerOptimizer::Adam {
                lr: DEFAULT_LR_MULTICLASS,
                tau: DEFAULT_TAU_MULTICLASS
            })
        );
        // A flag wins over either default.
        assert_eq!(
            args(None, Some(45.0), None).optimizer(8),
            Ok(ServerOptimizer::Adam {
                lr: 45.0,
                tau: DEFAULT_TAU_MULTICLASS
            })
        );
        assert_eq!(
            args(None, Some(10.0), Some(1.0)).optimizer(2),
            Ok(ServerOptimizer::Adam { lr: 10.0, tau: 1.0 })
        );
        assert_eq!(
            args(Some(ServerOptimizerName::None), None, None).optimizer(2),
            Ok(ServerOptimizer::None)
        );
        let e = args(Some(ServerOptimizerName::None), Some(1.0), None)
            .optimizer(2)
            .unwrap_err();
        assert!(e.contains("--server-lr"), "{e}");
        assert_eq!(
            args(Some(ServerOptimizerName::Adam), Some(10.0), None).to_args(),
            ["--server-optimizer", "adam", "--server-lr", "10"]
        );
        assert!(args(None, None, None).to_args().is_empty());
        for bad in ["0", "-1", "NaN", "inf", "x"] {
            assert!(parse_positive(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn adam_step_follows_the_formula() {
        let opt = ServerOptimizer::Adam { lr: 30.0, tau: 3.0 };
        let mut w = vec![1.0f32, 2.0, 0.0];
        let mut m = Moments::zeros(3);
        // Round 1: a small displacement moves about η/τ·(1−β1)·Δ = Δ; a large one is capped.
        assert!(opt.step(&mut w, &[1.3, 102.0, 0.0], Some(&mut m)));
        let small = 30.0 * 0.1 * 0.3 / ((0.01f32 * 0.09).sqrt() + 3.0);
        assert!((w[0] - (1.0 + small)).abs() < 1e-6, "{w:?}");
        // Δ = 100: m = 10, √v = 10, so the step is 30·10/13, not 100.
        assert!((w[1] - (2.0 + 300.0 / 13.0)).abs() < 1e-4, "{w:?}");
        assert_eq!((w[2], m.first[2], m.second[2]), (0.0, 0.0, 0.0));
        // Round 2, no displacement: momentum keeps moving the bucket the same way.
        let before = w[0];
        let combined = w.clone();
        assert!(
            opt.step(&mut w, &combined, Some(&mut m)),
            "momentum moves it"
        );
        assert!(w[0] > before, "{w:?}");
        // The moments decay as written.
        assert!((m.first[0] - 0.9 * 0.1 * 0.3).abs() < 1e-6);

        // No displacement and no momentum (the gradient round): nothing moves, and it says so.
        let mut w = vec![1.0f32, 2.0];
        let unmoved = w.clone();
        assert!(!opt.step(&mut w, &unmoved, Some(&mut Moments::zeros(2))));
        assert_eq!(w, unmoved);

        assert!(ServerOptimizer::None.step(&mut w, &[3.0, 4.0], None));
        assert_eq!(w, [3.0, 4.0]);
        assert!(!ServerOptimizer::None.step(&mut w, &[3.0, 4.0], None));
    }

    #[test]
    fn moments_round_trip_and_refuse_negative_second_moments() {
        let config = ModelConfig::with_buckets(10, 1);
        let mut m = Moments::zeros(config.dim());
        m.first[3] = -0.5;
        m.second[3] = 0.25;
        let ck = m.to_checkpoint(config, 2);
        let bytes = ck.to_bytes().unwrap();
        let back = Checkpoint::from_bytes(&bytes, std::path::Path::new("m")).unwrap();
        assert_eq!(Moments::from_checkpoint(back).unwrap(), m);
        m.second[1] = -1.0;
        let ck = m.to_checkpoint(config, 2);
        let e = Moments::from_checkpoint(ck).unwrap_err();
        assert!(format!("{e:#}").contains("negative"), "{e:#}");
    }
}
