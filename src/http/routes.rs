//! The handlers: classify (one image or a batch), health, metrics, model description, spec.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::http::{header, HeaderMap, Method, Uri};
use axum::response::IntoResponse;
use axum::Json;

use super::error::ApiError;
use super::types::{
    BatchClassification, BatchingInfo, Classification, ClassifyParams, Health, ModelResponse,
};
use super::{AppState, Endpoint};
use crate::infer::{Deadline, ModelInput};

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
    let inference = &state.inference;
    let deadline = inference.deadline(None);
    let params = ClassifyParams::parse(&query?.0, inference.model().num_classes)?;
    inference.check_accepting()?;
    inference.within(deadline, async {
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
    let inference = &state.inference;
    let deadline = inference.deadline(None);
    let params = ClassifyParams::parse(&query?.0, inference.model().num_classes)?;
    inference.check_accepting()?;
    inference
        .within(deadline, async {
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
    state.inference.check_ready()?;
    Ok(Json(Health {
        status: "ready".into(),
    }))
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
        model: state.inference.model().clone(),
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
    deadline: Deadline,
) -> Result<Vec<Classification>, ApiError> {
    let logits = state
        .inference
        .logits(ModelInput::Images(images), deadline)
        .await?;
    let labels = &state.inference.model().labels;
    Ok(logits
        .rows()
        .map(|row| Classification::from_logits(row, labels, params))
        .collect())
}
