//! `inference.GRPCInferenceService`: each method a thin adapter over [`Inference`], with the API
//! key checked where REST checks it, the client's `grpc-timeout` capping the request timeout,
//! calls refused once the server drains, and every call counted in `resnet_requests_total`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http;
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::convert;
use super::proto::grpc_inference_service_server::GrpcInferenceService;
use super::proto::model_metadata_response::TensorMetadata;
use super::proto::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};
use super::status::{code_name, from_infer, from_key_refusal};
use crate::api_key::{check_bearer, ApiKey};
use crate::infer::tensor::{input_specs, output_specs, TensorSpec, MODEL_VERSION};
use crate::infer::{InferError, Inference};
use crate::metrics::Metrics;
use crate::shutdown::Phase;
use crate::telemetry;
use tracing::Instrument;

/// The Open Inference Protocol service over one [`Inference`].
#[derive(Debug, Clone)]
pub struct InferenceService {
    inference: Inference,
    metrics: Arc<Metrics>,
    api_key: Option<ApiKey>,
    in_flight: Arc<watch::Sender<usize>>,
}

/// Counts a call as in flight until dropped.
struct InFlight(Arc<watch::Sender<usize>>);

impl InFlight {
    fn enter(counter: &Arc<watch::Sender<usize>>) -> Self {
        counter.send_modify(|n| *n += 1);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl InferenceService {
    pub fn new(inference: Inference, metrics: Arc<Metrics>, api_key: Option<ApiKey>) -> Self {
        Self {
            inference,
            metrics,
            api_key,
            in_flight: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Resolves once no call is in flight.
    pub fn drained(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut calls = self.in_flight.subscribe();
        async move {
            let _ = calls.wait_for(|&n| n == 0).await;
        }
    }

    /// Runs `call` as method `route`, counting it and its duration by its outcome.
    async fn observed<T>(
        &self,
        route: &'static str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let result = call.await;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        self.metrics.record_call(
            route,
            code_name(code).to_owned(),
            started.elapsed().as_secs_f64(),
        );
        result.map(Response::new)
    }

    /// The API key, where one is set, as the `authorization: Bearer <key>` metadata.
    fn authorize(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let value = metadata.get("authorization").map(|v| v.as_bytes());
        check_bearer(key, value).map_err(from_key_refusal)
    }

    fn model_known(&self, name: &str, version: &str) -> Result<(), InferError> {
        self.inference.check_model(name)?;
        self.inference.check_version(version)
    }
}

/// The client's deadline from `grpc-timeout` (`<at most 8 digits><H|M|S|m|u|n>`); an
/// unreadable value counts as none, as the gRPC specification leaves it to the server.
/// `headers` are a call's metadata (`MetadataMap::as_ref`) or its HTTP request's headers.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let text = headers.get("grpc-timeout")?.to_str().ok()?;
    let unit = text.chars().last()?;
    let digits = &text[..text.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(value * 3600),
        'M' => Duration::from_secs(value * 60),
        'S' => Duration::from_secs(value),
        'm' => Duration::from_millis(value),
        'u' => Duration::from_micros(value),
        'n' => Duration::from_nanos(value),
        _ => return None,
    })
}

fn described(specs: Vec<TensorSpec>) -> Vec<TensorMetadata> {
    specs
        .into_iter()
        .map(|spec| TensorMetadata {
            name: spec.name.into(),
            datatype: spec.datatype.into(),
            shape: spec.shape,
        })
        .collect()
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        self.observed("grpc:ServerLive", async {
            Ok(ServerLiveResponse { live: true })
        })
        .await
    }

    async fn server_ready(
        &self,
        _request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        self.observed("grpc:ServerReady", async {
            Ok(ServerReadyResponse {
                ready: self.inference.check_ready().is_ok(),
            })
        })
        .await
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        self.observed("grpc:ModelReady", async {
            self.authorize(request.metadata())?;
            let request = request.get_ref();
            self.model_known(&request.name, &request.version)
                .map_err(from_infer)?;
            Ok(ModelReadyResponse {
                ready: self.inference.check_ready().is_ok(),
            })
        })
        .await
    }

    async fn server_metadata(
        &self,
        request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        self.observed("grpc:ServerMetadata", async {
            self.authorize(request.metadata())?;
            Ok(ServerMetadataResponse {
                name: env!("CARGO_PKG_NAME").into(),
                version: env!("CARGO_PKG_VERSION").into(),
                extensions: Vec::new(),
            })
        })
        .await
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        self.observed("grpc:ModelMetadata", async {
            self.authorize(request.metadata())?;
            let request = request.get_ref();
            self.model_known(&request.name, &request.version)
                .map_err(from_infer)?;
            let model = self.inference.model();
            Ok(ModelMetadataResponse {
                name: model.name.clone(),
                versions: vec![MODEL_VERSION.into()],
                platform: model.platform(),
                inputs: described(input_specs(model)),
                outputs: described(output_specs(model)),
            })
        })
        .await
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let _call = InFlight::enter(&self.in_flight);
        let span = tracing::info_span!(
            "request",
            method = "ModelInfer",
            trace_id = tracing::field::Empty,
            otel.name = "inference.GRPCInferenceService/ModelInfer",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "inference.GRPCInferenceService",
            rpc.method = "ModelInfer",
        );
        telemetry::join_caller_trace(&span, &request.metadata().clone().into_headers());
        self.observed("grpc:ModelInfer", async {
            let inference = &self.inference;
            let deadline = inference.deadline(grpc_timeout(request.metadata().as_ref()));
            self.authorize(request.metadata())?;
            let mut request = request.into_inner();
            // Calls that arrive while draining go elsewhere: health already says NOT_SERVING.
            if inference.readiness().phase() == Phase::Draining {
                return Err(from_infer(InferError::ShuttingDown));
            }
            inference.check_accepting().map_err(from_infer)?;
            self.model_known(&request.model_name, &request.model_version)
                .map_err(from_infer)?;
            let outputs = convert::requested_outputs(&request).map_err(from_infer)?;
            let input = convert::model_input(&mut request, inference.limits().max_batch_size)
                .map_err(from_infer)?;
            let logits = inference
                .within(deadline, inference.logits(input, deadline))
                .await
                .map_err(from_infer)?;
            Ok(convert::response(
                &inference.model().name,
                request.id,
                &logits,
                &outputs,
            ))
        })
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(value: &str) -> Option<Duration> {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(metadata.as_ref())
    }

    #[test]
    fn grpc_timeouts_in_every_unit() {
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout("4S"), Some(Duration::from_secs(4)));
        assert_eq!(timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "12x", "-5m", "1.5S"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(MetadataMap::new().as_ref()), None);
    }
}
