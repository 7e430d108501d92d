//! REST against gRPC with one load tool: at each concurrency level, N closed-loop clients send
//! the same encoded image for a fixed time, first as `POST /classify` (the raw image body), then
//! as a gRPC `ModelInfer` call (the image as the BYTES input `image_bytes` in
//! `raw_input_contents`), each client on its own connection; prints requests/s, p50 and p99 per
//! protocol and level, and the gRPC / REST ratio, as a table and as JSON lines. The clients run
//! on one thread, as `wrk -t1`, to leave the cores to the server. Used by `scripts/bench-grpc.sh`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use resnet_serve::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use resnet_serve::grpc::proto::model_infer_request::InferInputTensor;
use resnet_serve::grpc::proto::ModelInferRequest;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Parser)]
struct Args {
    /// Base URL of the REST API.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    rest: String,
    /// URL of the gRPC API.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    grpc: String,
    /// The image to send.
    #[arg(long)]
    image: PathBuf,
    /// The model name gRPC calls carry.
    #[arg(long, default_value = "resnet56")]
    model: String,
    /// Concurrency levels, comma-separated.
    #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
    levels: Vec<usize>,
    /// Seconds per protocol and level (after one second of warm-up).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
}

/// What one protocol did at one level.
struct Run {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

#[derive(Clone)]
enum Client {
    Rest {
        http: reqwest::Client,
        url: String,
        image: Bytes,
    },
    Grpc {
        stub: GrpcInferenceServiceClient<Channel>,
        request: Box<ModelInferRequest>,
    },
}

impl Client {
    /// One request; whether it succeeded.
    async fn call(&mut self) -> bool {
        match self {
            Self::Rest { http, url, image } => http
                .post(url.as_str())
                .header("content-type", "image/png")
                .body(image.clone())
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()),
            Self::Grpc { stub, request } => stub.model_infer(*request.clone()).await.is_ok(),
        }
    }
}

async fn clients(args: &Args, grpc: bool, n: usize, image: &Bytes) -> anyhow::Result<Vec<Client>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(if grpc {
            // A channel per client: one HTTP/2 connection each, as REST gets one connection each.
            let channel = Endpoint::from_shared(args.grpc.clone())?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("connecting to {}", args.grpc))?;
            let mut length_prefixed = (image.len() as u32).to_le_bytes().to_vec();
            length_prefixed.extend_from_slice(image);
            Client::Grpc {
                stub: GrpcInferenceServiceClient::new(channel)
                    .max_decoding_message_size(usize::MAX),
                request: Box::new(ModelInferRequest {
                    model_name: args.model.clone(),
                    inputs: vec![InferInputTensor {
                        name: "image_bytes".into(),
                        datatype: "BYTES".into(),
                        shape: vec![1],
                        ..Default::default()
                    }],
                    raw_input_contents: vec![Bytes::from(length_prefixed)],
                    ..Default::default()
                }),
            }
        } else {
            Client::Rest {
                http: reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .tcp_nodelay(true)
                    .build()?,
                url: format!("{}/classify", args.rest),
                image: image.clone(),
            }
        });
    }
    Ok(out)
}

/// Runs `clients` closed-loop for `seconds`: each sends its next request when the last returns.
async fn drive(clients: Vec<Client>, seconds: f64) -> Run {
    let warm_until = Instant::now() + Duration::from_secs(1);
    let until = warm_until + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0;
                loop {
                    let started = Instant::now();
                    if started >= until {
                        break;
                    }
                    let ok = client.call().await;
                    if started >= warm_until {
                        latencies.push(started.elapsed());
                        errors += usize::from(!ok);
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut errors = 0;
    for task in tasks {
        if let Ok((l, e)) = task.await {
            latencies.extend(l);
            errors += e;
        }
    }
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    Run {
        requests_per_second: latencies.len() as f64 / seconds,
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        errors,
    }
}

fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let image = Bytes::from(
        std::fs::read(&args.image).with_context(|| format!("reading {}", args.image.display()))?,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        println!(
            "{:>8} {:>6} {:>10} {:>9} {:>9} {:>7}",
            "protocol", "conns", "req/s", "p50 ms", "p99 ms", "errors"
        );
        let mut lines = Vec::new();
        for &level in &args.levels {
            let mut rps = [0.0; 2];
            for (i, grpc) in [false, true].into_iter().enumerate() {
                let protocol = if grpc { "grpc" } else { "rest" };
                let run = drive(clients(&args, grpc, level, &image).await?, args.seconds).await;
                rps[i] = run.requests_per_second;
                println!(
                    "{protocol:>8} {level:>6} {:>10.1} {:>9.2} {:>9.2} {:>7}",
                    run.requests_per_second, run.p50_ms, run.p99_ms, run.errors
                );
                lines.push(format!(
                    "{{\"kind\":\"grpc_vs_rest\",\"protocol\":\"{protocol}\",\"connections\":{level},\"requests_per_second\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"errors\":{}}}",
                    run.requests_per_second, run.p50_ms, run.p99_ms, run.errors
                ));
            }
            println!("{:>8} {level:>6} {:>10.3}", "grpc/rest", rps[1] / rps[0]);
        }
        for line in lines {
            println!("{line}");
        }
        Ok(())
    })
}
