//! A closed-loop HTTP load generator for `POST /classify`: N clients, each posting one PNG after
//! another for a fixed time; prints requests/s, latency percentiles and the mean batch size.
//! Used by `scripts/load-test.sh`.

use std::io::Cursor;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Image to post (default: a generated 32x32 PNG).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Only wait until /health/ready answers 200 (at most this many seconds), then exit.
    #[arg(long)]
    wait_ready: Option<f64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    if let Some(limit) = args.wait_ready {
        let deadline = Instant::now() + Duration::from_secs_f64(limit);
        let ready_url = format!("{}/health/ready", args.url);
        while http
            .get(&ready_url)
            .send()
            .map_or(true, |r| r.status() != 200)
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{ready_url} not ready after {limit} s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        return Ok(());
    }
    let image = match &args.image {
        Some(path) => std::fs::read(path)?,
        None => {
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                image::Rgb([x as u8 * 8, y as u8 * 8, 128])
            });
            let mut out = Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png)?;
            out.into_inner()
        }
    };
    let (batches_before, images_before) = batch_totals(&http, &args.url)?;
    let url = format!("{}/classify", args.url);
    let started = Instant::now();
    let stop_at = started + Duration::from_secs_f64(args.seconds);
    let results: Vec<(Vec<f64>, usize)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..args.concurrency)
            .map(|_| {
                let (http, url, image) = (http.clone(), &url, &image);
                scope.spawn(move || {
                    let (mut latencies, mut errors) = (Vec::new(), 0);
                    while Instant::now() < stop_at {
                        let t = Instant::now();
                        let ok = http
                            .post(url)
                            .header("content-type", "image/png")
                            .body(image.clone())
                            .send()
                            .is_ok_and(|r| r.status() == 200 && r.bytes().is_ok());
                        if ok {
                            latencies.push(t.elapsed().as_secs_f64() * 1e3);
                        } else {
                            errors += 1;
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let errors: usize = results.iter().map(|r| r.1).sum();
    let mut latencies: Vec<f64> = results.into_iter().flat_map(|r| r.0).collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let (batches_after, images_after) = batch_totals(&http, &args.url)?;
    let batches = batches_after - batches_before;
    println!(
        "concurrency {:>3}: {:>6} ok, {errors} errors in {elapsed:.1} s: {:>8.1} req/s, p50 {:>7.1} ms, p99 {:>7.1} ms, mean batch {:.1}",
        args.concurrency,
        latencies.len(),
        latencies.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        if batches > 0.0 { (images_after - images_before) / batches } else { f64::NAN },
    );
    Ok(())
}

/// `resnet_batch_size` count and sum from /metrics.
fn batch_totals(http: &reqwest::blocking::Client, url: &str) -> anyhow::Result<(f64, f64)> {
    let text = http.get(format!("{url}/metrics")).send()?.text()?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    Ok((
        value("resnet_batch_size_count"),
        value("resnet_batch_size_sum"),
    ))
}
