//! Slow and stuck clients: stalled connections neither delay other clients nor stay open past
//! the header timeout, a stalled body ends at the request deadline, and the connection cap
//! holds further clients back until a slot frees.

mod common;
mod http_util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use http_util::{client, fake_info, solid_png, FakeModel, Gate, TestServer};
use resnet_serve::connections::ConnectionLimits;
use resnet_serve::server::ServerConfig;

const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

fn start(limits: ConnectionLimits, request_timeout: Duration) -> TestServer {
    let model = FakeModel::new(Gate::open());
    let server = TestServer::start_with_limits(
        model.clone(),
        fake_info(model.classes),
        ServerConfig {
            request_timeout,
            ..ServerConfig::default()
        },
        limits,
    );
    server.wait_ready();
    server
}

/// One normal `POST /classify`, with its latency.
fn classify(server: &TestServer, http: &reqwest::blocking::Client) -> (u16, Duration) {
    let started = Instant::now();
    let response = http
        .post(server.url("/classify"))
        .header("content-type", "image/png")
        .body(solid_png([10, 200, 30]))
        .send()
        .unwrap();
    let status = response.status().as_u16();
    response.bytes().unwrap();
    (status, started.elapsed())
}

/// Reads until the server closes the connection (EOF or reset); what it sent, or `None` when it
/// is still open at `limit`.
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return Some(received),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(_) => return Some(received),
        }
    }
}

#[test]
fn two_hundred_stalled_clients_do_not_delay_others_and_are_closed_after_the_header_timeout() {
    let server = start(
        ConnectionLimits {
            header_read_timeout: HEADER_TIMEOUT,
            ..ConnectionLimits::default()
        },
        Duration::from_secs(30),
    );
    let http = client();
    let (status, baseline) = classify(&server, &http);
    assert_eq!(status, 200);

    let opened = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..200)
        .map(|i| {
            let mut stream = TcpStream::connect(server.addr).unwrap();
            // Half a request line, half a header block, or nothing at all.
            let partial: &[u8] = match i % 3 {
                0 => b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Le",
                1 => b"GET /health/li",
                _ => b"",
            };
            stream.write_all(partial).unwrap();
            stream
        })
        .collect();

    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let (status, latency) = classify(&server, &http);
        assert_eq!(status, 200);
        worst = worst.max(latency);
    }
    // A fresh connection too, not only the client's kept-alive one.
    let (status, fresh) = classify(&server, &client());
    assert_eq!(status, 200);
    worst = worst.max(fresh);
    eprintln!(
        "baseline {baseline:?}; worst of 11 requests while 200 clients stall: {worst:?}; \
         stalled opened in {:?}",
        opened.elapsed()
    );
    assert!(
        worst < Duration::from_secs(1),
        "stalled clients delayed a normal request to {worst:?}"
    );

    // Each stalled connection is closed by the server within the header timeout (plus slack for
    // a loaded machine), counted from when it was opened.
    let limit = HEADER_TIMEOUT + Duration::from_secs(3);
    for (i, stream) in stalled.iter_mut().enumerate() {
        let left = (opened + limit).saturating_duration_since(Instant::now());
        let received = read_until_closed(stream, left.max(Duration::from_millis(100)))
            .unwrap_or_else(|| panic!("stalled connection {i} still open after {limit:?}"));
        let text = String::from_utf8_lossy(&received);
        assert!(
            received.is_empty() || text.starts_with("HTTP/1.1 408"),
            "connection {i}: {text}"
        );
    }
    eprintln!(
        "all 200 stalled connections closed after {:?}",
        opened.elapsed()
    );
    server.stop().unwrap();
}

#[test]
fn a_stalled_body_ends_with_504_at_the_request_deadline() {
    let request_timeout = Duration::from_secs(1);
    let server = start(ConnectionLimits::default(), request_timeout);
    let mut stream = TcpStream::connect(server.addr).unwrap();
    let started = Instant::now();
    stream
        .write_all(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\
              Content-Length: 100000\r\n\r\n\x89PNG",
        )
        .unwrap();
    let received = read_until_closed(&mut stream, Duration::from_secs(10))
        .expect("the server answers and closes a stalled upload");
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 504"), "{text}");
    assert!(
        elapsed >= request_timeout && elapsed < request_timeout + Duration::from_secs(3),
        "answered after {elapsed:?}"
    );
    server.stop().unwrap();
}

#[test]
fn the_connection_cap_holds_clients_back_until_a_slot_frees() {
    let server = start(
        ConnectionLimits {
            max_connections: 4,
            header_read_timeout: HEADER_TIMEOUT,
            ..ConnectionLimits::default()
        },
        Duration::from_secs(30),
    );
    let idle: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    // Let the server accept all four before the fifth client comes.
    std::thread::sleep(Duration::from_millis(300));
    let held_since = Instant::now();
    let (status, latency) = classify(&server, &client());
    assert_eq!(status, 200);
    // Served only once the header timeout closed an idle connection.
    assert!(
        latency >= HEADER_TIMEOUT - Duration::from_millis(500),
        "a fifth connection was served at once ({latency:?}) with the cap at 4"
    );
    assert!(held_since.elapsed() < HEADER_TIMEOUT + Duration::from_secs(5));
    drop(idle);
    server.stop().unwrap();
}
