//! The body limit's early refusal: a body whose declared `Content-Length` exceeds the limit is
//! refused before any of it is read.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::error::ApiError;
use super::AppState;

/// 413 at once for a declared length over `max_body_bytes`; anything else passes through.
pub async fn refuse_declared_oversize(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let limit = state.config.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(length) if length > u64::try_from(limit).unwrap_or(u64::MAX) => {
            tokio::spawn(linger(request.into_body()));
            ApiError::PayloadTooLarge(format!(
                "the request body declares {length} bytes; the limit is {limit}"
            ))
            .into_response()
        }
        _ => next.run(request).await,
    }
}

/// Most bytes of a refused body read and discarded after the 413 is sent.
const LINGER_BYTES: usize = 8 << 20;
/// Longest time a refused body is read and discarded after the 413 is sent.
const LINGER_TIME: Duration = Duration::from_secs(2);

/// Lingering read of a refused body: a client still sending would otherwise meet a connection
/// reset before it reads the 413. Discards chunk by chunk (nothing is kept), bounded in bytes and
/// time, after which the connection is closed.
async fn linger(body: Body) {
    let mut body = body;
    let mut discarded = 0usize;
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            discarded += frame.data_ref().map_or(0, |d| d.len());
            if discarded > LINGER_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}
