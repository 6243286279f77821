//! Test fixtures shared by the aggregator's unit tests.

use std::collections::BTreeMap;

use fedimdb::checkpoint::{Checkpoint, Header, Kind};
use fedimdb::model::ModelConfig;

/// A dense round-1 update over 2^10 buckets: bias `bias`, weight `weight(bucket)`.
pub fn update(bias: f32, weight: impl Fn(usize) -> f32) -> Checkpoint {
    Checkpoint {
        header: Header::new(Kind::Update, ModelConfig::with_buckets(10, 3), 1),
        tensors: BTreeMap::from([
            ("linear.bias".into(), vec![bias].into()),
            (
                "linear.weight".into(),
                (0..1024).map(weight).collect::<Vec<_>>().into(),
            ),
        ]),
        index: Vec::new(),
        sha256: String::new(),
    }
}
