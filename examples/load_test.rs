//! A closed-loop HTTP load generator for `POST /classify`: N clients, each posting one PNG after
//! another for a fixed time (or until a request count); prints requests/s, latency percentiles
//! and the mean batch size, and with `--soak` the count of each status, requests lost (sent but
//! never answered) and the server's RSS over time. Used by `scripts/load-test.sh` and
//! `scripts/soak.sh`.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    /// Stop after this many requests in all (sooner if `--seconds` passes first).
    #[arg(long)]
    requests: Option<usize>,
    /// Soak report: statuses, lost requests, RSS of `--server-pid`; exit 1 on any 5xx or loss.
    #[arg(long)]
    soak: bool,
    /// The server's process id, whose RSS is sampled (Linux /proc).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Seconds between RSS samples.
    #[arg(long, default_value_t = 5.0)]
    rss_interval: f64,
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
    let budget = AtomicUsize::new(args.requests.unwrap_or(usize::MAX));
    let finished = AtomicBool::new(false);
    let mut rss_samples: Vec<(f64, u64)> = Vec::new();
    let results: Vec<Outcomes> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..args.concurrency)
            .map(|_| {
                let (http, url, image, budget) = (http.clone(), &url, &image, &budget);
                scope.spawn(move || {
                    let mut outcomes = Outcomes::default();
                    while Instant::now() < stop_at
                        && budget
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                            .is_ok()
                    {
                        let t = Instant::now();
                        let answer = http
                            .post(url)
                            .header("content-type", "image/png")
                            .body(image.clone())
                            .send()
                            .and_then(|r| {
                                let status = r.status().as_u16();
                                r.bytes().map(|_| status)
                            });
                        match answer {
                            Ok(status) => {
                                *outcomes.statuses.entry(status).or_default() += 1;
                                if status == 200 {
                                    outcomes.latencies.push(t.elapsed().as_secs_f64() * 1e3);
                                } else {
                                    outcomes.errors += 1;
                                }
                            }
                            Err(e) => {
                                outcomes.errors += 1;
                                if e.is_connect() {
                                    outcomes.unsent += 1;
                                } else {
                                    outcomes.lost += 1;
                                }
                            }
                        }
                    }
                    outcomes
                })
            })
            .collect();
        if let Some(pid) = args.server_pid {
            let interval = Duration::from_secs_f64(args.rss_interval.max(0.1));
            let (samples, finished) = (&mut rss_samples, &finished);
            scope.spawn(move || {
                let mut next_sample = Instant::now();
                while !finished.load(Ordering::Acquire) {
                    if Instant::now() >= next_sample {
                        if let Some(kib) = proc_status_kib(pid, "VmRSS") {
                            samples.push((started.elapsed().as_secs_f64(), kib));
                        }
                        next_sample += interval;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
        let results = workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .collect();
        finished.store(true, Ordering::Release);
        results
    });
    let elapsed = started.elapsed().as_secs_f64();
    let errors: usize = results.iter().map(|r| r.errors).sum();
    let lost: usize = results.iter().map(|r| r.lost).sum();
    let unsent: usize = results.iter().map(|r| r.unsent).sum();
    let mut statuses = BTreeMap::<u16, usize>::new();
    for r in &results {
        for (status, n) in &r.statuses {
            *statuses.entry(*status).or_default() += n;
        }
    }
    let mut latencies: Vec<f64> = results.into_iter().flat_map(|r| r.latencies).collect();
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
    if !args.soak {
        return Ok(());
    }
    let server_errors: usize = statuses
        .iter()
        .filter(|(s, _)| **s >= 500)
        .map(|(_, n)| n)
        .sum();
    println!("statuses {statuses:?}; lost (sent, never answered) {lost}; not connected {unsent}");
    if let Some(pid) = args.server_pid {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let first = rss_samples.first().map_or(0, |s| s.1);
        let last = rss_samples.last().map_or(0, |s| s.1);
        let peak = rss_samples.iter().map(|s| s.1).max().unwrap_or(0);
        let hwm = proc_status_kib(pid, "VmHWM").unwrap_or(0);
        println!(
            "server RSS over {} samples: first {:.1} MiB, last {:.1} MiB, peak sampled {:.1} MiB, VmHWM {:.1} MiB",
            rss_samples.len(),
            mib(first),
            mib(last),
            mib(peak),
            mib(hwm)
        );
        let trace: Vec<String> = rss_samples
            .iter()
            .map(|(t, kib)| format!("{t:.0}s:{:.1}", mib(*kib)))
            .collect();
        println!("RSS MiB by time: {}", trace.join(" "));
    }
    anyhow::ensure!(
        server_errors == 0 && lost == 0 && unsent == 0,
        "soak failed: {server_errors} 5xx, {lost} lost, {unsent} not connected"
    );
    Ok(())
}

/// What one client saw.
#[derive(Debug, Default)]
struct Outcomes {
    /// Latencies of the 200s, ms.
    latencies: Vec<f64>,
    statuses: BTreeMap<u16, usize>,
    /// Anything but a 200.
    errors: usize,
    /// Sent (connected) but no complete answer.
    lost: usize,
    /// Never connected.
    unsent: usize,
}

/// A `/proc/PID/status` field in KiB (e.g. `VmRSS`), where the system has one.
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
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
