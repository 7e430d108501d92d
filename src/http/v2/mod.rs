//! The KServe v2 / Open Inference Protocol over REST: health, server and model metadata, and
//! infer (JSON and the binary tensor data extension), answered with the protocol's
//! `{"error": "..."}` body and the statuses of [`ApiError`].

pub mod tensor;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::AppState;
use crate::infer::tensor::{input_specs, output_specs, TensorSpec, OUTPUT_PROBABILITIES};
use crate::infer::Logits;
use tensor::{InferRequest, InferResponse, OutputSize, ResponseOutput};

/// Carries the JSON header's length in binary tensor data requests and responses.
pub const HEADER_LENGTH: &str = "inference-header-content-length";
pub use crate::infer::tensor::MODEL_VERSION;

/// An [`ApiError`] in the protocol's shape `{"error": "..."}`: status and headers (such as
/// `Retry-After`) are those of the rest of the API.
#[derive(Debug)]
pub struct V2Error(pub ApiError);

impl<E: Into<ApiError>> From<E> for V2Error {
    fn from(error: E) -> Self {
        Self(error.into())
    }
}

/// The error body of the v2 routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct V2ErrorBody {
    pub error: String,
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let body = V2ErrorBody {
            error: self.0.to_string(),
        };
        let (mut parts, _) = self.0.into_response().into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        let json = Json(body).into_response();
        Response::from_parts(parts, json.into_body())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerMetadata {
    pub name: String,
    pub version: String,
    pub extensions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Live {
    pub live: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    pub ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelReady {
    pub name: String,
    pub ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

/// `GET /v2`.
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: env!("CARGO_PKG_NAME").into(),
        version: env!("CARGO_PKG_VERSION").into(),
        extensions: vec!["binary_tensor_data".into()],
    })
}

/// `GET /v2/health/live`.
pub async fn live() -> Json<Live> {
    Json(Live { live: true })
}

/// `GET /v2/health/ready`: as `/health/ready`.
pub async fn ready(State(state): State<AppState>) -> Result<Json<Ready>, V2Error> {
    state.inference.check_ready()?;
    Ok(Json(Ready { ready: true }))
}

/// `GET /v2/models/{model_name}`.
pub async fn model_metadata(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, V2Error> {
    let inference = &state.inference;
    inference.check_model(&name)?;
    let model = inference.model();
    let described = |specs: Vec<TensorSpec>| {
        specs
            .into_iter()
            .map(|spec| TensorMetadata {
                name: spec.name.into(),
                datatype: spec.datatype.into(),
                shape: spec.shape,
            })
            .collect()
    };
    Ok(Json(ModelMetadata {
        name: model.name.clone(),
        versions: vec![MODEL_VERSION.into()],
        platform: model.platform(),
        inputs: described(input_specs(model)),
        outputs: described(output_specs(model)),
    }))
}

/// `GET /v2/models/{model_name}/ready`.
pub async fn model_ready(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ModelReady>, V2Error> {
    state.inference.check_model(&name)?;
    state.inference.check_ready()?;
    Ok(Json(ModelReady {
        name: state.inference.model().name.clone(),
        ready: true,
    }))
}

/// `POST /v2/models/{model_name}/infer`.
pub async fn infer(
    State(state): State<AppState>,
    Path(name): Path<String>,
    request: Request,
) -> Result<Response, V2Error> {
    let inference = &state.inference;
    let deadline = inference.deadline(None);
    inference.check_model(&name)?;
    inference.check_accepting()?;
    let response = inference
        .within(deadline, async {
            let header_length = header_length(request.headers())?;
            let body = Bytes::from_request(request, &state).await?;
            let (json, binary) = tensor::split_body(&body, header_length.as_deref())?;
            let request: InferRequest = serde_json::from_slice(&json)
                .map_err(|e| ApiError::BadRequest(format!("malformed inference request: {e}")))?;
            let outputs = tensor::requested_outputs(&request)?;
            let input = tensor::parse_inputs(&request, &binary, inference.limits().max_batch_size)?;
            let logits = inference.logits(input, deadline).await?;
            Ok::<_, ApiError>(answer(&state, request.id, &logits, &outputs))
        })
        .await?;
    Ok(response)
}

fn header_length(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    headers
        .get(HEADER_LENGTH)
        .map(|v| {
            v.to_str().map(str::to_owned).map_err(|_| {
                ApiError::BadRequest("Inference-Header-Content-Length is not ASCII".into())
            })
        })
        .transpose()
}

/// The infer response: JSON, or JSON then the binary outputs' little-endian bytes.
fn answer(
    state: &AppState,
    id: Option<String>,
    logits: &Logits,
    outputs: &[(&'static str, bool)],
) -> Response {
    let (n, classes) = (logits.len(), logits.classes());
    let mut binary = Vec::new();
    let mut described = Vec::with_capacity(outputs.len());
    for &(name, as_binary) in outputs {
        let values = if name == OUTPUT_PROBABILITIES {
            logits.probabilities()
        } else {
            logits.values().to_vec()
        };
        let (parameters, data) = if as_binary {
            let size = values.len() * 4;
            binary.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            (
                Some(OutputSize {
                    binary_data_size: size,
                }),
                None,
            )
        } else {
            (None, Some(values))
        };
        described.push(ResponseOutput {
            name: name.into(),
            datatype: "FP32".into(),
            shape: vec![n, classes],
            parameters,
            data,
        });
    }
    let response = InferResponse {
        model_name: state.inference.model().name.clone(),
        model_version: MODEL_VERSION.into(),
        id,
        outputs: described,
    };
    if binary.is_empty() && outputs.iter().all(|&(_, b)| !b) {
        return Json(response).into_response();
    }
    let json = match serde_json::to_vec(&response) {
        Ok(json) => json,
        Err(e) => {
            return V2Error(ApiError::Internal(format!(
                "cannot encode the response: {e}"
            )))
            .into_response()
        }
    };
    let length = HeaderValue::from(json.len());
    let mut body = json;
    body.extend_from_slice(&binary);
    let mut response = Response::new(Body::from(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(HEADER_LENGTH, length);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parts(error: ApiError) -> (u16, HeaderMap, V2ErrorBody) {
        let response = V2Error(error).into_response();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, headers, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn errors_keep_the_api_status_and_headers_in_the_protocol_shape() {
        let (status, headers, body) = parts(ApiError::Overloaded { capacity: 3 }).await;
        assert_eq!(status, 429);
        assert_eq!(headers[header::RETRY_AFTER], "1");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert!(body.error.contains("queue is full"), "{}", body.error);
        let (status, _, body) = parts(ApiError::BadRequest("shape [2]".into())).await;
        assert_eq!((status, body.error.as_str()), (400, "shape [2]"));
        let (status, _, _) = parts(ApiError::NotReady).await;
        assert_eq!(status, 503);
    }

    #[test]
    fn parametrised_routes_match_one_segment() {
        use crate::http::Endpoint;
        let at = |p: &str| Endpoint::at(p).collect::<Vec<_>>();
        assert_eq!(at("/v2/models/m/infer"), [Endpoint::V2Infer]);
        assert_eq!(at("/v2/models/m"), [Endpoint::V2Model]);
        assert!(at("/v2/models//infer").is_empty());
        assert!(at("/v2/models/m/x/infer").is_empty());
        assert_eq!(at("/v2"), [Endpoint::V2Server]);
    }
}
