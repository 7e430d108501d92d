//! Running the service: [`run`], which serves on an already-bound listener until a shutdown
//! future resolves, then drains. Its configuration, [`ServerConfig`], is defined next to the
//! HTTP state that holds it (so that [`crate::http`] does not depend on this module) and
//! re-exported here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::batcher::{BatchPolicy, Batcher, BatcherConfig};
use crate::connections::{self, ConnectionLimits};
use crate::grpc::{self, GrpcOptions};
pub use crate::http::ServerConfig;
use crate::http::{router, AppState};
use crate::infer::{Inference, ModelInfo};
use crate::metrics::Metrics;
use crate::model::engine::Engine;
use crate::shutdown::Readiness;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("setting up metrics: {0}")]
    Metrics(#[from] metrics_exporter_prometheus::BuildError),
    #[error("starting the model thread or the gRPC server thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the warm-up forward pass failed: {0}")]
    WarmUp(String),
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

/// Serves the API on `listener` with `model` until `shutdown` resolves, then stops accepting,
/// reports not ready, answers everything already queued, and returns.
///
/// The model thread first runs a warm-up forward pass; `/health/ready` answers 200 after it.
/// A failing warm-up shuts the server down and is returned as [`ServerError::WarmUp`].
pub async fn run<M: Engine>(
    listener: TcpListener,
    model: M,
    info: ModelInfo,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let listeners = Listeners {
        http: listener,
        grpc: None,
    };
    run_with_limits(
        listeners,
        model,
        info,
        config,
        ConnectionLimits::default(),
        shutdown,
    )
    .await
}

/// Where the server listens: HTTP, and gRPC unless it is turned off.
#[derive(Debug)]
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: Option<TcpListener>,
}

/// [`run`] on HTTP and optionally gRPC, with the given connection cap, header timeout and drain
/// bound.
pub async fn run_with_limits<M: Engine>(
    listeners: Listeners,
    model: M,
    info: ModelInfo,
    config: ServerConfig,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let readiness = Readiness::new();
    let metrics = Arc::new(Metrics::new(config.max_batch_size, info.metric_labels())?);
    let batcher_config = BatcherConfig {
        policy: BatchPolicy {
            max_batch_size: config.max_batch_size,
            max_delay: config.max_batch_delay,
        },
        queue_capacity: config.queue_capacity,
        num_classes: info.num_classes,
    };
    let (batcher, batcher_task, warmed_up) =
        Batcher::start(model, batcher_config, metrics.batch(), readiness.clone())
            .map_err(ServerError::Spawn)?;
    let predictions = metrics.predictions(&info.class_labels());
    let inference = Inference::new(
        batcher,
        info,
        readiness.clone(),
        config.infer_limits(),
        predictions,
    );
    let grpc = match listeners.grpc {
        Some(listener) => {
            let options = GrpcOptions {
                max_message_bytes: config.max_body_bytes,
                api_key: config.access.api_key.clone(),
                shutdown_timeout: limits.shutdown_timeout,
            };
            let stopped = grpc::spawn(listener, inference.clone(), metrics.clone(), options)
                .map_err(ServerError::Spawn)?;
            Some(stopped)
        }
        None => None,
    };
    let app = router(AppState::new(inference, config, metrics.clone()));

    let upkeep_metrics = metrics.clone();
    let upkeep = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep_metrics.run_upkeep();
        }
    });

    let (failure_tx, failure_rx) = tokio::sync::oneshot::channel::<String>();
    let drain_readiness = readiness.clone();
    let stop = async move {
        tokio::select! {
            () = shutdown => tracing::info!("shutting down: finishing queued requests"),
            Ok(Err(e)) = warmed_up => {
                tracing::error!(error = %e, "warm-up failed: shutting down");
                let _ = failure_tx.send(e);
            }
        }
        drain_readiness.set_draining();
    };
    connections::serve(listeners.http, app, limits, stop).await;
    if let Some(stopped) = grpc {
        match stopped.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the gRPC server failed"),
            Err(_) => tracing::error!("the gRPC server thread ended without a result"),
        }
    }
    // Every handler (and with it every queue sender) is gone: the queue drains and closes.
    batcher_task.finish().await;
    upkeep.abort();
    if let Ok(e) = failure_rx.await {
        return Err(ServerError::WarmUp(e));
    }
    tracing::info!("stopped");
    Ok(())
}
