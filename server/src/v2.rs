//! The Open Inference Protocol (KServe v2) over REST: health, metadata and inference, so
//! KServe tooling and Triton's HTTP client can call the model unchanged.
//!
//! One model, `fedimdb`, version = the training round of the served model. It takes one
//! input, `text`: a BYTES tensor of reviews, shape `[N]` or `[N, 1]`, and has these outputs:
//!
//! - `probabilities`: FP32 `[N, K]`, every class's probability in class order (rows sum to
//!   one), for every model; the class names are in the model metadata
//!   (`parameters.labels`, and the output's `parameters.labels`).
//! - `probability`: FP32, the input's shape, the probability of class 1 (positive), for
//!   two-class models only: what this output always was.
//!
//! A request that names no outputs gets the model's default: `probability` alone for a
//! two-class model (so a client of the binary server gets the very same answer, binary data
//! included), `probabilities` for a K-class model. Ask for `probabilities` by name to get
//! `[N, 2]` from a two-class model. Errors are `{"error": "..."}` with a 4xx status for the
//! client's mistakes.
//!
//! The binary tensor extension (what Triton's HTTP client sends by default) is supported:
//! a request whose `Inference-Header-Content-Length` header is N carries N bytes of JSON,
//! then the raw data of every input whose `parameters.binary_data_size` is set (BYTES
//! elements as a 4-byte little-endian length and the bytes). Outputs come back raw too when
//! asked (`binary_data_output` on the request, or `binary_data` on the output): JSON first,
//! its length in the response's `Inference-Header-Content-Length`, then the little-endian f32s
//! of each binary output in the order of `outputs`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::api::{MODEL_NAME, check_texts, not_ready};
use crate::error::{ApiError, V2JsonBody, parse_json, read_body};

pub const INPUT_NAME: &str = "text";
/// Two-class models: the probability of class 1, shaped like the input.
pub const OUTPUT_NAME: &str = "probability";
/// Every model: `[N, K]` class probabilities.
pub const PROBABILITIES_NAME: &str = "probabilities";
/// Every output name a request may ask for.
pub const OUTPUT_NAMES: [&str; 2] = [OUTPUT_NAME, PROBABILITIES_NAME];

/// `GET /v2/health/live`: the process answers.
pub async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

fn readiness(state: &AppState) -> (bool, Value) {
    let m = state.models.current();
    let body = json!({
        "ready": m.is_some(),
        "model_version": m.as_ref().map(|m| m.served.version.clone()),
        "model_sha256": m.as_ref().map(|m| m.served.sha256.clone()),
        "last_reload_error": state.models.last_error(),
    });
    (m.is_some(), body)
}

/// `GET /v2/health/ready`: 200 while a model serves (also while a newer one failed to load:
/// the old one still answers, and the body's `last_reload_error` says what failed); 503
/// before any model has loaded.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let (ok, body) = readiness(&state);
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

/// `GET /v2`: server metadata.
pub async fn server_metadata() -> Json<Value> {
    Json(
        json!({ "name": "fedimdb-server", "version": env!("CARGO_PKG_VERSION"), "extensions": [] }),
    )
}

/// The optional body of `POST /v2/repository/index`.
#[derive(Debug, Default, Deserialize)]
pub struct IndexRequest {
    /// Only the models that are ready.
    #[serde(default)]
    ready: bool,
}

/// `POST /v2/repository/index` (the index call of the model-repository extension, which
/// Triton's client makes in `get_model_repository_index()`): the one model, with its
/// version and state, `READY` or `UNAVAILABLE` with the reason. The body is optional
/// (Triton's client sends none); with `{"ready": true}` an unavailable model is left out.
/// Loading and unloading are not offered: the aggregator publishes, the server follows.
pub async fn repository_index(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Json<Value>, ApiError> {
    let body = read_body(req, &state).await?;
    let ask: IndexRequest = if body.trim_ascii().is_empty() {
        IndexRequest::default()
    } else {
        parse_json(&body)?
    };
    let entry = match state.models.current() {
        Some(m) => {
            json!({ "name": MODEL_NAME, "version": m.served.version, "state": "READY", "reason": "" })
        }
        None => {
            json!({ "name": MODEL_NAME, "state": "UNAVAILABLE", "reason": not_ready(&state).message })
        }
    };
    let listed = !ask.ready || entry["state"] == "READY";
    Ok(Json(Value::Array(
        listed.then_some(entry).into_iter().collect(),
    )))
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if name == MODEL_NAME {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "unknown model {name:?}: this server serves {MODEL_NAME:?}"
        )))
    }
}

/// The served model if `version` (when given) is its version.
fn check_version(
    state: &AppState,
    version: Option<&str>,
) -> Result<Arc<crate::state::LoadedModel>, ApiError> {
    let m = state.models.current().ok_or_else(|| not_ready(state))?;
    match version {
        Some(v) if v != m.served.version => Err(ApiError::not_found(format!(
            "model {MODEL_NAME:?} has no version {v:?}: version {:?} is served",
            m.served.version
        ))),
        _ => Ok(m),
    }
}

/// The model a route names: `/v2/models/{name}[/versions/{version}]/…`. Each model route
/// exists in both forms, served by one handler.
#[derive(Debug, Deserialize)]
pub struct ModelPath {
    name: String,
    version: Option<String>,
}

/// The prefixes of the model routes (the router adds `/ready` and `/infer`).
pub const MODEL_ROUTES: [&str; 2] = ["/v2/models/{name}", "/v2/models/{name}/versions/{version}"];

/// `GET /v2/models/{name}[/versions/{version}]`: model metadata.
pub async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(p): Path<ModelPath>,
) -> Result<Json<Value>, ApiError> {
    check_name(&p.name)?;
    let m = check_version(&state, p.version.as_deref())?;
    let k = m.scorer.classes();
    let probabilities = json!({
        "name": PROBABILITIES_NAME, "datatype": "FP32", "shape": [-1, k],
        "parameters": { "labels": m.labels },
    });
    let outputs = if m.is_binary() {
        json!([{ "name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1] }, probabilities])
    } else {
        json!([probabilities])
    };
    Ok(Json(json!({
        "name": MODEL_NAME,
        "versions": [m.served.version],
        "platform": "fedimdb_nblr",
        "inputs": [{ "name": INPUT_NAME, "datatype": "BYTES", "shape": [-1] }],
        "outputs": outputs,
        "parameters": { "task": m.task, "labels": m.labels, "classes": k },
    })))
}

/// The outputs a request gets from `model`: those it names (each checked to be one the
/// model has), else the model's default (two classes: `probability`; K: `probabilities`),
/// each with whether it comes back binary.
fn outputs_for(
    model: &crate::state::LoadedModel,
    named: &[(String, bool)],
    binary_output: bool,
) -> Result<Vec<(&'static str, bool)>, ApiError> {
    if named.is_empty() {
        let default = if model.is_binary() {
            OUTPUT_NAME
        } else {
            PROBABILITIES_NAME
        };
        return Ok(vec![(default, binary_output)]);
    }
    named
        .iter()
        .map(|(name, binary)| match name.as_str() {
            OUTPUT_NAME if model.is_binary() => Ok((OUTPUT_NAME, *binary)),
            OUTPUT_NAME => Err(ApiError::bad_request(format!(
                "output {OUTPUT_NAME:?} is the probability of class 1 of a two-class model; this model has {} classes: ask for {PROBABILITIES_NAME:?} ([N, {}])",
                model.scorer.classes(),
                model.scorer.classes()
            ))),
            _ => Ok((PROBABILITIES_NAME, *binary)),
        })
        .collect()
}

/// `GET /v2/models/{name}[/versions/{version}]/ready`.
pub async fn model_ready(
    State(state): State<Arc<AppState>>,
    Path(p): Path<ModelPath>,
) -> Result<Response, ApiError> {
    check_name(&p.name)?;
    let (ok, _) = readiness(&state);
    // Before the first model loads no version exists, and the answer is still a readiness
    // body (503, ready false), as for the unversioned route, not a 503 error body.
    if let (true, Some(v)) = (ok, p.version.as_deref()) {
        check_version(&state, Some(v))?;
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, Json(json!({ "name": MODEL_NAME, "ready": ok }))).into_response())
}

#[derive(Debug, Deserialize)]
pub struct InferRequest {
    #[serde(default, deserialize_with = "crate::error::not_null")]
    pub id: Option<String>,
    #[serde(default, deserialize_with = "crate::error::not_null")]
    pub parameters: Option<serde_json::Map<String, Value>>,
    #[serde(deserialize_with = "crate::error::objects")]
    pub inputs: Vec<InferInput>,
    #[serde(default, deserialize_with = "crate::error::not_null_objects")]
    pub outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
pub struct InferInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default, deserialize_with = "crate::error::not_null")]
    pub parameters: Option<serde_json::Map<String, Value>>,
    /// Absent when the data travels in binary after the JSON.
    #[serde(default)]
    pub data: Value,
}

#[derive(Debug, Deserialize)]
pub struct RequestedOutput {
    pub name: String,
    #[serde(default, deserialize_with = "crate::error::not_null")]
    pub parameters: Option<serde_json::Map<String, Value>>,
}

fn wants_binary(params: Option<&serde_json::Map<String, Value>>, key: &str) -> bool {
    params
        .and_then(|p| p.get(key))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The name of the header that splits a binary-extension body into JSON and raw data.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// An inference request body: JSON, or JSON followed by raw tensor data (the binary tensor
/// extension). Read whole, bounded in size and time, before anything is queued.
pub struct InferBody {
    pub request: InferRequest,
    pub binary: axum::body::Bytes,
}

impl FromRequest<Arc<AppState>> for InferBody {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let Some(len) = req.headers().get(HEADER_LENGTH).cloned() else {
            let V2JsonBody(request) = V2JsonBody::from_request(req, state).await?;
            return Ok(Self {
                request,
                binary: Default::default(),
            });
        };
        let bytes = read_body(req, state).await?;
        split_infer_body(&len, bytes)
    }
}

/// Splits a binary-extension body, read whole, into its JSON request and the raw data after
/// it, at the `Inference-Header-Content-Length` header's value `len`. A plain function, so
/// tests and the fuzzer reach it without a server.
pub fn split_infer_body(
    len: &HeaderValue,
    bytes: axum::body::Bytes,
) -> Result<InferBody, ApiError> {
    let len: usize = len
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| ApiError::bad_request(format!("{HEADER_LENGTH} must be a byte count")))?;
    if len > bytes.len() {
        return Err(ApiError::bad_request(format!(
            "{HEADER_LENGTH} is {len} but the body has only {} bytes",
            bytes.len()
        )));
    }
    Ok(InferBody {
        request: parse_json(&bytes[..len])?,
        binary: bytes.slice(len..),
    })
}

/// Decodes the binary form of a BYTES tensor: each element a 4-byte little-endian length,
/// then that many bytes of UTF-8.
fn decode_bytes_tensor(mut raw: &[u8]) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        let i = out.len();
        let Some((len, rest)) = raw.split_first_chunk::<4>() else {
            return Err(ApiError::bad_request(format!(
                "binary input {INPUT_NAME:?}: element {i} has a truncated length prefix"
            )));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return Err(ApiError::bad_request(format!(
                "binary input {INPUT_NAME:?}: element {i} says {len} bytes, {} remain",
                rest.len()
            )));
        }
        let text = std::str::from_utf8(&rest[..len]).map_err(|_| {
            ApiError::bad_request(format!(
                "binary input {INPUT_NAME:?}: element {i} is not valid UTF-8"
            ))
        })?;
        out.push(text.to_owned());
        raw = &rest[len..];
    }
    Ok(out)
}

/// What an inference request asks for: its texts, their shape, and which outputs, each
/// raw binary or not.
pub struct Parsed {
    pub texts: Vec<String>,
    pub shape: Vec<i64>,
    /// Whether outputs come back raw binary unless they say (`binary_data_output`); the
    /// default outputs (none named) follow it.
    pub binary_output: bool,
    /// The outputs named, in order (each one of [`OUTPUT_NAMES`], at most once), with
    /// whether each comes back raw binary; empty: the model's default outputs.
    pub outputs: Vec<(String, bool)>,
}

/// Checks an inference request (and its raw data, for the binary extension) and returns
/// what it asks for.
pub fn parse_infer(req: InferRequest, binary: &[u8]) -> Result<Parsed, ApiError> {
    let binary_output = wants_binary(req.parameters.as_ref(), "binary_data_output");
    let mut outputs: Vec<(String, bool)> = Vec::new();
    for o in req.outputs.iter().flatten() {
        if !OUTPUT_NAMES.contains(&o.name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown output {:?}: this model's outputs are {PROBABILITIES_NAME:?} and, with two classes, {OUTPUT_NAME:?}",
                o.name
            )));
        }
        if outputs.iter().any(|(n, _)| *n == o.name) {
            return Err(ApiError::bad_request(format!(
                "output {:?} is asked for twice",
                o.name
            )));
        }
        let binary = o
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data"))
            .and_then(Value::as_bool)
            .unwrap_or(binary_output);
        outputs.push((o.name.clone(), binary));
    }
    let [input] = <[InferInput; 1]>::try_from(req.inputs).map_err(|v| {
        ApiError::bad_request(format!(
            "{} inputs given: this model takes exactly one, {INPUT_NAME:?}",
            v.len()
        ))
    })?;
    if input.name != INPUT_NAME {
        return Err(ApiError::bad_request(format!(
            "unknown input {:?}: this model takes one input, {INPUT_NAME:?}",
            input.name
        )));
    }
    if input.datatype != "BYTES" {
        return Err(ApiError::bad_request(format!(
            "input {INPUT_NAME:?} has datatype {:?}, expected \"BYTES\"",
            input.datatype
        )));
    }
    let binary_size = input
        .parameters
        .as_ref()
        .and_then(|p| p.get("binary_data_size"));
    let n = match input.shape.as_slice() {
        [n] | [n, 1] if *n >= 0 => *n as usize,
        s => {
            return Err(ApiError::bad_request(format!(
                "input {INPUT_NAME:?} has shape {s:?}, expected [N] or [N, 1]"
            )));
        }
    };
    if let Some(size) = binary_size {
        let size = size.as_u64().map(|s| s as usize).filter(|&s| s == binary.len()).ok_or_else(|| {
            ApiError::bad_request(format!(
                "input {INPUT_NAME:?}: binary_data_size {size} does not match the {} bytes after the JSON",
                binary.len()
            ))
        })?;
        let texts = decode_bytes_tensor(&binary[..size])?;
        if texts.len() != n {
            return Err(ApiError::bad_request(format!(
                "input {INPUT_NAME:?} has shape {:?} but {} elements in its binary data",
                input.shape,
                texts.len()
            )));
        }
        return Ok(Parsed {
            texts,
            shape: input.shape,
            binary_output,
            outputs,
        });
    }
    if !binary.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{} bytes follow the JSON but no input sets parameters.binary_data_size",
            binary.len()
        )));
    }
    let Value::Array(items) = input.data else {
        return Err(ApiError::bad_request(format!(
            "input {INPUT_NAME:?}: \"data\" must be an array of strings"
        )));
    };
    // Data may be flat or nested ([[s], [s]]), whatever the shape says: as Triton does, the
    // elements are counted after flattening, so [N] with nested data is accepted too.
    let mut texts = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let item = match item {
            Value::Array(mut inner) if inner.len() == 1 => inner.pop().unwrap_or(Value::Null),
            other => other,
        };
        match item {
            Value::String(s) => texts.push(s),
            other => {
                return Err(ApiError::bad_request(format!(
                    "input {INPUT_NAME:?}: element {i} is {}, expected a string",
                    match other {
                        Value::Null => "null",
                        Value::Bool(_) => "a boolean",
                        Value::Number(_) => "a number",
                        Value::Array(_) => "an array",
                        Value::Object(_) => "an object",
                        Value::String(_) => "a string",
                    }
                )));
            }
        }
    }
    if texts.len() != n {
        return Err(ApiError::bad_request(format!(
            "input {INPUT_NAME:?} has shape {:?} but {} elements in \"data\"",
            input.shape,
            texts.len()
        )));
    }
    Ok(Parsed {
        texts,
        shape: input.shape,
        binary_output,
        outputs,
    })
}

/// `POST /v2/models/{name}[/versions/{version}]/infer`.
pub async fn infer(
    State(state): State<Arc<AppState>>,
    Path(p): Path<ModelPath>,
    body: InferBody,
) -> Result<Response, ApiError> {
    check_name(&p.name)?;
    let model = check_version(&state, p.version.as_deref())?;
    let id = body.request.id.clone();
    let Parsed {
        texts,
        shape,
        binary_output,
        outputs: named,
    } = parse_infer(body.request, &body.binary)?;
    // Checked against the model serving now, so a wrong output costs no scoring; checked
    // again against the model that scored (a reload may come between).
    outputs_for(&model, &named, binary_output)?;
    check_texts(&state, &texts)?;
    let n = texts.len();
    let scored = state.batcher.score(texts, None, &state.metrics).await?;
    let outputs = outputs_for(&scored.model, &named, binary_output)?;
    let k = scored.model.scorer.classes();
    let mut raw: Vec<u8> = Vec::new();
    let mut out_json = Vec::with_capacity(outputs.len());
    for (name, binary) in outputs {
        let (shape, data): (Value, Vec<f32>) = if name == OUTPUT_NAME {
            (
                json!(shape),
                scored
                    .predictions
                    .iter()
                    .map(|p| p.probabilities[1])
                    .collect(),
            )
        } else {
            (
                json!([n, k]),
                scored
                    .predictions
                    .iter()
                    .flat_map(|p| p.probabilities.iter().copied())
                    .collect(),
            )
        };
        out_json.push(if binary {
            raw.extend(data.iter().flat_map(|p| p.to_le_bytes()));
            json!({ "name": name, "shape": shape, "datatype": "FP32", "parameters": { "binary_data_size": data.len() * 4 } })
        } else {
            json!({ "name": name, "shape": shape, "datatype": "FP32", "data": data })
        });
    }
    let any_binary = out_json.iter().any(|o| o.get("data").is_none());
    let mut out = json!({ "model_name": MODEL_NAME, "model_version": scored.model.served.version, "outputs": out_json });
    if let Some(id) = id {
        out["id"] = Value::String(id);
    }
    if !any_binary {
        return Ok(Json(out).into_response());
    }
    let mut bytes = serde_json::to_vec(&out).map_err(|e| ApiError::internal(e.to_string()))?;
    let json_len = bytes.len();
    bytes.extend(raw);
    let mut resp = bytes.into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(HEADER_LENGTH, HeaderValue::from(json_len));
    Ok(resp)
}
