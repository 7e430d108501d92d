//! The handlers: classify (one image or a batch), health, metrics, model description, spec.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::{header, HeaderMap, Method, Uri};
use axum::response::IntoResponse;
use axum::Json;
use tokio::time::Instant;

use super::error::ApiError;
use super::types::{
    BatchClassification, BatchingInfo, Classification, ClassifyParams, Health, ModelResponse,
};
use super::{AppState, Endpoint};
use crate::batcher::saturating_add;
use crate::model::IMAGE_FLOATS;
use crate::preprocess::{preprocess_with, DecodeOptions};
use crate::shutdown::Phase;

/// The OpenAPI description of this API.
pub const OPENAPI_YAML: &str = include_str!("../../openapi.yaml");

/// The multipart field that carries an image.
pub const IMAGE_FIELD: &str = "image";

type QueryPairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// `POST /classify`: one image, as the raw body or a multipart field `image`.
pub async fn classify(
    State(state): State<AppState>,
    query: QueryPairs,
    request: Request,
) -> Result<Json<Classification>, ApiError> {
    let deadline = saturating_add(Instant::now(), state.config.request_timeout);
    let params = ClassifyParams::parse(&query?.0, state.model.num_classes)?;
    ensure_accepting(&state)?;
    within(&state, deadline, async {
        let image = match body_kind(request.headers())? {
            BodyKind::Raw => Bytes::from_request(request, &state).await?,
            BodyKind::Multipart => {
                let mut images = image_fields(&state, request, 1).await?;
                match images.len() {
                    1 => images.remove(0),
                    n => {
                        return Err(ApiError::BadRequest(format!(
                            "/classify takes one `{IMAGE_FIELD}` field, got {n}; send several to /classify/batch"
                        )))
                    }
                }
            }
        };
        let mut results = classify_images(&state, vec![image], &params, deadline).await?;
        results
            .pop()
            .map(Json)
            .ok_or_else(|| ApiError::Internal("no result for the image".into()))
    })
    .await
}

/// `POST /classify/batch`: 1..=N multipart fields `image`, answered in order.
pub async fn classify_batch(
    State(state): State<AppState>,
    query: QueryPairs,
    request: Request,
) -> Result<Json<BatchClassification>, ApiError> {
    let deadline = saturating_add(Instant::now(), state.config.request_timeout);
    let params = ClassifyParams::parse(&query?.0, state.model.num_classes)?;
    ensure_accepting(&state)?;
    within(&state, deadline, async {
        match body_kind(request.headers())? {
            BodyKind::Multipart => {}
            BodyKind::Raw => {
                return Err(ApiError::UnsupportedMediaType(format!(
                "/classify/batch takes multipart/form-data with one or more `{IMAGE_FIELD}` fields"
            )))
            }
        }
        let max = state.config.max_images_per_request;
        let images = image_fields(&state, request, max).await?;
        if images.len() > max {
            return Err(ApiError::BadRequest(format!(
                "at most {max} `{IMAGE_FIELD}` fields per request"
            )));
        }
        let results = classify_images(&state, images, &params, deadline).await?;
        Ok(Json(BatchClassification { results }))
    })
    .await
}

/// `GET /health/live`.
pub async fn live() -> Json<Health> {
    Json(Health {
        status: "live".into(),
    })
}

/// `GET /health/ready`: 200 once the warm-up forward pass succeeded, 503 before and while draining.
pub async fn ready(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    match state.readiness.phase() {
        Phase::Starting => Err(ApiError::NotReady),
        Phase::Ready => Ok(Json(Health {
            status: "ready".into(),
        })),
        Phase::Draining => Err(ApiError::ShuttingDown),
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// `GET /v1/model`.
pub async fn model(State(state): State<AppState>) -> Json<ModelResponse> {
    let c = &state.config;
    Json(ModelResponse {
        model: (*state.model).clone(),
        batching: BatchingInfo {
            max_batch_size: c.max_batch_size,
            max_batch_delay_ms: duration_ms(c.max_batch_delay),
            queue_capacity: c.queue_capacity,
            request_timeout_ms: duration_ms(c.request_timeout),
            max_images_per_request: c.max_images_per_request,
            max_body_bytes: c.max_body_bytes,
            max_image_pixels: c.max_image_pixels,
        },
    })
}

/// `GET /openapi.yaml`.
pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML)
}

/// Unknown paths.
pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {method} {}; the API is described at /openapi.yaml",
        uri.path()
    ))
}

/// Known paths, wrong method.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().into(),
        allowed: Endpoint::at(uri.path())
            .map(|e| e.method().to_string())
            .collect(),
    }
}

pub(super) fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Classify requests are refused only before the model is warm; while draining, requests
/// that reached a handler are still served.
pub(super) fn ensure_accepting(state: &AppState) -> Result<(), ApiError> {
    match state.readiness.phase() {
        Phase::Starting => Err(ApiError::NotReady),
        Phase::Ready | Phase::Draining => Ok(()),
    }
}

/// Runs `work` until `deadline`: reading the body, decoding, queueing and the forward pass
/// all count against it.
pub(super) async fn within<T>(
    state: &AppState,
    deadline: Instant,
    work: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    tokio::time::timeout_at(deadline, work)
        .await
        .unwrap_or_else(|_| {
            Err(ApiError::Timeout {
                ms: duration_ms(state.config.request_timeout),
            })
        })
}

enum BodyKind {
    Raw,
    Multipart,
}

/// Raw image bytes (`image/*`, `application/octet-stream`, no Content-Type, or
/// `application/x-www-form-urlencoded`, which `curl --data-binary @cat.png` sends unless told
/// otherwise: the bytes decide, and a real form is refused as an unknown image format) or
/// multipart.
fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(BodyKind::Raw);
    };
    let text = value.to_str().unwrap_or("");
    let essence = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "multipart/form-data" {
        Ok(BodyKind::Multipart)
    } else if essence.starts_with("image/")
        || essence == "application/octet-stream"
        || essence == "application/x-www-form-urlencoded"
    {
        Ok(BodyKind::Raw)
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type {text:?} is not accepted: send the image bytes as image/* or \
             application/octet-stream, or multipart/form-data with a field `{IMAGE_FIELD}`"
        )))
    }
}

/// The `image` fields of a multipart body, reading at most `max + 1` of them.
async fn image_fields(
    state: &AppState,
    request: Request,
    max: usize,
) -> Result<Vec<Bytes>, ApiError> {
    let mut multipart = Multipart::from_request(request, state).await?;
    let mut images = Vec::new();
    while let Some(field) = multipart.next_field().await? {
        let name = field.name().unwrap_or("").to_owned();
        if name != IMAGE_FIELD {
            return Err(ApiError::BadRequest(format!(
                "unexpected multipart field {name:?}: send the image in a field named `{IMAGE_FIELD}`"
            )));
        }
        images.push(field.bytes().await?);
        if images.len() > max {
            break;
        }
    }
    if images.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "the multipart body has no field named `{IMAGE_FIELD}`"
        )));
    }
    Ok(images)
}

/// Admits, decodes, queues and classifies `images`, answering in order.
async fn classify_images(
    state: &AppState,
    images: Vec<Bytes>,
    params: &ClassifyParams,
    deadline: Instant,
) -> Result<Vec<Classification>, ApiError> {
    let logits = image_logits(state, images, deadline).await?;
    let classes = state.model.num_classes;
    Ok(logits
        .chunks_exact(classes)
        .map(|row| Classification::from_logits(row, &state.model.labels, params))
        .collect())
}

/// Admits, decodes and queues `images`: their logits, `classes` per image, in order.
pub(super) async fn image_logits(
    state: &AppState,
    images: Vec<Bytes>,
    deadline: Instant,
) -> Result<Vec<f32>, ApiError> {
    let timeout_ms = duration_ms(state.config.request_timeout);
    let n = images.len();
    // Slots first: a full queue is refused before any decoding work.
    let admission = state
        .batcher
        .admit(n)
        .map_err(|e| ApiError::from_batch(e, timeout_ms))?;
    // Large images take more of the decode slots (the semaphore holds `limits::decode_slots()`).
    let decode_slot = state
        .decode_slots
        .clone()
        .acquire_many_owned(super::limits::decode_permits(
            &images,
            state.config.max_image_pixels,
        ))
        .await
        .map_err(|e| ApiError::Internal(format!("decoder pool closed: {e}")))?;
    let (mean, std) = (state.model.mean, state.model.std);
    let options = DecodeOptions {
        max_pixels: state.config.max_image_pixels,
        load_truncated: state.config.load_truncated_images,
    };
    let pixels = tokio::task::spawn_blocking(move || {
        let _slot = decode_slot;
        let mut pixels = Vec::with_capacity(n * IMAGE_FLOATS);
        for (i, bytes) in images.iter().enumerate() {
            let image = preprocess_with(bytes, &mean, &std, &options)
                .map_err(|e| ApiError::from_preprocess(e, (n > 1).then_some(i)))?;
            pixels.extend_from_slice(&image);
        }
        Ok::<_, ApiError>(pixels)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("image decoding failed: {e}")))??;
    state
        .batcher
        .submit(admission, pixels, deadline)
        .await
        .map_err(|e| ApiError::from_batch(e, timeout_ms))
}
