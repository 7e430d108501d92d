//! `serve`: the flags turned into the server's, the connections', the access and the telemetry
//! options; logging and trace export set up; the model loaded; then the server on its listeners
//! until a signal.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::cli::args::ServeArgs;
use crate::cli::logging::init_tracing;
use crate::connections::ConnectionLimits;
use crate::http::auth::{AccessConfig, AccessOptions};
use crate::infer::ModelInfo;
use crate::model::{check_device, may_use_cuda, LoadOptions, Model};
use crate::server::{self, ServerConfig};
use crate::telemetry::{Telemetry, TelemetryOptions};

/// The target of `serve`'s own log lines: the binary's crate root, where they were logged before
/// they moved here, so that log filters and queries written for them keep matching.
const LOG_TARGET: &str = "resnet_serve";

impl From<&ServeArgs> for ServerConfig {
    /// Batching, bounds and timeouts; a batch request may carry up to one forward pass of
    /// images. The access settings are left open: [`AccessConfig::from_options`] makes them,
    /// since it reads a file.
    fn from(args: &ServeArgs) -> Self {
        let max_batch_size = args.max_batch_size as usize;
        Self {
            max_batch_size,
            max_batch_delay: Duration::from_millis(args.max_batch_delay_ms),
            queue_capacity: args.queue_capacity as usize,
            request_timeout: Duration::from_millis(args.request_timeout_ms),
            max_body_bytes: args.max_body_bytes,
            max_image_pixels: args.max_image_pixels,
            load_truncated_images: args.load_truncated_images,
            max_images_per_request: max_batch_size,
            access: AccessConfig::default(),
        }
    }
}

impl From<&ServeArgs> for ConnectionLimits {
    fn from(args: &ServeArgs) -> Self {
        Self {
            max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
            header_read_timeout: Duration::from_millis(args.header_read_timeout_ms),
            shutdown_timeout: Duration::from_millis(args.shutdown_timeout_ms),
        }
    }
}

impl From<&ServeArgs> for AccessOptions {
    fn from(args: &ServeArgs) -> Self {
        Self {
            api_key: args.api_key.clone(),
            api_key_file: args.api_key_file.clone(),
            metrics_require_auth: args.metrics_require_auth,
            cors_allow_origin: args.cors_allow_origin.clone(),
        }
    }
}

impl From<&ServeArgs> for TelemetryOptions {
    fn from(args: &ServeArgs) -> Self {
        Self {
            endpoint: args.otlp_endpoint.clone(),
            sample_ratio: args.trace_sample_ratio,
        }
    }
}

/// The `serve` subcommand: model (from `--weights`, the default file, or the embedded weights),
/// listener, then the server until a signal.
pub fn run(args: &ServeArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(http_threads(args))
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let telemetry = {
        let _runtime = runtime.enter();
        Telemetry::start(&TelemetryOptions::from(args))?
    };
    init_tracing(args.log_format, telemetry.as_ref());
    if telemetry.is_some() {
        tracing::info!(
            target: LOG_TARGET,
            endpoint = args
                .otlp_endpoint
                .as_deref()
                .unwrap_or("from OTEL_EXPORTER_OTLP_*"),
            sample_ratio = args.trace_sample_ratio,
            "exporting traces over OTLP"
        );
    }
    let result = serve_with(args, &runtime);
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    result
}

/// The async runtime's worker threads: `--http-threads`, or [`default_http_threads`].
fn http_threads(args: &ServeArgs) -> usize {
    if args.http_threads > 0 {
        return args.http_threads;
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    default_http_threads(cores, may_use_cuda(args.model.device))
}

/// Runtime workers for `cores` cores: one per core when the model may run on CUDA, where they
/// do all of the CPU's work; one per four cores when it runs on the CPU. There the engine's
/// threads keep every core busy under load, and a worker needs about a tenth of a core for each
/// core of engine: 80-110 us of its CPU per 32x32 PNG against 0.73 ms of engine thread time per
/// image. Two workers on two cores only added context switches: one served 4-8% more requests
/// at 16 and 64 clients, at 25% less of its CPU per request.
fn default_http_threads(cores: usize, may_use_cuda: bool) -> usize {
    if may_use_cuda {
        cores.max(1)
    } else {
        cores.div_ceil(4).max(1)
    }
}

/// `serve` once logging is set up.
fn serve_with(args: &ServeArgs, runtime: &tokio::runtime::Runtime) -> Result<()> {
    let access = AccessConfig::from_options(&AccessOptions::from(args))?;
    tracing::info!(
        target: LOG_TARGET,
        api_key = access.api_key.is_some(),
        metrics_require_auth = access.metrics_require_auth,
        cors = ?access.cors,
        "access control"
    );
    if access.metrics_require_auth && access.api_key.is_none() {
        tracing::warn!(
            target: LOG_TARGET,
            "--metrics-require-auth has no effect without --api-key or --api-key-file"
        );
    }
    if args.offline {
        tracing::warn!(
            target: LOG_TARGET,
            "--offline (RESNET_OFFLINE) has no effect: serve never downloads weights"
        );
    }
    // A device that cannot be opened fails now, with a message saying what is missing.
    check_device(args.model.device)?;
    let model = Model::load(&LoadOptions::from(&args.model))?;
    let info = ModelInfo::from_model(&model);
    tracing::info!(
        target: LOG_TARGET,
        model = %info.name,
        depth = info.depth,
        shortcut = %info.shortcut,
        device = %info.device,
        engine = %info.engine,
        weights = %info.weights.kind,
        weights_path = info.weights.path.as_deref().unwrap_or("-"),
        weights_sha256 = %info.weights.sha256,
        source = info.source.as_deref().unwrap_or("-"),
        "model loaded"
    );
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host, args.port))
            .await
            .with_context(|| format!("binding {}:{}", args.host, args.port))?;
        tracing::info!(
            target: LOG_TARGET,
            address = %listener.local_addr()?,
            http_threads = runtime.metrics().num_workers(),
            "listening"
        );
        let grpc = if args.grpc_port == 0 {
            None
        } else {
            let grpc = tokio::net::TcpListener::bind((args.host, args.grpc_port))
                .await
                .with_context(|| format!("binding {}:{} for gRPC", args.host, args.grpc_port))?;
            tracing::info!(
                target: LOG_TARGET,
                address = %grpc.local_addr()?,
                "listening for gRPC"
            );
            Some(grpc)
        };
        let config = ServerConfig {
            access,
            ..ServerConfig::from(args)
        };
        server::run_with_limits(
            server::Listeners {
                http: listener,
                grpc,
            },
            model,
            info,
            config,
            ConnectionLimits::from(args),
            crate::shutdown::signal(),
        )
        .await?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::default_http_threads;

    #[test]
    fn http_threads_default_to_a_quarter_of_the_cores_on_cpu_and_every_core_on_cuda() {
        let on_cpu: Vec<usize> = [0, 1, 2, 4, 5, 8, 16, 64]
            .into_iter()
            .map(|cores| default_http_threads(cores, false))
            .collect();
        assert_eq!(on_cpu, [1, 1, 1, 1, 2, 2, 4, 16]);
        assert_eq!(default_http_threads(2, true), 2);
        assert_eq!(default_http_threads(16, true), 16);
    }
}
