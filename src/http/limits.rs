//! Refusing a body whose declared `Content-Length` exceeds the limit before reading any of it
//! (the body limit itself only trips once that many bytes have arrived).

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

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
            ApiError::PayloadTooLarge(format!(
                "the request body declares {length} bytes; the limit is {limit}"
            ))
            .into_response()
        }
        _ => next.run(request).await,
    }
}
