//! Shared state: the served model, how it is (re)loaded, and everything handlers share.
//!
//! The model lives in an `RwLock<Option<Arc<LoadedModel>>>`. A batch clones the `Arc` once
//! (a read lock held for a pointer copy) and scores all its reviews with that model, so a
//! reload never changes the model under a batch, and an old model is freed when its last
//! batch finishes. A reload builds the new model completely before taking the write lock for
//! a pointer swap: no request waits for a load, and none fails because of one.
//!
//! Root mode watches `ROOT/model/latest.json` (the aggregator writes it *after*
//! `latest.safetensors`) by polling its bytes (`--model FILE` mode: the file's size and
//! mtime); when they change, the card is read and the model loaded through
//! `fedimdb::verify::load_verified`, which checks its SHA-256 against the card's before
//! parsing it. A model that fails to load leaves the old one serving; the
//! error is logged, counted and shown in `/api/model` and `/v2/health/ready` until a later
//! model loads. The same fingerprint is not retried, so a broken file costs one load.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use fedimdb::checkpoint::{Checkpoint, Kind, ModelCard};
use fedimdb::layout::Layout;
use fedimdb::model::Scorer;
use fedimdb::verify::{load_verified, publication_of};
use serde::Serialize;

use crate::Config;
use crate::batcher::Batcher;
use crate::metrics::Metrics;

/// Where models come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A volume root: serve `model/latest.safetensors`, follow `model/latest.json`.
    Root(PathBuf),
    /// One model file (reloaded when the file changes).
    File(PathBuf),
}

/// A model ready to score, with what the API reports about it.
#[derive(Debug)]
pub struct LoadedModel {
    pub scorer: Scorer,
    pub samples: u64,
    pub card: Option<ModelCard>,
    pub served: Served,
    /// The class names in class order, one per class ([`label_names`]).
    pub labels: Vec<String>,
    /// What the model predicts, in words for people ([`task_name`]).
    pub task: String,
}

impl LoadedModel {
    /// Whether the model has two classes (one logit): the form every client of the server
    /// knew before K classes, whose answers keep all their fields.
    pub fn is_binary(&self) -> bool {
        self.scorer.config.rows() == 1
    }

    /// The `label` field of the JSON API for class `class`: `positive` or `negative` for a
    /// two-class model (as the server always answered, whatever the data), the class's name
    /// for more.
    pub fn api_label(&self, class: usize) -> String {
        if self.is_binary() {
            crate::api::binary_label(class == 1).to_owned()
        } else {
            self.labels[class].clone()
        }
    }
}

/// The class names of a model with `classes` classes and card `card`: the card's labels
/// when there is one per class; else IMDB's `neg`, `pos` for two classes (cards from before
/// K classes) and the class indices for more.
pub fn label_names(card: Option<&ModelCard>, classes: usize) -> Vec<String> {
    let named = card.map(ModelCard::label_names).unwrap_or_default();
    if named.len() == classes {
        return named;
    }
    if let Some(card) = card.filter(|c| !c.labels.is_empty()) {
        tracing::warn!(
            labels = ?card.labels,
            classes,
            "the model card's labels do not match the model's classes; naming classes by index"
        );
    }
    if classes == 2 && card.is_none_or(|c| c.labels.is_empty()) {
        return fedimdb::labels::SENTIMENT.map(str::to_owned).to_vec();
    }
    (0..classes).map(|k| k.to_string()).collect()
}

/// What a model with `classes` classes and card `card` predicts: the card's task; else IMDB
/// sentiment for two classes (cards from before K classes) and `text classification` for
/// more.
pub fn task_name(card: Option<&ModelCard>, classes: usize) -> String {
    match card.and_then(|c| c.task.clone()) {
        Some(t) if !t.trim().is_empty() => t,
        _ if classes == 2 => fedimdb::labels::Task::Sentiment.title().to_owned(),
        _ => "text classification".to_owned(),
    }
}

/// Which model file is served, and since when: what `GET /api/model` reports first, and
/// what the logs and metrics name a model by.
#[derive(Debug, Clone, Serialize)]
pub struct Served {
    /// The Open Inference Protocol `model_version`: the training round, as text.
    pub version: String,
    pub round: u32,
    pub sha256: String,
    pub path: String,
    /// When the aggregator published it (root mode).
    pub trained_at: Option<String>,
    /// When this server loaded it.
    pub loaded_at: String,
}

/// A failed attempt to load a new model.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadError {
    pub at: String,
    pub message: String,
}

/// Size and modification time of a file, or `None` when it is absent.
type FileStamp = Option<(u64, SystemTime)>;

/// What the watcher compares to notice a new model.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    card: Option<Vec<u8>>,
    model: FileStamp,
}

/// The served model and the history of loading it.
#[derive(Debug)]
pub struct ModelSlot {
    pub source: ModelSource,
    current: RwLock<Option<Arc<LoadedModel>>>,
    last_error: Mutex<Option<ReloadError>>,
    seen: Mutex<Option<Fingerprint>>,
}

impl ModelSlot {
    pub fn new(source: ModelSource) -> Self {
        Self {
            source,
            current: RwLock::new(None),
            last_error: Mutex::new(None),
            seen: Mutex::new(None),
        }
    }

    /// The model serving now, if one has loaded.
    pub fn current(&self) -> Option<Arc<LoadedModel>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The error of the last failed load since the last successful one.
    pub fn last_error(&self) -> Option<ReloadError> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn model_path(&self) -> PathBuf {
        match &self.source {
            ModelSource::Root(root) => Layout::new(root.clone()).latest_model(),
            ModelSource::File(f) => f.clone(),
        }
    }

    fn fingerprint(&self) -> Fingerprint {
        let stamp = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
        };
        match &self.source {
            // The card alone: the aggregator writes it after the model, so a new card means
            // its model is complete; a model file whose card has not followed yet is not
            // looked at (it would fail the sha256 check for a moment).
            ModelSource::Root(root) => Fingerprint {
                card: std::fs::read(Layout::new(root.clone()).latest_card()).ok(),
                model: None,
            },
            ModelSource::File(f) => Fingerprint {
                card: None,
                model: stamp(f),
            },
        }
    }

    /// Loads the model if the files changed since the last attempt. Blocking (file I/O and
    /// a ~50 MB parse); returns whether a new model now serves.
    pub fn poll(&self, metrics: &Metrics) -> bool {
        let fp = self.fingerprint();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.as_ref() == Some(&fp) {
                return false;
            }
            *seen = Some(fp.clone());
        }
        if matches!(self.source, ModelSource::Root(_)) && fp.card.is_none() {
            let msg = format!(
                "no model published yet: waiting for {}",
                self.model_path().with_extension("json").display()
            );
            if self.current().is_none() {
                tracing::info!("{msg}");
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(ReloadError {
                    at: fedimdb::report::utc_now(),
                    message: msg,
                });
            }
            return false;
        }
        match self.load(fp.card.as_deref()) {
            Ok(model) => {
                let model = Arc::new(model);
                let old = self
                    .current
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .replace(model.clone());
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                metrics
                    .reloads_ok
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match old {
                    Some(old) if old.served.sha256 == model.served.sha256 => {}
                    Some(old) => {
                        tracing::info!(from = %old.served.version, to = %model.served.version, sha256 = %model.served.sha256, "switched to a new model")
                    }
                    None => {
                        tracing::info!(version = %model.served.version, sha256 = %model.served.sha256, path = %model.served.path, "serving model")
                    }
                }
                true
            }
            Err(e) => {
                let message = format!("{e:#}");
                metrics
                    .reloads_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match self.current() {
                    Some(m) => {
                        tracing::error!(error = %message, still_serving = %m.served.version, "new model did not load; keeping the old one")
                    }
                    None => tracing::error!(error = %message, "model did not load; not ready"),
                }
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(ReloadError {
                    at: fedimdb::report::utc_now(),
                    message,
                });
                false
            }
        }
    }

    fn load(&self, card_bytes: Option<&[u8]>) -> Result<LoadedModel> {
        let path = self.model_path();
        let (ck, card) = match &self.source {
            ModelSource::Root(root) => {
                let card_path = Layout::new(root.clone()).latest_card();
                let bytes =
                    card_bytes.with_context(|| format!("cannot read {}", card_path.display()))?;
                let card: ModelCard = serde_json::from_slice(bytes).with_context(|| {
                    format!("{} is not a valid model card", card_path.display())
                })?;
                // Checked against the card by the library's one check (the sha256 of the
                // bytes read, before they are parsed); a refused model is retried when the
                // card changes.
                let published = publication_of(&card, &card_path)?;
                let ck = load_verified(&path, Kind::Model, &published.sha256, &card_path)?;
                (ck, Some(card))
            }
            ModelSource::File(_) => (Checkpoint::load_kind(&path, Kind::Model)?, None),
        };
        let scorer = ck.scorer()?;
        let header = ck.header;
        let card_or_header = card.clone().or(header.card);
        let classes = scorer.classes();
        Ok(LoadedModel {
            labels: label_names(card_or_header.as_ref(), classes),
            task: task_name(card_or_header.as_ref(), classes),
            scorer,
            samples: header.samples,
            card: card_or_header,
            served: Served {
                version: header.round.to_string(),
                round: header.round,
                sha256: ck.sha256,
                path: path.display().to_string(),
                trained_at: card.and_then(|c| c.published).map(|p| p.trained_at),
                loaded_at: fedimdb::report::utc_now(),
            },
        })
    }
}

/// One review of the test set, for the page's "sample review" button.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub id: String,
    /// IMDB: the star rating; 0 for other data.
    pub rating: u8,
    /// As `/api/predict` labels: `positive` or `negative` for a two-class model, the class's
    /// name for more.
    pub label: String,
    /// The class index.
    pub class: usize,
    /// The class's name from the model card.
    pub class_label: String,
    pub text: String,
}

/// A test-set review as read, labelled when it is served (with the labels of the model
/// serving then).
#[derive(Debug, Clone)]
pub struct TestReview {
    pub id: String,
    pub rating: u8,
    pub class: u8,
    pub text: String,
}

impl TestReview {
    /// The review as `/api/sample` shows it, its class named by `model` (IMDB's names when
    /// no model serves).
    pub fn sample(&self, model: Option<&LoadedModel>) -> Sample {
        let class = self.class as usize;
        let (label, class_label) = match model {
            Some(m) if class < m.labels.len() => (m.api_label(class), m.labels[class].clone()),
            Some(m) if !m.is_binary() => (class.to_string(), class.to_string()),
            _ => (
                crate::api::binary_label(class == 1).to_owned(),
                fedimdb::labels::SENTIMENT
                    .get(class)
                    .map_or_else(|| class.to_string(), |s| (*s).to_owned()),
            ),
        };
        Sample {
            id: self.id.clone(),
            rating: self.rating,
            label,
            class,
            class_label,
            text: self.text.clone(),
        }
    }
}

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub config: Config,
    pub models: Arc<ModelSlot>,
    pub batcher: Batcher,
    pub metrics: Arc<Metrics>,
    samples: tokio::sync::OnceCell<Arc<Vec<TestReview>>>,
}

impl AppState {
    /// Checks the flags, loads the first model and starts the batcher and workers.
    ///
    /// `--model FILE` must load now (nothing else could make the server useful). In root
    /// mode the server also starts while no model is published yet, or while the published
    /// one is broken, and becomes ready when a good one appears: on Kubernetes it can start
    /// beside the training jobs.
    pub async fn new(config: Config) -> Result<Arc<Self>> {
        config.validate()?;
        let metrics = Arc::new(Metrics::default());
        let models = Arc::new(ModelSlot::new(config.source()));
        {
            let (models, metrics) = (models.clone(), metrics.clone());
            tokio::task::spawn_blocking(move || models.poll(&metrics)).await?;
        }
        if let ModelSource::File(f) = &models.source
            && models.current().is_none()
        {
            let e = models
                .last_error()
                .map_or_else(|| "unknown error".to_owned(), |e| e.message);
            anyhow::bail!("cannot serve --model {}: {e}", f.display());
        }
        let batcher = Batcher::start(&config, models.clone(), metrics.clone())?;
        Ok(Arc::new(Self {
            config,
            models,
            batcher,
            metrics,
            samples: tokio::sync::OnceCell::new(),
        }))
    }

    /// The test-set reviews, read on first use (a 25,000-review Parquet file takes a moment
    /// and ~35 MB, which a server that never shows samples should not pay).
    pub async fn samples(&self) -> Result<Arc<Vec<TestReview>>, crate::error::ApiError> {
        let Some(path) = self.config.test_set() else {
            return Err(crate::error::ApiError::not_found(
                "no test set: the server was started with --model and no --test-set",
            ));
        };
        self.samples
            .get_or_try_init(|| async move {
                let p = path.clone();
                let reviews =
                    tokio::task::spawn_blocking(move || fedimdb::dataset::load_reviews(&p, None))
                        .await
                        .map_err(|e| {
                            crate::error::ApiError::internal(format!(
                                "reading the test set failed: {e}"
                            ))
                        })?
                        .map_err(|e| {
                            crate::error::ApiError::not_found(format!(
                                "no test set to sample from: {e:#}"
                            ))
                        })?;
                let samples = reviews
                    .into_iter()
                    .map(|r| TestReview {
                        class: r.label,
                        id: r.id,
                        rating: r.rating,
                        text: r.text,
                    })
                    .collect::<Vec<_>>();
                if samples.is_empty() {
                    return Err(crate::error::ApiError::not_found(format!(
                        "the test set {} holds no reviews",
                        path.display()
                    )));
                }
                Ok(Arc::new(samples))
            })
            .await
            .cloned()
    }
}

/// Polls for new models every `--poll-ms` in a blocking task, for as long as the state lives.
pub fn spawn_watcher(state: Arc<AppState>) {
    let models = state.models.clone();
    let metrics = state.metrics.clone();
    let every = state.config.poll_interval().max(Duration::from_millis(10));
    let weak = Arc::downgrade(&state);
    drop(state);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if weak.strong_count() == 0 {
                break;
            }
            let (m, x) = (models.clone(), metrics.clone());
            let _ = tokio::task::spawn_blocking(move || m.poll(&x)).await;
        }
    });
}
