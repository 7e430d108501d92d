//! Dynamic batching: requests enter a bounded queue (a semaphore of image slots, an mpsc of
//! entries); one model thread that owns the model takes batches off it by [`BatchPolicy`] and
//! runs them, and every request is answered through its own oneshot channel.

mod feed;
mod policy;
mod worker;

use std::sync::Arc;

use metrics::Gauge;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics::BatchMetrics;
use crate::model::engine::Engine;
use crate::shutdown::Readiness;
pub use policy::{saturating_add, BatchPolicy, Collector, Queued};

/// Resolves with the warm-up forward pass's outcome.
pub type WarmUp = oneshot::Receiver<Result<(), String>>;

/// Why a queued request got no logits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("the queue is full ({capacity} images admitted)")]
    Overloaded { capacity: usize },
    #[error("the deadline passed while the request was queued")]
    Timeout,
    #[error("the forward pass failed: {0}")]
    Inference(String),
    #[error("the model worker has stopped")]
    Stopped,
}

/// How the batcher is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherConfig {
    pub policy: BatchPolicy,
    /// Images that may be admitted (queued or being decoded) at once; beyond that: overloaded.
    pub queue_capacity: usize,
    /// Logits per image.
    pub num_classes: usize,
}

/// The handlers' side of the queue. Cloned into every request; when the last clone is dropped
/// the queue closes, the model thread finishes what is queued, and [`BatcherTask::finish`] returns.
#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::Sender<Entry>,
    slots: Arc<Semaphore>,
    capacity: usize,
    queue_depth: Gauge,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("capacity", &self.capacity)
            .field("free_slots", &self.slots.available_permits())
            .finish_non_exhaustive()
    }
}

/// Queue slots held by admitted images until their forward pass starts (or they are dropped).
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    images: usize,
    depth: Gauge,
}

impl Admission {
    pub fn images(&self) -> usize {
        self.images
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.depth.decrement(self.images as f64);
    }
}

/// One request in the queue.
pub(crate) struct Entry {
    /// `images * [3, 32, 32]` normalised floats.
    pixels: Vec<f32>,
    images: usize,
    enqueued_at: Instant,
    deadline: Instant,
    respond: oneshot::Sender<Result<Vec<f32>, BatchError>>,
    /// Dropped when the entry leaves the queue, freeing its slots.
    admission: Option<Admission>,
    /// The request's wait in the queue: a child of its span, ended when its forward pass starts,
    /// which links back to it.
    queue_wait: tracing::Span,
}

impl Queued for Entry {
    fn images(&self) -> usize {
        self.images
    }

    fn enqueued_at(&self) -> Instant {
        self.enqueued_at
    }

    fn still_wanted(self, now: Instant) -> Option<Self> {
        if self.respond.is_closed() {
            tracing::debug!("skipping a request whose client went away");
            return None;
        }
        if now >= self.deadline {
            let _ = self.respond.send(Err(BatchError::Timeout));
            return None;
        }
        Some(self)
    }
}

impl Batcher {
    /// Starts the model thread, which first runs a warm-up forward pass, marks `readiness` ready
    /// and reports through the returned receiver, then serves the queue. Call it inside a tokio
    /// runtime: its timer drives the optional batching delay.
    pub fn start<M: Engine>(
        model: M,
        config: BatcherConfig,
        metrics: BatchMetrics,
        readiness: Readiness,
    ) -> std::io::Result<(Self, BatcherTask, WarmUp)> {
        let capacity = config.queue_capacity.max(1);
        // Every entry holds at least one slot, so the channel never fills before the slots do.
        let (queue_tx, queue_rx) = mpsc::channel(capacity);
        let (warm_tx, warm_rx) = oneshot::channel();
        let collector = Collector::new(queue_rx, config.policy);
        let runtime = tokio::runtime::Handle::current();
        let thread_metrics = metrics.clone();
        let model_thread = std::thread::Builder::new()
            .name("model-worker".into())
            .spawn(move || {
                worker::run(
                    model,
                    collector,
                    runtime,
                    config.num_classes,
                    thread_metrics,
                    readiness,
                    warm_tx,
                )
            })?;
        let batcher = Self {
            queue: queue_tx,
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            queue_depth: metrics.queue_depth,
        };
        Ok((batcher, BatcherTask { model_thread }, warm_rx))
    }

    /// Reserves queue slots for `images` images, or fails at once when the queue is full.
    pub fn admit(&self, images: usize) -> Result<Admission, BatchError> {
        let overloaded = BatchError::Overloaded {
            capacity: self.capacity,
        };
        let count = u32::try_from(images.max(1)).map_err(|_| overloaded.clone())?;
        let permit = self
            .slots
            .clone()
            .try_acquire_many_owned(count)
            .map_err(|_| overloaded)?;
        self.queue_depth.increment(images as f64);
        Ok(Admission {
            _permit: permit,
            images,
            depth: self.queue_depth.clone(),
        })
    }

    /// Queues the admitted images (`admission.images() * [3, 32, 32]` floats) and waits for
    /// their logits, `classes` per image in order. Past `deadline` while queued: [`BatchError::Timeout`].
    pub async fn submit(
        &self,
        admission: Admission,
        pixels: Vec<f32>,
        deadline: Instant,
    ) -> Result<Vec<f32>, BatchError> {
        let (respond, answer) = oneshot::channel();
        let entry = Entry {
            pixels,
            images: admission.images,
            enqueued_at: Instant::now(),
            deadline,
            respond,
            queue_wait: tracing::info_span!("queue_wait", images = admission.images),
            admission: Some(admission),
        };
        self.queue.try_send(entry).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => BatchError::Overloaded {
                capacity: self.capacity,
            },
            mpsc::error::TrySendError::Closed(_) => BatchError::Stopped,
        })?;
        answer.await.map_err(|_| BatchError::Stopped)?
    }
}

/// The running model thread.
#[derive(Debug)]
pub struct BatcherTask {
    model_thread: std::thread::JoinHandle<()>,
}

impl BatcherTask {
    /// Waits until everything queued has been answered and the model thread has exited; call
    /// it after every [`Batcher`] clone is dropped.
    pub async fn finish(self) {
        let thread = self.model_thread;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => tracing::error!("the model thread panicked"),
            Err(e) => tracing::error!(error = %e, "joining the model thread failed"),
        }
    }
}
