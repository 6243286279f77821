//! Binary classification metrics for the test set.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Test-set metrics of a model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub samples: usize,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub log_loss: f64,
    pub roc_auc: f64,
}

impl Metrics {
    /// Computes the metrics from predicted probabilities of the positive class and labels
    /// (1 positive). A probability ≥ 0.5 predicts positive.
    pub fn compute(probs: &[f32], labels: &[u8]) -> Self {
        assert_eq!(probs.len(), labels.len(), "one probability per label");
        let (mut tp, mut fp, mut tn, mut fneg) = (0usize, 0usize, 0usize, 0usize);
        let mut log_loss = 0.0;
        for (&p, &y) in probs.iter().zip(labels) {
            let pred = p >= 0.5;
            match (pred, y == 1) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                (false, false) => tn += 1,
                (false, true) => fneg += 1,
            }
            let p = (p as f64).clamp(1e-7, 1.0 - 1e-7);
            log_loss -= if y == 1 { p.ln() } else { (1.0 - p).ln() };
        }
        let n = probs.len().max(1) as f64;
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let precision = ratio(tp, tp + fp);
        let recall = ratio(tp, tp + fneg);
        let f1 = if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        Self {
            samples: probs.len(),
            accuracy: (tp + tn) as f64 / n,
            precision,
            recall,
            f1,
            log_loss: log_loss / n,
            roc_auc: roc_auc(probs, labels),
        }
    }

    /// The metrics as a name → value map (for model cards).
    pub fn to_map(&self) -> BTreeMap<String, f64> {
        BTreeMap::from([
            ("accuracy".to_owned(), self.accuracy),
            ("precision".to_owned(), self.precision),
            ("recall".to_owned(), self.recall),
            ("f1".to_owned(), self.f1),
            ("log_loss".to_owned(), self.log_loss),
            ("roc_auc".to_owned(), self.roc_auc),
        ])
    }
}

/// Area under the ROC curve: the probability that a random positive scores above a random
/// negative (ties count half), by the rank-sum formula.
pub fn roc_auc(scores: &[f32], labels: &[u8]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let n_pos = labels.iter().filter(|&&y| y == 1).count();
    let n_neg = labels.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return f64::NAN;
    }
    let mut rank_sum_pos = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_pos += avg_rank * order[i..=j].iter().filter(|&&k| labels[k] == 1).count() as f64;
        i = j + 1;
    }
    (rank_sum_pos - (n_pos * (n_pos + 1)) as f64 / 2.0) / (n_pos as f64 * n_neg as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_example() {
        let probs = [0.9, 0.8, 0.3, 0.6, 0.1];
        let labels = [1, 1, 1, 0, 0];
        let m = Metrics::compute(&probs, &labels);
        assert_eq!(m.accuracy, 0.6);
        assert_eq!(m.precision, 2.0 / 3.0);
        assert_eq!(m.recall, 2.0 / 3.0);
        // positives beat negatives in 5 of 6 pairs (0.3 < 0.6)
        assert!((m.roc_auc - 5.0 / 6.0).abs() < 1e-12);
        let ll = -(0.9f64.ln() + 0.8f64.ln() + 0.3f64.ln() + 0.4f64.ln() + 0.9f64.ln()) / 5.0;
        assert!((m.log_loss - ll).abs() < 1e-6);
    }

    #[test]
    fn ties_count_half() {
        assert_eq!(roc_auc(&[0.5, 0.5], &[1, 0]), 0.5);
        assert_eq!(roc_auc(&[0.2, 0.7], &[0, 1]), 1.0);
    }
}
