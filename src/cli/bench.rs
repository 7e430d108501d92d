//! `bench`: forward-pass throughput on preprocessed tensors, the measure of `ort_bench.py`.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::cli::args::BenchArgs;
use crate::model::{Engine, LoadOptions, Model, IMAGE_FLOATS};

/// One line of `bench` output.
#[derive(Debug, Serialize)]
pub struct BenchLine {
    pub engine: String,
    pub device: String,
    pub batch_size: usize,
    pub images_per_second: f64,
    pub ms_per_batch: f64,
    pub batches: usize,
}

/// Standard-normal pseudo-random floats (xorshift + Box-Muller): a fixed, input-like batch.
fn random_input(len: usize) -> Vec<f32> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut uniform = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..len)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// Times the forward pass at `batch_size` for about `seconds` after three warm-up passes.
pub fn measure(model: &mut Model, batch_size: usize, seconds: f64) -> Result<BenchLine> {
    if batch_size == 0 {
        bail!("batch sizes must be >= 1");
    }
    let input = random_input(batch_size * IMAGE_FLOATS);
    let mut checksum = 0.0f32;
    for _ in 0..3 {
        checksum += model.logits(&input, batch_size)?[0];
    }
    let budget = Duration::from_secs_f64(seconds.max(0.0));
    let started = Instant::now();
    let mut batches = 0;
    while batches == 0 || started.elapsed() < budget {
        // Every pass computes from the input afresh; summing a logit keeps the work observable.
        checksum += model.logits(&input, batch_size)?[0];
        batches += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    std::hint::black_box(checksum);
    Ok(BenchLine {
        engine: model.engine_name().to_string(),
        device: crate::model::device_name(model.device()),
        batch_size,
        images_per_second: (batches * batch_size) as f64 / elapsed,
        ms_per_batch: elapsed * 1000.0 / batches as f64,
        batches,
    })
}

/// The `bench` subcommand: one JSON line per batch size.
pub fn run(args: &BenchArgs) -> Result<()> {
    let mut model = Model::load(&LoadOptions::from(&args.model))?;
    for &batch_size in &args.batch_sizes {
        let line = measure(&mut model, batch_size, args.seconds)?;
        println!("{}", serde_json::to_string(&line)?);
    }
    Ok(())
}
