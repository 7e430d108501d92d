//! JPEG over HTTP as a PyTorch pipeline on Pillow sees it: every case Pillow refuses is a 422
//! `invalid_image` (saying "truncated" where Pillow does), every case it opens a 200, with
//! `--load-truncated-images` off and on; and the logits of the shared reference JPEGs match
//! PyTorch's on torchvision's input.

mod common;
mod http_util;
mod jpeg_cases;

use candle_core::Device;
use http_util::{client, error_code, fake_info, weights_model, FakeModel, Gate, TestServer};
use jpeg_cases::Expected;
use resnet_serve::server::ServerConfig;
use serde_json::Value;

fn check_statuses(load_truncated: bool) {
    let cases = jpeg_cases::load(&jpeg_cases::fixture_dir());
    let server = TestServer::start(
        FakeModel::new(Gate::open()),
        fake_info(10),
        ServerConfig {
            load_truncated_images: load_truncated,
            ..ServerConfig::default()
        },
    );
    server.wait_ready();
    let http = client();
    let mut failures = Vec::new();
    let (mut ok, mut refused) = (0, 0);
    for case in &cases {
        let want = if load_truncated {
            &case.load_truncated
        } else {
            &case.strict
        };
        let r = http
            .post(server.url("/classify"))
            .header("content-type", "image/jpeg")
            .body(case.bytes.clone())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().unwrap();
        let message = body["error"]["message"].as_str().unwrap_or_default();
        let agrees = match want {
            Expected::Opens { .. } => {
                ok += 1;
                status == 200
            }
            Expected::Refused(_) => {
                refused += 1;
                status == 422
                    && error_code(&body) == "invalid_image"
                    && (!want.says_truncated() || message.contains("truncated"))
            }
        };
        if !agrees {
            failures.push(format!(
                "{}: Pillow {want:?}, answered {status} {body}",
                case.name
            ));
        }
    }
    eprintln!("load_truncated={load_truncated}: {ok} answered 200, {refused} answered 422");
    assert!(ok > 0 && refused > 0);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn jpegs_pillow_refuses_are_422_and_the_rest_200() {
    check_statuses(false);
}

#[test]
fn with_load_truncated_images_jpegs_are_answered_as_pillow_loads_them() {
    check_statuses(true);
}

#[test]
fn reference_jpeg_logits_match_pytorch() {
    let Some(checkpoint) = common::shared_file("models/resnet56-4bfd9763.th") else {
        return;
    };
    let Some(dir) = common::shared_file("reference/preprocess") else {
        return;
    };
    let refs =
        candle_core::safetensors::load(dir.join("torchvision.safetensors"), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("resnet56.safetensors");
    let (converted, stdout, stderr) = common::run_cli(&[
        "convert".as_ref(),
        checkpoint.as_os_str(),
        weights.as_os_str(),
        "--preset".as_ref(),
        "imagenet".as_ref(),
    ]);
    assert!(converted, "convert failed:\n{stdout}\n{stderr}");
    let Some((model, info)) = weights_model(weights) else {
        return;
    };
    let server = TestServer::start(model, info, ServerConfig::default());
    server.wait_ready();
    let http = client();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".jpg"))
        .collect();
    names.sort();
    assert!(
        names.len() >= 3,
        "expected the reference JPEGs, found {names:?}"
    );
    for name in &names {
        let r = http
            .post(server.url("/classify?logits=true"))
            .header("content-type", "image/jpeg")
            .body(std::fs::read(dir.join(name)).unwrap())
            .send()
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let body: Value = r.json().unwrap();
        let got: Vec<f32> = serde_json::from_value(body["logits"].clone()).unwrap();
        let want: Vec<f32> = refs[&format!("{name}/paper_logits")].to_vec1().unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{name}: max |logit - PyTorch| {max:.2e}");
        assert!(max <= 1e-4, "{name}: max |logit diff| {max}");
    }
}
