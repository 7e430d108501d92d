//! Logging for every subcommand: `tracing` to stderr as text or JSON (`RUST_LOG`, default
//! `info`), and for `serve` spans to OpenTelemetry too.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::cli::args::LogFormat;
use crate::telemetry::Telemetry;

/// Logs to stderr (`RUST_LOG`, default `info`) in `format`, and spans to OpenTelemetry when
/// `telemetry` is on.
pub fn init_tracing(format: LogFormat, telemetry: Option<&Telemetry>) {
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
