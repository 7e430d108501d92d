//! The HTTP API against a fake model the tests control: readiness, queue limits (429),
//! deadlines (504), failing forward passes (500), graceful drain, routing errors, metrics.

mod common;
mod http_util;

use std::time::Duration;

use http_util::{client, error_code, fake_info, metric, solid_png, FakeModel, Gate, TestServer};
use reqwest::blocking::multipart::{Form, Part};
use resnet_serve::server::ServerConfig;
use serde_json::Value;

fn config() -> ServerConfig {
    ServerConfig {
        max_batch_size: 8,
        max_batch_delay: Duration::from_millis(2),
        queue_capacity: 16,
        request_timeout: Duration::from_secs(30),
        max_body_bytes: 1 << 20,
        max_image_pixels: 1 << 20,
        max_images_per_request: 8,
        ..ServerConfig::default()
    }
}

fn start(model: &FakeModel, config: ServerConfig) -> TestServer {
    TestServer::start(model.clone(), fake_info(model.classes), config)
}

/// POSTs one PNG to /classify from another thread.
fn classify_async(server: &TestServer) -> std::thread::JoinHandle<(u16, Value)> {
    let url = server.url("/classify");
    std::thread::spawn(move || {
        let r = client()
            .post(url)
            .header("content-type", "image/png")
            .body(solid_png([10, 20, 30]))
            .send()
            .unwrap();
        (r.status().as_u16(), r.json().unwrap())
    })
}

fn classify(server: &TestServer) -> (u16, Value) {
    classify_async(server).join().unwrap()
}

#[test]
fn readiness_waits_for_the_warm_up_forward_pass() {
    let model = FakeModel::new(Gate::closed());
    let server = start(&model, config());
    let http = client();
    model.gate.wait_for_waiting(1);
    let r = http.get(server.url("/health/ready")).send().unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(&r.json().unwrap()), "not_ready");
    let r = http.get(server.url("/health/live")).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().unwrap()["status"], "live");
    let (status, body) = classify(&server);
    assert_eq!((status, error_code(&body)), (503, "not_ready"));

    model.gate.allow(1);
    server.wait_ready();
    assert_eq!(
        model.batches(),
        [1],
        "the warm-up is one forward pass of one image"
    );
    model.gate.open_all();
    let (status, body) = classify(&server);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["label"], "label9");
    assert_eq!(body["class_index"], 9);
    assert_eq!(body["top_k"].as_array().unwrap().len(), 5);
    server.stop().unwrap();
}

#[test]
fn a_full_queue_answers_429_at_once_with_retry_after_and_a_batch_takes_one_slot_per_image() {
    let model = FakeModel::new(Gate::closed());
    model.gate.allow(1);
    let server = start(
        &model,
        ServerConfig {
            queue_capacity: 4,
            max_batch_size: 4,
            ..config()
        },
    );
    server.wait_ready();
    // A occupies the model; a batch of 3 and then D fill the 4 slots.
    let a = classify_async(&server);
    model.gate.wait_for_waiting(1);
    let batch_url = server.url("/classify/batch");
    let batch = std::thread::spawn(move || {
        let mut form = Form::new();
        for i in 0..3u8 {
            form = form.part(
                "image",
                Part::bytes(solid_png([i, i, i]))
                    .mime_str("image/png")
                    .unwrap(),
            );
        }
        let r = client().post(batch_url).multipart(form).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    });
    server.wait_metric("resnet_queue_depth", 3.0);
    let d = classify_async(&server);
    server.wait_metric("resnet_queue_depth", 4.0);

    let started = std::time::Instant::now();
    let r = client()
        .post(server.url("/classify"))
        .header("content-type", "image/png")
        .body(solid_png([1, 2, 3]))
        .send()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().unwrap();
    assert_eq!(error_code(&body), "overloaded");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("queue is full"));

    model.gate.open_all();
    assert_eq!(a.join().unwrap().0, 200);
    let (status, body) = batch.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"].as_array().unwrap().len(), 3);
    assert_eq!(d.join().unwrap().0, 200);
    let batches = model.batches();
    assert_eq!(batches[..2], [1, 1]);
    assert_eq!(batches[2..].iter().sum::<usize>(), 4, "{batches:?}");
    let text = server.metrics();
    assert_eq!(metric(&text, "resnet_queue_depth"), Some(0.0));
    assert_eq!(metric(&text, "resnet_images_total"), Some(5.0));
    assert!(text.contains(r#"resnet_requests_total{route="/classify",status="429"} 1"#));
    server.stop().unwrap();
}

#[test]
fn a_request_past_its_deadline_answers_504_and_the_queue_recovers() {
    let model = FakeModel::new(Gate::closed());
    model.gate.allow(1);
    let server = start(
        &model,
        ServerConfig {
            request_timeout: Duration::from_millis(300),
            ..config()
        },
    );
    server.wait_ready();
    let a = classify_async(&server);
    model.gate.wait_for_waiting(1);
    let b = classify_async(&server);
    for (status, body) in [a.join().unwrap(), b.join().unwrap()] {
        assert_eq!((status, error_code(&body)), (504, "timeout"), "{body}");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("300 ms"));
    }
    model.gate.open_all();
    let (status, body) = classify(&server);
    assert_eq!(status, 200, "{body}");
    // B's client was gone when the model came free: it was skipped, not computed.
    assert_eq!(model.batches(), [1, 1, 1]);
    server.wait_metric("resnet_queue_depth", 0.0);
    server.stop().unwrap();
}

#[test]
fn requests_whose_client_went_away_are_not_computed() {
    let model = FakeModel::new(Gate::closed());
    model.gate.allow(1);
    let server = start(&model, config());
    server.wait_ready();
    let a = classify_async(&server);
    model.gate.wait_for_waiting(1);
    let impatient = client()
        .post(server.url("/classify"))
        .header("content-type", "image/png")
        .body(solid_png([1, 1, 1]))
        .timeout(Duration::from_millis(300))
        .send();
    assert!(impatient.is_err(), "the client gave up");
    // The server learns that the client is gone when its connection task next reads the closed
    // socket, which nothing here can observe; on a loaded machine the model thread once took the
    // next batch before that (batches [1, 1, 1, 1]). Give the connection task that turn first.
    std::thread::sleep(Duration::from_millis(500));
    model.gate.open_all();
    assert_eq!(a.join().unwrap().0, 200);
    let (status, _) = classify(&server);
    assert_eq!(status, 200);
    assert_eq!(model.batches(), [1, 1, 1]);
    server.wait_metric("resnet_queue_depth", 0.0);
    server.stop().unwrap();
}

#[test]
fn a_failing_or_panicking_forward_pass_fails_only_its_batch() {
    let model = FakeModel::new(Gate::open());
    let server = start(&model, config());
    server.wait_ready();
    model
        .fail_next
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = classify(&server);
    assert_eq!((status, error_code(&body)), (500, "internal"));
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("injected failure"));
    model
        .panic_next
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let (status, body) = classify(&server);
    assert_eq!((status, error_code(&body)), (500, "internal"));
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("injected panic"));
    let (status, body) = classify(&server);
    assert_eq!(status, 200, "{body}");
    server.stop().unwrap();
}

#[test]
fn shutdown_stops_accepting_and_finishes_what_is_queued() {
    let model = FakeModel::new(Gate::closed());
    model.gate.allow(1);
    let mut server = start(&model, config());
    server.wait_ready();
    let a = classify_async(&server);
    model.gate.wait_for_waiting(1);
    let queued: Vec<_> = (0..3).map(|_| classify_async(&server)).collect();
    server.wait_metric("resnet_queue_depth", 3.0);

    server.begin_stop();
    // The listener closes: new connections are refused while the queue drains.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client()
        .get(server.url("/health/live"))
        .timeout(Duration::from_millis(500))
        .send()
        .is_ok()
    {
        assert!(std::time::Instant::now() < deadline, "still accepting");
        std::thread::sleep(Duration::from_millis(10));
    }
    model.gate.open_all();
    assert_eq!(a.join().unwrap().0, 200);
    for q in queued {
        let (status, body) = q.join().unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let batches = model.batches();
    assert_eq!(batches[..2], [1, 1]);
    assert_eq!(batches[2..].iter().sum::<usize>(), 3, "{batches:?}");
    server.stop().unwrap();
}

#[test]
fn unknown_routes_and_methods_answer_json_errors() {
    let model = FakeModel::new(Gate::open());
    let server = start(&model, config());
    let http = client();
    let r = http.get(server.url("/nope")).send().unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().unwrap();
    assert_eq!(error_code(&body), "not_found");
    assert!(body["error"]["message"].as_str().unwrap().contains("/nope"));

    let r = http.get(server.url("/classify")).send().unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    assert_eq!(error_code(&r.json().unwrap()), "method_not_allowed");
    let r = http.post(server.url("/health/live")).send().unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET");
    server.stop().unwrap();
}

#[test]
fn request_ids_are_generated_or_echoed() {
    let model = FakeModel::new(Gate::open());
    let server = start(&model, config());
    let http = client();
    let r = http.get(server.url("/health/live")).send().unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let r = http
        .get(server.url("/health/live"))
        .header("x-request-id", "abc-123")
        .send()
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    server.stop().unwrap();
}

#[test]
fn model_route_describes_the_model_and_the_limits() {
    let model = FakeModel::new(Gate::open());
    let server = start(&model, config());
    let body: Value = client()
        .get(server.url("/v1/model"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let info = fake_info(10);
    assert_eq!(body["name"], "fake");
    assert_eq!(body["num_classes"], 10);
    assert_eq!(body["labels"].as_array().unwrap().len(), 10);
    assert_eq!(body["input_shape"], serde_json::json!([3, 32, 32]));
    assert_eq!(body["mean"][0], f64::from(info.mean[0]));
    assert_eq!(body["std"][2], f64::from(info.std[2]));
    assert_eq!(body["engine"], "fake");
    assert_eq!(body["batching"]["max_batch_size"], 8);
    assert_eq!(body["batching"]["queue_capacity"], 16);
    assert_eq!(body["batching"]["request_timeout_ms"], 30_000);
    assert_eq!(body["batching"]["max_body_bytes"], 1 << 20);
    server.stop().unwrap();
}

#[test]
fn metrics_expose_the_contract_names() {
    let model = FakeModel::new(Gate::open());
    let server = start(&model, config());
    server.wait_ready();
    let (status, _) = classify(&server);
    assert_eq!(status, 200);
    let r = client().get(server.url("/metrics")).send().unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().unwrap();
    for name in resnet_serve::metrics::ALL {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
    }
    for sample in [
        r#"resnet_requests_total{route="/classify",status="200"} 1"#,
        r#"resnet_request_duration_seconds_count{route="/classify"} 1"#,
        "resnet_queue_wait_seconds_count 1",
        "resnet_batch_size_count 1",
        "resnet_images_total 1",
        "resnet_queue_depth 0",
        r#"resnet_model_info{name="fake",device="cpu",engine="fake""#,
    ] {
        assert!(text.contains(sample), "{sample} missing:\n{text}");
    }
    assert_eq!(
        metric(&text, "resnet_inference_duration_seconds_count"),
        Some(1.0)
    );
    server.stop().unwrap();
}

#[test]
fn batch_requests_run_as_one_forward_pass_and_are_bounded() {
    let model = FakeModel::new(Gate::open());
    let server = start(&model, config());
    server.wait_ready();
    let http = client();
    let form = |n: usize| {
        (0..n).fold(Form::new(), |f, i| {
            f.part("image", Part::bytes(solid_png([i as u8; 3])))
        })
    };
    let r = http
        .post(server.url("/classify/batch?top_k=2&logits=true"))
        .multipart(form(5))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().unwrap();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 5);
    assert!(results
        .iter()
        .all(|r| r["top_k"].as_array().unwrap().len() == 2
            && r["logits"].as_array().unwrap().len() == 10));
    assert_eq!(model.batches(), [1, 5]);

    let r = http
        .post(server.url("/classify/batch"))
        .multipart(form(9))
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 8"));

    let r = http
        .post(server.url("/classify/batch"))
        .header("content-type", "image/png")
        .body(solid_png([0, 0, 0]))
        .send()
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(error_code(&r.json().unwrap()), "unsupported_media_type");
    server.stop().unwrap();
}
