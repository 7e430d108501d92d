//! The inference layer below every protocol. [`Inference`] owns what a request goes through
//! between its front-end (REST, the v2 REST routes, gRPC) and the model: readiness, its deadline,
//! admission to the bounded queue, decoding under the decode slots, and the batcher; it answers
//! [`Logits`] or an [`InferError`] that each front-end maps to its own status codes.

mod decode;
mod error;
mod info;
pub mod scores;
pub mod tensor;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::batcher::{saturating_add, Batcher};
use crate::metrics::PredictionMetrics;
use crate::model::IMAGE_FLOATS;
use crate::preprocess::{format_name, preprocess_with, DecodeOptions};
use crate::shutdown::{Phase, Readiness};
use decode::decode_inline;
pub use decode::{declared_pixels, decode_permits, decode_slots, permits_for};
pub use error::InferError;
pub use info::ModelInfo;

/// What bounds one request's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InferLimits {
    /// From arrival to answer, unless the client asks for less.
    pub request_timeout: Duration,
    /// Images whose header declares more pixels are refused before decoding.
    pub max_image_pixels: u64,
    /// Keep what truncated or damaged JPEGs decode to, as Pillow's `LOAD_TRUNCATED_IMAGES`.
    pub load_truncated_images: bool,
    /// Most images in one tensor request (one forward pass).
    pub max_batch_size: usize,
}

/// A request's images.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelInput {
    /// `n * [3, 32, 32]` normalised floats, given as they are.
    Pixels { pixels: Vec<f32>, n: usize },
    /// Encoded images (PNG, JPEG, ...), decoded and normalised as torchvision does.
    Images(Vec<Bytes>),
}

impl ModelInput {
    /// How many images the request carries.
    pub fn len(&self) -> usize {
        match self {
            Self::Pixels { n, .. } => *n,
            Self::Images(images) => images.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// When a request must be answered, and the budget that gave that instant (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    /// `budget` after `start` (or as far as an `Instant` goes).
    pub fn after(start: Instant, budget: Duration) -> Self {
        Self {
            at: saturating_add(start, budget),
            budget,
        }
    }

    pub fn at(&self) -> Instant {
        self.at
    }

    /// The budget in milliseconds, rounded up: a 100 us deadline reads 1 ms, not 0.
    pub fn budget_ms(&self) -> u64 {
        u64::try_from(self.budget.as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
    }
}

/// A request's logits: `classes` per image, in the order of its images.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    values: Vec<f32>,
    classes: usize,
}

impl Logits {
    pub fn new(values: Vec<f32>, classes: usize) -> Self {
        Self { values, classes }
    }

    /// One row of logits per image.
    pub fn rows(&self) -> impl ExactSizeIterator<Item = &[f32]> {
        self.values.chunks_exact(self.classes.max(1))
    }

    /// Every image's logits, row after row.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Every image's softmax probabilities, row after row.
    pub fn probabilities(&self) -> Vec<f32> {
        scores::softmax_rows(&self.values, self.classes)
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    /// How many images.
    pub fn len(&self) -> usize {
        self.rows().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The inference service every front-end shares: cheap to clone, one per server.
#[derive(Debug, Clone)]
pub struct Inference {
    batcher: Batcher,
    model: Arc<ModelInfo>,
    readiness: Readiness,
    /// Bounds concurrent image decoding (CPU and memory) to the cores available.
    decode_slots: Arc<Semaphore>,
    limits: InferLimits,
    /// What is asked and answered: formats, sizes, top-1 classes and their probabilities.
    predictions: PredictionMetrics,
}

impl Inference {
    pub fn new(
        batcher: Batcher,
        model: ModelInfo,
        readiness: Readiness,
        limits: InferLimits,
        predictions: PredictionMetrics,
    ) -> Self {
        Self {
            batcher,
            model: Arc::new(model),
            readiness,
            decode_slots: Arc::new(Semaphore::new(decode_slots() as usize)),
            limits,
            predictions,
        }
    }

    pub fn model(&self) -> &ModelInfo {
        &self.model
    }

    pub fn limits(&self) -> &InferLimits {
        &self.limits
    }

    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The deadline of a request arriving now: the server's request timeout, or less if the
    /// client asks for less (gRPC's `grpc-timeout`).
    pub fn deadline(&self, requested: Option<Duration>) -> Deadline {
        let budget = requested.map_or(self.limits.request_timeout, |r| {
            r.min(self.limits.request_timeout)
        });
        Deadline::after(Instant::now(), budget)
    }

    /// Inference requests are refused only before the model is warm; while draining, requests
    /// that reached a handler are still served.
    pub fn check_accepting(&self) -> Result<(), InferError> {
        match self.readiness.phase() {
            Phase::Starting => Err(InferError::NotReady),
            Phase::Ready | Phase::Draining => Ok(()),
        }
    }

    /// Readiness for new work, as probes report it: not before warm-up, not while draining.
    pub fn check_ready(&self) -> Result<(), InferError> {
        match self.readiness.phase() {
            Phase::Starting => Err(InferError::NotReady),
            Phase::Ready => Ok(()),
            Phase::Draining => Err(InferError::ShuttingDown),
        }
    }

    /// The request names the served model.
    pub fn check_model(&self, name: &str) -> Result<(), InferError> {
        if name == self.model.name {
            Ok(())
        } else {
            Err(InferError::UnknownModel {
                requested: name.into(),
                served: self.model.name.clone(),
            })
        }
    }

    /// The request names the served model's one version, or none.
    pub fn check_version(&self, version: &str) -> Result<(), InferError> {
        if version.is_empty() || version == tensor::MODEL_VERSION {
            Ok(())
        } else {
            Err(InferError::UnknownModel {
                requested: format!("{} version {version}", self.model.name),
                served: format!("{} version {}", self.model.name, tensor::MODEL_VERSION),
            })
        }
    }

    /// Runs `work` until `deadline`: reading the request, decoding, queueing and the forward
    /// pass all count against it.
    pub async fn within<T, E: From<InferError>>(
        &self,
        deadline: Deadline,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        tokio::time::timeout_at(deadline.at, work)
            .await
            .unwrap_or_else(|_| {
                Err(InferError::Timeout {
                    ms: deadline.budget_ms(),
                }
                .into())
            })
    }

    /// Admits, decodes if need be, queues and runs `input`: its logits, in order.
    pub async fn logits(
        &self,
        input: ModelInput,
        deadline: Deadline,
    ) -> Result<Logits, InferError> {
        let n = input.len();
        let budget_ms = deadline.budget_ms();
        // Slots first: a full queue is refused before any decoding work.
        let admission = self
            .batcher
            .admit(n)
            .map_err(|e| InferError::from_batch(e, budget_ms))?;
        let pixels = match input {
            ModelInput::Pixels { pixels, .. } => pixels,
            ModelInput::Images(images) => self.decode(images).await?,
        };
        let values = self
            .batcher
            .submit(admission, pixels, deadline.at)
            .await
            .map_err(|e| InferError::from_batch(e, budget_ms))?;
        let logits = Logits::new(values, self.model.num_classes);
        for row in logits.rows() {
            let (class, confidence) = scores::top1(row);
            self.predictions.record_prediction(class, confidence);
        }
        Ok(logits)
    }

    /// Decodes and normalises `images` holding decode slots weighed by their declared pixels:
    /// small ones ([`decode_inline`]) right here, the others on the blocking pool.
    async fn decode(&self, images: Vec<Bytes>) -> Result<Vec<f32>, InferError> {
        let n = images.len();
        // Each header is read once: for the input metrics and for the decode slots.
        let declared: Vec<Option<u64>> = images.iter().map(|b| declared_pixels(b)).collect();
        for (bytes, &pixels) in images.iter().zip(&declared) {
            self.predictions.record_input(format_name(bytes), pixels);
        }
        let inline = decode_inline(&declared, self.limits.max_image_pixels);
        let permits = permits_for(declared, self.limits.max_image_pixels);
        let slot = self
            .decode_slots
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|e| InferError::Internal(format!("decoder pool closed: {e}")))?;
        let (mean, std) = (self.model.mean, self.model.std);
        let options = DecodeOptions {
            max_pixels: self.limits.max_image_pixels,
            load_truncated: self.limits.load_truncated_images,
        };
        let span = tracing::info_span!("decode", images = n, inline);
        let decode_all = move || {
            let _in_span = span.enter();
            let _slot = slot;
            let mut pixels = Vec::with_capacity(n * IMAGE_FLOATS);
            for (i, bytes) in images.iter().enumerate() {
                let image = preprocess_with(bytes, &mean, &std, &options).map_err(|error| {
                    InferError::Image {
                        index: (n > 1).then_some(i),
                        error,
                    }
                })?;
                pixels.extend_from_slice(&image);
            }
            Ok(pixels)
        };
        let failed = |cause: &dyn std::fmt::Display| {
            InferError::Internal(format!("image decoding failed: {cause}"))
        };
        if inline {
            // A decoder bug costs this request a 500, as on the pool, not the connection.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode_all))
                .map_err(|_| failed(&"the decoder panicked"))?
        } else {
            tokio::task::spawn_blocking(decode_all)
                .await
                .map_err(|e| failed(&e))?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sub_millisecond_deadline_reads_one_ms() {
        let ms = |budget| Deadline::after(Instant::now(), budget).budget_ms();
        assert_eq!(ms(Duration::from_micros(100)), 1);
        assert_eq!(ms(Duration::from_millis(30)), 30);
        assert_eq!(ms(Duration::MAX), u64::MAX);
    }
}
