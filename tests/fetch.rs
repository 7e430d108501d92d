//! `fetch-weights` against a loopback HTTP server serving the public checkpoint: a verified
//! download converts to weights that reproduce PyTorch; a wrong checksum, a missing file or a
//! cut-off body fail clearly and leave nothing at the output path.

mod common;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;

use resnet_serve::model::fetch::{fetch_weights, FetchError, FetchOptions, DEFAULT_SHA256};
use resnet_serve::model::weights::{IMAGENET_MEAN, IMAGENET_STD};
use resnet_serve::model::Checkpoint;

/// Serves `checkpoint` at `/resnet56-4bfd9763.th`, half of it (with the full Content-Length) at
/// `/cut.th`, and 404 elsewhere, from a thread; returns the base URL.
fn serve(checkpoint: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("");
            let (status, body): (&str, &[u8]) = match path {
                "/resnet56-4bfd9763.th" => ("200 OK", &checkpoint),
                "/cut.th" => ("200 OK", &checkpoint[..checkpoint.len() / 2]),
                _ => ("404 Not Found", b"not found"),
            };
            let length = if path == "/cut.th" {
                checkpoint.len()
            } else {
                body.len()
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(body);
        }
    });
    base
}

fn fetch_cli(url: &str, sha256: &str, output: &Path) -> (bool, String) {
    let out = std::process::Command::new(common::binary())
        .args([
            OsStr::new("fetch-weights"),
            OsStr::new("--url"),
            OsStr::new(url),
            OsStr::new("--sha256"),
            OsStr::new(sha256),
            OsStr::new("--output"),
            output.as_os_str(),
        ])
        .env("NO_PROXY", "127.0.0.1")
        .env_remove("RESNET_WEIGHTS_URL")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Files left in `dir` (temporary downloads must not linger).
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn verified_download_converts_to_weights_matching_pytorch() {
    let Some(th) = common::shared_file("models/resnet56-4bfd9763.th") else {
        return;
    };
    let base = serve(std::fs::read(th).unwrap());
    let url = format!("{base}/resnet56-4bfd9763.th");
    let dir = tempfile::tempdir().unwrap();
    let weights_dir = dir.path().join("fresh/weights");
    let output = weights_dir.join("resnet56.safetensors");
    let (ok, stderr) = fetch_cli(&url, DEFAULT_SHA256, &output);
    assert!(ok, "{stderr}");
    assert_eq!(entries(&weights_dir), vec!["resnet56.safetensors"]);

    let ckpt = Checkpoint::load(&output).unwrap();
    assert_eq!(ckpt.metadata.mean, IMAGENET_MEAN);
    assert_eq!(ckpt.metadata.std, IMAGENET_STD);
    assert_eq!(ckpt.metadata.name, "resnet56");
    assert_eq!(ckpt.metadata.source.as_deref(), Some(url.as_str()));
    // What a download converts to is what the binary has built in.
    common::assert_bitwise_equal(
        "fetch-weights vs embedded",
        &common::tensors_of(&std::fs::read(&output).unwrap()),
        &common::embedded_tensors(),
    );

    let Some(report) = common::eval_report(&output, "paper_logits", "candle") else {
        return;
    };
    common::assert_pretrained_parity(&report);
}

#[test]
fn wrong_checksum_names_both_hashes_and_writes_nothing() {
    let Some(th) = common::shared_file("models/resnet56-4bfd9763.th") else {
        return;
    };
    let base = serve(std::fs::read(th).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("resnet56.safetensors");
    let wrong = "0".repeat(64);
    let (ok, stderr) = fetch_cli(&format!("{base}/resnet56-4bfd9763.th"), &wrong, &output);
    assert!(!ok, "a wrong checksum was accepted");
    assert!(
        stderr.contains("sha256 mismatch")
            && stderr.contains(&wrong)
            && stderr.contains(DEFAULT_SHA256),
        "{stderr}"
    );
    assert!(!output.exists());
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
}

#[test]
fn missing_file_and_cut_off_download_fail_clearly() {
    let Some(th) = common::shared_file("models/resnet56-4bfd9763.th") else {
        return;
    };
    let base = serve(std::fs::read(th).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("resnet56.safetensors");

    let (ok, stderr) = fetch_cli(&format!("{base}/nothing-here.th"), DEFAULT_SHA256, &output);
    assert!(!ok);
    assert!(
        stderr.contains("404") && stderr.contains("nothing-here.th"),
        "{stderr}"
    );

    // The library function behind `fetch-weights` reports the same, as a typed error.
    let err = fetch_weights(&FetchOptions {
        url: format!("{base}/nothing-here.th"),
        sha256: DEFAULT_SHA256.into(),
        output: output.clone(),
    })
    .unwrap_err();
    assert!(
        matches!(err, FetchError::Status { status: 404, .. }),
        "{err}"
    );

    let (ok, stderr) = fetch_cli(&format!("{base}/cut.th"), DEFAULT_SHA256, &output);
    assert!(!ok, "a cut-off download was accepted");
    assert!(stderr.contains("cut.th"), "{stderr}");

    let (ok, stderr) = fetch_cli(&format!("{base}/x.th"), "not-a-hash", &output);
    assert!(!ok && stderr.contains("not-a-hash"), "{stderr}");

    assert!(!output.exists());
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
}
