//! HTTP access control: which routes stay open without the API key ([`crate::api_key`]), the
//! middleware that checks it on the others, and the access settings as a whole (key and CORS).

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::cors::CorsOrigins;
use super::error::ApiError;
use crate::api_key::{check_bearer, ApiKey, KeyError};

/// Paths under these prefixes never need the key: probes carry no credentials.
const OPEN_PREFIXES: [&str; 2] = ["/health/", "/v2/health/"];

/// Paths that never need the key.
const OPEN_PATHS: [&str; 1] = ["/openapi.yaml"];

/// The metrics path, open unless `metrics_require_auth`.
const METRICS_PATH: &str = "/metrics";

/// Who may call what, and from which browser origins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessConfig {
    /// When set, every route outside the open list needs `Authorization: Bearer <key>`.
    pub api_key: Option<ApiKey>,
    /// Whether `/metrics` needs the key too (only meaningful with one).
    pub metrics_require_auth: bool,
    /// Origins answered with CORS headers; off by default.
    pub cors: CorsOrigins,
}

/// Why the access settings are unusable; the server does not start.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "--api-key and --api-key-file (RESNET_API_KEY, RESNET_API_KEY_FILE) exclude each other"
    )]
    BothKeys,
    #[error("--cors-allow-origin (RESNET_CORS_ALLOW_ORIGIN): {0}")]
    Cors(String),
}

/// The access settings as given, before they are checked and the key file is read.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AccessOptions {
    /// The API key itself; excludes `api_key_file`.
    pub api_key: Option<String>,
    /// A file holding the key (a mounted secret; one trailing newline is dropped).
    pub api_key_file: Option<PathBuf>,
    /// Whether `/metrics` needs the key too.
    pub metrics_require_auth: bool,
    /// Origins answered with CORS headers: comma-separated, or `*`; `None`: no CORS.
    pub cors_allow_origin: Option<String>,
}

impl std::fmt::Debug for AccessOptions {
    /// Everything but the key itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessOptions")
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("api_key_file", &self.api_key_file)
            .field("metrics_require_auth", &self.metrics_require_auth)
            .field("cors_allow_origin", &self.cors_allow_origin)
            .finish()
    }
}

impl AccessConfig {
    /// Checks the options, reading the key file if one is named.
    pub fn from_options(options: &AccessOptions) -> Result<Self, AccessError> {
        let api_key = match (&options.api_key, &options.api_key_file) {
            (Some(_), Some(_)) => return Err(AccessError::BothKeys),
            (Some(key), None) => Some(ApiKey::new(key, "--api-key (RESNET_API_KEY)")?),
            (None, Some(path)) => Some(ApiKey::from_file(path)?),
            (None, None) => None,
        };
        let cors = match &options.cors_allow_origin {
            Some(list) => CorsOrigins::parse(list).map_err(AccessError::Cors)?,
            None => CorsOrigins::Off,
        };
        Ok(Self {
            api_key,
            metrics_require_auth: options.metrics_require_auth,
            cors,
        })
    }

    /// Whether a request to `path` may go without the key.
    pub fn is_open(&self, path: &str) -> bool {
        OPEN_PATHS.contains(&path)
            || OPEN_PREFIXES.iter().any(|p| path.starts_with(p))
            || (path == METRICS_PATH && !self.metrics_require_auth)
    }
}

/// Middleware: outside the open list, answers 401 unless the request carries the key.
pub async fn require_api_key(
    State(access): State<Arc<AccessConfig>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = &access.api_key else {
        return next.run(request).await;
    };
    if access.is_open(request.uri().path()) {
        return next.run(request).await;
    }
    let header = request.headers().get(header::AUTHORIZATION);
    match check_bearer(key, header.map(|v| v.as_bytes())) {
        Ok(()) => next.run(request).await,
        Err(refusal) => ApiError::Unauthorized(refusal.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let access = AccessConfig {
            api_key: Some(ApiKey::new("hunter2-visible", "test").unwrap()),
            ..AccessConfig::default()
        };
        let shown = format!("{access:?} {access:#?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn only_probes_the_spec_and_by_default_metrics_are_open() {
        let mut access = AccessConfig::default();
        for open in [
            "/health/live",
            "/health/ready",
            "/v2/health/live",
            "/v2/health/ready",
            "/openapi.yaml",
            "/metrics",
        ] {
            assert!(access.is_open(open), "{open}");
        }
        for closed in [
            "/classify",
            "/classify/batch",
            "/v1/model",
            "/v2/models/resnet56/infer",
            "/v2",
            "/health",
            "/metrics/",
            "/openapi.yaml/x",
            "/unknown",
        ] {
            assert!(!access.is_open(closed), "{closed}");
        }
        access.metrics_require_auth = true;
        assert!(!access.is_open("/metrics"));
    }
}
