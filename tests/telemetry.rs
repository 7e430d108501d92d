//! OpenTelemetry against a real OTLP/HTTP receiver on loopback (written here with the
//! `opentelemetry-proto` types): a request carrying a W3C `traceparent` produces spans in that
//! trace for its route, decoding and queue wait, and a forward-pass span linked to it; over REST
//! and gRPC; probes and metrics scrapes produce none; the JSON logs carry the trace id; and with
//! the collector down every request still succeeds.

mod common;

use std::net::TcpListener as StdListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

/// The caller's trace context on the REST request, and on the gRPC call.
const REST_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const GRPC_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "b7ad6b7169203331";

fn traceparent(trace: &str) -> String {
    format!("00-{trace}-{CALLER_SPAN}-01")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every span the receiver has been sent.
type Received = Arc<Mutex<Vec<Span>>>;

/// An OTLP/HTTP trace receiver on a free loopback port: decodes each export and keeps its spans.
fn start_receiver() -> (String, Received) {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let address = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let sink = received.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = axum::Router::new().route(
                "/v1/traces",
                post(move |body: Bytes| async move {
                    let export = ExportTraceServiceRequest::decode(body).unwrap();
                    let mut spans = sink.lock().unwrap();
                    for resource in export.resource_spans {
                        for scope in resource.scope_spans {
                            spans.extend(scope.spans);
                        }
                    }
                    // An empty ExportTraceServiceResponse.
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }),
            );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (format!("http://{address}"), received)
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `serve` with JSON logs, exporting to `endpoint`, and its gRPC port; ready when returned.
struct Server {
    server: common::JsonLogServer,
    grpc: u16,
}

impl Server {
    fn start(endpoint: &str) -> Option<Self> {
        let weights = common::shared_file("models/resnet56-seed-random.safetensors")?;
        let grpc = free_port();
        let mut command = common::JsonLogServer::command();
        command
            .args([
                "--grpc-port",
                &grpc.to_string(),
                "--otlp-endpoint",
                endpoint,
            ])
            .arg("--weights")
            .arg(weights)
            // Export every 100 ms rather than every 5 s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env("RUST_LOG", "info");
        Some(Self {
            server: common::JsonLogServer::spawn(command),
            grpc,
        })
    }

    fn classify(&self, traceparent: Option<&str>) -> (u16, Duration) {
        let png = std::fs::read(common::shared_file("data/images/0000-cat.png").unwrap()).unwrap();
        let mut request = client()
            .post(self.server.url("/classify"))
            .header("content-type", "image/png")
            .body(png);
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        let started = Instant::now();
        let status = request.send().unwrap().status().as_u16();
        (status, started.elapsed())
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// One gRPC ModelInfer of the cat PNG with `traceparent` metadata.
fn grpc_infer(port: u16, traceparent: &str) {
    use resnet_serve::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
    use resnet_serve::grpc::proto::model_infer_request::InferInputTensor;
    use resnet_serve::grpc::proto::{InferTensorContents, ModelInferRequest};

    let png = std::fs::read(common::shared_file("data/images/0000-cat.png").unwrap()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
        let mut request = tonic::Request::new(ModelInferRequest {
            model_name: "resnet56".into(),
            inputs: vec![InferInputTensor {
                name: "image_bytes".into(),
                datatype: "BYTES".into(),
                shape: vec![1],
                contents: Some(InferTensorContents {
                    bytes_contents: vec![png.into()],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
        client.model_infer(request).await.unwrap();
    });
}

/// Waits until `ready` holds for the spans received, or fails after 20 s with `what`.
fn wait_for(received: &Received, what: &str, ready: impl Fn(&[Span]) -> bool) -> Vec<Span> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans = received.lock().unwrap().clone();
        if ready(&spans) {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "{what}; spans received: {:?}",
            names(&spans)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn names(spans: &[Span]) -> Vec<(String, String)> {
    spans
        .iter()
        .map(|s| (s.name.clone(), hex(&s.trace_id)))
        .collect()
}

fn in_trace<'a>(spans: &'a [Span], trace: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| hex(&s.trace_id) == trace).collect()
}

#[test]
fn requests_join_the_callers_trace_and_forward_passes_link_to_them() {
    let (endpoint, received) = start_receiver();
    let Some(server) = Server::start(&endpoint) else {
        return;
    };
    // Probes and scrapes first: none of them may produce a span.
    for path in [
        "/health/live",
        "/health/ready",
        "/metrics",
        "/v2/health/ready",
    ] {
        let r = client()
            .get(server.server.url(path))
            .header(
                "traceparent",
                traceparent("11111111111111111111111111111111"),
            )
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    assert_eq!(server.classify(Some(&traceparent(REST_TRACE))).0, 200);
    grpc_infer(server.grpc, &traceparent(GRPC_TRACE));

    let has = |spans: &[Span], trace: &str, name: &str| {
        in_trace(spans, trace).iter().any(|s| s.name == name)
    };
    let linked_forward_pass = |spans: &[Span], trace: &str| {
        spans
            .iter()
            .any(|s| s.name == "forward_pass" && s.links.iter().any(|l| hex(&l.trace_id) == trace))
    };
    let spans = wait_for(
        &received,
        "REST and gRPC spans with their forward passes",
        |spans| {
            ["POST /classify", "decode", "queue_wait"]
                .iter()
                .all(|name| has(spans, REST_TRACE, name))
                && [
                    "inference.GRPCInferenceService/ModelInfer",
                    "decode",
                    "queue_wait",
                ]
                .iter()
                .all(|name| has(spans, GRPC_TRACE, name))
                && linked_forward_pass(spans, REST_TRACE)
                && linked_forward_pass(spans, GRPC_TRACE)
        },
    );
    for trace in [REST_TRACE, GRPC_TRACE] {
        let spans = in_trace(&spans, trace);
        // The route span's parent is the caller's span; the others are below the route span.
        let route = spans
            .iter()
            .find(|s| s.name != "decode" && s.name != "queue_wait")
            .unwrap();
        assert_eq!(hex(&route.parent_span_id), CALLER_SPAN, "{}", route.name);
        for child in spans.iter().filter(|s| s.span_id != route.span_id) {
            assert_eq!(child.parent_span_id, route.span_id, "{}", child.name);
        }
    }
    // Give any stray probe span time to arrive, then check there is none.
    std::thread::sleep(Duration::from_millis(500));
    let spans = received.lock().unwrap().clone();
    assert!(
        in_trace(&spans, "11111111111111111111111111111111").is_empty(),
        "probes were traced: {:?}",
        names(&spans)
    );
    assert!(
        !spans
            .iter()
            .any(|s| s.name.contains("/health") || s.name.contains("/metrics")),
        "{:?}",
        names(&spans)
    );
    // The JSON log line of the traced request carries its trace id.
    let logs = server.server.log_lines();
    assert!(
        logs.iter()
            .any(|l| l["span"]["trace_id"] == REST_TRACE && l["span"]["path"] == "/classify"),
        "no log line with trace_id {REST_TRACE}"
    );
}

#[test]
fn a_dead_collector_costs_requests_nothing() {
    // A port nobody listens on.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let Some(server) = Server::start(&endpoint) else {
        return;
    };
    let mut latencies = Vec::new();
    for i in 0..50 {
        let (status, latency) = server.classify(Some(&traceparent(REST_TRACE)));
        assert_eq!(status, 200, "request {i}");
        latencies.push(latency);
    }
    latencies.sort();
    eprintln!(
        "collector down: 50 requests, p50 {:?}, max {:?}",
        latencies[25], latencies[49]
    );
}
