//! The Open Inference Protocol (v2) routes with the seed-random ResNet56: FP32 and BYTES
//! inputs in JSON and in binary tensor data, compared with the PyTorch reference logits, and
//! the protocol's errors.

mod common;
mod http_util;

use std::time::Duration;

use http_util::{argmax, client, png_from_chw, seed_model, TestServer};
use resnet_serve::cli::eval::{load_reference, LabelledImages};
use resnet_serve::infer::ModelInfo;
use resnet_serve::preprocess::normalize_chw;
use resnet_serve::server::ServerConfig;
use serde_json::{json, Value};

const IMAGE: usize = 3 * 32 * 32;
const MAX_BATCH: usize = 8;

struct Fixture {
    server: TestServer,
    info: ModelInfo,
    data: LabelledImages,
    reference: Vec<f32>,
}

impl Fixture {
    /// `None` (skipping loudly) without the shared data.
    fn start() -> Option<Self> {
        let data = LabelledImages::load(&common::shared_file("data/cifar10-test-846.safetensors")?)
            .unwrap();
        let reference = load_reference(
            &common::shared_file("reference/logits.safetensors")?,
            "seed_random_logits",
        )
        .unwrap();
        let (model, info) = seed_model()?;
        let config = ServerConfig {
            max_batch_size: MAX_BATCH,
            max_batch_delay: Duration::from_millis(2),
            ..ServerConfig::default()
        };
        let server = TestServer::start(model, info.clone(), config);
        server.wait_ready();
        Some(Self {
            server,
            info,
            data,
            reference,
        })
    }

    fn url(&self, tail: &str) -> String {
        self.server
            .url(&format!("/v2/models/{}{tail}", self.info.name))
    }

    fn normalised(&self, i: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(IMAGE);
        let pixels = &self.data.pixels[i * IMAGE..(i + 1) * IMAGE];
        normalize_chw(pixels, &self.info.mean, &self.info.std, &mut out);
        out
    }

    fn png(&self, i: usize) -> Vec<u8> {
        png_from_chw(&self.data.pixels[i * IMAGE..(i + 1) * IMAGE], 32, 32)
    }

    /// Checks `logits` (`[n, classes]` row-major) against the references of `images`.
    fn assert_reference(&self, images: &[usize], logits: &[f32]) {
        let classes = self.info.num_classes;
        assert_eq!(logits.len(), images.len() * classes);
        for (row, &i) in logits.chunks(classes).zip(images) {
            let expected = &self.reference[i * classes..(i + 1) * classes];
            let diff = row
                .iter()
                .zip(expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(diff <= 1e-3, "image {i}: max |diff| {diff}");
            assert_eq!(argmax(row), argmax(expected), "image {i}");
        }
    }

    fn infer(&self, body: &Value) -> (u16, Value) {
        let r = client().post(self.url("/infer")).json(body).send().unwrap();
        (r.status().as_u16(), r.json().unwrap())
    }
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn output<'a>(body: &'a Value, name: &str) -> &'a Value {
    body["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name} in {body}"))
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn health_and_metadata_describe_the_model() {
    let Some(f) = Fixture::start() else { return };
    let http = client();
    for path in ["/v2/health/live", "/v2/health/ready"] {
        assert_eq!(http.get(f.server.url(path)).send().unwrap().status(), 200);
    }
    let server: Value = http
        .get(f.server.url("/v2"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(server["extensions"], json!(["binary_tensor_data"]));
    let r = http.get(f.url("/ready")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["ready"], true);
    let meta: Value = http.get(f.url("")).send().unwrap().json().unwrap();
    assert_eq!(meta["name"], f.info.name.as_str());
    assert_eq!(meta["versions"], json!(["1"]));
    assert_eq!(
        meta["inputs"],
        json!([
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
            {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
        ])
    );
    let classes = f.info.num_classes;
    assert_eq!(
        meta["outputs"],
        json!([
            {"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]},
        ])
    );
}

#[test]
fn json_fp32_and_base64_png_inputs_match_the_reference_logits() {
    let Some(f) = Fixture::start() else { return };
    // Flat data, 8 images, both outputs, the id echoed.
    let images: Vec<usize> = (0..8).map(|k| k * 97 + 5).collect();
    let data: Vec<f32> = images.iter().flat_map(|&i| f.normalised(i)).collect();
    let (status, body) = f.infer(&json!({
        "id": "flat-1",
        "inputs": [{"name": "input", "shape": [8, 3, 32, 32], "datatype": "FP32", "data": data}],
    }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "flat-1");
    assert_eq!(body["model_name"], f.info.name.as_str());
    let logits = output(&body, "logits");
    assert_eq!(logits["shape"], json!([8, f.info.num_classes]));
    assert_eq!(logits["datatype"], "FP32");
    let logits = floats(&logits["data"]);
    f.assert_reference(&images, &logits);
    let probabilities = floats(&output(&body, "probabilities")["data"]);
    for (p, l) in probabilities
        .chunks(f.info.num_classes)
        .zip(logits.chunks(f.info.num_classes))
    {
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert_eq!(argmax(p), argmax(l));
    }

    // Nested data [2][3][32][32], only probabilities requested.
    let nested: Vec<Value> = [840, 845]
        .iter()
        .map(|&i| {
            let image = f.normalised(i);
            json!(image
                .chunks(1024)
                .map(|plane| plane.chunks(32).collect::<Vec<_>>())
                .collect::<Vec<_>>())
        })
        .collect();
    let (status, body) = f.infer(&json!({
        "inputs": [{"name": "input", "shape": [2, 3, 32, 32], "datatype": "FP32", "data": nested}],
        "outputs": [{"name": "logits"}],
    }));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outputs"].as_array().unwrap().len(), 1);
    assert!(body.get("id").is_none());
    f.assert_reference(&[840, 845], &floats(&output(&body, "logits")["data"]));

    // PNG files as base64 BYTES, decoded like /classify uploads.
    let pngs: Vec<String> = [3, 400].iter().map(|&i| base64(&f.png(i))).collect();
    let (status, body) = f.infer(&json!({
        "inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES", "data": pngs}],
    }));
    assert_eq!(status, 200, "{body}");
    f.assert_reference(&[3, 400], &floats(&output(&body, "logits")["data"]));
}

/// Splits a binary-extension response into its JSON header and the binary outputs.
fn binary_response(r: reqwest::blocking::Response) -> (Value, Vec<u8>) {
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    let length: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = r.bytes().unwrap();
    let header: Value = serde_json::from_slice(&body[..length]).unwrap();
    (header, body[length..].to_vec())
}

fn le_floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn post_binary(f: &Fixture, header: &Value, tensors: &[u8]) -> reqwest::blocking::Response {
    let json = serde_json::to_vec(header).unwrap();
    let mut body = json.clone();
    body.extend_from_slice(tensors);
    client()
        .post(f.url("/infer"))
        .header("inference-header-content-length", json.len())
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .unwrap()
}

#[test]
fn binary_tensor_data_in_requests_and_responses() {
    let Some(f) = Fixture::start() else { return };
    let classes = f.info.num_classes;
    // FP32 binary input, logits binary, probabilities JSON.
    let images = [11, 222, 333];
    let tensor: Vec<u8> = images
        .iter()
        .flat_map(|&i| f.normalised(i))
        .flat_map(f32::to_le_bytes)
        .collect();
    let header = json!({
        "inputs": [{"name": "input", "shape": [3, 3, 32, 32], "datatype": "FP32",
                    "parameters": {"binary_data_size": tensor.len()}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": true}},
                    {"name": "probabilities", "parameters": {"binary_data": false}}],
    });
    let (json_part, binary) = binary_response(post_binary(&f, &header, &tensor));
    let logits_out = output(&json_part, "logits");
    assert_eq!(
        logits_out["parameters"]["binary_data_size"],
        3 * classes * 4
    );
    assert!(logits_out.get("data").is_none());
    let logits = le_floats(&binary);
    f.assert_reference(&images, &logits);
    let probabilities = floats(&output(&json_part, "probabilities")["data"]);
    assert_eq!(probabilities.len(), 3 * classes);

    // BYTES binary input (length-prefixed PNGs), every output binary by request parameter.
    let mut tensor = Vec::new();
    for i in [7, 8] {
        let png = f.png(i);
        tensor.extend_from_slice(&(png.len() as u32).to_le_bytes());
        tensor.extend_from_slice(&png);
    }
    let header = json!({
        "parameters": {"binary_data_output": true},
        "inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES",
                    "parameters": {"binary_data_size": tensor.len()}}],
    });
    let (json_part, binary) = binary_response(post_binary(&f, &header, &tensor));
    let names: Vec<&str> = json_part["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["logits", "probabilities"]);
    assert_eq!(binary.len(), 2 * 2 * classes * 4);
    let values = le_floats(&binary);
    f.assert_reference(&[7, 8], &values[..2 * classes]);
    let p = &values[2 * classes..];
    assert!((p[..classes].iter().sum::<f32>() - 1.0).abs() < 1e-5);

    // Declared sizes that do not match the body.
    let header = json!({
        "inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES",
                    "parameters": {"binary_data_size": tensor.len() + 1}}],
    });
    let r = post_binary(&f, &header, &tensor);
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().unwrap()["error"].is_string());
}

#[test]
fn errors_use_the_protocol_shape_and_status() {
    let Some(f) = Fixture::start() else { return };
    let http = client();
    let fp32 = |shape: Value, datatype: &str, data: Vec<f32>| json!({"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]});
    let one = f.normalised(0);

    for url in [
        f.server.url("/v2/models/nope"),
        f.server.url("/v2/models/nope/ready"),
    ] {
        let r = http.get(url).send().unwrap();
        assert_eq!(r.status(), 404);
        let body: Value = r.json().unwrap();
        assert!(body["error"].as_str().unwrap().contains("nope"), "{body}");
    }
    let r = http
        .post(f.server.url("/v2/models/nope/infer"))
        .json(&fp32(json!([1, 3, 32, 32]), "FP32", one.clone()))
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().unwrap()["error"].is_string());

    let too_many = vec![0.0; (MAX_BATCH + 1) * IMAGE];
    let cases = [
        (
            "wrong datatype",
            fp32(json!([1, 3, 32, 32]), "FP64", one.clone()),
        ),
        (
            "wrong shape",
            fp32(json!([1, 32, 32, 3]), "FP32", one.clone()),
        ),
        (
            "too few values",
            fp32(json!([2, 3, 32, 32]), "FP32", one.clone()),
        ),
        (
            "over max_batch_size",
            fp32(json!([MAX_BATCH + 1, 3, 32, 32]), "FP32", too_many),
        ),
        ("empty batch", fp32(json!([0, 3, 32, 32]), "FP32", vec![])),
        (
            "overflowing shape",
            fp32(
                json!([1, 3, 32, 32, 4611686018427387904u64, 8]),
                "FP32",
                one.clone(),
            ),
        ),
        (
            "negative dimension",
            fp32(json!([-1, 3, 32, 32]), "FP32", one.clone()),
        ),
        (
            "unknown input",
            json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}),
        ),
        (
            "unknown output",
            json!({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": one.clone()}],
                   "outputs": [{"name": "features"}]}),
        ),
        (
            "bad base64",
            json!({"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": ["**"]}]}),
        ),
        ("no inputs", json!({"inputs": []})),
        ("unknown field", json!({"inputs": [], "extra": 1})),
    ];
    for (what, body) in cases {
        let (status, body) = f.infer(&body);
        assert_eq!(status, 400, "{what}: {body}");
        assert!(body["error"].is_string(), "{what}: {body}");
    }
    let r = http.post(f.url("/infer")).body("{not json").send().unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().unwrap()["error"].is_string());
    // An image that is no image: the /classify status (415), in the protocol's shape.
    let (status, body) = f.infer(&json!({
        "inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [base64(b"hello")]}],
    }));
    assert_eq!(status, 415, "{body}");
    assert!(body["error"].is_string());
}
