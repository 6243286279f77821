//! One error type for every route, answered as JSON `{"error": "..."}` (the Open Inference
//! Protocol's error body, used by the JSON API too), and the body extractor that turns every
//! way a client can get a request wrong into a 4xx with such a body.
//!
//! Axum's own `Json` extractor answers rejections in plain text and reads the body without a
//! time limit; [`JsonBody`] replaces it so that (1) a client's mistake is never a 5xx nor a
//! text body, and (2) a slow client times out while its body is read, in the async handler,
//! before anything reaches the inference workers.

use std::sync::Arc;

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use crate::AppState;

/// An error answered to the client with `status` and `{"error": message}`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), error = %self.message, "request failed");
        } else {
            tracing::debug!(status = self.status.as_u16(), error = %self.message, "request refused");
        }
        let mut resp = (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// Fallback for unknown routes: 404 with a JSON body.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!(
        "no route {}: see /openapi.json for the API",
        uri.path()
    ))
}

/// Fallback for a known route with the wrong method: 405 with a JSON body.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// A JSON request body, read whole within `--read-timeout`, at most
/// [`crate::Config::max_body_bytes`] long, checked to be UTF-8 and parsed into `T`.
/// `/api/*` requires `Content-Type: application/json`.
pub struct JsonBody<T>(pub T);

/// The same for the Open Inference Protocol, which also accepts a request without a
/// `Content-Type` (Triton's HTTP client sends none for JSON requests).
pub struct V2JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        read_json(req, state, true).await.map(JsonBody)
    }
}

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for V2JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        read_json(req, state, false).await.map(V2JsonBody)
    }
}

fn check_content_type(headers: &HeaderMap, required: bool) -> Result<(), ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return if required {
            Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "missing Content-Type: send application/json",
            ))
        } else {
            Ok(())
        };
    };
    let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type is {essence:?}, expected application/json"),
        ))
    }
}

/// Reads the whole body (bounded in size and time), then checks and parses it.
pub async fn read_body(req: Request, state: &AppState) -> Result<axum::body::Bytes, ApiError> {
    let limit = state.config.max_body_bytes();
    let timeout = state.config.read_timeout();
    match tokio::time::timeout(timeout, axum::body::to_bytes(req.into_body(), limit)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body was not received within {} ms",
                timeout.as_millis()
            ),
        )),
        Ok(Err(e)) => {
            // `to_bytes` reports an over-long body as a length-limit error in its source chain.
            let mut src: Option<&dyn std::error::Error> = Some(&e);
            while let Some(s) = src {
                if s.to_string().contains("length limit") {
                    return Err(ApiError::too_large(format!(
                        "request body is over the limit of {limit} bytes"
                    )));
                }
                src = s.source();
            }
            Err(ApiError::bad_request(format!(
                "could not read the request body: {e}"
            )))
        }
        Ok(Ok(bytes)) => Ok(bytes),
    }
}

async fn read_json<T: DeserializeOwned>(
    req: Request,
    state: &AppState,
    require_ct: bool,
) -> Result<T, ApiError> {
    check_content_type(req.headers(), require_ct)?;
    let bytes = read_body(req, state).await?;
    parse_json(&bytes)
}

/// Parses a JSON body with precise 400 messages: not UTF-8, not JSON, or the wrong shape.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "request body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        ))
    })?;
    serde_json::from_str::<Object<T>>(text)
        .map(|o| o.0)
        .map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => {
                    ApiError::bad_request(format!("request does not match the schema: {e}"))
                }
                _ => ApiError::bad_request(format!("request body is not valid JSON: {e}")),
            }
        })
}

/// For `#[serde(default, deserialize_with = "error::not_null")]` on an optional field: the
/// field may be left out, but an explicit `null` is refused like any other wrong type (the
/// OpenAPI document declares these fields non-nullable, and a client that sends
/// `{"text": "…", "texts": null}` has made a mistake worth naming).
pub fn not_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// `T` read from a JSON object only. A derived `Deserialize` also takes a struct from an
/// array of its field values in order (`["a review"]` as `{"text": "a review"}`, and with
/// defaulted fields even a shorter array), which the OpenAPI document does not allow; every
/// request body and every object inside one is read through this instead.
pub struct Object<T>(pub T);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
            .map(Object)
    }
}

/// For `#[serde(deserialize_with = "error::objects")]` on a list of structs: each a JSON
/// object (see [`Object`]).
pub fn objects<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    Ok(<Vec<Object<T>> as serde::Deserialize>::deserialize(d)?
        .into_iter()
        .map(|o| o.0)
        .collect())
}

/// [`not_null`] and [`objects`] together, for an optional list of structs.
pub fn not_null_objects<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    objects(d).map(Some)
}
