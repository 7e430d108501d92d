//! The API's one error type and its mapping to status codes and the JSON error body
//! `{"error": {"code": "...", "message": "..."}}`, in one place.

use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::infer::InferError;
use crate::preprocess::PreprocessError;

/// Seconds a client told `overloaded` should wait before retrying.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Everything a request can fail with. The message names the cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method {method} is not allowed on {path}; allowed: {}", allowed.join(", "))]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: Vec<String>,
    },
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    InvalidImage(String),
    #[error("the queue is full ({capacity} images admitted); retry after {RETRY_AFTER_SECS} s")]
    Overloaded { capacity: usize },
    #[error("the model is not ready yet: the warm-up forward pass has not finished")]
    NotReady,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the request did not complete within its deadline of {ms} ms")]
    Timeout { ms: u64 },
    #[error("{0}")]
    Internal(String),
}

/// The JSON error body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `bad_request`, `payload_too_large`, ...
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InvalidImage(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NotReady | Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Unauthorized(_) => "unauthorized",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::InvalidImage(_) => "invalid_image",
            Self::Overloaded { .. } => "overloaded",
            Self::NotReady => "not_ready",
            Self::ShuttingDown => "shutting_down",
            Self::Timeout { .. } => "timeout",
            Self::Internal(_) => "internal",
        }
    }

    /// A preprocessing failure; `image` numbers the image (from 0) in a multi-image request.
    pub fn from_preprocess(error: PreprocessError, image: Option<usize>) -> Self {
        InferError::Image {
            index: image,
            error,
        }
        .into()
    }

    /// Whether this error says that the request body exceeded the size limit.
    fn body_too_large(status: StatusCode, text: String) -> Self {
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            Self::PayloadTooLarge(format!("the request body is larger than the limit: {text}"))
        } else {
            Self::BadRequest(text)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, "request failed");
        } else {
            tracing::debug!(code = self.code(), error = %self, "request rejected");
        }
        let extra = match &self {
            Self::Overloaded { .. } => {
                Some((header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS)))
            }
            Self::Unauthorized(_) => Some((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="resnet-serve""#),
            )),
            Self::MethodNotAllowed { allowed, .. } => HeaderValue::from_str(&allowed.join(", "))
                .ok()
                .map(|v| (header::ALLOW, v)),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().into(),
                message: self.to_string(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Some((name, value)) = extra {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

/// The inference layer's errors as HTTP sees them: the one place their status codes are chosen.
impl From<InferError> for ApiError {
    fn from(error: InferError) -> Self {
        let message = error.to_string();
        match error {
            InferError::InvalidInput(_) => Self::BadRequest(message),
            InferError::UnknownModel { .. } => Self::NotFound(message),
            InferError::Image { error, .. } => match error {
                PreprocessError::Empty => Self::BadRequest(message),
                PreprocessError::UnsupportedFormat(_) => Self::UnsupportedMediaType(message),
                PreprocessError::TooManyPixels { .. } => Self::PayloadTooLarge(message),
                PreprocessError::Decode(_) | PreprocessError::Truncated(_) => {
                    Self::InvalidImage(message)
                }
            },
            InferError::Overloaded { capacity } => Self::Overloaded { capacity },
            InferError::NotReady => Self::NotReady,
            InferError::ShuttingDown => Self::ShuttingDown,
            InferError::Timeout { ms } => Self::Timeout { ms },
            InferError::Internal(_) => Self::Internal(message),
        }
    }
}

impl From<MultipartRejection> for ApiError {
    fn from(rejection: MultipartRejection) -> Self {
        Self::body_too_large(
            rejection.status(),
            format!(
                "malformed multipart/form-data body: {}",
                rejection.body_text()
            ),
        )
    }
}

impl From<MultipartError> for ApiError {
    fn from(error: MultipartError) -> Self {
        Self::body_too_large(
            error.status(),
            format!("malformed multipart/form-data body: {}", error.body_text()),
        )
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        Self::body_too_large(
            rejection.status(),
            format!("cannot read the request body: {}", rejection.body_text()),
        )
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::BadRequest(format!("malformed query string: {}", rejection.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_status_and_code() {
        let cases = [
            (ApiError::BadRequest("x".into()), 400, "bad_request"),
            (ApiError::Unauthorized("x".into()), 401, "unauthorized"),
            (
                ApiError::PayloadTooLarge("x".into()),
                413,
                "payload_too_large",
            ),
            (
                ApiError::UnsupportedMediaType("x".into()),
                415,
                "unsupported_media_type",
            ),
            (ApiError::InvalidImage("x".into()), 422, "invalid_image"),
            (ApiError::Overloaded { capacity: 4 }, 429, "overloaded"),
            (ApiError::NotReady, 503, "not_ready"),
            (ApiError::ShuttingDown, 503, "shutting_down"),
            (ApiError::Timeout { ms: 5 }, 504, "timeout"),
            (ApiError::Internal("x".into()), 500, "internal"),
        ];
        for (error, status, code) in cases {
            assert_eq!(error.status().as_u16(), status);
            assert_eq!(error.code(), code);
        }
    }

    #[test]
    fn preprocessing_errors_map_to_the_documented_codes() {
        let too_many = PreprocessError::TooManyPixels {
            width: 60000,
            height: 60000,
            limit: 10,
        };
        let e = ApiError::from_preprocess(too_many, Some(2));
        assert_eq!(e.code(), "payload_too_large");
        assert!(e.to_string().starts_with("image 2: "), "{e}");
        assert!(e.to_string().contains("60000x60000"), "{e}");
        let cases = [
            (PreprocessError::Empty, "bad_request"),
            (
                PreprocessError::UnsupportedFormat("x".into()),
                "unsupported_media_type",
            ),
            (PreprocessError::Decode("x".into()), "invalid_image"),
            (PreprocessError::Truncated("x".into()), "invalid_image"),
        ];
        for (error, code) in cases {
            assert_eq!(ApiError::from_preprocess(error, None).code(), code);
        }
    }

    #[test]
    fn overloaded_carries_retry_after() {
        let response = ApiError::Overloaded { capacity: 1 }.into_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
