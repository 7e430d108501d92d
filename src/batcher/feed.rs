//! The queue as the model serves it ([`Feed`]): batches collected from the queue (where their
//! requests' waits end), and every request answered as soon as all its images' logits are in,
//! whichever of the engine's threads computed them, while the rest of its batch still runs.

use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{BatchError, Collector, Entry, Queued};
use crate::metrics::BatchMetrics;
use crate::model::engine::{check_input, EngineError, FedBatch, Feed};

/// What a request is answered with.
type Answer = Result<Vec<f32>, BatchError>;

/// Serves one run of [`crate::model::Engine::serve`]: it starts with a batch the model thread
/// collected (waiting for it if need be), then hands out whatever is queued whenever the engine
/// asks, until nothing is.
pub(super) struct QueueFeed<'a> {
    classes: usize,
    metrics: &'a BatchMetrics,
    state: Mutex<State<'a>>,
}

struct State<'a> {
    collector: &'a mut Collector<Entry>,
    /// The batch the feed starts with, until it is handed out.
    first: Option<Vec<Entry>>,
    /// Nothing was queued when the engine last asked: the feed is done.
    done: bool,
    next_id: u64,
    /// Batches handed out and not yet finished, oldest first.
    open: Vec<OpenBatch>,
}

/// A batch handed out whose images are not all delivered yet.
struct OpenBatch {
    id: u64,
    images: usize,
    /// Images neither delivered nor failed.
    left: usize,
    requests: Vec<Request>,
    started: std::time::Instant,
    /// The batch's `forward_pass` span, which ends when the batch does.
    _span: tracing::Span,
}

/// A request of an open batch: images `first..first + images` of it.
struct Request {
    first: usize,
    images: usize,
    /// Images whose logits are still to come.
    left: usize,
    logits: Vec<f32>,
    /// Taken when the request is answered.
    respond: Option<oneshot::Sender<Answer>>,
}

impl<'a> QueueFeed<'a> {
    pub(super) fn new(
        first: Vec<Entry>,
        collector: &'a mut Collector<Entry>,
        classes: usize,
        metrics: &'a BatchMetrics,
    ) -> Self {
        Self {
            classes,
            metrics,
            state: Mutex::new(State {
                collector,
                first: Some(first),
                done: false,
                next_id: 0,
                open: Vec::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<'a>> {
        // Nothing panics while holding the lock; if something did, the state is still whole.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails every open batch with `message`: after the engine panicked.
    pub(super) fn fail_open(&self, message: &str) {
        let open = std::mem::take(&mut self.state().open);
        for batch in open {
            self.finish_failed(batch, message);
        }
    }

    /// Makes a batch of `entries`, their pixels appended to `pixels`, or `None` when none of
    /// them is still wanted. Their waits in the queue end here.
    fn open(
        &self,
        state: &mut State<'_>,
        entries: Vec<Entry>,
        pixels: &mut Vec<f32>,
    ) -> Option<FedBatch> {
        let now = Instant::now();
        let mut kept = Vec::with_capacity(entries.len());
        for entry in entries {
            // The batch may have waited for the model: drop what went stale meanwhile.
            let Some(mut entry) = entry.still_wanted(now) else {
                continue;
            };
            entry.admission = None;
            self.metrics
                .queue_wait
                .record(now.saturating_duration_since(entry.enqueued_at));
            if let Err(e) = check_input(&entry.pixels, entry.images) {
                let _ = entry
                    .respond
                    .send(Err(BatchError::Inference(e.to_string())));
                continue;
            }
            kept.push(entry);
        }
        let images: usize = kept.iter().map(|e| e.images).sum();
        if images == 0 {
            return None;
        }
        // One span per batch, in a trace of its own, linked to every request's queue wait.
        let span = tracing::info_span!(
            parent: None,
            "forward_pass",
            batch_size = images,
            requests = kept.len()
        );
        let mut requests = Vec::with_capacity(kept.len());
        let mut first = 0;
        for mut entry in kept {
            span.follows_from(&entry.queue_wait);
            pixels.append(&mut entry.pixels);
            requests.push(Request {
                first,
                images: entry.images,
                left: entry.images,
                logits: vec![0.0; entry.images * self.classes],
                respond: Some(entry.respond),
            });
            first += entry.images;
        }
        self.metrics.batch_size.record(images as f64);
        let id = state.next_id;
        state.next_id += 1;
        state.open.push(OpenBatch {
            id,
            images,
            left: images,
            requests,
            started: std::time::Instant::now(),
            _span: span,
        });
        Some(FedBatch { id, images })
    }

    fn finish_failed(&self, batch: OpenBatch, message: &str) {
        tracing::error!(
            error = message,
            images = batch.images,
            "forward pass failed; failing its batch"
        );
        self.metrics.inference.record(batch.started.elapsed());
        for request in batch.requests {
            if let Some(respond) = request.respond {
                let _ = respond.send(Err(BatchError::Inference(message.to_string())));
            }
        }
    }
}

impl Feed for QueueFeed<'_> {
    fn next_batch(&self, pixels: &mut Vec<f32>) -> Option<FedBatch> {
        let mut state = self.state();
        loop {
            if state.done {
                return None;
            }
            let entries = match state.first.take() {
                Some(entries) => entries,
                None => match state.collector.try_next_batch() {
                    Some(entries) => entries,
                    None => {
                        state.done = true;
                        return None;
                    }
                },
            };
            if let Some(batch) = self.open(&mut state, entries, pixels) {
                return Some(batch);
            }
        }
    }

    fn deliver(&self, batch: u64, first: usize, logits: &[f32]) {
        let classes = self.classes;
        let mut answers = Vec::new();
        let mut state = self.state();
        // A batch already failed (or never handed out) has nobody left to answer.
        let Some(at) = state.open.iter().position(|b| b.id == batch) else {
            return;
        };
        let open = &mut state.open[at];
        let count = logits.len() / classes.max(1);
        if count * classes != logits.len() || first + count > open.images {
            let error = EngineError::OutputLength {
                images: open.images,
                classes,
                got: logits.len(),
            };
            let open = state.open.remove(at);
            drop(state);
            self.finish_failed(open, &error.to_string());
            return;
        }
        let end = first + count;
        for request in &mut open.requests {
            let (from, to) = (
                first.max(request.first),
                end.min(request.first + request.images),
            );
            if from >= to {
                continue;
            }
            request.logits[(from - request.first) * classes..(to - request.first) * classes]
                .copy_from_slice(&logits[(from - first) * classes..(to - first) * classes]);
            request.left = request.left.saturating_sub(to - from);
            if request.left == 0 {
                if let Some(respond) = request.respond.take() {
                    answers.push((respond, std::mem::take(&mut request.logits)));
                }
            }
        }
        open.left = open.left.saturating_sub(count);
        if open.left == 0 {
            let open = state.open.remove(at);
            self.metrics.inference.record(open.started.elapsed());
            self.metrics.images.increment(open.images as u64);
        }
        drop(state);
        // Answered outside the lock: waking a request's task is the slowest part.
        for (respond, logits) in answers {
            let _ = respond.send(Ok(logits));
        }
    }

    fn fail(&self, batch: u64, error: &EngineError) {
        let mut state = self.state();
        let Some(at) = state.open.iter().position(|b| b.id == batch) else {
            return;
        };
        let open = state.open.remove(at);
        drop(state);
        self.finish_failed(open, &error.to_string());
    }
}

impl Drop for QueueFeed<'_> {
    fn drop(&mut self) {
        // Only an engine that returned from `serve` without finishing a batch leaves one open.
        self.fail_open("the engine stopped before computing the batch");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::{mpsc, oneshot};

    use super::*;
    use crate::batcher::BatchPolicy;
    use crate::metrics::Metrics;
    use crate::model::IMAGE_FLOATS;

    const CLASSES: usize = 10;

    /// An entry of `images` images whose pixels are all `marker`, and where its answer arrives.
    fn entry(images: usize, marker: f32) -> (Entry, oneshot::Receiver<Answer>) {
        let (respond, answer) = oneshot::channel();
        let entry = Entry {
            pixels: vec![marker; images * IMAGE_FLOATS],
            images,
            enqueued_at: Instant::now(),
            deadline: Instant::now() + Duration::from_secs(60),
            respond,
            admission: None,
            queue_wait: tracing::Span::none(),
        };
        (entry, answer)
    }

    fn queue() -> (mpsc::Sender<Entry>, Collector<Entry>) {
        let (tx, rx) = mpsc::channel(16);
        let policy = BatchPolicy {
            max_batch_size: 64,
            max_delay: Duration::ZERO,
        };
        (tx, Collector::new(rx, policy))
    }

    fn metrics() -> BatchMetrics {
        Metrics::new(64, vec![]).unwrap().batch()
    }

    /// Logits for images `images` of a batch: image i, class c gets `100 i + c`.
    fn logits(images: std::ops::Range<usize>) -> Vec<f32> {
        images
            .flat_map(|i| (0..CLASSES).map(move |c| (100 * i + c) as f32))
            .collect()
    }

    fn answered(answer: &mut oneshot::Receiver<Answer>) -> Option<Answer> {
        answer.try_recv().ok()
    }

    #[test]
    fn each_request_is_answered_once_its_images_are_in_whatever_the_order() {
        let (a, mut to_a) = entry(1, 1.0);
        let (b, mut to_b) = entry(3, 2.0);
        let (c, mut to_c) = entry(2, 3.0);
        let (_tx, mut collector) = queue();
        let metrics = metrics();
        let feed = QueueFeed::new(vec![a, b, c], &mut collector, CLASSES, &metrics);
        let mut pixels = Vec::new();
        let batch = feed.next_batch(&mut pixels).unwrap();
        assert_eq!(batch.images, 6);
        let markers: Vec<f32> = pixels.chunks_exact(IMAGE_FLOATS).map(|p| p[0]).collect();
        assert_eq!(markers, [1.0, 2.0, 2.0, 2.0, 3.0, 3.0]);

        feed.deliver(batch.id, 4, &logits(4..6));
        assert_eq!(answered(&mut to_c), Some(Ok(logits(4..6))));
        feed.deliver(batch.id, 1, &logits(1..3));
        assert_eq!(answered(&mut to_b), None, "one of its images is still out");
        feed.deliver(batch.id, 3, &logits(3..4));
        assert_eq!(answered(&mut to_b), Some(Ok(logits(1..4))));
        assert_eq!(answered(&mut to_a), None);
        feed.deliver(batch.id, 0, &logits(0..1));
        assert_eq!(answered(&mut to_a), Some(Ok(logits(0..1))));
        assert!(feed.state().open.is_empty());
        assert_eq!(feed.next_batch(&mut pixels), None);
    }

    #[test]
    fn a_failed_batch_answers_only_what_is_left_with_its_error() {
        let (a, mut to_a) = entry(1, 1.0);
        let (b, mut to_b) = entry(2, 2.0);
        let (c, mut to_c) = entry(1, 3.0);
        let (_tx, mut collector) = queue();
        let metrics = metrics();
        let feed = QueueFeed::new(vec![a, b], &mut collector, CLASSES, &metrics);
        let batch = feed.next_batch(&mut Vec::new()).unwrap();
        feed.deliver(batch.id, 0, &logits(0..1));
        feed.fail(batch.id, &EngineError::Failed("out of memory".into()));
        assert_eq!(answered(&mut to_a), Some(Ok(logits(0..1))));
        assert_eq!(
            answered(&mut to_b),
            Some(Err(BatchError::Inference("out of memory".into())))
        );
        // Late logits of a failed batch have nobody to go to.
        feed.deliver(batch.id, 1, &logits(1..3));
        drop(feed);

        // Logits that are not whole images fail the batch too.
        let feed = QueueFeed::new(vec![c], &mut collector, CLASSES, &metrics);
        let batch = feed.next_batch(&mut Vec::new()).unwrap();
        feed.deliver(batch.id, 0, &logits(0..1)[..CLASSES - 1]);
        match answered(&mut to_c) {
            Some(Err(BatchError::Inference(message))) => {
                assert!(message.contains("returned 9 logits"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn later_batches_are_what_is_queued_and_stale_or_malformed_entries_are_not_run() {
        let (a, _to_a) = entry(1, 1.0);
        let (tx, mut collector) = queue();
        let (mut stale, mut to_stale) = entry(1, 2.0);
        stale.deadline = Instant::now();
        let (mut malformed, mut to_malformed) = entry(2, 3.0);
        malformed.pixels.pop();
        let (d, mut to_d) = entry(2, 4.0);
        for e in [stale, malformed, d] {
            tx.try_send(e).unwrap();
        }
        let metrics = metrics();
        let feed = QueueFeed::new(vec![a], &mut collector, CLASSES, &metrics);
        let mut pixels = Vec::new();
        let first = feed.next_batch(&mut pixels).unwrap();
        assert_eq!(first.images, 1);
        pixels.clear();
        let second = feed.next_batch(&mut pixels).unwrap();
        assert_eq!((second.images, pixels.len()), (2, 2 * IMAGE_FLOATS));
        assert_ne!(first.id, second.id);
        assert!(pixels.iter().all(|&p| p == 4.0));
        assert_eq!(answered(&mut to_stale), Some(Err(BatchError::Timeout)));
        match answered(&mut to_malformed) {
            Some(Err(BatchError::Inference(message))) => {
                assert!(message.contains("floats for 2 images"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        feed.deliver(second.id, 0, &logits(0..2));
        assert_eq!(answered(&mut to_d), Some(Ok(logits(0..2))));

        // Once nothing was queued, the feed is done, even if more arrives: that waits for the
        // model thread's next collection.
        assert_eq!(feed.next_batch(&mut pixels), None);
        let (e, _to_e) = entry(1, 5.0);
        tx.try_send(e).unwrap();
        assert_eq!(feed.next_batch(&mut pixels), None);
    }

    #[test]
    fn open_batches_fail_when_the_engine_panics_or_returns_without_them() {
        let (a, mut to_a) = entry(1, 1.0);
        let (b, mut to_b) = entry(1, 2.0);
        let (_tx, mut collector) = queue();
        let metrics = metrics();
        let feed = QueueFeed::new(vec![a], &mut collector, CLASSES, &metrics);
        feed.next_batch(&mut Vec::new()).unwrap();
        feed.fail_open("the forward pass panicked: boom");
        assert_eq!(
            answered(&mut to_a),
            Some(Err(BatchError::Inference(
                "the forward pass panicked: boom".into()
            )))
        );
        drop(feed);

        let feed = QueueFeed::new(vec![b], &mut collector, CLASSES, &metrics);
        feed.next_batch(&mut Vec::new()).unwrap();
        drop(feed);
        assert!(matches!(
            answered(&mut to_b),
            Some(Err(BatchError::Inference(_)))
        ));
    }
}
