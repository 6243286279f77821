//! Hyper-parameter sweep for the model, reading the labeled archive directly:
//! `cargo run --release -p fedimdb --example sweep -- ARCHIVE`. Prints test accuracy of
//! centralized training for a grid of settings; used to choose the defaults.

use std::io::Read;

use fedimdb::featurize::{Featurizer, FeaturizerConfig};
use fedimdb::model::{ClassCounts, Model, ModelConfig};
use fedimdb::train::{SparseSgd, TrainConfig};

fn main() {
    let path = std::env::args().nth(1).expect("usage: sweep ARCHIVE");
    let t0 = std::time::Instant::now();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()));
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().into_owned();
        let parts: Vec<&str> = p.split('/').collect();
        if parts.len() != 4 || !p.ends_with(".txt") {
            continue;
        }
        let label = match parts[2] { "pos" => 1u8, "neg" => 0, _ => continue };
        let mut s = String::new();
        e.read_to_string(&mut s).unwrap();
        match parts[1] { "train" => train.push((s, label)), "test" => test.push((s, label)), _ => {} }
    }
    eprintln!("read {} train {} test in {:?}", train.len(), test.len(), t0.elapsed());
    let bits: Vec<u32> = std::env::var("BITS").map(|s| s.split(',').map(|x| x.parse().unwrap()).collect()).unwrap_or(vec![22]);
    let ngrams: u32 = std::env::var("NGRAM").map(|s| s.parse().unwrap()).unwrap_or(3);
    for &hb in &bits {
        let fc = FeaturizerConfig { hash_bits: hb, max_ngram: ngrams };
        let t = std::time::Instant::now();
        let feat = |set: &[(String, u8)]| -> Vec<Vec<u32>> {
            let mid = set.len() / 2;
            std::thread::scope(|s| {
                let h = s.spawn(|| { let mut f = Featurizer::new(fc); set[..mid].iter().map(|(t, _)| f.features(t)).collect::<Vec<_>>() });
                let mut f = Featurizer::new(fc);
                let mut b: Vec<Vec<u32>> = set[mid..].iter().map(|(t, _)| f.features(t)).collect();
                let mut a = h.join().unwrap();
                a.append(&mut b);
                a
            })
        };
        let (xtr, xte) = (feat(&train), feat(&test));
        let ytr: Vec<u8> = train.iter().map(|x| x.1).collect();
        let yte: Vec<u8> = test.iter().map(|x| x.1).collect();
        eprintln!("bits {hb}: featurized in {:?}", t.elapsed());
        let mc = ModelConfig { featurizer: fc, nb_smoothing: 1.0 };
        let counts = ClassCounts::count(mc.dim(), &xtr, &ytr);
        let base = Model::from_counts(mc, &counts).unwrap();
        let acc = |m: &Model| { let s = m.scorer().unwrap(); xte.iter().zip(&yte).filter(|(x, y)| (s.logit(x) >= 0.0) == (**y == 1)).count() as f64 / yte.len() as f64 };
        println!("bits {hb} NB only: {:.4}", acc(&base));
        if let Ok(w) = std::env::var("FED") {
            let workers: usize = w.parse().unwrap();
            let rounds: u32 = std::env::var("ROUNDS").map(|s| s.parse().unwrap()).unwrap_or(4);
            let epochs: u32 = std::env::var("EPOCHS").map(|s| s.parse().unwrap()).unwrap_or(2);
            for lr in std::env::var("LRS").unwrap().split(',').map(|x| x.parse::<f32>().unwrap()) {
                let decay: f32 = std::env::var("DECAY").map(|s| s.parse().unwrap()).unwrap_or(0.0);
                // IID: interleave by position (train is grouped by label, so stride keeps balance)
                let parts: Vec<Vec<usize>> = (0..workers).map(|k| (k..xtr.len()).step_by(workers).collect()).collect();
                let mut global = base.clone();
                let mut line = format!("fed {workers} lr {lr} decay {decay}:");
                for r in 1..=rounds {
                    let lr_r = lr / (1.0 + decay * (r - 1) as f32);
                    let mut sum_w = vec![0f64; mc.dim()];
                    let mut sum_b = 0f64;
                    for (k, part) in parts.iter().enumerate() {
                        let xs: Vec<Vec<u32>> = part.iter().map(|&i| xtr[i].clone()).collect();
                        let ys: Vec<u8> = part.iter().map(|&i| ytr[i]).collect();
                        let mut sgd = SparseSgd::new(&global).unwrap();
                        sgd.train(&xs, &ys, &TrainConfig { epochs, batch: 1, lr: lr_r, seed: 42 + (r as u64) * 100 + k as u64 }, |_| {});
                        let wk = part.len() as f64;
                        for (s, &x) in sum_w.iter_mut().zip(&sgd.weight) { *s += wk * x as f64; }
                        sum_b += wk * sgd.bias as f64;
                    }
                    let n = xtr.len() as f64;
                    let w: Vec<f32> = sum_w.iter().map(|s| (s / n) as f32).collect();
                    global.weight = candle_core::Tensor::from_vec(w, mc.dim(), &candle_core::Device::Cpu).unwrap();
                    global.bias = candle_core::Tensor::new(&[(sum_b / n) as f32], &candle_core::Device::Cpu).unwrap();
                    line += &format!(" r{r}={:.4}", acc(&global));
                }
                println!("{line}");
            }
            continue;
        }
        let lrs: Vec<f32> = std::env::var("LRS").map(|s| s.split(',').map(|x| x.parse().unwrap()).collect()).unwrap_or(vec![0.1, 0.3, 1.0]);
        let batches: Vec<usize> = std::env::var("BATCHES").map(|s| s.split(',').map(|x| x.parse().unwrap()).collect()).unwrap_or(vec![1, 32]);
        let epochs: u32 = std::env::var("EPOCHS").map(|s| s.parse().unwrap()).unwrap_or(6);
        for &lr in &lrs {
            for &b in &batches {
                let m = base.clone();
                let mut sgd = SparseSgd::new(&m).unwrap();
                let mut line = format!("bits {hb} lr {lr} batch {b}:");
                for e in 0..epochs {
                    let t = std::time::Instant::now();
                    let decay: f32 = std::env::var("DECAY").map(|s| s.parse().unwrap()).unwrap_or(0.0);
                    sgd.train(&xtr, &ytr, &TrainConfig { epochs: 1, batch: b, lr: lr / (1.0 + decay * e as f32), seed: 42 + e as u64 }, |_| {});
                    let el = t.elapsed().as_secs_f64();
                    let mut mm = m.clone();
                    sgd.write_into(&mut mm).unwrap();
                    line += &format!(" e{}={:.4}({el:.2}s)", e + 1, acc(&mm));
                }
                println!("{line}");
            }
        }
    }
}
