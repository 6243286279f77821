//! Weighted averaging of updates, one file at a time.
//!
//! The running sum is kept in f64 and each update is dropped once it is added (FedAvg's
//! sparse updates in groups of at most 8, `crate::combine`), so memory stays at about two
//! models whatever the number of workers.

use std::collections::BTreeMap;

use anyhow::{Result, ensure};
use fedimdb::checkpoint::Checkpoint;

/// Adds `weight` times `values` to `sum`, place by place, in f64.
pub fn add_scaled(sum: &mut [f64], weight: f64, values: &[f32]) {
    for (s, &x) in sum.iter_mut().zip(values) {
        *s += weight * x as f64;
    }
}

/// Running sample-weighted sum of same-shaped tensors.
#[derive(Debug, Default)]
pub struct WeightedSum {
    sums: BTreeMap<String, Vec<f64>>,
    total_weight: f64,
}

impl WeightedSum {
    /// Adds every tensor of `ck` with weight `weight`. The first checkpoint fixes names and
    /// shapes; later ones must match.
    pub fn add(&mut self, ck: &Checkpoint, weight: f64) -> Result<()> {
        let shapes: Vec<(&str, usize)> = ck
            .tensors
            .iter()
            .map(|(name, v)| (name.as_str(), v.len()))
            .collect();
        self.add_with(&shapes, weight, |name, sum| {
            add_scaled(sum, weight, ck.tensor(name))
        })
    }

    /// Adds one update given as the names and lengths of its tensors, `add(name, sum)`
    /// adding `weight` times the tensor into its running sum: for updates that are not held
    /// as whole tables (a sparse update adds its listed buckets and what the others stand
    /// for, without making a dense copy first). The first update fixes names and shapes;
    /// later ones must match.
    pub fn add_with(
        &mut self,
        shapes: &[(&str, usize)],
        weight: f64,
        mut add: impl FnMut(&str, &mut [f64]),
    ) -> Result<()> {
        ensure!(
            weight > 0.0,
            "an update with {weight} samples cannot be averaged"
        );
        if self.sums.is_empty() {
            for &(name, len) in shapes {
                self.sums
                    .insert(name.to_owned(), fedimdb::dense::zeros(len));
            }
        }
        let names: Vec<&str> = shapes.iter().map(|&(name, _)| name).collect();
        let expect: Vec<&str> = self.sums.keys().map(String::as_str).collect();
        ensure!(
            names == expect,
            "tensors {names:?} differ from the first update's {expect:?}"
        );
        for &(name, len) in shapes {
            let sum = self.sums.get_mut(name).expect("names checked");
            ensure!(
                sum.len() == len,
                "tensor `{name}` has {len} values, the first update's has {}",
                sum.len()
            );
        }
        for &(name, _) in shapes {
            add(name, self.sums.get_mut(name).expect("names checked"));
        }
        self.total_weight += weight;
        Ok(())
    }

    /// The running sum of tensor `name`, once an update has fixed the names.
    pub fn sum_mut(&mut self, name: &str) -> Option<&mut [f64]> {
        self.sums.get_mut(name).map(Vec::as_mut_slice)
    }

    /// The weighted mean of each tensor.
    pub fn mean(self) -> BTreeMap<String, Vec<f32>> {
        let w = self.total_weight;
        self.sums
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().map(|s| (s / w) as f32).collect()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An update whose every value is `w`.
    fn ck(w: f32) -> Checkpoint {
        crate::fixtures::update(w, |_| w)
    }

    #[test]
    fn weights_by_sample_count() {
        let mut s = WeightedSum::default();
        s.add(&ck(1.0), 1.0).unwrap();
        s.add(&ck(4.0), 3.0).unwrap();
        let m = s.mean();
        assert_eq!(m["linear.bias"], vec![3.25]);
        assert!(m["linear.weight"].iter().all(|&x| x == 3.25));
    }

    #[test]
    fn refuses_other_shapes() {
        let mut s = WeightedSum::default();
        s.add(&ck(1.0), 1.0).unwrap();
        let mut other = ck(1.0);
        other
            .tensors
            .get_mut("linear.weight")
            .unwrap()
            .to_mut()
            .pop();
        assert!(format!("{:#}", s.add(&other, 1.0).unwrap_err()).contains("1023 values"));
    }
}
