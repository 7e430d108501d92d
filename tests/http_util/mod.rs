//! Support for the HTTP tests: the real server in-process on 127.0.0.1:0, a controllable fake
//! model, the seed-random model, PNG encoding and metric parsing.
#![allow(dead_code)]

use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use resnet_serve::connections::ConnectionLimits;
use resnet_serve::infer::ModelInfo;
use resnet_serve::model::engine::{Engine, EngineError};
use resnet_serve::model::{DeviceChoice, EngineChoice, LoadOptions, Model, SimdChoice};
use resnet_serve::server::{self, ServerConfig, ServerError};

use super::common;

/// The server running on its own runtime thread.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    pub fn start<M: Engine>(model: M, info: ModelInfo, config: ServerConfig) -> Self {
        Self::start_with_limits(model, info, config, ConnectionLimits::default())
    }

    pub fn start_with_limits<M: Engine>(
        model: M,
        info: ModelInfo,
        config: ServerConfig,
        limits: ConnectionLimits,
    ) -> Self {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let shutdown = async {
                    let _ = stop_rx.await;
                };
                server::run_with_limits(
                    server::Listeners {
                        http: listener,
                        grpc: None,
                    },
                    model,
                    info,
                    config,
                    limits,
                    shutdown,
                )
                .await
            })
        });
        let addr = addr_rx.recv().expect("the server binds");
        Self {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Polls `/health/ready` until it answers 200.
    pub fn wait_ready(&self) {
        let client = client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(self.url("/health/ready")).send() {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the server never became ready");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Signals shutdown without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Signals shutdown and waits until the server has drained and returned.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.begin_stop();
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("the server thread does not panic")
    }

    pub fn metrics(&self) -> String {
        client()
            .get(self.url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    /// Polls `/metrics` until `name` (unlabelled) has `value`.
    pub fn wait_metric(&self, name: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.metrics();
            if metric(&text, name) == Some(value) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never reached {value}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Not joined: a failed test may have left the fake model blocked.
        self.begin_stop();
    }
}

/// A blocking client with a timeout, so that no test can hang.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Lets forward passes through one at a time, as the test allows.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<GateState>, Condvar)>);

#[derive(Default)]
struct GateState {
    /// Passes left; `None` = open.
    allowed: Option<usize>,
    waiting: usize,
}

impl Gate {
    pub fn open() -> Self {
        Self::default()
    }

    pub fn closed() -> Self {
        let gate = Self::default();
        gate.0 .0.lock().unwrap().allowed = Some(0);
        gate
    }

    pub fn allow(&self, n: usize) {
        let mut state = self.0 .0.lock().unwrap();
        if let Some(a) = state.allowed.as_mut() {
            *a += n;
        }
        self.0 .1.notify_all();
    }

    pub fn open_all(&self) {
        self.0 .0.lock().unwrap().allowed = None;
        self.0 .1.notify_all();
    }

    /// Forward passes waiting at the gate.
    pub fn waiting(&self) -> usize {
        self.0 .0.lock().unwrap().waiting
    }

    pub fn wait_for_waiting(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.waiting() != n {
            assert!(
                Instant::now() < deadline,
                "never {n} forward passes waiting"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn pass(&self) {
        let (lock, cvar) = &*self.0;
        let mut state = lock.lock().unwrap();
        state.waiting += 1;
        while state.allowed == Some(0) {
            state = cvar.wait(state).unwrap();
        }
        state.waiting -= 1;
        if let Some(a) = state.allowed.as_mut() {
            *a -= 1;
        }
    }
}

/// A model whose forward passes the test controls: gated, recorded, failing or panicking on
/// demand. Its logits rank class `i` by `i`, so every image is the last class.
#[derive(Clone)]
pub struct FakeModel {
    pub classes: usize,
    pub gate: Gate,
    /// Images per forward pass, warm-up included.
    pub batches: Arc<Mutex<Vec<usize>>>,
    pub fail_next: Arc<AtomicUsize>,
    pub panic_next: Arc<AtomicUsize>,
}

impl FakeModel {
    pub fn new(gate: Gate) -> Self {
        Self {
            classes: 10,
            gate,
            batches: Arc::default(),
            fail_next: Arc::default(),
            panic_next: Arc::default(),
        }
    }

    pub fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl Engine for FakeModel {
    fn logits(&mut self, images: &[f32], n: usize) -> Result<Vec<f32>, EngineError> {
        self.gate.pass();
        self.batches.lock().unwrap().push(n);
        assert_eq!(images.len(), n * 3 * 32 * 32);
        if take_one(&self.panic_next) {
            panic!("injected panic");
        }
        if take_one(&self.fail_next) {
            return Err(EngineError::Failed("injected failure".into()));
        }
        Ok((0..n)
            .flat_map(|_| (0..self.classes).map(|c| c as f32))
            .collect())
    }
}

pub fn fake_info(classes: usize) -> ModelInfo {
    ModelInfo {
        name: "fake".into(),
        depth: 56,
        shortcut: "projection".into(),
        conv_bias: true,
        parameter_count: 1,
        num_classes: classes,
        labels: (0..classes).map(|c| format!("label{c}")).collect(),
        input_shape: [3, 32, 32],
        mean: [0.5; 3],
        std: [0.25; 3],
        device: "cpu".into(),
        engine: "fake".into(),
        source: None,
        weights: resnet_serve::model::WeightsOrigin {
            kind: "file".into(),
            path: None,
            sha256: String::new(),
        },
    }
}

/// The seed-random ResNet56 on the CPU, or `None` (skipping loudly) without the shared data.
pub fn seed_model() -> Option<(Model, ModelInfo)> {
    weights_model(common::shared_file(
        "models/resnet56-seed-random.safetensors",
    )?)
}

pub fn weights_model(weights: std::path::PathBuf) -> Option<(Model, ModelInfo)> {
    let model = Model::load(&LoadOptions {
        weights: Some(weights),
        device: DeviceChoice::Cpu,
        engine: EngineChoice::Auto,
        simd: SimdChoice::Auto,
        threads: 0,
        ..LoadOptions::default()
    })
    .unwrap();
    let info = ModelInfo::from_model(&model);
    Some((model, info))
}

/// An RGB CHW u8 image as PNG bytes.
pub fn png_from_chw(pixels: &[u8], width: u32, height: u32) -> Vec<u8> {
    let plane = (width * height) as usize;
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        let i = (y * width + x) as usize;
        image::Rgb([pixels[i], pixels[plane + i], pixels[2 * plane + i]])
    });
    encode(&image, image::ImageFormat::Png)
}

pub fn encode(image: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A 32x32 PNG of one colour.
pub fn solid_png(rgb: [u8; 3]) -> Vec<u8> {
    encode(
        &image::RgbImage::from_pixel(32, 32, image::Rgb(rgb)),
        image::ImageFormat::Png,
    )
}

/// Index of the largest value (the first on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}

/// The JSON error code of a response.
pub fn error_code(body: &serde_json::Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<none>")
}
