//! Test helpers shared by the integration tests: where the shared reference data lives.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A safetensors file's tensors: name -> (dtype, shape, raw little-endian bytes).
pub type Tensors = BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>;

/// The tensors of a safetensors file held in memory.
pub fn tensors_of(bytes: &[u8]) -> Tensors {
    let st = safetensors::SafeTensors::deserialize(bytes).expect("a valid safetensors file");
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

/// Asserts two tensor sets are bitwise identical: same names, dtypes, shapes and bytes.
pub fn assert_bitwise_equal(what: &str, a: &Tensors, b: &Tensors) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: different tensor names"
    );
    for (name, (dtype, shape, data)) in a {
        let (other_dtype, other_shape, other_data) = &b[name];
        assert_eq!((dtype, shape), (other_dtype, other_shape), "{what}: {name}");
        assert!(data == other_data, "{what}: {name} differs");
    }
}

/// The tensors of the weights compiled into the binary (the `embedded-weights` feature).
pub fn embedded_tensors() -> Tensors {
    tensors_of(resnet_serve::model::embedded::bytes().expect("built with embedded-weights"))
}

/// The shared reference data directory (`RESNET_SHARED_DIR`, default `../shared`), or `None`
/// after a loud SKIPPED line when it is absent. With `REQUIRE_SHARED_DATA=1` absence fails the test.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("RESNET_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    if dir.join("README.md").is_file() {
        return Some(dir);
    }
    let required = std::env::var("REQUIRE_SHARED_DATA").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "REQUIRE_SHARED_DATA=1 but the shared data directory {} is missing (set RESNET_SHARED_DIR)",
        dir.display()
    );
    eprintln!(
        "SKIPPED: shared data directory {} not found (set RESNET_SHARED_DIR); this test did not run",
        dir.display()
    );
    None
}

/// A file under the shared directory, or `None` (skipping loudly) when the directory is absent.
pub fn shared_file(relative: &str) -> Option<PathBuf> {
    let path = shared_dir()?.join(relative);
    assert!(
        path.exists(),
        "shared data file {} is missing",
        path.display()
    );
    Some(path)
}

/// Whether the kernels of SIMD level `name` can be tested on this CPU (`supported`). When not,
/// says so loudly; under `REQUIRE_SHARED_DATA=1` that fails the test unless `ALLOW_MISSING_SIMD`
/// (comma-separated level names, e.g. `avx512`) accepts the gap for this machine.
pub fn simd_testable(name: &str, supported: bool) -> bool {
    if supported {
        return true;
    }
    let allowed = std::env::var("ALLOW_MISSING_SIMD")
        .unwrap_or_default()
        .split(',')
        .any(|level| level.trim() == name);
    let required = std::env::var("REQUIRE_SHARED_DATA").is_ok_and(|v| v == "1");
    assert!(
        allowed || !required,
        "this CPU lacks {name}, so its kernels cannot be tested here; with REQUIRE_SHARED_DATA=1 \
         set ALLOW_MISSING_SIMD={name} to accept that on this machine"
    );
    eprintln!(
        "SKIPPED: this CPU does not support {name}; its kernels were not tested{}",
        if allowed {
            " (accepted by ALLOW_MISSING_SIMD)"
        } else {
            ""
        }
    );
    false
}

/// The `resnet-serve` binary built for this test run.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_resnet-serve"))
}

/// `binary` with no `RESNET_*` variables from the test's environment leaking into its settings,
/// and the gRPC port off: its fixed default would collide between servers the tests run at once
/// (a test that wants gRPC passes `--grpc-port` with a free port).
pub fn command_without_resnet_env(binary: &Path) -> std::process::Command {
    let mut command = std::process::Command::new(binary);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("RESNET_") {
            command.env_remove(key);
        }
    }
    command.env("RESNET_GRPC_PORT", "0");
    command
}

/// Runs the binary with `args`, returning (exit success, stdout, stderr).
pub fn run_cli(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = std::process::Command::new(binary())
        .args(args)
        .env_remove("RESNET_WEIGHTS")
        .output()
        .expect("the resnet-serve binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `eval --json` of `weights` on the 846 shared CIFAR-10 images against the reference logits
/// `reference_key`, with `engine` on the CPU; `None` (skipping loudly) without the shared data.
pub fn eval_report(weights: &Path, reference_key: &str, engine: &str) -> Option<serde_json::Value> {
    use std::ffi::OsStr;
    let data = shared_file("data/cifar10-test-846.safetensors")?;
    let reference = shared_file("reference/logits.safetensors")?;
    let (ok, stdout, stderr) = run_cli(&[
        OsStr::new("eval"),
        OsStr::new("--weights"),
        weights.as_os_str(),
        OsStr::new("--data"),
        data.as_os_str(),
        OsStr::new("--reference"),
        reference.as_os_str(),
        OsStr::new("--reference-key"),
        OsStr::new(reference_key),
        OsStr::new("--json"),
        OsStr::new("--engine"),
        OsStr::new(engine),
        OsStr::new("--device"),
        OsStr::new("cpu"),
    ]);
    assert!(ok, "eval failed: {stderr}");
    Some(serde_json::from_str(stdout.trim()).expect("eval --json prints one JSON object"))
}

/// The pretrained checkpoint against PyTorch: all 846 images, accuracy >= 0.932 (PyTorch:
/// 0.9326), the same top-1 class everywhere, logits within 1e-3.
pub fn assert_pretrained_parity(report: &serde_json::Value) {
    assert_eq!(report["images"], 846, "{report}");
    assert!(report["accuracy"].as_f64().unwrap() >= 0.932, "{report}");
    assert_eq!(report["top1_agreement"].as_f64().unwrap(), 1.0, "{report}");
    assert!(
        report["max_abs_logit_diff"].as_f64().unwrap() <= 1e-3,
        "{report}"
    );
}

/// A `serve` a test started with JSON logs on an ephemeral port: the child, its base URL and
/// every JSON log line so far. Killed when dropped.
pub struct JsonLogServer {
    pub child: std::process::Child,
    pub base: String,
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl JsonLogServer {
    /// `serve --host 127.0.0.1 --port 0 --log-format json` of the binary under test, without the
    /// caller's `RESNET_*` variables: what [`Self::spawn`] expects; add flags and env to it.
    pub fn command() -> std::process::Command {
        let mut command = command_without_resnet_env(&binary());
        command.args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-format",
            "json",
        ]);
        command
    }

    /// Spawns `command` (made by [`Self::command`]), keeps draining its stderr
    /// (so the server never blocks on a full pipe) and collecting the JSON lines, then waits for
    /// the address it logs as `listening` and for `/health/ready` to answer 200, 60 s each.
    pub fn spawn(mut command: std::process::Command) -> Self {
        use std::io::{BufRead, BufReader};
        use std::time::{Duration, Instant};

        let mut child = command
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (address_tx, address_rx) = std::sync::mpsc::channel::<String>();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if entry["fields"]["message"] == "listening" {
                    if let Some(address) = entry["fields"]["address"].as_str() {
                        let _ = address_tx.send(address.to_owned());
                    }
                }
                sink.lock().unwrap().push(entry);
            }
        });
        let address = address_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server logs its address");
        let server = Self {
            child,
            base: format!("http://{address}"),
            logs,
        };
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while http
            .get(server.url("/health/ready"))
            .send()
            .map_or(true, |r| r.status() != 200)
        {
            assert!(Instant::now() < deadline, "never ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The JSON log lines written so far.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.logs.lock().unwrap().clone()
    }
}

impl Drop for JsonLogServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
