//! The `resnet-serve` binary: parse the configuration, set up logging, run the subcommand.

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use resnet_serve::cli::args::{Cli, Command, LogFormat, ServeArgs};
use resnet_serve::telemetry::{Telemetry, TelemetryOptions};

fn main() -> ExitCode {
    #[cfg(feature = "cuda")]
    keep_cuda_math_fp32();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let command = cli.into_command();
    if !matches!(command, Command::Serve(_)) {
        init_tracing(LogFormat::Text, None);
    }
    let result = match &command {
        // Sets up its own logging: trace export needs its runtime first.
        Command::Serve(args) => serve(args),
        Command::Eval(args) => resnet_serve::cli::eval::run(args),
        Command::Bench(args) => resnet_serve::cli::bench::run(args),
        Command::Preprocess(args) => resnet_serve::cli::preprocess::run(args),
        Command::Convert(args) => resnet_serve::cli::convert::run(args),
        Command::FetchWeights(args) => resnet_serve::cli::fetch::run(args),
        Command::Healthcheck(args) => resnet_serve::cli::healthcheck::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// cuDNN may run FP32 convolutions on TF32 tensor cores (10-bit mantissa) by default on Ampere
/// and newer GPUs, enough over 56 layers to move the logits past the 1e-3 the service matches
/// PyTorch's FP32 to. Ask NVIDIA's libraries for FP32 unless the environment says otherwise
/// (`NVIDIA_TF32_OVERRIDE=1` leaves TF32 allowed).
#[cfg(feature = "cuda")]
fn keep_cuda_math_fp32() {
    if std::env::var_os("NVIDIA_TF32_OVERRIDE").is_none() {
        // Before any thread exists, so nothing reads the environment while it changes.
        std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
    }
}

/// Logs to stderr (`RUST_LOG`, default `info`) in `format`, and spans to OpenTelemetry when
/// `telemetry` is on.
fn init_tracing(format: LogFormat, telemetry: Option<&Telemetry>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let logs = match format {
        LogFormat::Text => logs.boxed(),
        LogFormat::Json => logs.json().with_current_span(true).boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(telemetry.map(Telemetry::layer))
        .init();
}

/// `serve`: model (from `--weights`, the default file, or the embedded weights), listener, then
/// the server until a signal.
fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let telemetry = {
        let _runtime = runtime.enter();
        Telemetry::start(&TelemetryOptions {
            endpoint: args.otlp_endpoint.clone(),
            sample_ratio: args.trace_sample_ratio,
        })?
    };
    init_tracing(args.log_format, telemetry.as_ref());
    if telemetry.is_some() {
        tracing::info!(
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

/// `serve` once logging is set up.
fn serve_with(args: &ServeArgs, runtime: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    use resnet_serve::{infer::ModelInfo, model::LoadOptions, model::Model, server};

    let access = resnet_serve::http::auth::AccessConfig::from_args(args)?;
    tracing::info!(
        api_key = access.api_key.is_some(),
        metrics_require_auth = access.metrics_require_auth,
        cors = ?access.cors,
        "access control"
    );
    if access.metrics_require_auth && access.api_key.is_none() {
        tracing::warn!("--metrics-require-auth has no effect without --api-key or --api-key-file");
    }
    if args.offline {
        tracing::warn!("--offline (RESNET_OFFLINE) has no effect: serve never downloads weights");
    }
    // A device that cannot be opened fails now, with a message saying what is missing.
    resnet_serve::model::check_device(args.model.device)?;
    let model = Model::load(&LoadOptions::from(&args.model))?;
    let info = ModelInfo::from_model(&model);
    tracing::info!(
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
        tracing::info!(address = %listener.local_addr()?, "listening");
        let grpc = if args.grpc_port == 0 {
            None
        } else {
            let grpc = tokio::net::TcpListener::bind((args.host, args.grpc_port))
                .await
                .with_context(|| format!("binding {}:{} for gRPC", args.host, args.grpc_port))?;
            tracing::info!(address = %grpc.local_addr()?, "listening for gRPC");
            Some(grpc)
        };
        let config = server::ServerConfig {
            access,
            ..server::ServerConfig::from_args(args)
        };
        server::run_with_limits(
            server::Listeners {
                http: listener,
                grpc,
            },
            model,
            info,
            config,
            resnet_serve::connections::ConnectionLimits::from_args(args),
            resnet_serve::shutdown::signal(),
        )
        .await?;
        Ok(())
    })
}
