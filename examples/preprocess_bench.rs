//! What the server spends on an upload before the model sees it, per image: the admission's
//! header read (`declared_pixels`) then decoding and torchvision's preprocessing
//! (`preprocess`), timed over many repetitions on one thread. One JSON line per image.
//!
//!   cargo run --release --example preprocess_bench -- IMAGE... [--iterations N]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use resnet_serve::model::weights::{NOTEBOOK_MEAN, NOTEBOOK_STD};

#[derive(Debug, Parser)]
struct Args {
    /// Images to time, one after another.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Repetitions per image; the median of five rounds is reported.
    #[arg(long, default_value_t = 5000)]
    iterations: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for path in &args.images {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mut rounds = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            for _ in 0..args.iterations {
                let declared = resnet_serve::infer::declared_pixels(&bytes);
                let floats = resnet_serve::preprocess::preprocess(
                    &bytes,
                    &NOTEBOOK_MEAN,
                    &NOTEBOOK_STD,
                    u64::MAX,
                )?;
                std::hint::black_box((declared, floats));
            }
            rounds.push(started.elapsed().as_secs_f64() * 1e6 / f64::from(args.iterations));
        }
        rounds.sort_by(f64::total_cmp);
        println!(
            "{}",
            serde_json::json!({
                "image": path.display().to_string(),
                "bytes": bytes.len(),
                "microseconds_per_image": rounds[2],
                "fastest": rounds[0],
                "slowest": rounds[4],
            })
        );
    }
    Ok(())
}
