//! The server's request parsing on arbitrary bodies: every bad request is a clean 4xx
//! `ApiError`, never a panic, and what is accepted is consistent.
//!
//! The first byte picks the parser (its value mod 4):
//! - `0`: `POST /api/predict` body (`error::parse_json::<api::PredictRequest>`);
//! - `1`: `POST /api/preprocess` body;
//! - `2`: Open Inference Protocol infer request in JSON (`parse_json` + `v2::parse_infer`);
//! - `3`: the binary tensor extension: the `Inference-Header-Content-Length` value up to the
//!   first newline, then the body (`v2::split_infer_body` + `v2::parse_infer`).

#![no_main]

use axum::body::Bytes;
use axum::http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use server::api::{PredictRequest, PreprocessRequest};
use server::error::{ApiError, parse_json};
use server::v2::{InferRequest, Parsed, parse_infer, split_infer_body};

fn client_error(e: &ApiError) {
    assert!(
        e.status.is_client_error(),
        "a request's fault answered as {}: {}",
        e.status,
        e.message
    );
    assert!(!e.message.is_empty());
}

/// What an accepted inference request must satisfy.
fn check_parsed(p: &Parsed) {
    match p.shape.as_slice() {
        [n] | [n, 1] => assert_eq!(
            *n,
            p.texts.len() as i64,
            "shape {:?} for {} texts",
            p.shape,
            p.texts.len()
        ),
        s => panic!("accepted shape {s:?}"),
    }
}

fuzz_target!(
    init: fedimdb_fuzz::init("request_parsers"),
    |data: &[u8]| {
        let Some((&which, body)) = data.split_first() else { return };
        match which % 4 {
            0 => {
                if let Err(e) = parse_json::<PredictRequest>(body) {
                    client_error(&e);
                }
            }
            1 => {
                if let Err(e) = parse_json::<PreprocessRequest>(body) {
                    client_error(&e);
                }
            }
            2 => match parse_json::<InferRequest>(body) {
                Ok(req) => match parse_infer(req, &[]) {
                    Ok(p) => {
                        assert!(!p.binary_output || body.windows(6).any(|w| w == b"binary"));
                        check_parsed(&p);
                    }
                    Err(e) => client_error(&e),
                },
                Err(e) => client_error(&e),
            },
            _ => {
                let (header, body) = match body.iter().position(|&b| b == b'\n') {
                    Some(i) => (&body[..i], &body[i + 1..]),
                    None => (body, &[][..]),
                };
                // Only values a client could send in a header.
                let Ok(header) = HeaderValue::from_bytes(header) else { return };
                match split_infer_body(&header, Bytes::copy_from_slice(body)) {
                    Ok(b) => {
                        assert!(b.binary.len() <= body.len());
                        match parse_infer(b.request, &b.binary) {
                            Ok(p) => check_parsed(&p),
                            Err(e) => client_error(&e),
                        }
                    }
                    Err(e) => client_error(&e),
                }
            }
        }
    }
);
