//! What idle time between forward passes costs the next pass: one-image passes of the model as
//! `serve` loads it, back to back or with a pause before each (a sleep, as the model thread
//! waits for the next request at one client, or a busy wait that keeps its core running). One
//! JSON line per pause with the pass times' mean, p50 and p90.
//!
//!   cargo run --release --example idle_gaps -- [--weights FILE] [--threads 2] \
//!       [--pauses-us 0,100,300] [--busy]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use resnet_serve::model::{Engine, LoadOptions, Model, IMAGE_FLOATS};

#[derive(Debug, Parser)]
struct Args {
    /// Weights file; default: what `serve` would load.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Engine threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Pauses before each pass, in microseconds.
    #[arg(long, value_delimiter = ',', default_value = "0,100,300,1000")]
    pauses_us: Vec<u64>,
    /// Busy-wait through each pause instead of sleeping.
    #[arg(long)]
    busy: bool,
    /// Seconds of passes per pause.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let options = LoadOptions {
        weights: args.weights.clone(),
        threads: args.threads,
        ..LoadOptions::default()
    };
    let mut model = Model::load(&options)?;
    let image = vec![0.1_f32; IMAGE_FLOATS];
    for _ in 0..200 {
        model.logits(&image, 1)?;
    }
    for &pause_us in &args.pauses_us {
        let pause = Duration::from_micros(pause_us);
        let mut passes_ms = Vec::new();
        let end = Instant::now() + Duration::from_secs_f64(args.seconds);
        // At least one pass, however short `--seconds`.
        loop {
            if args.busy {
                let started = Instant::now();
                while started.elapsed() < pause {
                    std::hint::spin_loop();
                }
            } else if !pause.is_zero() {
                std::thread::sleep(pause);
            }
            let started = Instant::now();
            std::hint::black_box(model.logits(&image, 1)?);
            passes_ms.push(started.elapsed().as_secs_f64() * 1e3);
            if Instant::now() >= end {
                break;
            }
        }
        passes_ms.sort_by(f64::total_cmp);
        let at = |q: f64| passes_ms[((passes_ms.len() - 1) as f64 * q) as usize];
        println!(
            "{}",
            serde_json::json!({
                "pause_us": pause_us,
                "busy": args.busy,
                "passes": passes_ms.len(),
                "mean_ms": passes_ms.iter().sum::<f64>() / passes_ms.len() as f64,
                "p50_ms": at(0.5),
                "p90_ms": at(0.9),
            })
        );
    }
    Ok(())
}
