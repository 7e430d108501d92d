//! REST against gRPC with one load tool: at each concurrency level, N closed-loop clients send
//! the same encoded image for a fixed time as `POST /classify` (the raw image body) and as a gRPC
//! `ModelInfer` call (the image as the BYTES input `image_bytes` in `raw_input_contents`), each
//! client on its own connection. Each level runs several rounds, alternating which protocol goes
//! first, so that drift in the machine's speed falls on both alike; prints every run, then per
//! protocol and level the median run (requests/s, p50, p99) and the gRPC / REST ratio of the
//! medians, as a table and as JSON lines. The clients run on one thread, as `wrk -t1`, to leave
//! the cores to the server. Used by `scripts/bench-grpc.sh`.

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
    /// Seconds per run (after one second of warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Runs per protocol and level.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// What one protocol did in one run at one level.
#[derive(Debug, Clone, Copy)]
struct Run {
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

const PROTOCOLS: [&str; 2] = ["rest", "grpc"];

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
        let mut summary = Vec::new();
        for &level in &args.levels {
            let mut runs: [Vec<Run>; 2] = [Vec::new(), Vec::new()];
            for round in 0..args.rounds.max(1) {
                let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
                for i in order {
                    let grpc = i == 1;
                    let run = drive(clients(&args, grpc, level, &image).await?, args.seconds).await;
                    println!(
                        "{:>8} {level:>6} {:>10.1} {:>9.2} {:>9.2} {:>7}",
                        PROTOCOLS[i], run.requests_per_second, run.p50_ms, run.p99_ms, run.errors
                    );
                    runs[i].push(run);
                }
            }
            let medians = runs.clone().map(|mut r| {
                r.sort_by(|a, b| a.requests_per_second.total_cmp(&b.requests_per_second));
                r[r.len() / 2]
            });
            for (i, run) in medians.iter().enumerate() {
                let errors: usize = runs[i].iter().map(|r| r.errors).sum();
                lines.push(format!(
                    "{{\"kind\":\"grpc_vs_rest\",\"protocol\":\"{}\",\"connections\":{level},\"runs\":{},\"median_requests_per_second\":{:.1},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"errors\":{errors}}}",
                    PROTOCOLS[i],
                    runs[i].len(),
                    run.requests_per_second,
                    run.p50_ms,
                    run.p99_ms
                ));
            }
            summary.push((level, medians));
        }
        println!("\nmedian run per protocol and level:");
        println!(
            "{:>6} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9}",
            "conns", "rest req/s", "p50 ms", "p99 ms", "grpc req/s", "p50 ms", "p99 ms", "grpc/rest"
        );
        for (level, [rest, grpc]) in summary {
            println!(
                "{level:>6} {:>10.1} {:>9.2} {:>9.2} {:>10.1} {:>9.2} {:>9.2} {:>9.3}",
                rest.requests_per_second,
                rest.p50_ms,
                rest.p99_ms,
                grpc.requests_per_second,
                grpc.p50_ms,
                grpc.p99_ms,
                grpc.requests_per_second / rest.requests_per_second
            );
        }
        for line in lines {
            println!("{line}");
        }
        Ok(())
    })
}
