//! Evaluating a model on the test set.

use fedimdb::dataset::Featurized;
use fedimdb::metrics::Metrics;
use fedimdb::model::Scorer;

/// Test-set metrics of `scorer` on featurised reviews, scored on all cores.
pub fn evaluate(scorer: &Scorer, data: &Featurized) -> Metrics {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = data.features.len().div_ceil(threads).max(1);
    let probs: Vec<f32> = std::thread::scope(|s| {
        let hs: Vec<_> = data
            .features
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .flat_map(|f| scorer.probabilities(f))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().expect("scoring thread panicked"))
            .collect()
    });
    Metrics::of_classes(&probs, scorer.classes(), &data.labels)
}
