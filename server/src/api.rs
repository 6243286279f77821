//! The JSON API (`/api/*`) and the OpenAPI document. Handlers are small functions over the
//! shared state: check the request, hand the texts to the batcher, shape the answer.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use fedimdb::featurize::{self, NGram};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::batcher::ExplainOptions;
use crate::error::{ApiError, JsonBody};
use crate::explain::{Span, Word};
use crate::state::{ReloadError, Sample};

/// Most n-grams a client may ask for per direction (per class).
pub const MAX_TOP_K: usize = 50;
/// N-grams listed per direction (per class) unless the request says otherwise.
pub const DEFAULT_TOP_K: usize = 5;
/// Classes explained in `top_classes` unless the request says otherwise (two-class models:
/// always both).
pub const DEFAULT_TOP_CLASSES: usize = 3;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    #[serde(default, deserialize_with = "crate::error::not_null")]
    pub text: Option<String>,
    #[serde(default, deserialize_with = "crate::error::not_null")]
    pub texts: Option<Vec<String>>,
    #[serde(default, deserialize_with = "crate::error::not_null")]
    pub top_k: Option<usize>,
    /// How many of the most probable classes `top_classes` explains (default 3; at most the
    /// model's classes are listed).
    #[serde(default, deserialize_with = "crate::error::not_null")]
    pub top_classes: Option<usize>,
    #[serde(default)]
    pub highlight: bool,
}

/// One text's prediction. Two-class models answer every field they always did (`label`
/// `positive`/`negative`, `probability` of class 1, `logit`, `top_positive`,
/// `top_negative`) and the fields every model has: `class`, `class_label`,
/// `probabilities`, `top_classes`.
#[derive(Debug, Serialize)]
pub struct PredictionOut {
    /// Two classes: `positive` (class 1) or `negative` (class 0), as always, whatever the
    /// data; K classes: the predicted class's name.
    pub label: String,
    /// The predicted class's index.
    pub class: usize,
    /// The predicted class's name from the model card (IMDB sentiment: `pos`, `neg`).
    pub class_label: String,
    /// Two classes: the probability of class 1 (positive), as always; K classes: the
    /// predicted class's probability.
    pub probability: f32,
    /// Two classes only: the model's one logit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logit: Option<f32>,
    /// Every class's probability, in class order (they sum to one).
    pub probabilities: Vec<ClassProbability>,
    /// Two classes only: the n-grams that pushed toward class 1 (weights > 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_positive: Option<Vec<Word>>,
    /// Two classes only: the n-grams that pushed toward class 0 (weights < 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_negative: Option<Vec<Word>>,
    /// The most probable classes (most probable first), each with the n-grams that pushed
    /// toward it (weights > 0); empty when nothing is explained (`top_k` 0, no highlight).
    pub top_classes: Vec<TopClass>,
    /// Per-token weights toward class 1 (two classes) or the predicted class (K classes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub highlight: Option<Vec<Span>>,
}

/// A class's name and probability.
#[derive(Debug, Clone, Serialize)]
pub struct ClassProbability {
    pub label: String,
    pub probability: f32,
}

/// One of the most probable classes and the n-grams that pushed toward it.
#[derive(Debug, Clone, Serialize)]
pub struct TopClass {
    pub class: usize,
    pub label: String,
    pub probability: f32,
    pub words: Vec<Word>,
}

#[derive(Debug, Serialize)]
pub struct PredictResponse {
    pub model_version: String,
    pub model_sha256: String,
    pub predictions: Vec<PredictionOut>,
}

/// The label of a two-class model's probability of class 1: positive from 0.5 up.
pub fn label(probability: f32) -> &'static str {
    binary_label(probability >= 0.5)
}

/// The `label` of a two-class model's prediction: `positive` for class 1, else `negative`.
pub fn binary_label(positive: bool) -> &'static str {
    if positive { "positive" } else { "negative" }
}

/// The answer for one scored text, by `model`.
pub fn prediction_out(
    model: &crate::state::LoadedModel,
    p: crate::batcher::Prediction,
) -> PredictionOut {
    let name = |k: usize| model.labels[k].clone();
    let binary = model.is_binary();
    let (classes, highlight) = match p.explanation {
        Some(e) => (e.classes, e.highlight),
        None => (Vec::new(), None),
    };
    let words_of = |k: usize| -> Vec<Word> {
        classes
            .iter()
            .find(|c| c.class == k)
            .map(|c| c.words.clone())
            .unwrap_or_default()
    };
    let (top_positive, top_negative) = if binary {
        let negative = words_of(0)
            .into_iter()
            .map(|w| Word {
                weight: -w.weight,
                ..w
            })
            .collect();
        (Some(words_of(1)), Some(negative))
    } else {
        (None, None)
    };
    let top_classes = classes
        .iter()
        .map(|c| TopClass {
            class: c.class,
            label: name(c.class),
            probability: p.probabilities[c.class],
            words: c.words.clone(),
        })
        .collect();
    PredictionOut {
        label: model.api_label(p.class),
        class: p.class,
        class_label: name(p.class),
        probability: if binary {
            p.probabilities[1]
        } else {
            p.probabilities[p.class]
        },
        logit: binary.then(|| p.logits[0]),
        probabilities: p
            .probabilities
            .iter()
            .enumerate()
            .map(|(k, &probability)| ClassProbability {
                label: name(k),
                probability,
            })
            .collect(),
        top_positive,
        top_negative,
        top_classes,
        highlight,
    }
}

/// Checks a request's texts against the limits; the messages name the text and the flag.
pub fn check_texts(state: &AppState, texts: &[String]) -> Result<(), ApiError> {
    let c = &state.config;
    if texts.is_empty() {
        return Err(ApiError::bad_request("no texts to score"));
    }
    if texts.len() > c.max_texts {
        return Err(ApiError::too_large(format!(
            "{} texts in one request, over the limit of {} (--max-texts)",
            texts.len(),
            c.max_texts
        )));
    }
    for (i, t) in texts.iter().enumerate() {
        if t.len() > c.max_text_bytes {
            return Err(ApiError::too_large(format!(
                "text {i} is {} bytes, over the limit of {} bytes (--max-text-bytes)",
                t.len(),
                c.max_text_bytes
            )));
        }
        if t.trim().is_empty() {
            return Err(ApiError::bad_request(format!("text {i} is empty")));
        }
    }
    Ok(())
}

/// `POST /api/predict`: `{"text": ...}` or `{"texts": [...]}` → per text, the label, every
/// class's probability and the n-grams that pushed toward the most probable classes.
pub async fn predict(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<PredictRequest>,
) -> Result<Json<PredictResponse>, ApiError> {
    let texts = match (req.text, req.texts) {
        (Some(t), None) => vec![t],
        (None, Some(ts)) => ts,
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "send either \"text\" or \"texts\", not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "missing \"text\" (one review) or \"texts\" (a list)",
            ));
        }
    };
    check_texts(&state, &texts)?;
    let top_k = req.top_k.unwrap_or(DEFAULT_TOP_K);
    if top_k > MAX_TOP_K {
        return Err(ApiError::bad_request(format!(
            "top_k is {top_k}, at most {MAX_TOP_K}"
        )));
    }
    let top_classes = req.top_classes.unwrap_or(DEFAULT_TOP_CLASSES);
    if top_classes > fedimdb::labels::MAX_CLASSES {
        return Err(ApiError::bad_request(format!(
            "top_classes is {top_classes}, at most {}",
            fedimdb::labels::MAX_CLASSES
        )));
    }
    let explain = (top_k > 0 || req.highlight).then_some(ExplainOptions {
        top_k,
        top_classes,
        highlight: req.highlight,
    });
    let scored = state.batcher.score(texts, explain, &state.metrics).await?;
    let predictions = scored
        .predictions
        .into_iter()
        .map(|p| prediction_out(&scored.model, p))
        .collect();
    Ok(Json(PredictResponse {
        model_version: scored.model.served.version.clone(),
        model_sha256: scored.model.served.sha256.clone(),
        predictions,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessRequest {
    pub text: String,
}

#[derive(Debug, Serialize)]
pub struct PreprocessResponse {
    pub normalized: String,
    pub tokens: Vec<String>,
    pub ngrams: Vec<NGram>,
    /// Distinct buckets: the review's feature count.
    pub distinct_buckets: usize,
    pub hash_bits: u32,
    pub max_ngram: u32,
}

/// `POST /api/preprocess`: the preprocessing stage on its own, with the served model's
/// featurizer settings.
pub async fn preprocess_handler(
    state: Arc<AppState>,
    text: String,
) -> Result<Json<PreprocessResponse>, ApiError> {
    check_texts(&state, std::slice::from_ref(&text))?;
    let model = state.models.current().ok_or_else(|| not_ready(&state))?;
    let cfg = model.scorer.config.featurizer;
    let out = tokio::task::spawn_blocking(move || {
        let p = featurize::preprocess(&text, &cfg);
        let mut buckets: Vec<u32> = p.ngrams.iter().map(|g| g.bucket).collect();
        buckets.sort_unstable();
        buckets.dedup();
        PreprocessResponse {
            normalized: p.normalized,
            tokens: p.tokens,
            ngrams: p.ngrams,
            distinct_buckets: buckets.len(),
            hash_bits: cfg.hash_bits,
            max_ngram: cfg.max_ngram,
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("preprocessing failed: {e}")))?;
    Ok(Json(out))
}

pub async fn preprocess(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<PreprocessRequest>,
) -> Result<Json<PreprocessResponse>, ApiError> {
    preprocess_handler(state, req.text).await
}

/// 503 naming why no model serves.
pub fn not_ready(state: &AppState) -> ApiError {
    let why = state
        .models
        .last_error()
        .map_or_else(String::new, |e| format!(": {}", e.message));
    ApiError::unavailable(format!("no model loaded yet{why}"))
}

#[derive(Debug, Serialize)]
pub struct ModelInfo {
    pub name: &'static str,
    #[serde(flatten)]
    pub served: crate::state::Served,
    /// What the model predicts (`IMDB sentiment`, `IMDB rating`, a data source's name).
    pub task: String,
    /// The class names in class order.
    pub labels: Vec<String>,
    /// Number of classes.
    pub classes: usize,
    /// K classes: how the logits become probabilities (`softmax`, `one-vs-rest`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multiclass: Option<fedimdb::model::Multiclass>,
    pub train_samples: u64,
    pub hash_bits: u32,
    pub max_ngram: u32,
    pub workers: Option<usize>,
    pub partition: Option<String>,
    pub alpha: Option<f64>,
    pub history: Vec<fedimdb::checkpoint::RoundPoint>,
    pub metrics: std::collections::BTreeMap<String, f64>,
    pub last_reload_error: Option<ReloadError>,
}

/// The name the model is served under (Open Inference Protocol).
pub const MODEL_NAME: &str = "fedimdb";

/// `GET /api/model`: the served model's card, and the last failed reload if any.
pub async fn model(State(state): State<Arc<AppState>>) -> Result<Json<ModelInfo>, ApiError> {
    let m = state.models.current().ok_or_else(|| not_ready(&state))?;
    let card = m.card.clone().unwrap_or_default();
    Ok(Json(ModelInfo {
        name: MODEL_NAME,
        served: m.served.clone(),
        task: m.task.clone(),
        labels: m.labels.clone(),
        classes: m.scorer.classes(),
        multiclass: m.scorer.config.multiclass,
        train_samples: if card.train_samples > 0 {
            card.train_samples
        } else {
            m.samples
        },
        hash_bits: m.scorer.config.featurizer.hash_bits,
        max_ngram: m.scorer.config.featurizer.max_ngram,
        workers: m.card.as_ref().map(|c| c.workers),
        partition: m.card.as_ref().map(|c| c.partition.to_string()),
        alpha: card.alpha,
        history: card.history,
        metrics: card.metrics,
        last_reload_error: state.models.last_error(),
    }))
}

/// `GET /api/sample`: a random review of the test set.
pub async fn sample(State(state): State<Arc<AppState>>) -> Result<Json<Sample>, ApiError> {
    let samples = state.samples().await?;
    let i = rand::rng().random_range(0..samples.len());
    Ok(Json(samples[i].sample(state.models.current().as_deref())))
}

/// `GET /openapi.json`: the hand-written OpenAPI 3 document (tests check it lists exactly
/// the routes the router serves).
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../static/openapi.json"),
    )
        .into_response()
}
