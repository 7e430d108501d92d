//! Cross-origin access for browsers: off unless origins are configured, then a CORS layer that
//! answers preflights itself (before the API key is checked: preflights carry no credentials).

use axum::http::{header, HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::REQUEST_ID_HEADER;

/// Which origins get CORS headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CorsOrigins {
    /// No CORS headers: browsers refuse cross-origin reads.
    #[default]
    Off,
    /// Any origin (`*`).
    Any,
    /// These origins exactly.
    List(Vec<HeaderValue>),
}

impl CorsOrigins {
    /// `*`, or comma-separated origins such as `https://a.example,http://localhost:3000`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let items: Vec<&str> = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if items.is_empty() {
            return Err("no origin given".into());
        }
        if items.contains(&"*") {
            return if items.len() == 1 {
                Ok(Self::Any)
            } else {
                Err("`*` cannot be combined with other origins".into())
            };
        }
        items
            .into_iter()
            .map(|origin| {
                let origin = origin.strip_suffix('/').unwrap_or(origin);
                let authority = origin
                    .strip_prefix("https://")
                    .or_else(|| origin.strip_prefix("http://"));
                if !authority.is_some_and(|a| !a.is_empty() && !a.contains(['/', '?', '#'])) {
                    return Err(format!(
                        "{origin:?} is not an origin like https://app.example or \
                         http://localhost:3000 (scheme, host and port only)"
                    ));
                }
                HeaderValue::from_str(origin)
                    .map_err(|_| format!("{origin:?} is not a valid header value"))
            })
            .collect::<Result<_, _>>()
            .map(Self::List)
    }

    /// The layer, or `None` when CORS is off.
    pub fn layer(&self) -> Option<CorsLayer> {
        let allow = match self {
            Self::Off => return None,
            Self::Any => AllowOrigin::any(),
            Self::List(origins) => AllowOrigin::list(origins.iter().cloned()),
        };
        Some(
            CorsLayer::new()
                .allow_origin(allow)
                .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                .allow_headers([
                    header::CONTENT_TYPE,
                    header::AUTHORIZATION,
                    HeaderName::from_static(REQUEST_ID_HEADER),
                ])
                .expose_headers([
                    HeaderName::from_static(REQUEST_ID_HEADER),
                    header::RETRY_AFTER,
                    header::WWW_AUTHENTICATE,
                ]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_as_star_or_a_list() {
        assert_eq!(CorsOrigins::parse("*"), Ok(CorsOrigins::Any));
        assert_eq!(CorsOrigins::parse(" * "), Ok(CorsOrigins::Any));
        assert_eq!(
            CorsOrigins::parse("https://a.example, http://localhost:3000/"),
            Ok(CorsOrigins::List(vec![
                HeaderValue::from_static("https://a.example"),
                HeaderValue::from_static("http://localhost:3000"),
            ]))
        );
        for bad in [
            "",
            " , ",
            "*,https://a.example",
            "a.example",
            "https://a.example/path",
            "ftp://a.example",
        ] {
            assert!(CorsOrigins::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn off_has_no_layer() {
        assert!(CorsOrigins::Off.layer().is_none());
        assert!(CorsOrigins::Any.layer().is_some());
    }
}
