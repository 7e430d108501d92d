//! The 846 CIFAR-10 test images, encoded as PNG, posted by 48 concurrent clients to the real
//! server: every answer 200, the same predictions as PyTorch, and batches actually formed.

mod common;
mod http_util;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use http_util::{argmax, client, metric, png_from_chw, weights_model, TestServer};
use resnet_serve::cli::eval::{load_reference, LabelledImages};
use resnet_serve::server::ServerConfig;
use serde_json::Value;

const CLIENTS: usize = 48;
const IMAGE_BYTES: usize = 3 * 32 * 32;

/// What the server answered for every image.
struct Run {
    /// Per image: the class the server named, and its logits.
    answers: Vec<(usize, Vec<f32>)>,
    labels: Vec<i64>,
    mean_batch_size: f64,
}

/// Serves `weights` and posts every image of the 846-image set from `CLIENTS` threads.
fn run_846(weights: std::path::PathBuf) -> Option<Run> {
    let data =
        LabelledImages::load(&common::shared_file("data/cifar10-test-846.safetensors")?).unwrap();
    let (model, info) = weights_model(weights)?;
    let classes = info.num_classes;
    let class_labels = info.class_labels();
    let server = TestServer::start(model, info, ServerConfig::default());
    server.wait_ready();
    let pngs: Vec<Vec<u8>> = data
        .pixels
        .chunks_exact(IMAGE_BYTES)
        .map(|chw| png_from_chw(chw, 32, 32))
        .collect();
    let next = AtomicUsize::new(0);
    let answers = Mutex::new(vec![None; pngs.len()]);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..CLIENTS {
            scope.spawn(|| {
                let http = client();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(png) = pngs.get(i) else { break };
                    let r = http
                        .post(server.url("/classify?logits=true"))
                        .header("content-type", "image/png")
                        .body(png.clone())
                        .send()
                        .unwrap();
                    assert_eq!(r.status(), 200, "image {i}: {}", r.text().unwrap());
                    let body: Value = r.json().unwrap();
                    let class = body["class_index"].as_u64().unwrap() as usize;
                    let logits: Vec<f32> = serde_json::from_value(body["logits"].clone()).unwrap();
                    assert_eq!(logits.len(), classes);
                    answers.lock().unwrap()[i] = Some((class, logits));
                }
            });
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let text = server.metrics();
    let batches = metric(&text, "resnet_batch_size_count").unwrap();
    let images = metric(&text, "resnet_batch_size_sum").unwrap();
    assert_eq!(
        metric(&text, "resnet_images_total"),
        Some(pngs.len() as f64)
    );
    assert_eq!(metric(&text, "resnet_queue_depth"), Some(0.0));
    let answers: Vec<(usize, Vec<f32>)> = answers
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|a| a.expect("every image answered"))
        .collect();
    check_prediction_metrics(&text, &answers, &class_labels);
    server.stop().unwrap();
    eprintln!(
        "{} images in {seconds:.1} s ({:.1} images/s), {batches} forward passes, mean batch {:.1}",
        pngs.len(),
        pngs.len() as f64 / seconds,
        images / batches
    );
    Some(Run {
        answers,
        labels: data.labels,
        mean_batch_size: images / batches,
    })
}

/// The prediction-quality metrics agree with what the server answered: per-label counts of the
/// top-1 classes, one confidence sample per image (the top-1 probability), every image a 32x32
/// PNG.
fn check_prediction_metrics(text: &str, answers: &[(usize, Vec<f32>)], labels: &[String]) {
    let n = answers.len() as f64;
    for (class, label) in labels.iter().enumerate() {
        let answered = answers.iter().filter(|(c, _)| *c == class).count() as f64;
        let name = format!("resnet_predictions_total{{label=\"{label}\"}}");
        assert_eq!(metric(text, &name), Some(answered), "{name}");
    }
    assert_eq!(metric(text, "resnet_prediction_confidence_count"), Some(n));
    let confidence_sum: f64 = answers
        .iter()
        .map(|(_, logits)| f64::from(resnet_serve::infer::scores::top1(logits).1))
        .sum();
    let recorded = metric(text, "resnet_prediction_confidence_sum").unwrap();
    assert!(
        (recorded - confidence_sum).abs() < 1e-3 * n,
        "{recorded} vs {confidence_sum}"
    );
    assert_eq!(
        metric(text, r#"resnet_input_format_total{format="png"}"#),
        Some(n)
    );
    assert_eq!(
        metric(text, r#"resnet_input_format_total{format="jpeg"}"#),
        Some(0.0)
    );
    assert_eq!(
        metric(text, r#"resnet_input_pixels_bucket{le="1024"}"#),
        Some(n)
    );
    assert_eq!(metric(text, "resnet_input_pixels_sum"), Some(1024.0 * n));
}

/// Checks the answers against PyTorch's logits `key`; returns the top-1 accuracy.
fn check_against_reference(run: &Run, key: &str) -> f64 {
    let reference = load_reference(
        &common::shared_file("reference/logits.safetensors").unwrap(),
        key,
    )
    .unwrap();
    let classes = run.answers[0].1.len();
    assert_eq!(reference.len(), run.answers.len() * classes);
    let mut agree = 0;
    let mut max_diff = 0f32;
    for ((class, logits), expected) in run.answers.iter().zip(reference.chunks_exact(classes)) {
        assert_eq!(
            *class,
            argmax(logits),
            "the named class is the argmax of the logits"
        );
        agree += usize::from(*class == argmax(expected));
        for (a, b) in logits.iter().zip(expected) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    let correct = run
        .answers
        .iter()
        .zip(&run.labels)
        .filter(|((class, _), &label)| *class as i64 == label)
        .count();
    let accuracy = correct as f64 / run.answers.len() as f64;
    eprintln!(
        "{key}: top-1 agreement {agree}/{}, max |logit diff| {max_diff:.2e}, accuracy {accuracy:.4}",
        run.answers.len()
    );
    assert_eq!(agree, run.answers.len(), "top-1 agreement with {key}");
    assert!(max_diff <= 1e-3, "max |logit diff| {max_diff} vs {key}");
    assert!(
        run.mean_batch_size >= 4.0,
        "mean batch size {} under {CLIENTS} concurrent clients",
        run.mean_batch_size
    );
    accuracy
}

#[test]
fn seed_random_model_over_http_matches_pytorch_on_846_images() {
    let Some(weights) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let Some(run) = run_846(weights) else { return };
    check_against_reference(&run, "seed_random_logits");
}

#[test]
fn pretrained_model_over_http_reaches_its_accuracy_on_846_images() {
    let Some(checkpoint) = common::shared_file("models/resnet56-4bfd9763.th") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("resnet56.safetensors");
    let (ok, stdout, stderr) = common::run_cli(&[
        "convert".as_ref(),
        checkpoint.as_os_str(),
        weights.as_os_str(),
        "--preset".as_ref(),
        "imagenet".as_ref(),
    ]);
    assert!(ok, "convert failed:\n{stdout}\n{stderr}");
    let Some(run) = run_846(weights) else { return };
    let accuracy = check_against_reference(&run, "paper_logits");
    assert!(accuracy >= 0.932, "accuracy {accuracy}");
}

/// `/classify/batch` with a real model answers in the order of its fields: 16 distinct images
/// (classes chosen to differ from their neighbours'), each result with its own image's logits.
#[test]
fn classify_batch_answers_distinct_images_in_order() {
    let Some(path) = common::shared_file("data/cifar10-test-846.safetensors") else {
        return;
    };
    let Some(weights) = common::shared_file("models/resnet56-seed-random.safetensors") else {
        return;
    };
    let data = LabelledImages::load(&path).unwrap();
    let reference = load_reference(
        &common::shared_file("reference/logits.safetensors").unwrap(),
        "seed_random_logits",
    )
    .unwrap();
    let (model, info) = weights_model(weights).unwrap();
    let classes = info.num_classes;
    let server = TestServer::start(model, info, ServerConfig::default());
    server.wait_ready();
    // Images whose reference top-1 class differs from the previous pick's, so that a shuffled
    // answer cannot pass by chance.
    let mut picks: Vec<usize> = Vec::new();
    for i in 0..data.labels.len() {
        let class = argmax(&reference[i * classes..(i + 1) * classes]);
        let differs = picks
            .last()
            .is_none_or(|&p| argmax(&reference[p * classes..(p + 1) * classes]) != class);
        if differs {
            picks.push(i);
        }
        if picks.len() == 16 {
            break;
        }
    }
    assert_eq!(picks.len(), 16);
    let mut form = reqwest::blocking::multipart::Form::new();
    for &i in &picks {
        let png = png_from_chw(&data.pixels[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES], 32, 32);
        let part = reqwest::blocking::multipart::Part::bytes(png)
            .file_name(format!("{i}.png"))
            .mime_str("image/png")
            .unwrap();
        form = form.part("image", part);
    }
    let r = client()
        .post(server.url("/classify/batch?logits=true"))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().unwrap();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), picks.len());
    for (result, &i) in results.iter().zip(&picks) {
        let expected = &reference[i * classes..(i + 1) * classes];
        let logits: Vec<f32> = serde_json::from_value(result["logits"].clone()).unwrap();
        let diff = logits
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 1e-3, "image {i}: max |logit diff| {diff}");
        assert_eq!(result["class_index"], argmax(expected), "image {i}");
    }
    server.stop().unwrap();
}
