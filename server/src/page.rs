//! The web page: one self-contained HTML file (inline CSS and JS, no CDN, no fonts to fetch),
//! compiled into the binary so the server needs no static folder beside it.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The page, from `server/static/index.html`.
pub const INDEX_HTML: &str = include_str!("../static/index.html");

/// `GET /`.
pub async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything is inline; nothing may be loaded from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        INDEX_HTML,
    )
        .into_response()
}
