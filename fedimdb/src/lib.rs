//! What the fedimdb binaries share.
//!
//! Follow one review from archive to prediction through these modules, in this order:
//!
//! 1. [`reviews`]: the review record and its Parquet format (written by `copier`).
//! 2. [`layout`]: where every file lives on the shared volume; [`manifest`] describes the data,
//!    and [`labels`] how label names become the classes the shards store.
//! 3. [`featurize`]: text → normalised tokens → hashed word n-grams.
//! 4. [`model`]: the classifier (naive-Bayes-weighted logistic regression over hashed n-grams):
//!    its config, its weights (the one [`model::Model`] type) and its fast scorer.
//! 5. [`train`]: local training (SGD with SCAFFOLD's correction, [`control`]), on the CPU; the
//!    trainer adds a candle engine for CUDA.
//! 6. [`checkpoint`]: models and worker updates as safetensors with metadata.
//! 7. [`strategy`]: how the aggregator combines a round's updates, and [`server_optimizer`]
//!    how far the combined weights move the global model.
//! 8. [`metrics`]: accuracy, F1, log loss and ROC-AUC on the test set.
//!
//! [`atomic`] and [`digest`] make every write crash-safe and every read verifiable;
//! [`verify`] checks what a step finds on the volume against the checksums its writers
//! recorded, which is also how a re-run knows what is already done. [`fault`] is the
//! crash tests' way to kill a binary at a chosen point.

pub mod alloc;
pub mod atomic;
pub mod checkpoint;
pub mod control;
pub mod dataset;
pub mod dense;
pub mod digest;
pub mod fault;
pub mod featurize;
pub mod labels;
pub mod layout;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod outcome;
pub mod partition;
pub mod prefetch;
pub mod report;
pub mod retention;
pub mod reviews;
pub mod server_optimizer;
pub mod strategy;
pub mod train;
pub mod verify;

/// The version every binary reports and writes into its outputs.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
