//! The `resnet-serve` binary as deployed: `serve` on an ephemeral port with JSON logs, graceful
//! exit 0 on SIGTERM, and the first-run weights rules (`--offline`, explicit `--weights`).

mod common;
mod http_util;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use http_util::{client, solid_png};
use serde_json::Value;

/// The binary with no `RESNET_*` variables from the environment leaking in.
fn resnet_serve() -> Command {
    let mut command = Command::new(common::binary());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RESNET_") {
            command.env_remove(key);
        }
    }
    command.env("RUST_LOG", "info");
    command
}

#[cfg(unix)]
#[test]
fn serve_logs_json_answers_and_exits_0_on_sigterm() {
    let Some(weights) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let mut child = resnet_serve()
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-format",
            "json",
            "--weights",
        ])
        .arg(&weights)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let _ = lines_tx.send(line);
        }
    });
    let mut logs = Vec::new();
    let address = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server logs its address");
        let entry: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        logs.push(entry.clone());
        if entry["fields"]["message"] == "listening" {
            break entry["fields"]["address"].as_str().unwrap().to_owned();
        }
    };
    let base = format!("http://{address}");
    let http = client();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while http
        .get(format!("{base}/health/ready"))
        .send()
        .map_or(true, |r| r.status() != 200)
    {
        assert!(std::time::Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = http
        .post(format!("{base}/classify"))
        .header("content-type", "image/png")
        .header("x-request-id", "req-42")
        .body(solid_png([200, 30, 30]))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(status.success(), "exit status {status}");
    logs.extend(lines_rx.try_iter().map(|line| {
        serde_json::from_str::<Value>(&line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
    }));
    let messages: Vec<&str> = logs
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect();
    for expected in ["model loaded", "SIGTERM received", "stopped"] {
        assert!(
            messages.contains(&expected),
            "no {expected:?} in {messages:?}"
        );
    }
    assert!(
        logs.iter().any(|l| l["span"]["request_id"] == "req-42"),
        "the request id is in the request's log lines"
    );
}

#[test]
fn offline_without_weights_fails_saying_how_to_get_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = resnet_serve()
        .current_dir(dir.path())
        .args(["serve", "--offline", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("weights/resnet56.safetensors"), "{stderr}");
    assert!(stderr.contains("--offline"), "{stderr}");
    assert!(stderr.contains("resnet-serve fetch-weights"), "{stderr}");
    assert!(!dir.path().join("weights").exists());

    // The same through the environment, and with no subcommand.
    let out = resnet_serve()
        .current_dir(dir.path())
        .env("RESNET_OFFLINE", "1")
        .args(["--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("resnet-serve fetch-weights"));
}

#[test]
fn an_explicit_missing_weights_file_is_an_error_not_a_download() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    for explicit in [
        resnet_serve()
            .current_dir(dir.path())
            .arg("serve")
            .arg("--weights")
            .arg(&missing)
            .output()
            .unwrap(),
        resnet_serve()
            .current_dir(dir.path())
            .env("RESNET_WEIGHTS", &missing)
            .output()
            .unwrap(),
        // The default path given explicitly is explicit too.
        resnet_serve()
            .current_dir(dir.path())
            .args(["serve", "--weights", "weights/resnet56.safetensors"])
            .output()
            .unwrap(),
    ] {
        assert!(!explicit.status.success());
        let stderr = String::from_utf8_lossy(&explicit.stderr);
        assert!(stderr.contains("cannot read weights file"), "{stderr}");
        assert!(!stderr.contains("download"), "{stderr}");
    }
}
