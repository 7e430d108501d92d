//! The optional API key that the HTTP and gRPC servers both check: read from a flag or a mounted
//! secret file, kept only as its digest, and compared with a bearer token in constant time.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why an API key is unusable; the server does not start.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
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
}

/// The API key, kept only as its SHA-256 digest: it cannot leak through `Debug` or logs, and
/// comparing digests of equal length removes the length of the key from the timing.
#[derive(Clone)]
pub struct ApiKey {
    digest: [u8; 32],
}

impl ApiKey {
    /// `origin` names where the key came from, for the error message.
    pub fn new(key: &str, origin: &str) -> Result<Self, KeyError> {
        if key.is_empty() {
            return Err(KeyError::EmptyKey {
                origin: origin.into(),
            });
        }
        // Header values are trimmed of surrounding whitespace and carry visible ASCII only.
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(KeyError::UnsendableKey {
                origin: origin.into(),
            });
        }
        Ok(Self {
            digest: sha256(key.as_bytes()),
        })
    }

    /// A mounted secret: the file's content without its trailing newline.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::ReadKeyFile {
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
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
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
            Err(KeyError::EmptyKey { .. })
        ));
        for bad in ["a b", "key\n", "\tkey", "clé"] {
            assert!(
                matches!(
                    ApiKey::new(bad, "test"),
                    Err(KeyError::UnsendableKey { .. })
                ),
                "{bad:?}"
            );
        }
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
                assert!(matches!(loaded, Err(KeyError::EmptyKey { .. })), "{name}");
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
        assert!(matches!(missing, Err(KeyError::ReadKeyFile { .. })));
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
}
