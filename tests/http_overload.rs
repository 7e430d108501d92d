//! Overload: a burst far beyond a small queue is answered with 200 or 429 (with `Retry-After`)
//! only, and every request gets an answer.

mod common;
mod http_util;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_util::{client, fake_info, solid_png, FakeModel, Gate, TestServer};
use resnet_serve::server::ServerConfig;

const REQUESTS: usize = 300;
const CLIENTS: usize = 64;

#[test]
fn a_burst_beyond_the_queue_gets_only_200_or_429_with_retry_after_and_every_request_an_answer() {
    let model = FakeModel::new(Gate::closed());
    model.gate.allow(1); // the warm-up pass
    let server = TestServer::start(
        model.clone(),
        fake_info(model.classes),
        ServerConfig {
            queue_capacity: 4,
            max_batch_size: 4,
            max_images_per_request: 4,
            ..ServerConfig::default()
        },
    );
    server.wait_ready();

    // A slow model: one forward pass every 5 ms.
    let done = AtomicBool::new(false);
    let next = AtomicUsize::new(0);
    let png = solid_png([90, 10, 200]);
    let started = Instant::now();
    let outcomes: Vec<Result<(u16, Option<String>), String>> = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(Ordering::Acquire) {
                model.gate.allow(1);
                std::thread::sleep(Duration::from_millis(5));
            }
            model.gate.open_all();
        });
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                scope.spawn(|| {
                    let http = client();
                    let mut outcomes = Vec::new();
                    while next.fetch_add(1, Ordering::AcqRel) < REQUESTS {
                        let outcome = http
                            .post(server.url("/classify"))
                            .header("content-type", "image/png")
                            .body(png.clone())
                            .send()
                            .and_then(|r| {
                                let status = r.status().as_u16();
                                let retry_after = r
                                    .headers()
                                    .get("retry-after")
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_owned);
                                r.bytes().map(|_| (status, retry_after))
                            })
                            .map_err(|e| e.to_string());
                        outcomes.push(outcome);
                    }
                    outcomes
                })
            })
            .collect();
        let outcomes = clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect();
        done.store(true, Ordering::Release);
        outcomes
    });
    let elapsed = started.elapsed();

    assert_eq!(outcomes.len(), REQUESTS);
    let mut statuses = BTreeMap::<u16, usize>::new();
    for outcome in &outcomes {
        let (status, retry_after) = outcome
            .as_ref()
            .unwrap_or_else(|e| panic!("a request got no answer: {e}"));
        *statuses.entry(*status).or_default() += 1;
        match status {
            200 => {}
            429 => {
                let seconds: u64 = retry_after
                    .as_deref()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("429 with Retry-After {retry_after:?}"));
                assert!(seconds >= 1, "Retry-After {seconds}");
            }
            other => panic!("status {other} under overload"),
        }
    }
    eprintln!("{REQUESTS} requests from {CLIENTS} clients in {elapsed:?}: {statuses:?}");
    assert!(statuses.get(&200).is_some_and(|&n| n > 0), "{statuses:?}");
    assert!(statuses.get(&429).is_some_and(|&n| n > 0), "{statuses:?}");
    server.stop().unwrap();
}
