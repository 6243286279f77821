//! The checkpoint reader on arbitrary bytes: `Checkpoint::from_bytes` returns a checkpoint
//! or an error naming the file, never panics and never allocates without bound.
//!
//! A file it accepts must be usable as its kind says: a model gives a scorer and a model
//! that scores alike, a stats file its counts; and writing it back gives a file that reads back the same.

#![no_main]

use std::path::Path;

use fedimdb::checkpoint::{Checkpoint, Kind};
use libfuzzer_sys::fuzz_target;

const NAME: &str = "fuzzed.safetensors";

fuzz_target!(
    init: fedimdb_fuzz::init("checkpoint"),
    |data: &[u8]| {
        let ck = match Checkpoint::from_bytes(data, Path::new(NAME)) {
            Ok(ck) => ck,
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(msg.contains(NAME), "error does not name the file: {msg}");
                return;
            }
        };
        let (dim, rows) = (ck.header.config.dim(), ck.header.config.rows());
        match ck.header.kind {
            Kind::Model => {
                let s = ck.scorer().expect("a model file gives a scorer");
                let m = ck.clone().into_model().expect("a model file gives a model");
                assert_eq!((m.weight.len(), m.nb_ratio.len(), m.bias.len()), (rows * dim, rows * dim, rows));
                let probe: Vec<u32> = (0..dim.min(5) as u32).collect();
                assert_eq!(m.scorer().logits(&probe), s.logits(&probe));
                assert_eq!(s.probabilities(&probe).len(), ck.header.config.classes());
            }
            Kind::Stats => {
                if let Ok(c) = ck.to_counts() {
                    assert_eq!(c.counts.len(), ck.header.config.classes());
                    assert!(c.counts.iter().chain(&c.scaled).all(|v| v.len() == dim));
                }
            }
            Kind::Update => assert!(ck.scorer().is_err() && ck.to_counts().is_err()),
            Kind::Control | Kind::Moments => assert!(ck.scorer().is_err() && ck.to_counts().is_err()),
        }
        let bytes = ck.to_bytes().expect("an accepted checkpoint can be written back");
        let back = Checkpoint::from_bytes(&bytes, Path::new(NAME)).expect("a written checkpoint reads back");
        assert_eq!((back.header.kind, back.header.config, back.header.round), (ck.header.kind, ck.header.config, ck.header.round));
        assert_eq!(back.tensors.keys().collect::<Vec<_>>(), ck.tensors.keys().collect::<Vec<_>>());
        assert_eq!(back.index, ck.index);
        for (name, v) in &ck.tensors {
            let w = &back.tensors[name];
            assert!(v.iter().zip(w).all(|(a, b)| a.to_bits() == b.to_bits()), "tensor {name} changed");
        }
    }
);
