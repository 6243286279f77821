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

/// Most n-grams a client may ask for per direction.
pub const MAX_TOP_K: usize = 50;
/// N-grams listed per direction unless the request says otherwise.
pub const DEFAULT_TOP_K: usize = 5;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    #[serde(default, deserialize_with = "crate::error::not_null")]
    pub text: Option<String>,
    #[serde(default, deserialize_with = "crate::error::not_null")]
    pub texts: Option<Vec<String>>,
    #[serde(default, deserialize_with = "crate::error::not_null")]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub highlight: bool,
}

#[derive(Debug, Serialize)]
pub struct PredictionOut {
    pub label: &'static str,
    pub probability: f32,
    pub logit: f32,
    pub top_positive: Vec<Word>,
    pub top_negative: Vec<Word>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub highlight: Option<Vec<Span>>,
}

#[derive(Debug, Serialize)]
pub struct PredictResponse {
    pub model_version: String,
    pub model_sha256: String,
    pub predictions: Vec<PredictionOut>,
}

/// The label of a probability: positive from 0.5 up.
pub fn label(probability: f32) -> &'static str {
    if probability >= 0.5 {
        "positive"
    } else {
        "negative"
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

/// `POST /api/predict`: `{"text": ...}` or `{"texts": [...]}` → label, probability and the
/// n-grams that pushed each way, per text.
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
    let explain = (top_k > 0 || req.highlight).then_some(ExplainOptions {
        top_k,
        highlight: req.highlight,
    });
    let scored = state.batcher.score(texts, explain, &state.metrics).await?;
    let predictions = scored
        .predictions
        .into_iter()
        .map(|p| {
            let e = p
                .explanation
                .unwrap_or_else(|| crate::explain::Explanation {
                    top_positive: vec![],
                    top_negative: vec![],
                    highlight: None,
                });
            PredictionOut {
                label: label(p.probability),
                probability: p.probability,
                logit: p.logit,
                top_positive: e.top_positive,
                top_negative: e.top_negative,
                highlight: e.highlight,
            }
        })
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
    Ok(Json(samples[i].clone()))
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
