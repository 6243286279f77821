//! Dynamic batching: a queue, one batcher thread, `--workers` inference threads.
//!
//! Handlers submit *jobs* (the texts of one request, at most `--max-batch` of them) to a
//! bounded queue and await a oneshot reply. The batcher takes the first waiting job, then
//! keeps adding jobs until the batch holds `--max-batch` reviews or `--max-delay-us` has
//! passed since it took the first, and hands the batch to a free worker. The hand-off is a
//! rendezvous (a zero-capacity channel): while every worker is busy the batcher waits, the
//! queue fills, and the next batch comes out larger. So under load batches grow by
//! themselves even with `--max-delay-us 0`, and when the server is idle a lone request is
//! not held back at all. A positive delay trades latency for larger batches at moderate
//! load; for this model (a sparse dot product per review, no per-batch setup worth
//! amortising) the measured effect is small: see the README.
//!
//! Why threads and not tokio tasks: featurising and scoring is CPU work (~15 µs a review)
//! that must not stall the async runtime, and `std::sync::mpsc::Receiver::recv_timeout`
//! waits to the microsecond where tokio timers round up to a millisecond.
//!
//! A worker scores a whole batch with the model that is current when it starts, and never
//! sees a half-read request: handlers read and check the body before submitting.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use fedimdb::featurize::Featurizer;
use tokio::sync::oneshot;

use crate::Config;
use crate::error::ApiError;
use crate::explain::{Explanation, explain};
use crate::metrics::Metrics;
use crate::state::{LoadedModel, ModelSlot};

/// What a caller wants explained about each text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExplainOptions {
    /// Words and n-grams to list per class.
    pub top_k: usize,
    /// Classes to explain, most probable first (two-class models: always both).
    pub top_classes: usize,
    /// Whether to return per-token weights with their places in the text.
    pub highlight: bool,
}

/// One review's score.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// The row logits: one for a two-class model, K for K classes.
    pub logits: Vec<f32>,
    /// Every class's probability, in class order (they sum to one).
    pub probabilities: Vec<f32>,
    /// The predicted class: for two classes 1 when its probability is at least 0.5, as the
    /// server always labelled; for K the most probable (ties: the lower index).
    pub class: usize,
    pub explanation: Option<Explanation>,
}

impl Prediction {
    /// The prediction of `logits` by `link`.
    pub fn new(
        link: fedimdb::model::Link,
        logits: Vec<f32>,
        explanation: Option<Explanation>,
    ) -> Self {
        let probabilities = link.probabilities(&logits);
        let class = if logits.len() == 1 {
            usize::from(probabilities[1] >= 0.5)
        } else {
            link.predict(&logits)
        };
        Self {
            logits,
            probabilities,
            class,
            explanation,
        }
    }
}

/// A job's answer: its predictions and the model that made them.
#[derive(Debug)]
pub struct Scored {
    pub model: Arc<LoadedModel>,
    pub predictions: Vec<Prediction>,
}

struct Job {
    texts: Vec<String>,
    explain: Option<ExplainOptions>,
    queued_at: Instant,
    reply: oneshot::Sender<Result<Scored, ApiError>>,
}

/// The handle handlers submit to.
#[derive(Debug)]
pub struct Batcher {
    queue: SyncSender<Job>,
    depth: Arc<AtomicUsize>,
    max_batch: usize,
}

impl Batcher {
    /// Starts the batcher thread and the workers. They stop when the `Batcher` is dropped.
    pub fn start(config: &Config, models: Arc<ModelSlot>, metrics: Arc<Metrics>) -> Result<Self> {
        let (queue, jobs) = mpsc::sync_channel::<Job>(config.max_queue);
        let (to_workers, batches) = mpsc::sync_channel::<Vec<Job>>(0);
        let batches = Arc::new(Mutex::new(batches));
        let depth = Arc::new(AtomicUsize::new(0));
        for i in 0..config.workers {
            let (batches, models, metrics) = (batches.clone(), models.clone(), metrics.clone());
            std::thread::Builder::new()
                .name(format!("infer-{i}"))
                .spawn(move || worker(&batches, &models, &metrics))?;
        }
        let (max_batch, max_delay, d) = (config.max_batch, config.max_delay(), depth.clone());
        std::thread::Builder::new()
            .name("batcher".into())
            .spawn(move || batch_loop(&jobs, &to_workers, max_batch, max_delay, &d, &metrics))?;
        Ok(Self {
            queue,
            depth,
            max_batch: config.max_batch,
        })
    }

    /// Requests waiting in the queue.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Scores `texts` (already validated), split into jobs of at most `--max-batch`
    /// reviews so that one large request is shared among the workers.
    pub async fn score(
        &self,
        texts: Vec<String>,
        explain: Option<ExplainOptions>,
        metrics: &Metrics,
    ) -> Result<Scored, ApiError> {
        let mut waits = Vec::with_capacity(texts.len().div_ceil(self.max_batch));
        let mut texts = texts.into_iter().peekable();
        while texts.peek().is_some() {
            let chunk: Vec<String> = texts.by_ref().take(self.max_batch).collect();
            let (reply, wait) = oneshot::channel();
            let job = Job {
                texts: chunk,
                explain,
                queued_at: Instant::now(),
                reply,
            };
            self.depth.fetch_add(1, Ordering::Relaxed);
            match self.queue.try_send(job) {
                Ok(()) => waits.push(wait),
                Err(e) => {
                    self.depth.fetch_sub(1, Ordering::Relaxed);
                    return Err(match e {
                        TrySendError::Full(_) => {
                            metrics.queue_full.fetch_add(1, Ordering::Relaxed);
                            ApiError::unavailable(
                                "server busy: the request queue is full (--max-queue); retry shortly",
                            )
                        }
                        TrySendError::Disconnected(_) => {
                            ApiError::unavailable("server is shutting down")
                        }
                    });
                }
            }
        }
        let mut all: Option<Scored> = None;
        for wait in waits {
            let part = wait
                .await
                .map_err(|_| ApiError::internal("an inference worker stopped"))??;
            match &mut all {
                None => all = Some(part),
                Some(all) => {
                    // Parts scored by another model (a reload between them) are reported under
                    // the newest one; each prediction was still made by one whole model.
                    if part.model.served.round >= all.model.served.round {
                        all.model = part.model;
                    }
                    all.predictions.extend(part.predictions);
                }
            }
        }
        all.ok_or_else(|| ApiError::bad_request("no texts to score"))
    }
}

fn batch_loop(
    jobs: &Receiver<Job>,
    to_workers: &SyncSender<Vec<Job>>,
    max_batch: usize,
    max_delay: Duration,
    depth: &AtomicUsize,
    metrics: &Metrics,
) {
    while let Ok(first) = jobs.recv() {
        depth.fetch_sub(1, Ordering::Relaxed);
        let deadline = Instant::now() + max_delay;
        let mut reviews = first.texts.len();
        let mut batch = vec![first];
        while reviews < max_batch {
            let next = match jobs.try_recv() {
                Ok(job) => Some(job),
                Err(_) if max_delay.is_zero() => None,
                Err(_) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        None
                    } else {
                        jobs.recv_timeout(left).ok()
                    }
                }
            };
            let Some(job) = next else { break };
            depth.fetch_sub(1, Ordering::Relaxed);
            reviews += job.texts.len();
            batch.push(job);
            // A job is never split across batches: a batch may end up to one job's size
            // over `max_batch`, which is at most `max_batch - 1` extra reviews.
        }
        metrics.batch_size.observe(reviews as f64);
        if to_workers.send(batch).is_err() {
            break;
        }
    }
}

fn worker(batches: &Mutex<Receiver<Vec<Job>>>, models: &ModelSlot, metrics: &Metrics) {
    let mut featurizer: Option<Featurizer> = None;
    let mut features = Vec::with_capacity(1024);
    loop {
        let batch = {
            let rx = batches.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(b) => b,
                Err(_) => return,
            }
        };
        let started = Instant::now();
        let model = models.current();
        for job in batch {
            metrics
                .queue_seconds
                .observe(started.duration_since(job.queued_at).as_secs_f64());
            let Some(model) = model.clone() else {
                let why = models
                    .last_error()
                    .map_or_else(String::new, |e| format!(": {}", e.message));
                let _ = job.reply.send(Err(ApiError::unavailable(format!(
                    "no model loaded yet{why}"
                ))));
                continue;
            };
            let cfg = model.scorer.config.featurizer;
            let f = match &mut featurizer {
                Some(f) if *f.config() == cfg => f,
                slot => slot.insert(Featurizer::new(cfg)),
            };
            let n = job.texts.len();
            let link = model.scorer.config.link();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                job.texts
                    .iter()
                    .map(|text| {
                        // An explained review is featurised once, by the explanation.
                        let (logits, explanation) = match job.explain {
                            Some(o) => {
                                let (logits, e) = explain(
                                    text,
                                    &model.scorer,
                                    o.top_k,
                                    o.top_classes,
                                    o.highlight,
                                );
                                (logits, Some(e))
                            }
                            None => {
                                f.features_into(text, &mut features);
                                (model.scorer.logits(&features), None)
                            }
                        };
                        Prediction::new(link, logits, explanation)
                    })
                    .collect::<Vec<_>>()
            }));
            let reply = match result {
                Ok(predictions) => {
                    metrics
                        .reviews_scored
                        .fetch_add(n as u64, Ordering::Relaxed);
                    Ok(Scored { model, predictions })
                }
                Err(_) => Err(ApiError::internal(
                    "scoring this request failed unexpectedly (a bug: see the server log)",
                )),
            };
            let _ = job.reply.send(reply);
        }
    }
}
