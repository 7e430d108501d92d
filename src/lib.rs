//! resnet-serve: an HTTP inference service for CIFAR ResNets.
//!
//! - [`model`]: architecture spec, weights loading, PyTorch conversion, download, and the
//!   forward-pass engines behind one [`model::Model`].
//! - [`preprocess`]: image bytes to normalised tensors, as torchvision does.
//! - [`infer`]: the inference layer every protocol shares: readiness, deadlines, admission,
//!   decoding, the batcher, softmax; one error type.
//! - [`batcher`]: the bounded queue, the batching policy and the model thread.
//! - [`grpc`]: the Open Inference Protocol over gRPC and `grpc.health.v1`, on their own port.
//! - [`api_key`]: the optional API key both servers check (constant-time bearer comparison).
//! - [`http`]: the routes, their request and response types, the one error type, and the
//!   server's configuration ([`http::ServerConfig`], also [`server::ServerConfig`]).
//! - [`metrics`]: the Prometheus metrics of the contract, one registry per server.
//! - [`telemetry`]: OpenTelemetry trace export (OTLP) and `traceparent` propagation.
//! - [`shutdown`]: readiness and the signals that start a graceful shutdown.
//! - [`connections`]: accepting connections: the connection cap, header timeout, bounded drain.
//! - [`server`]: `run(listener, ..., shutdown)`: the batcher, HTTP and gRPC put together.
//! - [`cli`]: the command line: every flag and its `RESNET_*` environment variable
//!   ([`cli::args`]), and every subcommand's handler: `serve`, `convert`, `fetch-weights`,
//!   `eval`, `bench`, `preprocess`, `healthcheck`.

pub mod api_key;
pub mod batcher;
pub mod cli;
pub mod connections;
pub mod grpc;
pub mod http;
pub mod infer;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod server;
pub mod shutdown;
pub mod telemetry;
