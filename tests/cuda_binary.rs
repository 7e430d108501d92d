//! `--device` on a machine without a GPU, through the binary.
//!
//! - This build (without the `cuda` feature) refuses `--device cuda` at once, saying it has no
//!   CUDA support and how to run on the CPU.
//! - The CUDA build, whose path is in `RESNET_CUDA_BINARY` (scripts/build-cuda.sh makes it; point
//!   the variable at the wrapper it writes, which sets the library path), refuses `--device cuda`
//!   at once saying that no CUDA driver or device was found and how to run on the CPU; with
//!   `--device auto` it serves on the CPU with the fast engine; and its CPU engines give PyTorch's
//!   logits. Without `RESNET_CUDA_BINARY` these print SKIPPED; with `REQUIRE_CUDA_BINARY=1`
//!   (scripts/test-cuda-build.sh, CI) they fail instead.

mod common;
mod http_util;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a refused `--device cuda` may take: the driver answers in well under a second.
const REFUSAL_LIMIT: Duration = Duration::from_secs(20);

/// The CUDA build to test, or `None` after a loud SKIPPED line (a failure under
/// `REQUIRE_CUDA_BINARY=1`).
fn cuda_binary() -> Option<PathBuf> {
    let required = std::env::var("REQUIRE_CUDA_BINARY").is_ok_and(|v| v == "1");
    match std::env::var_os("RESNET_CUDA_BINARY").map(PathBuf::from) {
        Some(path) => {
            assert!(
                path.is_file(),
                "RESNET_CUDA_BINARY={} is not a file",
                path.display()
            );
            Some(path)
        }
        None => {
            assert!(
                !required,
                "REQUIRE_CUDA_BINARY=1 but RESNET_CUDA_BINARY is not set (scripts/test-cuda-build.sh sets it)"
            );
            eprintln!(
                "SKIPPED: RESNET_CUDA_BINARY is not set (scripts/test-cuda-build.sh builds the CUDA \
                 binary and runs these tests with it); the CUDA build was not tested"
            );
            None
        }
    }
}

/// Whether the NVIDIA kernel driver sees a GPU here, where "no GPU" cannot be checked. (Not
/// /dev/nvidiactl: the driver library creates that node when run as root, GPU or not.)
fn gpu_present() -> bool {
    let present =
        std::fs::read_dir("/proc/driver/nvidia/gpus").is_ok_and(|mut gpus| gpus.next().is_some());
    if present {
        eprintln!(
            "SKIPPED: /proc/driver/nvidia/gpus lists a GPU; the no-GPU behaviour was not tested"
        );
    }
    present
}

/// `binary` with no `RESNET_*` variables from the environment leaking in.
fn command(binary: &Path) -> Command {
    let mut command = common::command_without_resnet_env(binary);
    command.env("RUST_LOG", "info");
    command
}

/// Runs `binary` with `args` in `dir`, with a time limit on how long it may take.
fn run_timed(binary: &Path, dir: &Path, args: &[&OsStr]) -> (Output, Duration) {
    let started = Instant::now();
    let output = command(binary)
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (output, started.elapsed())
}

/// `serve --device cuda` (the built-in weights: the device is checked first) and
/// `bench --device cuda`: both refused at once, with `expected` in the message, no panic, no
/// raw driver error, and the way to run on the CPU.
fn assert_cuda_refused(binary: &Path, expected: &[&str]) {
    let Some(weights) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let serve: [&OsStr; 5] = [
        "serve".as_ref(),
        "--device".as_ref(),
        "cuda".as_ref(),
        "--port".as_ref(),
        "0".as_ref(),
    ];
    let bench: [&OsStr; 8] = [
        "bench".as_ref(),
        "--device".as_ref(),
        "cuda:0".as_ref(),
        "--weights".as_ref(),
        weights.as_os_str(),
        "--batch-sizes".as_ref(),
        "1".as_ref(),
        "--json".as_ref(),
    ];
    for args in [&serve[..], &bench[..]] {
        let (out, took) = run_timed(binary, dir.path(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{args:?}: {} in {took:?}\n{stderr}", out.status);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(took < REFUSAL_LIMIT, "{args:?} took {took:?}");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
        assert!(
            expected.iter().any(|e| stderr.contains(e)),
            "{args:?}: none of {expected:?} in: {stderr}"
        );
        for hint in ["--device cpu", "--device auto"] {
            assert!(stderr.contains(hint), "{args:?}: no {hint:?} in: {stderr}");
        }
        for raw in ["panicked", "DriverError(", "RUST_BACKTRACE"] {
            assert!(!stderr.contains(raw), "{args:?}: {raw:?} in: {stderr}");
        }
    }
    // Nothing was downloaded or written in place of the missing default weights.
    assert!(!dir.path().join("weights").exists());
}

#[cfg(not(feature = "cuda"))]
#[test]
fn this_build_refuses_cuda_saying_it_was_built_without_it() {
    assert_cuda_refused(&common::binary(), &["built without CUDA support"]);
}

#[test]
fn cuda_build_without_a_gpu_refuses_cuda_saying_what_is_missing() {
    let Some(binary) = cuda_binary() else {
        return;
    };
    if gpu_present() {
        return;
    }
    assert_cuda_refused(
        &binary,
        &[
            "no CUDA device found",
            "no CUDA driver found",
            "no usable CUDA driver",
        ],
    );
}

/// `eval --device cpu` of the CUDA build on `weights` against `reference_key`.
fn eval_cuda_build(binary: &Path, weights: &Path, reference_key: &str, engine: &str) -> Value {
    let (data, reference) = (
        common::shared_file("data/cifar10-test-846.safetensors").unwrap(),
        common::shared_file("reference/logits.safetensors").unwrap(),
    );
    let out = command(binary)
        .arg("eval")
        .arg("--weights")
        .arg(weights)
        .arg("--data")
        .arg(data)
        .arg("--reference")
        .arg(reference)
        .args([
            "--reference-key",
            reference_key,
            "--json",
            "--device",
            "cpu",
        ])
        .args(["--engine", engine])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "eval failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{report}");
    assert_eq!(report["device"], "cpu", "{report}");
    assert_eq!(report["images"], 846, "{report}");
    assert_eq!(report["top1_agreement"].as_f64(), Some(1.0), "{report}");
    let diff = report["max_abs_logit_diff"].as_f64().unwrap();
    assert!(diff <= 1e-3, "{report}");
    report
}

/// The CUDA build's CPU engines (fast, and candle: the reference) on both shared models.
#[test]
fn cuda_build_cpu_engines_match_pytorch() {
    let Some(binary) = cuda_binary() else {
        return;
    };
    let (Some(seed), Some(th)) = (
        common::shared_file("models/resnet56-seed-random.safetensors"),
        common::shared_file("models/resnet56-4bfd9763.th"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pretrained = dir.path().join("pretrained.safetensors");
    let out = command(&binary)
        .arg("convert")
        .arg(&th)
        .arg(&pretrained)
        .args(["--preset", "imagenet"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for engine in ["fast", "candle"] {
        let report = eval_cuda_build(&binary, &seed, "seed_random_logits", engine);
        assert!(report["engine"].as_str().unwrap().starts_with(engine));
        let report = eval_cuda_build(&binary, &pretrained, "paper_logits", engine);
        common::assert_pretrained_parity(&report);
    }
}

/// `--device auto` without a GPU: a warning that CUDA is unusable, then the fast engine on the
/// CPU, answering HTTP with the reference logits; exit 0 on SIGTERM.
#[cfg(unix)]
#[test]
fn cuda_build_without_a_gpu_serves_on_the_cpu_under_device_auto() {
    let Some(binary) = cuda_binary() else {
        return;
    };
    if gpu_present() {
        return;
    }
    let (Some(weights), Some(images), Some(reference)) = (
        common::shared_file("models/resnet56-seed-random.safetensors"),
        common::shared_file("data/images"),
        common::shared_file("reference/logits.safetensors"),
    ) else {
        return;
    };
    let reference =
        resnet_serve::cli::eval::load_reference(&reference, "seed_random_logits").unwrap();
    let mut child = command(&binary)
        .args([
            "serve",
            "--device",
            "auto",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .args(["--log-format", "json", "--weights"])
        .arg(&weights)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut logs: Vec<Value> = Vec::new();
    let address = loop {
        let Ok(line) = lines_rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            panic!("the server never logged its address; logs: {logs:?}");
        };
        let entry: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        logs.push(entry.clone());
        if entry["fields"]["message"] == "listening" {
            break entry["fields"]["address"].as_str().unwrap().to_owned();
        }
    };
    let fallback = logs
        .iter()
        .find(|l| {
            l["level"] == "WARN"
                && l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("CUDA is compiled in but unusable"))
        })
        .unwrap_or_else(|| {
            panic!("no warning that CUDA is unusable (is this the CUDA build?): {logs:?}")
        });
    let reason = fallback["fields"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("no CUDA"), "{fallback}");
    assert!(!reason.contains("DriverError("), "{fallback}");

    let base = format!("http://{address}");
    let http = http_util::client();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http
        .get(format!("{base}/health/ready"))
        .send()
        .map_or(true, |r| r.status() != 200)
    {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let info: Value = http
        .get(format!("{base}/v1/model"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(info["device"], "cpu", "{info}");
    assert!(
        info["engine"]
            .as_str()
            .is_some_and(|e| e.starts_with("fast-")),
        "{info}"
    );
    // The first shared test images (`INDEX-LABEL.png`) against PyTorch's logits for that index.
    let mut files: Vec<PathBuf> = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for file in files.iter().take(5) {
        let stem = file.file_stem().unwrap().to_string_lossy();
        let index: usize = stem.split('-').next().unwrap().parse().unwrap();
        let r = http
            .post(format!("{base}/classify?logits=true"))
            .header("content-type", "image/png")
            .body(std::fs::read(file).unwrap())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().unwrap();
        let logits: Vec<f32> = body["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let expected = &reference[index * logits.len()..(index + 1) * logits.len()];
        for (a, b) in logits.iter().zip(expected) {
            assert!((a - b).abs() <= 1e-3, "{stem}: {logits:?} vs {expected:?}");
        }
    }

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    reader.join().unwrap();
    assert!(status.success(), "exit status {status}");
}
