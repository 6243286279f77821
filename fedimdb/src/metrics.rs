//! Classification metrics for the test set: two classes or K.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Test-set metrics of a model. With two classes, precision, recall and F1 are those of
/// class 1 (IMDB: `pos`) and ROC AUC ranks its probability; with K classes they are macro
/// averages over the classes (each class against the rest), the accuracy is that of the
/// most probable class, and `macro_f1` is the unweighted mean of every class's F1 (for two
/// classes too, where it averages both classes' F1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub samples: usize,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub log_loss: f64,
    pub roc_auc: f64,
    /// The mean of the classes' F1 (0 in reports from before K classes).
    #[serde(default)]
    pub macro_f1: f64,
}

/// One class against the rest: true and false positives, false negatives.
#[derive(Debug, Clone, Copy, Default)]
struct Confusion {
    tp: usize,
    fp: usize,
    fneg: usize,
}

impl Confusion {
    fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fneg)
    }

    fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

impl Metrics {
    /// Computes the metrics of a 2-class model from predicted probabilities of class 1 and
    /// labels (1 positive). A probability ≥ 0.5 predicts class 1.
    pub fn compute(probs: &[f32], labels: &[u8]) -> Self {
        let flat: Vec<f32> = probs.iter().flat_map(|&p| [1.0 - p, p]).collect();
        Self::of_classes(&flat, 2, labels)
    }

    /// Computes the metrics from every class's predicted probability (`probs`: `classes`
    /// values per review, row after row) and the class indices. The prediction is the most
    /// probable class (two classes: class 1 from probability 0.5 up).
    pub fn of_classes(probs: &[f32], classes: usize, labels: &[u8]) -> Self {
        assert_eq!(
            probs.len(),
            labels.len() * classes,
            "K probabilities per label"
        );
        let mut conf = vec![Confusion::default(); classes];
        let (mut correct, mut log_loss) = (0usize, 0.0);
        for (p, &y) in probs.chunks_exact(classes).zip(labels) {
            let pred = if classes == 2 {
                usize::from(p[1] >= 0.5)
            } else {
                (0..classes).fold(0, |best, k| if p[k] > p[best] { k } else { best })
            };
            let y = y as usize;
            if pred == y {
                correct += 1;
                conf[y].tp += 1;
            } else {
                conf[pred].fp += 1;
                conf[y].fneg += 1;
            }
            log_loss -= if classes == 2 {
                // As 2-class metrics have always been computed, from class 1's probability.
                let p = (p[1] as f64).clamp(1e-7, 1.0 - 1e-7);
                if y == 1 { p.ln() } else { (1.0 - p).ln() }
            } else {
                (p[y] as f64).clamp(1e-7, 1.0).ln()
            };
        }
        let n = labels.len().max(1) as f64;
        let mean = |f: &dyn Fn(&Confusion) -> f64| conf.iter().map(f).sum::<f64>() / classes as f64;
        let column =
            |k: usize| -> Vec<f32> { probs.iter().skip(k).step_by(classes).copied().collect() };
        let one_vs_rest =
            |k: usize| -> Vec<u8> { labels.iter().map(|&y| u8::from(y as usize == k)).collect() };
        let (precision, recall, f1, roc_auc) = if classes == 2 {
            let c = &conf[1];
            (
                c.precision(),
                c.recall(),
                c.f1(),
                roc_auc(&column(1), labels),
            )
        } else {
            // Macro ROC AUC over the classes present with reviews of other classes beside.
            let aucs: Vec<f64> = (0..classes)
                .map(|k| roc_auc(&column(k), &one_vs_rest(k)))
                .filter(|a| a.is_finite())
                .collect();
            let auc = if aucs.is_empty() {
                f64::NAN
            } else {
                aucs.iter().sum::<f64>() / aucs.len() as f64
            };
            (
                mean(&|c| c.precision()),
                mean(&|c| c.recall()),
                mean(&|c| c.f1()),
                auc,
            )
        };
        Self {
            samples: labels.len(),
            accuracy: correct as f64 / n,
            precision,
            recall,
            f1,
            log_loss: log_loss / n,
            roc_auc,
            macro_f1: mean(&|c| c.f1()),
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
            ("macro_f1".to_owned(), self.macro_f1),
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
    fn three_classes_by_hand() {
        // predictions: 0, 1, 2, 2 for labels 0, 1, 1, 2
        let probs = [
            0.7, 0.2, 0.1, //
            0.1, 0.8, 0.1, //
            0.2, 0.3, 0.5, //
            0.1, 0.1, 0.8,
        ];
        let m = Metrics::of_classes(&probs, 3, &[0, 1, 1, 2]);
        assert_eq!(m.accuracy, 0.75);
        // F1: class 0 1, class 1 2/3 (p 1, r 1/2), class 2 2/3 (p 1/2, r 1)
        assert!((m.macro_f1 - (1.0 + 2.0 / 3.0 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert_eq!(m.f1, m.macro_f1);
        let ll = -(0.7f64.ln() + 0.8f64.ln() + 0.3f64.ln() + 0.8f64.ln()) / 4.0;
        assert!((m.log_loss - ll).abs() < 1e-6, "{}", m.log_loss);
        assert!(m.roc_auc > 0.5 && m.roc_auc <= 1.0);
        // Two classes: macro F1 averages both classes' F1.
        let b = Metrics::compute(&[0.9, 0.8, 0.3, 0.6, 0.1], &[1, 1, 1, 0, 0]);
        assert!(
            (b.macro_f1 - (2.0 / 3.0 + 0.5) / 2.0).abs() < 1e-12,
            "{}",
            b.macro_f1
        );
    }

    #[test]
    fn ties_count_half() {
        assert_eq!(roc_auc(&[0.5, 0.5], &[1, 0]), 0.5);
        assert_eq!(roc_auc(&[0.2, 0.7], &[0, 1]), 1.0);
    }
}
