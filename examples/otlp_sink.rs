//! A minimal OTLP/HTTP trace receiver for benchmarks: accepts `POST /v1/traces`, decodes each
//! export and counts its spans, and prints the count on SIGTERM or Ctrl-C. Used by
//! `scripts/bench-tracing.sh` as the live collector.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::routing::post;
use clap::Parser;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:4318")]
    listen: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spans = Arc::new(AtomicU64::new(0));
    let counter = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| async move {
            let count: usize = ExportTraceServiceRequest::decode(body)
                .map(|export| {
                    export
                        .resource_spans
                        .iter()
                        .flat_map(|r| &r.scope_spans)
                        .map(|s| s.spans.len())
                        .sum()
                })
                .unwrap_or(0);
            counter.fetch_add(count as u64, Ordering::Relaxed);
            (
                [("content-type", "application/x-protobuf")],
                Vec::<u8>::new(),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    eprintln!("otlp_sink: listening on {}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(resnet_serve::shutdown::signal())
        .await?;
    println!("spans received: {}", spans.load(Ordering::Relaxed));
    Ok(())
}
