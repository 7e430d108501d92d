//! The Open Inference Protocol's gRPC messages, server and client, generated from
//! `proto/grpc_predict_v2.proto` by `build.rs`.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("inference");
