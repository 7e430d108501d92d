//! Access control: the optional API key (from a flag or a mounted secret file), which routes stay
//! open without it, the bearer-token check (constant time), and the access settings as a whole.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use super::cors::CorsOrigins;
use super::error::ApiError;

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
    #[error("the API key given by {origin} is empty")]
    EmptyKey { origin: String },
    #[error(
        "the API key given by {origin} contains whitespace or a non-printable or non-ASCII \
         character, so no Authorization header could carry it"
    )]
    UnsendableKey { origin: String },
    #[error("reading the API key file {}: {source}", path.display())]
    ReadKeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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

/// The API key, kept only as its SHA-256 digest: it cannot leak through `Debug` or logs, and
/// comparing digests of equal length removes the length of the key from the timing.
#[derive(Clone)]
pub struct ApiKey {
    digest: [u8; 32],
}

impl ApiKey {
    /// `origin` names where the key came from, for the error message.
    pub fn new(key: &str, origin: &str) -> Result<Self, AccessError> {
        if key.is_empty() {
            return Err(AccessError::EmptyKey {
                origin: origin.into(),
            });
        }
        // Header values are trimmed of surrounding whitespace and carry visible ASCII only.
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AccessError::UnsendableKey {
                origin: origin.into(),
            });
        }
        Ok(Self {
            digest: sha256(key.as_bytes()),
        })
    }

    /// A mounted secret: the file's content without its trailing newline.
    pub fn from_file(path: &Path) -> Result<Self, AccessError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessError::ReadKeyFile {
            path: path.into(),
            source,
        })?;
        let key = text
            .strip_suffix('\n')
            .map_or(text.as_str(), |k| k.strip_suffix('\r').unwrap_or(k));
        Self::new(
            key,
            &format!("--api-key-file (RESNET_API_KEY_FILE) {}", path.display()),
        )
    }

    /// Whether `presented` is the key, in time independent of where they differ and of length.
    pub fn matches(&self, presented: &[u8]) -> bool {
        digests_equal(&self.digest, &sha256(presented))
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl PartialEq for ApiKey {
    fn eq(&self, other: &Self) -> bool {
        digests_equal(&self.digest, &other.digest)
    }
}

impl Eq for ApiKey {}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Equality of two digests that always reads every byte: no early exit on the first difference.
pub fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(difference) == 0
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let token = value[SCHEME.len()..].trim_ascii();
    (!token.is_empty()).then_some(token)
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

/// Why a request without the right API key is refused, for every protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    #[error("this route needs the API key: send the header `Authorization: Bearer <key>`")]
    Missing,
    #[error("the API key is not valid")]
    Invalid,
}

/// Checks an `Authorization` value (HTTP header or gRPC metadata) against `key`.
pub fn check_bearer(key: &ApiKey, authorization: Option<&[u8]>) -> Result<(), KeyRefusal> {
    match authorization.and_then(bearer_token) {
        Some(token) if key.matches(token) => Ok(()),
        Some(_) => Err(KeyRefusal::Invalid),
        None => Err(KeyRefusal::Missing),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_equal_only_when_every_byte_is() {
        let a = sha256(b"key");
        assert!(digests_equal(&a, &a));
        for i in [0, 17, 31] {
            let mut b = a;
            b[i] ^= 0x01;
            assert!(!digests_equal(&a, &b), "byte {i} differs");
        }
    }

    #[test]
    fn the_key_matches_itself_only() {
        let key = ApiKey::new("s3cret-key", "test").unwrap();
        assert!(key.matches(b"s3cret-key"));
        for wrong in [
            &b""[..],
            b"s3cret-ke",
            b"s3cret-key ",
            b"s3cret-keyy",
            b"S3cret-key",
            b"\xffs3cret-key",
        ] {
            assert!(!key.matches(wrong), "{:?}", String::from_utf8_lossy(wrong));
        }
    }

    #[test]
    fn unusable_keys_are_refused() {
        assert!(matches!(
            ApiKey::new("", "test"),
            Err(AccessError::EmptyKey { .. })
        ));
        for bad in ["a b", "key\n", "\tkey", "clé"] {
            assert!(
                matches!(
                    ApiKey::new(bad, "test"),
                    Err(AccessError::UnsendableKey { .. })
                ),
                "{bad:?}"
            );
        }
    }

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
    fn a_key_file_loses_its_trailing_newline_only() {
        let dir = std::env::temp_dir().join(format!("resnet-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // (file name, content, the key it holds; "" = refused as empty)
        let cases = [
            ("plain", "abc", "abc"),
            ("lf", "abc\n", "abc"),
            ("crlf", "abc\r\n", "abc"),
            ("empty", "", ""),
            ("newline-only", "\n", ""),
        ];
        for (name, content, key) in cases {
            let path = dir.join(name);
            std::fs::write(&path, content).unwrap();
            let loaded = ApiKey::from_file(&path);
            if key.is_empty() {
                assert!(
                    matches!(loaded, Err(AccessError::EmptyKey { .. })),
                    "{name}"
                );
            } else {
                let loaded = loaded.unwrap();
                assert!(loaded.matches(key.as_bytes()), "{name}");
                assert!(
                    !loaded.matches(content.as_bytes()) || content == key,
                    "{name}"
                );
            }
        }
        let missing = ApiKey::from_file(&dir.join("missing"));
        assert!(matches!(missing, Err(AccessError::ReadKeyFile { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bearer_tokens_are_parsed_case_insensitively() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bearer    "), None);
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearerabc"), None);
        assert_eq!(bearer_token(b"abc"), None);
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
