//! How a round's updates are combined: the rule and its flags, one type for the
//! aggregator, the pipeline and the round reports. The combining itself is the
//! aggregator's (`aggregator/src/combine.rs`).
//!
//! * `fedavg`: the sample-weighted mean (FedAvg).
//! * `median`: the coordinate-wise median, unweighted (Flower's `FedMedian`).
//! * `trimmed-mean(β)`: the coordinate-wise mean after cutting `floor(β·n)` values from
//!   each end, unweighted (Flower's `FedTrimmedAvg`).
//!
//! Round reports hold the rule as that text (`"trimmed-mean(0.2)"`), so a resumed run can
//! tell whether the global model on disk was made the way it is asked for now.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Flower's default `beta` for `FedTrimmedAvg`, the fraction cut from each end.
pub const DEFAULT_TRIM: f64 = 0.2;

/// A combination rule with its parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Strategy {
    /// Sample-weighted mean of every tensor (FedAvg).
    FedAvg,
    /// Coordinate-wise median, unweighted (FedMedian).
    Median,
    /// Coordinate-wise mean after cutting `floor(trim · n)` values from each end, unweighted
    /// (FedTrimmedAvg with `beta = trim`).
    TrimmedMean { trim: f64 },
}

impl fmt::Display for Strategy {
    /// The name written into round reports: `fedavg`, `median`, `trimmed-mean(0.2)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::FedAvg => f.write_str("fedavg"),
            Strategy::Median => f.write_str("median"),
            Strategy::TrimmedMean { trim } => write!(f, "trimmed-mean({trim})"),
        }
    }
}

impl FromStr for Strategy {
    type Err = String;

    /// Reads what [`Display`](fmt::Display) writes.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fedavg" => Ok(Strategy::FedAvg),
            "median" => Ok(Strategy::Median),
            _ => s
                .strip_prefix("trimmed-mean(")
                .and_then(|rest| rest.strip_suffix(')'))
                .ok_or_else(|| {
                    format!("`{s}` is not a strategy: expected fedavg, median or trimmed-mean(F)")
                })
                .and_then(parse_trim)
                .map(|trim| Strategy::TrimmedMean { trim }),
        }
    }
}

/// How a round combined its updates, as its report records it: round 0 sums the workers'
/// statistics (`"sum"`), later rounds apply a [`Strategy`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Combination {
    Sum,
    Strategy(Strategy),
}

impl Combination {
    /// How round `round` combines its updates under `strategy`.
    pub fn of_round(round: u32, strategy: Strategy) -> Self {
        if round == 0 {
            Combination::Sum
        } else {
            Combination::Strategy(strategy)
        }
    }
}

impl fmt::Display for Combination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Combination::Sum => f.write_str("sum"),
            Combination::Strategy(s) => s.fmt(f),
        }
    }
}

impl FromStr for Combination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sum" => Ok(Combination::Sum),
            _ => s.parse().map(Combination::Strategy),
        }
    }
}

/// Serialises as its [`Display`](fmt::Display) text and reads it back with [`FromStr`].
macro_rules! serde_as_text {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_as_text!(Strategy);
serde_as_text!(Combination);

/// The rule's name on the command line (`--strategy`); its parameter is `--trim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StrategyName {
    /// Federated averaging: the mean of the workers' weights, weighted by sample count.
    Fedavg,
    /// Coordinate-wise median of the workers' weights, unweighted (Flower's FedMedian).
    Median,
    /// Coordinate-wise mean after cutting the fraction --trim of values from each end,
    /// unweighted (Flower's FedTrimmedAvg).
    TrimmedMean,
}

/// The strategy flags, shared by the aggregator and the pipeline (which passes them on).
#[derive(Debug, Clone, Copy, PartialEq, clap::Args)]
pub struct StrategyArgs {
    /// How updates are combined (rounds ≥ 1; round 0 always sums its statistics).
    #[arg(long, value_enum, default_value = "fedavg")]
    pub strategy: StrategyName,
    /// With --strategy trimmed-mean: the fraction of values cut from each end of every
    /// coordinate, at least 0 and below 0.5 [default: 0.2].
    #[arg(long, value_name = "F", value_parser = parse_trim, allow_negative_numbers = true)]
    pub trim: Option<f64>,
    #[command(flatten)]
    pub server: crate::server_optimizer::ServerOptimizerArgs,
}

impl Default for StrategyArgs {
    fn default() -> Self {
        Self {
            strategy: StrategyName::Fedavg,
            trim: None,
            server: Default::default(),
        }
    }
}

impl StrategyArgs {
    /// The combination rule the flags ask for; `--trim` goes with trimmed-mean only.
    pub fn strategy(&self) -> Result<Strategy, String> {
        match (self.strategy, self.trim) {
            (StrategyName::Fedavg, None) => Ok(Strategy::FedAvg),
            (StrategyName::Median, None) => Ok(Strategy::Median),
            (StrategyName::TrimmedMean, trim) => Ok(Strategy::TrimmedMean {
                trim: trim.unwrap_or(DEFAULT_TRIM),
            }),
            (other, Some(_)) => Err(format!(
                "--trim only applies to --strategy trimmed-mean, not {}",
                clap::ValueEnum::to_possible_value(&other)
                    .expect("no skipped variants")
                    .get_name()
            )),
        }
    }

    /// The server optimizer the flags ask for (`fedimdb::server_optimizer`), for a model of
    /// `classes` classes.
    pub fn server_optimizer(
        &self,
        classes: usize,
    ) -> Result<crate::server_optimizer::ServerOptimizer, String> {
        self.server.optimizer(classes)
    }

    /// Checks the server optimizer's flags together, before the classes are known.
    pub fn check_server_optimizer(&self) -> Result<(), String> {
        self.server.check()
    }

    /// The flags as arguments for the aggregator's command line.
    pub fn to_args(&self) -> Vec<String> {
        let name = clap::ValueEnum::to_possible_value(&self.strategy).expect("no skipped variants");
        let mut args = vec!["--strategy".to_owned(), name.get_name().to_owned()];
        if let Some(trim) = self.trim {
            args.extend(["--trim".to_owned(), trim.to_string()]);
        }
        args.extend(self.server.to_args());
        args
    }
}

/// Checks a `--trim` value: a fraction cut from each end, at least 0 and below 0.5 (so at
/// least one value is always left). Used as clap's value parser.
pub fn parse_trim(s: &str) -> Result<f64, String> {
    let f: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if !(0.0..0.5).contains(&f) {
        return Err(format!(
            "the fraction cut from each end must be at least 0 and below 0.5, got {f}"
        ));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_read_back() {
        for s in [
            Strategy::FedAvg,
            Strategy::Median,
            Strategy::TrimmedMean { trim: 0.2 },
            Strategy::TrimmedMean { trim: 0.0 },
        ] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<Strategy>(&json).unwrap(), s);
        }
        let e = "trimmed-mean(0.7)".parse::<Strategy>().unwrap_err();
        assert!(e.contains("below 0.5"), "{e}");
        for c in [Combination::Sum, Combination::Strategy(Strategy::Median)] {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Combination>(&json).unwrap(), c);
        }
        assert_eq!(serde_json::to_string(&Combination::Sum).unwrap(), "\"sum\"");
        let e = "mean".parse::<Strategy>().unwrap_err();
        assert!(e.contains("`mean` is not a strategy"), "{e}");
    }

    #[test]
    fn trim_must_be_a_fraction_below_one_half() {
        assert_eq!(parse_trim("0"), Ok(0.0));
        assert_eq!(parse_trim("0.2"), Ok(0.2));
        assert_eq!(parse_trim("0.499"), Ok(0.499));
        for bad in ["0.5", "0.7", "-0.1", "1", "NaN", "inf", "x", ""] {
            assert!(parse_trim(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn trim_goes_with_trimmed_mean_only() {
        let args = |strategy, trim| StrategyArgs {
            strategy,
            trim,
            server: Default::default(),
        };
        assert_eq!(
            args(StrategyName::TrimmedMean, None).strategy(),
            Ok(Strategy::TrimmedMean { trim: DEFAULT_TRIM })
        );
        let e = args(StrategyName::Median, Some(0.1))
            .strategy()
            .unwrap_err();
        assert_eq!(
            e,
            "--trim only applies to --strategy trimmed-mean, not median"
        );
        assert_eq!(
            args(StrategyName::TrimmedMean, Some(0.1)).to_args(),
            ["--strategy", "trimmed-mean", "--trim", "0.1"]
        );
    }
}
