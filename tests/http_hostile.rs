//! Hostile and malformed requests against the real server and the seed-random model: each gets
//! a clear 4xx JSON error, fast, and the server then still classifies a valid image correctly.

mod common;
mod http_util;

use std::time::{Duration, Instant};

use http_util::{argmax, client, error_code, png_from_chw, seed_model, TestServer};
use reqwest::blocking::multipart::{Form, Part};
use reqwest::blocking::RequestBuilder;
use resnet_serve::cli::eval::{load_reference, LabelledImages};
use resnet_serve::server::ServerConfig;
use serde_json::Value;

const MAX_BODY: usize = 64 * 1024;

/// A running server, the first test image as PNG, and its reference logits.
struct Fixture {
    server: TestServer,
    png: Vec<u8>,
    reference: Vec<f32>,
}

fn fixture() -> Option<Fixture> {
    let (model, info) = seed_model()?;
    let data =
        LabelledImages::load(&common::shared_file("data/cifar10-test-846.safetensors")?).unwrap();
    let reference = load_reference(
        &common::shared_file("reference/logits.safetensors")?,
        "seed_random_logits",
    )
    .unwrap();
    let server = TestServer::start(
        model,
        info,
        ServerConfig {
            max_body_bytes: MAX_BODY,
            ..ServerConfig::default()
        },
    );
    server.wait_ready();
    Some(Fixture {
        server,
        png: png_from_chw(&data.pixels[..3 * 32 * 32], 32, 32),
        reference: reference[..10].to_vec(),
    })
}

impl Fixture {
    fn post(&self, path: &str) -> RequestBuilder {
        client().post(self.server.url(path))
    }

    /// Sends `request`, expects `status` and `code` promptly, then checks that a valid
    /// image still gets the reference answer.
    fn expect_error(&self, request: RequestBuilder, status: u16, code: &str) -> String {
        let started = Instant::now();
        let r = request.send().unwrap();
        let elapsed = started.elapsed();
        assert_eq!(r.status(), status);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let body: Value = r.json().unwrap();
        assert_eq!(error_code(&body), code, "{body}");
        // Generous for a loaded machine; a decoder allocating 60000x60000 pixels would not be.
        assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
        self.expect_valid_answer();
        body["error"]["message"].as_str().unwrap().to_owned()
    }

    fn expect_valid_answer(&self) {
        let r = self
            .post("/classify?logits=true")
            .header("content-type", "image/png")
            .body(self.png.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let body: Value = r.json().unwrap();
        let logits: Vec<f32> = serde_json::from_value(body["logits"].clone()).unwrap();
        assert_eq!(body["class_index"], argmax(&self.reference));
        for (a, b) in logits.iter().zip(&self.reference) {
            assert!((a - b).abs() <= 1e-3, "{logits:?} vs {:?}", self.reference);
        }
    }
}

#[test]
fn empty_body() {
    let Some(f) = fixture() else { return };
    let message = f.expect_error(
        f.post("/classify").header("content-type", "image/png"),
        400,
        "bad_request",
    );
    assert!(message.contains("empty"), "{message}");
}

#[test]
fn text_body() {
    let Some(f) = fixture() else { return };
    let message = f.expect_error(
        f.post("/classify")
            .header("content-type", "text/plain")
            .body("hello"),
        415,
        "unsupported_media_type",
    );
    assert!(message.contains("text/plain"), "{message}");
    // Text that claims to be an image: not a format we decode.
    f.expect_error(
        f.post("/classify")
            .header("content-type", "image/png")
            .body("hello, I am not a PNG"),
        415,
        "unsupported_media_type",
    );
}

/// `curl --data-binary @cat.png URL` labels the bytes `application/x-www-form-urlencoded`:
/// an image is classified as sent raw; a real form is not an image format.
#[test]
fn curl_default_content_type() {
    let Some(f) = fixture() else { return };
    let r = f
        .post("/classify?logits=true")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(f.png.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().unwrap();
    assert_eq!(body["class_index"], argmax(&f.reference), "{body}");
    f.expect_error(
        f.post("/classify")
            .header("content-type", "application/x-www-form-urlencoded")
            .body("label=cat&top_k=3"),
        415,
        "unsupported_media_type",
    );
}

#[test]
fn truncated_jpeg() {
    let Some(f) = fixture() else { return };
    let image = image::load_from_memory(&f.png).unwrap().to_rgb8();
    let jpeg = http_util::encode(&image, image::ImageFormat::Jpeg);
    f.expect_error(
        f.post("/classify")
            .header("content-type", "image/jpeg")
            .body(jpeg[..jpeg.len() / 2].to_vec()),
        422,
        "invalid_image",
    );
}

#[test]
fn corrupt_png() {
    let Some(f) = fixture() else { return };
    let mut png = f.png.clone();
    let idat = png.windows(4).position(|w| w == b"IDAT").unwrap();
    for b in &mut png[idat + 8..idat + 40] {
        *b ^= 0x5a;
    }
    f.expect_error(
        f.post("/classify")
            .header("content-type", "image/png")
            .body(png),
        422,
        "invalid_image",
    );
}

/// A PNG whose header declares `width` x `height` pixels, with a few bytes of image data.
fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0x63, 0x00, 0x00]);
    chunk(&mut png, b"IEND", &[]);
    png
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn png_declaring_60000x60000_pixels_is_refused_before_decoding() {
    let Some(f) = fixture() else { return };
    let png = png_declaring(60_000, 60_000);
    assert!(png.len() < 100);
    let message = f.expect_error(
        f.post("/classify")
            .header("content-type", "image/png")
            .body(png.clone()),
        413,
        "payload_too_large",
    );
    assert!(message.contains("60000"), "{message}");
    // In a batch the message names the image.
    let form = Form::new()
        .part("image", Part::bytes(f.png.clone()))
        .part("image", Part::bytes(png));
    let message = f.expect_error(
        f.post("/classify/batch").multipart(form),
        413,
        "payload_too_large",
    );
    assert!(message.starts_with("image 1: "), "{message}");
}

#[test]
fn wrong_multipart_field() {
    let Some(f) = fixture() else { return };
    let form = Form::new().part("file", Part::bytes(f.png.clone()));
    let message = f.expect_error(f.post("/classify").multipart(form), 400, "bad_request");
    assert!(
        message.contains("\"file\"") && message.contains("`image`"),
        "{message}"
    );
    let form = Form::new().text("note", "no image here");
    f.expect_error(
        f.post("/classify/batch").multipart(form),
        400,
        "bad_request",
    );
    // Two images to the single-image route.
    let form = Form::new()
        .part("image", Part::bytes(f.png.clone()))
        .part("image", Part::bytes(f.png.clone()));
    let message = f.expect_error(f.post("/classify").multipart(form), 400, "bad_request");
    assert!(message.contains("/classify/batch"), "{message}");
}

#[test]
fn malformed_multipart() {
    let Some(f) = fixture() else { return };
    let message = f.expect_error(
        f.post("/classify")
            .header("content-type", "multipart/form-data; boundary=xyz")
            .body("--xyz\r\nnot a header line\r\n\r\n"),
        400,
        "bad_request",
    );
    assert!(message.contains("multipart"), "{message}");
    f.expect_error(
        f.post("/classify")
            .header("content-type", "multipart/form-data")
            .body("no boundary"),
        400,
        "bad_request",
    );
}

#[test]
fn unknown_and_invalid_query_values() {
    let Some(f) = fixture() else { return };
    for (query, parameter) in [
        ("top_k=0", "`top_k`"),
        ("top_k=11", "`top_k`"),
        ("top_k=abc", "`top_k`"),
        ("logits=maybe", "`logits`"),
        ("colour=blue", "`colour`"),
        ("top_k=2&top_k=3", "`top_k`"),
    ] {
        let message = f.expect_error(
            f.post(&format!("/classify?{query}"))
                .header("content-type", "image/png")
                .body(f.png.clone()),
            400,
            "bad_request",
        );
        assert!(message.contains(parameter), "{query}: {message}");
    }
}

#[test]
fn body_over_the_limit() {
    let Some(f) = fixture() else { return };
    let mut big = f.png.clone();
    big.resize(MAX_BODY + 1024, 0);
    let message = f.expect_error(
        f.post("/classify")
            .header("content-type", "image/png")
            .body(big.clone()),
        413,
        "payload_too_large",
    );
    assert!(message.contains("limit"), "{message}");
    let form = Form::new().part("image", Part::bytes(big));
    f.expect_error(
        f.post("/classify").multipart(form),
        413,
        "payload_too_large",
    );
}

#[test]
fn raw_and_multipart_uploads_agree_and_top_k_is_honoured() {
    let Some(f) = fixture() else { return };
    let raw: Value = f
        .post("/classify?top_k=3")
        .header("content-type", "application/octet-stream")
        .body(f.png.clone())
        .send()
        .unwrap()
        .json()
        .unwrap();
    let form = Form::new().part("image", Part::bytes(f.png.clone()).file_name("x.png"));
    let multipart: Value = f
        .post("/classify?top_k=3")
        .multipart(form)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(raw, multipart);
    assert_eq!(raw["top_k"].as_array().unwrap().len(), 3);
    assert!(raw.get("logits").is_none());
    assert_eq!(raw["class_index"], argmax(&f.reference));
    assert_eq!(raw["top_k"][0]["class_index"], raw["class_index"]);
}
