//! In-process simulation of federated training under heterogeneity, for choosing the
//! algorithm and its defaults without the pipeline's processes and files:
//! `cargo run --release -p fedimdb --example hetero -- ARCHIVE`.
//!
//! By default it scores on a validation split held out of the *training* reviews
//! (`VAL=0.2`, seeded), so choices made from its output never look at the test set;
//! `VAL=0` scores on the official test set instead, for reports only. The split holds out
//! whole movies (`VAL_BY=movie`, from the archive's `train/urls_*.txt`), because the
//! official test set is about other movies than the training set; `VAL_BY=review` holds out
//! single reviews, as every table before 2026-12-03 did, and overrates federated cells.
//!
//! Environment (lists are comma-separated; every combination runs):
//! `WORKERS` (5,20,64), `PARTS` (iid,0.5,0.1: a Dirichlet alpha), `ALGOS`
//! (fedavg,scaffold,fedavgm), `ROUNDS` (5), `STEPS` (local SGD steps per round; 0: `EPOCHS`
//! passes), `EPOCHS` (8), `LR` (8), `SCHEDULES` (linear,constant), `SLR` (server learning
//! rate, 1), `MOM` (0.9, FedAvgM's momentum), `SMOM` (server momentum on SCAFFOLD, 0),
//! `INIT` (1: control variates from the starting model's gradient, as round 0 gives them),
//! `OPT1` (1: control variate = the shard's gradient at the round's start instead of the mean
//! along the local path), `POW` (learning rate × round^-POW), `SEED` (42), `MIN_SHARD` (32),
//! `VWARM` (1: server Adam's v starts from a bucket's first displacement squared), `TASK`
//! (sentiment, or rating: IMDB's 8 star ratings), `MULTI` (softmax,one-vs-rest: the K-class
//! link; every one runs). Server Adam on SCAFFOLD: `SADAM` (η; 0: off), `TAU` (τ), `B1`,
//! `B2` (its moments' decays), `YOGI` (1: Yogi's second moment), `SADAM_FROM` (first round it
//! steps), `SADAM_BIAS` (1: the biases take the Adam step too, instead of the average). Starting point: `INIT_W` (every weight starts at this value: the naive-Bayes
//! classifier scaled; default the pipeline's `model::start_weight`, 0.2 for two classes and
//! 0 for more; round 1's controls are the exact gradients there, as the pipeline's gradient
//! round gives them, and `ROUNDS` counts the training rounds after it), `INIT_AT0` (1: round
//! 1's control variates at zero weights, as round 0's counts give them, whatever `INIT_W`). `TAIL` (1: score the running
//! average of the global models instead), `DIAG` (1: share predicted positive and the
//! accuracy at the best bias; on the training reviews, the share predicted positive and the
//! mean residual). Probes of the threshold drift under label skew (none is a default):
//! `CORR_SCALE` (1: SCAFFOLD's correction `c - c_i` multiplied by this), `BCS` (the same
//! factor for the bias's correction alone; default `CORR_SCALE`), `FRESHB` (1|2: the bias's
//! correction from the shard's own mean residual at the round's start, a local pass, against
//! the global control's bias (1) or zero (2)), `DECOMP` (1: after each cell, the mean score
//! difference between its model and the first cell's, on the training and on the evaluation
//! reviews, split by the buckets' training document frequency, by the positive share of the
//! shards that read them, and by the sign of their naive-Bayes ratio), `GBIAS_PRIOR` (1: the
//! global bias stays the prior's log-odds of round 0), `SADAM_FLAT` (k: from round k on, η
//! shrinks so the momentum's growth stops raising the step), `AGREE` (1|2: every weight's
//! server step blended with the plain average by the workers' agreement on it, or its
//! square), `STEPSTAT` (1: the mean displacement and the server step's ratio to it),
//! `SHARDS` (1: each shard's positive and total reviews, before its cell runs), `SWD` (λ: after
//! each server Adam step every weight moves back towards its starting value by λ of the
//! distance, a prior centred on the naive-Bayes start), `EXP` (1: each round, FedExP's ratio
//! `Σ p_k ‖Δ_k‖² / ‖Σ p_k Δ_k‖²` over the weights: 1 when the workers move alike, large when
//! their moves cancel), `BSTEP` (β: the biases take β of the pipeline's step). With server
//! Adam the biases take the pipeline's agreement step (`BAGREE=0`: the plain mean).

use std::io::Read;

use fedimdb::featurize::{Featurizer, FeaturizerConfig};
use fedimdb::model::{ClassCounts, Model, ModelConfig, Multiclass, Scorer};
use fedimdb::server_optimizer::ServerOptimizer;
use fedimdb::train::{Algorithm, Correction, Schedule, TrainConfig, train_sparse, worker_seed};

fn env_list<T: std::str::FromStr>(name: &str, default: &str) -> Vec<T>
where
    T::Err: std::fmt::Debug,
{
    std::env::var(name)
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|x| x.trim().parse().unwrap())
        .collect()
}

fn featurize(set: &[(String, u8)], fc: FeaturizerConfig) -> Vec<Vec<u32>> {
    let mid = set.len() / 2;
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut f = Featurizer::new(fc);
            set[..mid]
                .iter()
                .map(|(t, _)| f.features(t))
                .collect::<Vec<_>>()
        });
        let mut f = Featurizer::new(fc);
        let b: Vec<Vec<u32>> = set[mid..].iter().map(|(t, _)| f.features(t)).collect();
        let mut a = h.join().unwrap();
        a.extend(b);
        a
    })
}

fn main() {
    let path = std::env::args().nth(1).expect("usage: hetero ARCHIVE");
    let task = match env_list::<String>("TASK", "sentiment")[0].as_str() {
        "rating" => fedimdb::labels::Task::Rating,
        _ => fedimdb::labels::Task::Sentiment,
    };
    let classes = task.labels().len();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(path).unwrap(),
    ));
    let (mut train, mut test) = (Vec::new(), Vec::new());
    // For VAL_BY=movie: each training review's (polarity, id), and the training split's
    // `urls_{neg,pos}.txt`, whose line `id` names the review's movie.
    let (mut train_ids, mut urls) = (Vec::new(), [Vec::new(), Vec::new()]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().into_owned();
        let parts: Vec<&str> = p.split('/').collect();
        if parts.len() == 3 && parts[1] == "train" && parts[2].starts_with("urls_") {
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            let k = usize::from(parts[2] == "urls_pos.txt");
            urls[k] = s.lines().map(|l| l.to_owned()).collect();
            continue;
        }
        if parts.len() != 4 || !p.ends_with(".txt") {
            continue;
        }
        let positive = match parts[2] {
            "pos" => true,
            "neg" => false,
            _ => continue,
        };
        let rating: u8 = parts[3]
            .trim_end_matches(".txt")
            .rsplit('_')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let label = task.class(positive, rating);
        let mut s = String::new();
        e.read_to_string(&mut s).unwrap();
        match parts[1] {
            "train" => {
                let id: usize = parts[3].split('_').next().unwrap().parse().unwrap();
                train_ids.push((usize::from(positive), id));
                train.push((s, label))
            }
            "test" => test.push((s, label)),
            _ => {}
        }
    }
    let val: f64 = env_list("VAL", "0.2")[0];
    let (train, eval) = if val > 0.0 {
        let cut = (train.len() as f64 * val) as usize;
        let order = fedimdb::train::shuffled(train.len(), 7);
        let held: Vec<bool> = if env_list::<String>("VAL_BY", "movie")[0] == "movie" {
            // Whole movies held out, as the official test set is about other movies than
            // the training set: review-level splits share movies (names, plots) with
            // training and flatter models that lean on them.
            let movie = |&(k, id): &(usize, usize)| {
                let u: &str = &urls[k][id];
                u.split("/title/")
                    .nth(1)
                    .unwrap_or(u)
                    .split('/')
                    .next()
                    .unwrap()
                    .to_owned()
            };
            let mut movies: Vec<String> = train_ids.iter().map(movie).collect();
            let of: Vec<String> = movies.clone();
            movies.sort();
            movies.dedup();
            let order = fedimdb::train::shuffled(movies.len(), 7);
            let mut per: std::collections::HashMap<&str, usize> = Default::default();
            for m in &of {
                *per.entry(m.as_str()).or_default() += 1;
            }
            let mut chosen = std::collections::HashSet::new();
            let mut n = 0;
            for &i in &order {
                if n >= cut {
                    break;
                }
                n += per[movies[i].as_str()];
                chosen.insert(movies[i].as_str());
            }
            of.iter().map(|m| chosen.contains(m.as_str())).collect()
        } else {
            let mut h = vec![false; train.len()];
            for &i in &order[..cut] {
                h[i] = true;
            }
            h
        };
        let eval: Vec<_> = order
            .iter()
            .filter(|&&i| held[i])
            .map(|&i| train[i].clone())
            .collect();
        let rest: Vec<_> = order
            .iter()
            .filter(|&&i| !held[i])
            .map(|&i| train[i].clone())
            .collect();
        (rest, eval)
    } else {
        (train, test)
    };
    eprintln!(
        "train {} eval {} ({})",
        train.len(),
        eval.len(),
        if val > 0.0 {
            "validation split"
        } else {
            "TEST SET"
        }
    );
    let fc = FeaturizerConfig::default();
    let (xtr, xev) = (featurize(&train, fc), featurize(&eval, fc));
    let ytr: Vec<u8> = train.iter().map(|x| x.1).collect();
    let yev: Vec<u8> = eval.iter().map(|x| x.1).collect();
    let counts = ClassCounts::count(classes, fc.buckets(), &xtr, &ytr);
    for multi in env_list::<String>("MULTI", "softmax") {
        let multiclass = if multi == "one-vs-rest" {
            Multiclass::OneVsRest
        } else {
            Multiclass::Softmax
        };
        let mut mc = ModelConfig {
            featurizer: fc,
            ..ModelConfig::default()
        }
        .with_classes(classes, multiclass);
        if let Ok(nb) = std::env::var("NB") {
            mc.nb_smoothing = nb.parse().unwrap();
        }
        let base = Model::from_counts(mc, &counts);
        let ratio: Vec<f32> = base.nb_ratio.clone();
        let bias0 = base.bias.clone();
        let acc = |w: &[f32], b: &[f32]| {
            let s = Scorer::new(mc, w, b, &ratio);
            xev.iter()
                .zip(&yev)
                .filter(|(x, y)| s.predict(x) == **y as usize)
                .count() as f64
                / yev.len() as f64
                * 100.0
        };
        // DIAG=1 (two classes): the share of reviews predicted positive, and the accuracy
        // the same weights would reach with the best bias (a diagnostic, not a method).
        let diag = |w: &[f32], b: &[f32]| {
            let s = Scorer::new(mc, w, b, &ratio);
            let mut z: Vec<(f32, u8)> = xev
                .iter()
                .zip(&yev)
                .map(|(x, &y)| (s.logits(x)[0], y))
                .collect();
            let pos = z.iter().filter(|p| p.0 > 0.0).count() as f64 / z.len() as f64;
            z.sort_by(|a, b| a.0.total_cmp(&b.0));
            // Threshold after i reviews: the first i predicted negative.
            let mut correct = z.iter().filter(|p| p.1 == 1).count();
            let mut best = correct;
            for p in &z {
                if p.1 == 1 {
                    correct -= 1;
                } else {
                    correct += 1;
                }
                best = best.max(correct);
            }
            // On the training reviews: the share predicted positive and the mean residual
            // (zero where the bias is at its optimum for these weights).
            let (mut tpos, mut resid) = (0usize, 0f64);
            for (x, &y) in xtr.iter().zip(&ytr) {
                let z = s.logits(x)[0];
                tpos += usize::from(z > 0.0);
                resid += fedimdb::model::sigmoid(z) as f64 - y as f64;
            }
            format!(
                "pos {:.1}% best-bias {:.2} train-pos {:.1}% train-resid {:+.4}",
                pos * 100.0,
                best as f64 / z.len() as f64 * 100.0,
                tpos as f64 / xtr.len() as f64 * 100.0,
                resid / xtr.len() as f64
            )
        };
        let rounds: u32 = env_list("ROUNDS", "5")[0];
        let mut reference: Option<(Vec<f32>, Vec<f32>)> = None;
        let seed: u64 = env_list("SEED", "42")[0];
        let min_shard: usize = env_list("MIN_SHARD", "32")[0];
        for algo in env_list::<String>("ALGOS", "fedavg,scaffold") {
            for &steps in &env_list::<u64>("STEPS", "0") {
                for &lr in &env_list::<f32>("LR", "8") {
                    for schedule in env_list::<String>("SCHEDULES", "linear") {
                        for &workers in &env_list::<usize>("WORKERS", "1,5,20,64") {
                            for part in env_list::<String>("PARTS", "iid,0.5,0.1") {
                                if workers == 1 && part != "iid" {
                                    continue;
                                }
                                let shards = if part == "iid" {
                                    fedimdb::partition::iid(&ytr, workers, seed).unwrap()
                                } else {
                                    fedimdb::partition::dirichlet(
                                        &ytr,
                                        workers,
                                        part.parse().unwrap(),
                                        min_shard,
                                        seed,
                                    )
                                    .unwrap()
                                };
                                if std::env::var("SHARDS").is_ok() {
                                    let desc: Vec<String> = shards
                                        .iter()
                                        .map(|s| {
                                            let pos = s.iter().filter(|&&i| ytr[i] == 1).count();
                                            format!("{}/{}", pos, s.len())
                                        })
                                        .collect();
                                    println!("shards (positive/all): {}", desc.join(" "));
                                }
                                let t0 = std::time::Instant::now();
                                let link = if classes > 2 {
                                    format!("{multi} ")
                                } else {
                                    String::new()
                                };
                                let (line, wf, bf) = simulate(
                                    &algo, steps, lr, &schedule, rounds, &shards, &xtr, &ytr, mc,
                                    &ratio, &bias0, &acc, &diag,
                                );
                                if std::env::var("DECOMP").is_ok() {
                                    match &reference {
                                        None => reference = Some((wf.clone(), bf.clone())),
                                        Some((wc, bc)) => decomp(
                                            &shards, &xtr, &ytr, &xev, &counts, &ratio, &wf, &bf,
                                            wc, bc,
                                        ),
                                    }
                                }
                                println!(
                                    "{link}{algo:8} steps {steps:6} lr {lr:5} {schedule:8} workers {workers:3} part {part:4}: {line} ({:.1}s)",
                                    t0.elapsed().as_secs_f64()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One worker's round: its weights and bias, its mean gradient and bias gradient (its next
/// control variate), and the first pass's loss.
type WorkerRound = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, f64);

#[allow(clippy::too_many_arguments)]
fn simulate(
    algo: &str,
    steps: u64,
    lr: f32,
    schedule: &str,
    rounds: u32,
    shards: &[Vec<usize>],
    xtr: &[Vec<u32>],
    ytr: &[u8],
    mc: ModelConfig,
    ratio: &[f32],
    bias0: &[f32],
    acc: &dyn Fn(&[f32], &[f32]) -> f64,
    diag: &dyn Fn(&[f32], &[f32]) -> String,
) -> (String, Vec<f32>, Vec<f32>) {
    let dim = ratio.len();
    let rows = bias0.len();
    let epochs: u32 = env_list("EPOCHS", "8")[0];
    let slr: f32 = env_list("SLR", "1")[0];
    let mom: f32 = env_list("MOM", "0.9")[0];
    let seed: u64 = env_list("SEED", "42")[0];
    let n: usize = shards.iter().map(Vec::len).sum();
    let data: Vec<(Vec<Vec<u32>>, Vec<u8>)> = shards
        .iter()
        .map(|s| {
            (
                s.iter().map(|&i| xtr[i].clone()).collect(),
                s.iter().map(|&i| ytr[i]).collect(),
            )
        })
        .collect();
    // INIT_W=c: every weight starts at c (the naive-Bayes classifier scaled by c) instead of
    // where the pipeline starts (`start_weight`).
    let start = fedimdb::model::start_weight(mc.classes()).to_string();
    let init_w: f32 = env_list("INIT_W", &start)[0];
    let (mut w, mut b) = (vec![init_w; dim], bias0.to_vec());
    let mut c = Correction {
        weight: vec![0.0; dim],
        bias: vec![0.0; rows],
    };
    let mut ci: Vec<Correction> = vec![
        Correction {
            weight: Vec::new(),
            bias: vec![0.0; rows],
        };
        shards.len()
    ];
    let mut m = vec![0f32; dim];
    let mut v = vec![0f32; dim];
    let mut m_b = vec![0f32; rows];
    let mut v_b = vec![0f32; rows];
    let mut line = String::new();
    let pow: f32 = env_list("POW", "0")[0];
    let full_grad = |w: &[f32], b: &[f32], xs: &[Vec<u32>], ys: &[u8]| {
        let model = Model {
            config: mc,
            weight: w.to_vec(),
            bias: b.to_vec(),
            nb_ratio: ratio.to_vec(),
        };
        fedimdb::control::shard_gradient(&model, xs, ys)
    };
    let opt1 = env_list::<u32>("OPT1", "0")[0] == 1;
    if algo == "scaffold" && env_list::<u32>("INIT", "1")[0] == 1 {
        // Control variates at the starting point, as round 0 can provide them.
        // INIT_AT0=1: at zero weights whatever INIT_W (what round 0's counts give).
        let at0 = env_list::<u32>("INIT_AT0", "0")[0] == 1;
        let zero = vec![0f32; dim];
        for (k, (xs, ys)) in data.iter().enumerate() {
            let (g, gb) = full_grad(if at0 { &zero } else { &w }, &b, xs, ys);
            let p = shards[k].len() as f32 / n as f32;
            for (cj, gj) in c.weight.iter_mut().zip(&g) {
                *cj += p * gj;
            }
            for (cb, g) in c.bias.iter_mut().zip(&gb) {
                *cb += p * g;
            }
            ci[k] = Correction {
                weight: g,
                bias: gb,
            };
        }
    }
    let (mut tail_w, mut tail_b) = (vec![0f64; dim], vec![0f64; rows]);
    for r in 1..=rounds {
        let lr = lr * (r as f32).powf(-pow);
        let results: Vec<WorkerRound> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|t| {
                    let (w, b, c, ci, data, full_grad) = (&w, &b, &c, &ci, &data, &full_grad);
                    s.spawn(move || {
                        let mut out = Vec::new();
                        for k in (t..data.len()).step_by(2) {
                            let (xs, ys) = &data[k];
                            let mut sgd = Model {
                                config: mc,
                                weight: w.clone(),
                                bias: b.clone(),
                                nb_ratio: ratio.to_vec(),
                            };
                            let schedule = if schedule == "linear" {
                                Schedule::Linear
                            } else {
                                Schedule::Constant
                            };
                            let tc = TrainConfig {
                                algorithm: if algo == "scaffold" {
                                    Algorithm::Scaffold
                                } else {
                                    Algorithm::FedAvg
                                },
                                epochs,
                                batch: 1,
                                lr,
                                seed: worker_seed(seed, r, k),
                                steps,
                                schedule,
                            };
                            let cs: f32 = env_list("CORR_SCALE", "1")[0];
                            let bcs: f32 = env_list("BCS", &cs.to_string())[0];
                            let corr = (algo == "scaffold").then(|| {
                                let own = &ci[k];
                                Correction {
                                    weight: if own.weight.is_empty() {
                                        c.weight.clone()
                                    } else {
                                        c.weight
                                            .iter()
                                            .zip(&own.weight)
                                            .map(|(a, b)| cs * (a - b))
                                            .collect()
                                    },
                                    bias: c
                                        .bias
                                        .iter()
                                        .zip(&own.bias)
                                        .map(|(a, b)| bcs * (a - b))
                                        .collect(),
                                }
                            });
                            // FRESHB=1|2: the bias correction from the shard's own mean
                            // residual at the round's start (a local pass), against the
                            // global control's bias (1) or zero (2).
                            let freshb: u32 = env_list("FRESHB", "0")[0];
                            let mut corr = corr;
                            if let (Some(cr), true) =
                                (corr.as_mut(), freshb > 0 && !ci[k].weight.is_empty())
                            {
                                let (_, gb) = full_grad(w, b, xs, ys);
                                for ((d, g), cb) in cr.bias.iter_mut().zip(&gb).zip(&c.bias) {
                                    *d = if freshb == 1 { cb - g } else { -g };
                                }
                            }
                            let mut o = train_sparse(&mut sgd, xs, ys, &tc, corr.as_ref(), |_| {});
                            if opt1 {
                                let (g, gb) = full_grad(w, b, xs, ys);
                                o.mean_grad = g;
                                o.mean_grad_bias = gb;
                            }
                            let loss = o.epochs.first().map_or(0.0, |e| e.loss);
                            out.push((
                                k,
                                (sgd.weight, sgd.bias, o.mean_grad, o.mean_grad_bias, loss),
                            ));
                        }
                        out
                    })
                })
                .collect();
            let mut all: Vec<_> = handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect();
            all.sort_by_key(|x| x.0);
            all.into_iter().map(|x| x.1).collect()
        });
        let mut dw = vec![0f64; dim];
        // Σ p_k |Δ_k| per weight, only for the AGREE probe (a pass over every weight).
        let agree = env_list::<u8>("AGREE", "0")[0];
        let mut dabs = vec![0f64; if agree > 0 { dim } else { 0 }];
        let mut dbabs = vec![0f64; rows];
        let mut db = vec![0f64; rows];
        let mut floss = 0.0;
        // EXP=1: FedExP's ratio Σ p_k ‖Δ_k‖² / ‖Σ p_k Δ_k‖² over the weights (1 when the
        // workers move alike, large when their moves cancel), printed each round.
        let exp_probe = env_list::<u8>("EXP", "0")[0] == 1;
        let mut sq_each = 0f64;
        for (k, (wk, bk, gk, gbk, loss)) in results.into_iter().enumerate() {
            let p = shards[k].len() as f64 / n as f64;
            floss += p * loss;
            if exp_probe {
                sq_each += p * wk
                    .iter()
                    .zip(&w)
                    .map(|(&a, &x)| ((a - x) as f64).powi(2))
                    .sum::<f64>();
            }
            for ((s, &a), &x) in dw.iter_mut().zip(&wk).zip(&w) {
                *s += p * (a - x) as f64;
            }
            for ((sa, &a), &x) in dabs.iter_mut().zip(&wk).zip(&w) {
                *sa += p * (a - x).abs() as f64;
            }
            for (((d, da), &x), &y) in db.iter_mut().zip(dbabs.iter_mut()).zip(&bk).zip(&b) {
                *d += p * (x - y) as f64;
                *da += p * (x - y).abs() as f64;
            }
            if algo == "scaffold" {
                let old = std::mem::take(&mut ci[k].weight);
                for (j, &g) in gk.iter().enumerate() {
                    c.weight[j] += (p * (g - old.get(j).copied().unwrap_or(0.0)) as f64) as f32;
                }
                for ((cb, &g), &o) in c.bias.iter_mut().zip(&gbk).zip(&ci[k].bias) {
                    *cb += (p * (g - o) as f64) as f32;
                }
                ci[k] = Correction {
                    weight: gk,
                    bias: gbk,
                };
            }
        }
        if exp_probe {
            let sq_combined: f64 = dw.iter().map(|d| d * d).sum();
            line += &format!(" [exp {:.2}]", sq_each / sq_combined.max(1e-30));
        }
        let sadam: f32 = env_list::<f32>("SADAM", "0")[0]
            * (r as f32).powf(-env_list::<f32>("SADAM_POW", "0")[0]);
        let sadam_from: u32 = env_list("SADAM_FROM", "1")[0];
        if sadam > 0.0 && r >= sadam_from {
            // FedAdam (Reddi et al., 2021) on the averaged displacement: per-coordinate steps
            // of about SADAM, moments β1 0.9, β2 0.99, τ TAU (1e-3); the bias moves plainly.
            let tau: f32 = env_list("TAU", "0.001")[0];
            let vwarm = env_list::<u8>("VWARM", "0")[0] == 1;
            let yogi = env_list::<u8>("YOGI", "0")[0] == 1;
            let b1: f32 = env_list("B1", "0.9")[0];
            let b2: f32 = env_list("B2", "0.99")[0];
            // SADAM_FLAT=k: from round k on, η shrinks by (1 - β1^k) / (1 - β1^r), so that
            // the momentum's growth (no bias correction) stops raising the step there.
            let flat: i32 = env_list("SADAM_FLAT", "0")[0];
            let sadam = if flat > 0 && r as i32 > flat {
                sadam * (1.0 - b1.powi(flat)) / (1.0 - b1.powi(r as i32))
            } else {
                sadam
            };
            let (mut sum_d, mut sum_step, mut moved) = (0f64, 0f64, 0usize);
            for (j, (((mj, vj), wj), d)) in m
                .iter_mut()
                .zip(v.iter_mut())
                .zip(w.iter_mut())
                .zip(&dw)
                .enumerate()
            {
                // AGREE=1: the step blends Adam's and the plain average by the workers'
                // agreement on the bucket, |Σ p d| / Σ p |d|.
                let a = match dabs.get(j) {
                    Some(&da) if da > 0.0 => (d.abs() / da) as f32,
                    _ => 1.0,
                };
                let d = *d as f32;
                if d == 0.0 && *mj == 0.0 {
                    continue;
                }
                sum_d += d.abs() as f64;
                moved += 1;
                *mj = b1 * *mj + (1.0 - b1) * d;
                // VWARM=1: a bucket's first displacement sets v whole (not 1% of it), so
                // the first step is capped at about η·0.1 instead of η.
                *vj = if vwarm && *vj == 0.0 {
                    d * d
                } else if yogi {
                    // FedYogi: v moves towards d² additively, so it grows slowly.
                    *vj - (1.0 - b2) * d * d * (*vj - d * d).signum()
                } else {
                    b2 * *vj + (1.0 - b2) * d * d
                };
                let step = sadam * *mj / (vj.sqrt() + tau);
                let step = match agree {
                    1 => a * step + (1.0 - a) * d,
                    2 => a * a * step + (1.0 - a * a) * d,
                    _ => step,
                };
                sum_step += step.abs() as f64;
                *wj += step;
            }
            // SWD=λ: after the step every weight moves back towards the start by λ of its
            // distance (a prior centred on the naive-Bayes classifier, applied by the server).
            let swd: f32 = env_list("SWD", "0")[0];
            if swd > 0.0 {
                for wj in w.iter_mut() {
                    *wj -= swd * (*wj - init_w);
                }
            }
            if env_list::<u8>("STEPSTAT", "0")[0] == 1 {
                line += &format!(
                    " [mean |d| {:.4} step/|d| {:.2}]",
                    sum_d / moved.max(1) as f64,
                    sum_step / sum_d.max(1e-30)
                );
            }
            if env_list::<u8>("SADAM_BIAS", "0")[0] == 1 {
                // SADAM_BIAS=1: the biases take the same Adam step as the weights.
                for ((mb, vb), (bb, d)) in m_b
                    .iter_mut()
                    .zip(v_b.iter_mut())
                    .zip(b.iter_mut().zip(&db))
                {
                    let d = *d as f32;
                    *mb = b1 * *mb + (1.0 - b1) * d;
                    *vb = b2 * *vb + (1.0 - b2) * d * d;
                    *bb += sadam * *mb / (vb.sqrt() + tau);
                }
            } else {
                // The pipeline's bias step: the agreement step that goes with server Adam
                // (`ServerOptimizer::step_bias`), or the plain average with `BAGREE=0`.
                let combined: Vec<f32> = b.iter().zip(&db).map(|(x, d)| x + *d as f32).collect();
                let opt = if env_list::<u8>("BAGREE", "1")[0] == 0 {
                    ServerOptimizer::None
                } else {
                    ServerOptimizer::default_for(2)
                };
                // BSTEP=β: the biases take β of that step (a probe). At 1, the pipeline's
                // step is kept as it is: `b0 + (b - b0)` need not round back to `b`.
                let beta: f32 = env_list("BSTEP", "1")[0];
                let before = (beta != 1.0).then(|| b.clone());
                opt.step_bias(&mut b, &combined, &dbabs);
                if let Some(before) = before {
                    for (bj, b0) in b.iter_mut().zip(&before) {
                        *bj = b0 + beta * (*bj - b0);
                    }
                }
            }
        } else if algo == "fedavgm" || env_list::<f32>("SMOM", "0")[0] > 0.0 {
            let mom = if algo == "fedavgm" {
                mom
            } else {
                env_list::<f32>("SMOM", "0")[0]
            };
            for ((mj, wj), d) in m.iter_mut().zip(w.iter_mut()).zip(&dw) {
                *mj = mom * *mj + *d as f32;
                *wj += slr * *mj;
            }
            for ((mb, bb), d) in m_b.iter_mut().zip(b.iter_mut()).zip(&db) {
                *mb = mom * *mb + *d as f32;
                *bb += slr * *mb;
            }
        } else {
            for (wj, d) in w.iter_mut().zip(&dw) {
                *wj += slr * *d as f32;
            }
            for (bb, d) in b.iter_mut().zip(&db) {
                *bb += slr * *d as f32;
            }
        }
        if env_list::<u8>("GBIAS_PRIOR", "0")[0] == 1 {
            // GBIAS_PRIOR=1: the global bias stays the prior's log-odds (round 0's).
            b.copy_from_slice(bias0);
        }
        line += &format!(" r{r}={:.2}(loss {floss:.3})", acc(&w, &b));
        if env_list::<u8>("DIAG", "0")[0] == 1 {
            line += &format!("[{}]", diag(&w, &b));
        }
        if env_list::<u8>("TAIL", "0")[0] == 1 && r >= 2 {
            // The mean of the global models from round 2 on (iterate averaging).
            for (s, &x) in tail_w.iter_mut().zip(&w) {
                *s += x as f64;
            }
            for (s, &x) in tail_b.iter_mut().zip(&b) {
                *s += x as f64;
            }
            let k = (r - 1) as f64;
            let tw: Vec<f32> = tail_w.iter().map(|s| (s / k) as f32).collect();
            let tb: Vec<f32> = tail_b.iter().map(|s| (s / k) as f32).collect();
            line += &format!("[tail {:.2}]", acc(&tw, &tb));
        }
    }
    (line, w, b)
}

/// DECOMP=1: the mean score difference between this cell's model and the first cell's
/// (centralized), on the training and on the evaluation reviews, split by bucket class.
#[allow(clippy::too_many_arguments)]
fn decomp(
    shards: &[Vec<usize>],
    xtr: &[Vec<u32>],
    ytr: &[u8],
    xev: &[Vec<u32>],
    counts: &ClassCounts,
    ratio: &[f32],
    wf: &[f32],
    bf: &[f32],
    wc: &[f32],
    bc: &[f32],
) {
    let dim = ratio.len();
    // Per bucket: the reader-weighted positive share of the shards that read it.
    let mut num = vec![0f64; dim];
    let mut den = vec![0f64; dim];
    for s in shards {
        let pi = s.iter().filter(|&&i| ytr[i] == 1).count() as f64 / s.len() as f64;
        for &i in s {
            for &j in &xtr[i] {
                num[j as usize] += pi;
                den[j as usize] += 1.0;
            }
        }
    }
    let df = |j: usize| (counts.counts[0][j] + counts.counts[1][j]) as f64;
    let dfbin = |j: usize| match df(j) as u64 {
        0 => 0,
        1 => 1,
        2..=4 => 2,
        5..=19 => 3,
        20..=99 => 4,
        100..=999 => 5,
        _ => 6,
    };
    let pbin = |j: usize| {
        if den[j] == 0.0 {
            return 0;
        }
        let p = num[j] / den[j];
        if p < 0.35 {
            1
        } else if p < 0.45 {
            2
        } else if p < 0.55 {
            3
        } else if p < 0.65 {
            4
        } else {
            5
        }
    };
    let rbin = |j: usize| usize::from(ratio[j] > 0.0);
    let d: Vec<f32> = (0..dim).map(|j| (wf[j] - wc[j]) * ratio[j]).collect();
    let run = |xs: &[Vec<u32>], name: &str| {
        let mut by_df = [0f64; 7];
        let mut by_p = [0f64; 6];
        let mut by_r = [0f64; 2];
        let mut by_dfr = [[0f64; 2]; 7];
        for x in xs {
            let sc = fedimdb::model::doc_scale(x.len()) as f64;
            for &j in x {
                let j = j as usize;
                let c = d[j] as f64 * sc;
                by_df[dfbin(j)] += c;
                by_p[pbin(j)] += c;
                by_r[rbin(j)] += c;
                by_dfr[dfbin(j)][rbin(j)] += c;
            }
        }
        let n = xs.len() as f64;
        let total: f64 = by_df.iter().sum::<f64>() / n + (bf[0] - bc[0]) as f64;
        println!(
            "  decomp {name}: total {total:+.3} bias {:+.3} | df 0,1,2-4,5-19,20-99,100-999,1000+: {} | reader-pos <.35,.35-.45,-.55,-.65,>.65 (unread {:+.3}): {} | r<0 {:+.3} r>0 {:+.3} | df x (r<0, r>0): {}",
            bf[0] - bc[0],
            by_df
                .iter()
                .map(|v| format!("{:+.3}", v / n))
                .collect::<Vec<_>>()
                .join(" "),
            by_p[0] / n,
            by_p[1..]
                .iter()
                .map(|v| format!("{:+.3}", v / n))
                .collect::<Vec<_>>()
                .join(" "),
            by_r[0] / n,
            by_r[1] / n,
            by_dfr
                .iter()
                .map(|v| format!("({:+.2},{:+.2})", v[0] / n, v[1] / n))
                .collect::<Vec<_>>()
                .join(" "),
        );
    };
    run(xtr, "train");
    run(xev, "eval ");
}
