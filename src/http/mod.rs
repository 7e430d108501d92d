//! The HTTP API: shared state, the one list of endpoints, and the router built from it with
//! request ids, tracing, body limits and request metrics.

pub mod error;
pub mod routes;
pub mod types;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, Method};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use tokio::sync::Semaphore;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::batcher::Batcher;
use crate::metrics::Metrics;
use crate::server::ServerConfig;
use crate::shutdown::Readiness;
use types::ModelInfo;

/// The header that carries each request's id (set when the client sends none, echoed back).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Everything the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    pub batcher: Batcher,
    pub model: Arc<ModelInfo>,
    pub config: Arc<ServerConfig>,
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
    /// Bounds concurrent image decoding (CPU and memory) to the cores available.
    pub decode_slots: Arc<Semaphore>,
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
}

impl Endpoint {
    pub const ALL: [Self; 7] = [
        Self::Classify,
        Self::ClassifyBatch,
        Self::Live,
        Self::Ready,
        Self::Metrics,
        Self::Model,
        Self::OpenApi,
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
        }
    }

    pub fn method(self) -> Method {
        match self {
            Self::Classify | Self::ClassifyBatch => Method::POST,
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
        }
    }

    /// The endpoints at `path`.
    pub fn at(path: &str) -> impl Iterator<Item = Self> + '_ {
        Self::ALL.into_iter().filter(move |e| e.path() == path)
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
            tracing::info_span!(
                "request",
                method = %request.method(),
                path = %request.uri().path(),
                request_id = %id,
            )
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
    let route = Endpoint::ALL
        .into_iter()
        .find(|e| e.path() == request.uri().path())
        .map_or("unmatched", Endpoint::path);
    let started = Instant::now();
    let response = next.run(request).await;
    state.metrics.record_request(
        route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}
