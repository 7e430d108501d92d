//! OpenTelemetry traces: off unless an OTLP endpoint is configured; then the `tracing` spans of
//! each request (route, decode, queue wait) and of each forward pass (linked from the requests in
//! its batch) are exported over OTLP, HTTP/protobuf by default or gRPC
//! (`OTEL_EXPORTER_OTLP_PROTOCOL=grpc`), by a batch processor on its own thread: a slow or dead
//! collector costs dropped spans and a warning, never a request. Also the W3C `traceparent`
//! propagation that joins a request's spans to its caller's trace.

use std::time::Duration;

use axum::http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TraceId, TracerProvider as _};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The span name of health probes and metrics scrapes: logged like any request, never exported.
pub const PROBE_SPAN: &str = "probe";

/// The service name spans carry unless `OTEL_SERVICE_NAME` says otherwise.
pub const SERVICE_NAME: &str = env!("CARGO_PKG_NAME");

/// How traces are exported.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryOptions {
    /// The collector's base URL (`http://collector:4318` for HTTP, `http://collector:4317` for
    /// gRPC); `None` leaves it to `OTEL_EXPORTER_OTLP_ENDPOINT` and friends.
    pub endpoint: Option<String>,
    /// Fraction of new traces sampled (requests that carry a sampled `traceparent` follow their
    /// caller's decision).
    pub sample_ratio: f64,
}

impl Default for TelemetryOptions {
    /// No endpoint of its own (the standard environment decides), every new trace sampled: the
    /// defaults, which `serve`'s flags take too.
    fn default() -> Self {
        Self {
            endpoint: None,
            sample_ratio: 1.0,
        }
    }
}

impl TelemetryOptions {
    /// Whether traces are exported at all: an endpoint from the flag or the standard
    /// environment.
    pub fn enabled(&self) -> bool {
        self.endpoint.is_some()
            || [
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            ]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
    }
}

/// Why trace export could not be set up; the server does not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the trace sample ratio must be from 0 to 1, got {0}")]
    SampleRatio(f64),
    #[error("setting up the OTLP trace exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The running trace pipeline; [`Telemetry::shutdown`] exports what is buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// How long shutdown waits for the last spans to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

impl Telemetry {
    /// The exporter and tracer provider for `options`; `None` when tracing is off. Call it
    /// within a Tokio runtime: the gRPC exporter's connection lives there.
    pub fn start(options: &TelemetryOptions) -> Result<Option<Self>, TelemetryError> {
        if !options.enabled() {
            return Ok(None);
        }
        if !(0.0..=1.0).contains(&options.sample_ratio) {
            return Err(TelemetryError::SampleRatio(options.sample_ratio));
        }
        let grpc = [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ]
        .iter()
        .find_map(|v| std::env::var(v).ok())
        .is_some_and(|p| p.trim() == "grpc");
        let exporter = if grpc {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_protocol(Protocol::Grpc);
            if let Some(endpoint) = &options.endpoint {
                builder = builder.with_endpoint(endpoint.clone());
            }
            builder.build()?
        } else {
            let mut builder = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary);
            if let Some(endpoint) = &options.endpoint {
                // The flag names the base URL, as OTEL_EXPORTER_OTLP_ENDPOINT does.
                let base = endpoint.trim_end_matches('/');
                builder = builder.with_endpoint(format!("{base}/v1/traces"));
            }
            builder.build()?
        };
        let service_name =
            std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| SERVICE_NAME.into());
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                options.sample_ratio,
            ))))
            .with_resource(Resource::builder().with_service_name(service_name).build())
            .build();
        Ok(Some(Self { provider }))
    }

    /// The `tracing` layer that turns spans into OpenTelemetry spans: every span but probes and
    /// the OpenTelemetry crates' own.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        use tracing_subscriber::Layer as _;
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer(SERVICE_NAME))
            .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
                metadata.name() != PROBE_SPAN && !metadata.target().starts_with("opentelemetry")
            }))
    }

    /// Exports what is buffered (for at most a few seconds) and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!(error = %e, "exporting the last spans failed");
        }
    }
}

/// Joins `span` to the caller's trace from a W3C `traceparent` in `headers`, and records the
/// trace id in its `trace_id` field (so that JSON logs lead to the trace): the exported trace's
/// id when tracing is on, else the caller's, if it sent one.
pub fn join_caller_trace(span: &tracing::Span, headers: &HeaderMap) {
    let caller = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let caller_trace = caller.span().span_context().trace_id();
    if caller.span().span_context().is_valid() {
        let _ = span.set_parent(caller);
    }
    let exported = span.context().span().span_context().trace_id();
    let trace_id = if exported != TraceId::INVALID {
        exported
    } else {
        caller_trace
    };
    if trace_id != TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}
