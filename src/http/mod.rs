//! The HTTP API: shared state (with the server's [`ServerConfig`]), the one list of endpoints,
//! and the router built from it with request ids, tracing, body limits and request metrics.

pub mod auth;
mod config;
pub mod cors;
pub mod error;
pub mod limits;
pub mod routes;
pub mod types;
pub mod v2;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, Method};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::infer::Inference;
use crate::metrics::Metrics;
use crate::telemetry;
pub use config::ServerConfig;

/// The header that carries each request's id (set when the client sends none, echoed back).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Everything the handlers share, behind one reference count. axum clones the state for the
/// handler and for each middleware that reads it, three times a request, and the parts hold a
/// dozen counts of their own (the queue's sender, semaphores, metric handles).
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

/// What [`AppState`] shares.
#[derive(Debug)]
pub struct Shared {
    /// The inference layer: readiness, deadlines, admission, decoding and the batcher.
    pub inference: Inference,
    pub config: ServerConfig,
    pub metrics: Arc<Metrics>,
}

impl AppState {
    pub fn new(inference: Inference, config: ServerConfig, metrics: Arc<Metrics>) -> Self {
        Self(Arc::new(Shared {
            inference,
            config,
            metrics,
        }))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Every route the API serves: the router is built from this list, and the OpenAPI test
/// compares it with `openapi.yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Classify,
    ClassifyBatch,
    Live,
    Ready,
    Metrics,
    Model,
    OpenApi,
    V2Server,
    V2Live,
    V2Ready,
    V2Model,
    V2ModelReady,
    V2Infer,
}

impl Endpoint {
    pub const ALL: [Self; 13] = [
        Self::Classify,
        Self::ClassifyBatch,
        Self::Live,
        Self::Ready,
        Self::Metrics,
        Self::Model,
        Self::OpenApi,
        Self::V2Server,
        Self::V2Live,
        Self::V2Ready,
        Self::V2Model,
        Self::V2ModelReady,
        Self::V2Infer,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Self::Classify => "/classify",
            Self::ClassifyBatch => "/classify/batch",
            Self::Live => "/health/live",
            Self::Ready => "/health/ready",
            Self::Metrics => "/metrics",
            Self::Model => "/v1/model",
            Self::OpenApi => "/openapi.yaml",
            Self::V2Server => "/v2",
            Self::V2Live => "/v2/health/live",
            Self::V2Ready => "/v2/health/ready",
            Self::V2Model => "/v2/models/{model_name}",
            Self::V2ModelReady => "/v2/models/{model_name}/ready",
            Self::V2Infer => "/v2/models/{model_name}/infer",
        }
    }

    pub fn method(self) -> Method {
        match self {
            Self::Classify | Self::ClassifyBatch | Self::V2Infer => Method::POST,
            _ => Method::GET,
        }
    }

    fn handler(self) -> MethodRouter<AppState> {
        match self {
            Self::Classify => post(routes::classify),
            Self::ClassifyBatch => post(routes::classify_batch),
            Self::Live => get(routes::live),
            Self::Ready => get(routes::ready),
            Self::Metrics => get(routes::metrics),
            Self::Model => get(routes::model),
            Self::OpenApi => get(routes::openapi),
            Self::V2Server => get(v2::server_metadata),
            Self::V2Live => get(v2::live),
            Self::V2Ready => get(v2::ready),
            Self::V2Model => get(v2::model_metadata),
            Self::V2ModelReady => get(v2::model_ready),
            Self::V2Infer => post(v2::infer),
        }
    }

    /// Health probes and metrics scrapes: frequent, uninteresting to trace.
    pub fn is_probe(self) -> bool {
        matches!(
            self,
            Self::Live | Self::Ready | Self::Metrics | Self::V2Live | Self::V2Ready
        )
    }

    /// The endpoints whose path template (`{name}` matching one segment) matches `path`.
    pub fn at(path: &str) -> impl Iterator<Item = Self> + '_ {
        Self::ALL.into_iter().filter(move |e| e.matches(path))
    }

    fn matches(self, path: &str) -> bool {
        let (mut template, mut actual) = (self.path().split('/'), path.split('/'));
        loop {
            match (template.next(), actual.next()) {
                (None, None) => return true,
                (Some(t), Some(a)) if t == a || (t.starts_with('{') && !a.is_empty()) => {}
                _ => return false,
            }
        }
    }
}

/// The application: every [`Endpoint`], JSON 404/405 fallbacks, and the middleware stack.
pub fn router(state: AppState) -> Router {
    let mut router = Router::new();
    for endpoint in Endpoint::ALL {
        router = router.route(endpoint.path(), endpoint.handler());
    }
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    let trace = TraceLayer::new_for_http()
        .make_span_with(|request: &Request| {
            let id = request
                .headers()
                .get(REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            let path = request.uri().path();
            let endpoint = Endpoint::at(path).next();
            if endpoint.is_some_and(Endpoint::is_probe) {
                // Logged like any request; never exported as a trace.
                return tracing::info_span!(
                    telemetry::PROBE_SPAN,
                    method = %request.method(),
                    path = %path,
                    request_id = %id,
                );
            }
            let route = endpoint.map_or("unmatched", Endpoint::path);
            let span = tracing::info_span!(
                "request",
                method = %request.method(),
                path = %path,
                request_id = %id,
                trace_id = tracing::field::Empty,
                otel.name = %format_args!("{} {route}", request.method()),
                otel.kind = "server",
                http.route = route,
                http.response.status_code = tracing::field::Empty,
            );
            telemetry::join_caller_trace(&span, request.headers());
            span
        })
        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO));
    router
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
                .layer(trace)
                .layer(PropagateRequestIdLayer::new(request_id))
                .layer(middleware::from_fn_with_state(
                    state.clone(),
                    record_request_metrics,
                ))
                .option_layer(state.config.access.cors.layer())
                .option_layer(state.config.access.api_key.as_ref().map(|_| {
                    let access = Arc::new(state.config.access.clone());
                    middleware::from_fn_with_state(access, auth::require_api_key)
                }))
                .layer(middleware::from_fn_with_state(
                    state.clone(),
                    limits::refuse_declared_oversize,
                ))
                .layer(DefaultBodyLimit::max(state.config.max_body_bytes)),
        )
        .with_state(state)
}

/// Counts every request under its route (`unmatched` for unknown paths) and status.
async fn record_request_metrics(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = Endpoint::at(request.uri().path())
        .next()
        .map_or("unmatched", Endpoint::path);
    let started = Instant::now();
    let response = next.run(request).await;
    tracing::Span::current().record("http.response.status_code", response.status().as_u16());
    state.metrics.record_request(
        route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::StatusCode;
    use tower::ServiceExt;

    use super::*;
    use crate::batcher::{BatchPolicy, Batcher, BatcherConfig};
    use crate::infer::ModelInfo;
    use crate::model::engine::{Engine, EngineError};
    use crate::shutdown::Readiness;

    struct Uniform;

    impl Engine for Uniform {
        fn logits(&mut self, _: &[f32], n: usize) -> Result<Vec<f32>, EngineError> {
            Ok(vec![0.0; n * 10])
        }
    }

    fn info() -> ModelInfo {
        ModelInfo {
            name: "uniform".into(),
            depth: 56,
            shortcut: "projection".into(),
            conv_bias: true,
            parameter_count: 0,
            num_classes: 10,
            labels: vec![],
            input_shape: [3, 32, 32],
            mean: [0.5; 3],
            std: [0.25; 3],
            device: "cpu".into(),
            engine: "none".into(),
            source: None,
            weights: crate::model::WeightsOrigin {
                kind: "file".into(),
                path: None,
                sha256: String::new(),
            },
        }
    }

    async fn ready_status(app: &Router) -> (StatusCode, String) {
        let request = Request::get("/health/ready").body(Body::empty()).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readiness_is_503_shutting_down_once_draining() {
        let config = ServerConfig::default();
        let metrics = Arc::new(Metrics::new(config.max_batch_size, vec![]).unwrap());
        let readiness = Readiness::new();
        let batcher_config = BatcherConfig {
            policy: BatchPolicy {
                max_batch_size: 4,
                max_delay: std::time::Duration::ZERO,
            },
            queue_capacity: 4,
            num_classes: 10,
        };
        let (batcher, task, warmed_up) =
            Batcher::start(Uniform, batcher_config, metrics.batch(), readiness.clone()).unwrap();
        let predictions = metrics.predictions(&[]);
        let inference = Inference::new(
            batcher,
            info(),
            readiness.clone(),
            config.infer_limits(),
            predictions,
        );
        let app = router(AppState::new(inference, config, metrics));
        warmed_up.await.unwrap().unwrap();
        assert_eq!(ready_status(&app).await.0, StatusCode::OK);
        readiness.set_draining();
        let (status, body) = ready_status(&app).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains(r#""code":"shutting_down""#), "{body}");
        drop(app);
        task.finish().await;
    }
}
