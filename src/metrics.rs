//! Prometheus metrics under the names the contract fixes, kept in one recorder per server (so
//! several servers can share a process) and rendered as text by `GET /metrics`.

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Label, Unit};
use metrics_exporter_prometheus::{
    BuildError, Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

pub const REQUESTS_TOTAL: &str = "resnet_requests_total";
pub const REQUEST_DURATION: &str = "resnet_request_duration_seconds";
pub const QUEUE_WAIT: &str = "resnet_queue_wait_seconds";
pub const INFERENCE_DURATION: &str = "resnet_inference_duration_seconds";
pub const BATCH_SIZE: &str = "resnet_batch_size";
pub const QUEUE_DEPTH: &str = "resnet_queue_depth";
pub const IMAGES_TOTAL: &str = "resnet_images_total";
pub const MODEL_INFO: &str = "resnet_model_info";
pub const PREDICTIONS_TOTAL: &str = "resnet_predictions_total";
pub const PREDICTION_CONFIDENCE: &str = "resnet_prediction_confidence";
pub const INPUT_PIXELS: &str = "resnet_input_pixels";
pub const INPUT_FORMAT_TOTAL: &str = "resnet_input_format_total";

/// Every metric name `/metrics` exposes.
pub const ALL: [&str; 12] = [
    REQUESTS_TOTAL,
    REQUEST_DURATION,
    QUEUE_WAIT,
    INFERENCE_DURATION,
    BATCH_SIZE,
    QUEUE_DEPTH,
    IMAGES_TOTAL,
    MODEL_INFO,
    PREDICTIONS_TOTAL,
    PREDICTION_CONFIDENCE,
    INPUT_PIXELS,
    INPUT_FORMAT_TOTAL,
];

/// The `format` values of `resnet_input_format_total` ([`crate::preprocess::format_name`]).
pub const INPUT_FORMATS: [&str; 7] = ["png", "jpeg", "gif", "bmp", "webp", "tiff", "other"];

/// Top-1 probabilities: fine steps near 1, where a well-trained model's answers sit.
const CONFIDENCE_BUCKETS: [f64; 12] =
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0];

/// Decoded pixels: 32x32 (CIFAR itself), then squares doubling in side up to the decode limit.
const PIXEL_BUCKETS: [f64; 10] = [
    1024.0,
    4096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    40_000_000.0,
    100_000_000.0,
];

const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// The handles the batcher updates.
#[derive(Clone)]
pub struct BatchMetrics {
    /// Images admitted and not yet in a forward pass.
    pub queue_depth: Gauge,
    /// Seconds from entering the queue to the start of its forward pass.
    pub queue_wait: Histogram,
    /// Seconds per forward pass.
    pub inference: Histogram,
    /// Images per forward pass.
    pub batch_size: Histogram,
    /// Images classified.
    pub images: Counter,
}

/// What the model is being asked and how sure it is: cheap enough to record for every image.
#[derive(Clone)]
pub struct PredictionMetrics {
    /// One counter per class, by its label.
    by_class: Arc<[Counter]>,
    confidence: Histogram,
    pixels: Histogram,
    /// One counter per [`INPUT_FORMATS`] entry, in that order.
    formats: Arc<[Counter]>,
}

impl std::fmt::Debug for PredictionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PredictionMetrics")
            .field("classes", &self.by_class.len())
            .finish_non_exhaustive()
    }
}

impl PredictionMetrics {
    /// One image's top-1 class and its probability.
    pub fn record_prediction(&self, class: usize, confidence: f32) {
        if let Some(counter) = self.by_class.get(class) {
            counter.increment(1);
        }
        self.confidence.record(f64::from(confidence));
    }

    /// One uploaded image: its format ([`INPUT_FORMATS`]) and, when its header could be read,
    /// its width x height.
    pub fn record_input(&self, format: &str, pixels: Option<u64>) {
        let index = INPUT_FORMATS
            .iter()
            .position(|&f| f == format)
            .unwrap_or(INPUT_FORMATS.len() - 1);
        self.formats[index].increment(1);
        if let Some(pixels) = pixels {
            self.pixels.record(pixels as f64);
        }
    }
}

/// The server's metrics registry.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    batch: BatchMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A registry whose batch-size buckets reach `max_batch_size`, with `resnet_model_info`
    /// set to 1 under `model_labels`.
    pub fn new(
        max_batch_size: usize,
        model_labels: Vec<(&'static str, String)>,
    ) -> Result<Self, BuildError> {
        let mut builder = PrometheusBuilder::new();
        for name in [REQUEST_DURATION, QUEUE_WAIT, INFERENCE_DURATION] {
            builder =
                builder.set_buckets_for_metric(Matcher::Full(name.into()), &LATENCY_BUCKETS)?;
        }
        builder = builder
            .set_buckets_for_metric(
                Matcher::Full(BATCH_SIZE.into()),
                &batch_buckets(max_batch_size),
            )?
            .set_buckets_for_metric(
                Matcher::Full(PREDICTION_CONFIDENCE.into()),
                &CONFIDENCE_BUCKETS,
            )?
            .set_buckets_for_metric(Matcher::Full(INPUT_PIXELS.into()), &PIXEL_BUCKETS)?;
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let batch = metrics::with_local_recorder(&recorder, || {
            metrics::describe_counter!(REQUESTS_TOTAL, "HTTP requests by route and status code");
            metrics::describe_histogram!(
                REQUEST_DURATION,
                Unit::Seconds,
                "HTTP request duration by route"
            );
            metrics::describe_histogram!(
                QUEUE_WAIT,
                Unit::Seconds,
                "time images wait in the batching queue"
            );
            metrics::describe_histogram!(
                INFERENCE_DURATION,
                Unit::Seconds,
                "duration of one forward pass"
            );
            metrics::describe_histogram!(BATCH_SIZE, "images per forward pass");
            metrics::describe_gauge!(QUEUE_DEPTH, "images admitted and not yet in a forward pass");
            metrics::describe_counter!(IMAGES_TOTAL, "images classified");
            metrics::describe_gauge!(MODEL_INFO, "the served model; always 1");
            metrics::describe_counter!(PREDICTIONS_TOTAL, "images by their top-1 class");
            metrics::describe_histogram!(
                PREDICTION_CONFIDENCE,
                "top-1 softmax probability of each image"
            );
            metrics::describe_histogram!(
                INPUT_PIXELS,
                "width x height of each uploaded image, as its header declares"
            );
            metrics::describe_counter!(INPUT_FORMAT_TOTAL, "uploaded images by format");
            let labels: Vec<Label> = model_labels
                .into_iter()
                .map(|(key, value)| Label::new(key, value))
                .collect();
            metrics::gauge!(MODEL_INFO, labels).set(1.0);
            BatchMetrics {
                queue_depth: metrics::gauge!(QUEUE_DEPTH),
                queue_wait: metrics::histogram!(QUEUE_WAIT),
                inference: metrics::histogram!(INFERENCE_DURATION),
                batch_size: metrics::histogram!(BATCH_SIZE),
                images: metrics::counter!(IMAGES_TOTAL),
            }
        });
        // Registered up front so that the gauge and counter show 0 before the first request.
        batch.queue_depth.set(0.0);
        batch.images.increment(0);
        Ok(Self {
            recorder,
            handle,
            batch,
        })
    }

    /// The handles the batcher updates.
    pub fn batch(&self) -> BatchMetrics {
        self.batch.clone()
    }

    /// The prediction-quality handles, with a counter for each class in `labels` (registered at
    /// 0, so every class shows from the start).
    pub fn predictions(&self, labels: &[String]) -> PredictionMetrics {
        metrics::with_local_recorder(&self.recorder, || {
            let by_class: Arc<[Counter]> = labels
                .iter()
                .map(|label| metrics::counter!(PREDICTIONS_TOTAL, "label" => label.clone()))
                .collect();
            let formats: Arc<[Counter]> = INPUT_FORMATS
                .iter()
                .map(|&format| metrics::counter!(INPUT_FORMAT_TOTAL, "format" => format))
                .collect();
            for counter in by_class.iter().chain(formats.iter()) {
                counter.increment(0);
            }
            PredictionMetrics {
                by_class,
                confidence: metrics::histogram!(PREDICTION_CONFIDENCE),
                pixels: metrics::histogram!(INPUT_PIXELS),
                formats,
            }
        })
    }

    /// Counts one HTTP request and its duration.
    pub fn record_request(&self, route: &'static str, status: u16, seconds: f64) {
        self.record_call(route, status.to_string(), seconds);
    }

    /// Counts one request or call of any protocol: `status` is the HTTP status code, or the
    /// gRPC status code's name (`OK`, `INVALID_ARGUMENT`, ...) for routes `grpc:<method>`.
    pub fn record_call(&self, route: &'static str, status: String, seconds: f64) {
        metrics::with_local_recorder(&self.recorder, || {
            metrics::counter!(REQUESTS_TOTAL, "route" => route, "status" => status).increment(1);
            metrics::histogram!(REQUEST_DURATION, "route" => route).record(seconds);
        });
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Folds recent histogram samples into their buckets; without it they pile up in memory
    /// between scrapes.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// 1, 2, 4, ... up to and including `max`.
fn batch_buckets(max: usize) -> Vec<f64> {
    let max = max.max(1);
    let mut buckets: Vec<f64> = std::iter::successors(Some(1usize), |b| b.checked_mul(2))
        .take_while(|&b| b < max)
        .map(|b| b as f64)
        .collect();
    buckets.push(max as f64);
    buckets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_buckets_double_up_to_the_limit() {
        assert_eq!(batch_buckets(1), [1.0]);
        assert_eq!(batch_buckets(64), [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]);
        assert_eq!(batch_buckets(48), [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 48.0]);
    }

    #[test]
    fn two_registries_do_not_share_samples() {
        let a = Metrics::new(8, vec![("name", "a".into())]).unwrap();
        let b = Metrics::new(8, vec![("name", "b".into())]).unwrap();
        a.record_request("/classify", 200, 0.01);
        a.batch().batch_size.record(3.0);
        let predictions = a.predictions(&["cat".into(), "dog".into()]);
        predictions.record_prediction(1, 0.97);
        predictions.record_input("jpeg", Some(1024));
        predictions.record_input("psd", None);
        let (text_a, text_b) = (a.render(), b.render());
        assert!(text_a.contains(r#"resnet_requests_total{route="/classify",status="200"} 1"#));
        assert!(!text_b.contains("resnet_requests_total{"));
        assert!(text_a.contains("resnet_batch_size_sum 3"));
        assert!(text_b.contains(r#"resnet_model_info{name="b"} 1"#));
        for name in ALL {
            assert!(text_a.contains(name), "{name} missing from\n{text_a}");
        }
        assert!(text_a.contains(r#"resnet_predictions_total{label="dog"} 1"#));
        assert!(text_a.contains(r#"resnet_predictions_total{label="cat"} 0"#));
        assert!(text_a.contains(r#"resnet_input_format_total{format="jpeg"} 1"#));
        assert!(text_a.contains(r#"resnet_input_format_total{format="other"} 1"#));
        assert!(text_a.contains(r#"resnet_prediction_confidence_bucket{le="0.99"} 1"#));
        assert!(text_a.contains(r#"resnet_prediction_confidence_bucket{le="0.95"} 0"#));
        assert!(text_a.contains(r#"resnet_input_pixels_bucket{le="1024"} 1"#));
    }
}
