//! The gRPC API on its own port: the Open Inference Protocol (KServe v2
//! `inference.GRPCInferenceService`) as a thin adapter over [`crate::infer`], and the standard
//! `grpc.health.v1.Health` that follows the server's readiness, with the REST API's key,
//! message-size limit, request timeout, metrics and graceful drain.

mod convert;
mod deadline;
pub mod proto;
mod service;
mod status;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::api_key::ApiKey;
use crate::infer::Inference;
use crate::metrics::Metrics;
use crate::shutdown::Phase;
use proto::grpc_inference_service_server::GrpcInferenceServiceServer;
pub use service::{grpc_timeout, InferenceService};
pub use status::RETRY_PUSHBACK_MS;

/// The gRPC service name the health service reports on, besides the server as a whole (`""`).
pub const INFERENCE_SERVICE: &str =
    <GrpcInferenceServiceServer<InferenceService> as NamedService>::NAME;

/// How the gRPC API is bounded.
#[derive(Debug, Clone)]
pub struct GrpcOptions {
    /// Largest request message (`--max-body-bytes`); larger ones are refused unread.
    pub max_message_bytes: usize,
    /// When set, every method but the health checks, ServerLive and ServerReady needs it.
    pub api_key: Option<ApiKey>,
    /// After draining starts, how long calls in flight may take to finish.
    pub shutdown_timeout: Duration,
}

/// Why the gRPC server stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("taking over the gRPC listener: {0}")]
    Listen(#[source] std::io::Error),
}

/// Runs [`serve`] on a thread of its own with a single-threaded runtime: every task of a call
/// (the HTTP/2 connection, the stream, the handler) then wakes on the same thread, where on the
/// shared multi-threaded runtime each hand-over between them could cross threads and cost a
/// wake-up. The receiver resolves when it has stopped.
pub fn spawn(
    listener: TcpListener,
    inference: Inference,
    metrics: Arc<Metrics>,
    options: GrpcOptions,
) -> std::io::Result<tokio::sync::oneshot::Receiver<Result<(), GrpcError>>> {
    let listener = listener.into_std()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("grpc-blocking")
        .build()?;
    let (stopped_tx, stopped) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("grpc".into())
        .spawn(move || {
            let result = runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).map_err(GrpcError::Listen)?;
                serve(listener, inference, metrics, options).await
            });
            let _ = stopped_tx.send(result);
        })?;
    Ok(stopped)
}

/// Serves the gRPC API on `listener` until the server drains ([`Phase::Draining`]): health turns
/// NOT_SERVING, new inference calls are refused with UNAVAILABLE, calls in flight finish (for at
/// most `shutdown_timeout`), then the listener closes and connections end.
pub async fn serve(
    listener: TcpListener,
    inference: Inference,
    metrics: Arc<Metrics>,
    options: GrpcOptions,
) -> Result<(), GrpcError> {
    let readiness = inference.readiness().clone();
    let service = InferenceService::new(inference, metrics, options.api_key);
    let drained = service.drained_after_draining(readiness.clone(), options.shutdown_timeout);
    let (reporter, health) = tonic_health::server::health_reporter();
    let mut phases = readiness.subscribe();
    let follow_readiness = tokio::spawn(async move {
        loop {
            let phase = *phases.borrow_and_update();
            let status = match phase {
                Phase::Ready => ServingStatus::Serving,
                Phase::Starting | Phase::Draining => ServingStatus::NotServing,
            };
            for name in ["", INFERENCE_SERVICE] {
                reporter.set_service_status(name, status).await;
            }
            if phase == Phase::Draining || phases.changed().await.is_err() {
                break;
            }
        }
    });
    let inference_server = GrpcInferenceServiceServer::new(service)
        .max_decoding_message_size(options.max_message_bytes)
        .max_encoding_message_size(usize::MAX);
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stopping_tx, stopping) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        drained.await;
        let _ = stopping_tx.send(());
    };
    let serving = tonic::transport::Server::builder()
        .layer(deadline::ClientDeadlineLayer)
        .add_service(health)
        .add_service(inference_server)
        .serve_with_incoming_shutdown(incoming, signal);
    // Once stopping, connections that stay open (a health Watch stream never ends) are cut
    // after a short grace instead of holding the shutdown.
    let cut_off = async {
        if stopping.await.is_ok() {
            tokio::time::sleep(CLOSE_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        result = serving => result,
        () = cut_off => {
            tracing::debug!("gRPC connections still open after the drain: closing them");
            Ok(())
        }
    };
    follow_readiness.abort();
    Ok(result?)
}

/// How long connections may stay open once the gRPC server stops accepting.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

impl InferenceService {
    /// Resolves once the server drains and then no call is in flight (or `timeout` passed).
    fn drained_after_draining(
        &self,
        readiness: crate::shutdown::Readiness,
        timeout: Duration,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let idle = self.drained();
        let mut phases = readiness.subscribe();
        async move {
            let _ = phases.wait_for(|&p| p == Phase::Draining).await;
            if tokio::time::timeout(timeout, idle).await.is_err() {
                tracing::warn!("gRPC calls still in flight at the shutdown timeout: closing");
            }
        }
    }
}
