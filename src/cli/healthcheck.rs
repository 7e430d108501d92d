//! `healthcheck`: exit 0 when a local server answers `GET /health/live` with 200, so the
//! container image's HEALTHCHECK needs no curl. Plain HTTP/1.1 over a socket, bounded in time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cli::args::HealthcheckArgs;

/// The most of the answer read: the status line is all that matters.
const MAX_RESPONSE_BYTES: u64 = 4096;

pub fn run(args: &HealthcheckArgs) -> Result<()> {
    let address = SocketAddr::new(args.host, args.port);
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let status = live_status(address, timeout)
        .with_context(|| format!("health check of http://{address}/health/live"))?;
    if status != 200 {
        bail!("http://{address}/health/live answered {status}");
    }
    Ok(())
}

/// The status code `GET /health/live` gets from `address`, each step bounded by `timeout`.
fn live_status(address: SocketAddr, timeout: Duration) -> Result<u16> {
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /health/live HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.take(MAX_RESPONSE_BYTES).read_to_end(&mut response)?;
    parse_status(&response).context("not an HTTP response")
}

/// The status code of an HTTP/1.x status line (`HTTP/1.1 200 OK`).
fn parse_status(response: &[u8]) -> Option<u16> {
    let line = response.split(|&b| b == b'\r' || b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::parse_status;

    #[test]
    fn status_lines_parse() {
        assert_eq!(
            parse_status(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"),
            Some(200)
        );
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }
}
