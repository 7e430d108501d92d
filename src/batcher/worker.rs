//! The model thread: warm-up, then, for as long as the queue is open, the next batch straight
//! off the queue (whatever arrived while the previous one ran) and one forward pass for it,
//! answering every entry.

use std::panic::AssertUnwindSafe;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{BatchError, Collector, Entry, Queued};
use crate::metrics::BatchMetrics;
use crate::model::engine::{check_output, Engine};
use crate::model::IMAGE_FLOATS;
use crate::shutdown::Readiness;

/// The model thread's body: owns the model until the queue closes and is empty.
///
/// The thread collects its own batches (on `runtime`, which drives the optional batching delay's
/// timer) instead of being handed them by a task: a finished pass starts the next one at once,
/// without waiting for a runtime worker that is busy answering the previous batch's requests.
pub(super) fn run<M: Engine>(
    mut model: M,
    mut collector: Collector<Entry>,
    runtime: Handle,
    classes: usize,
    metrics: BatchMetrics,
    readiness: Readiness,
    warmed_up: oneshot::Sender<Result<(), String>>,
) {
    let started = std::time::Instant::now();
    match forward(&mut model, &vec![0.0; IMAGE_FLOATS], 1, classes) {
        Ok(_) => {
            tracing::info!(
                ms = started.elapsed().as_secs_f64() * 1e3,
                "warm-up forward pass done; ready"
            );
            readiness.set_ready();
            let _ = warmed_up.send(Ok(()));
        }
        Err(e) => {
            tracing::error!(error = %e, "warm-up forward pass failed");
            let _ = warmed_up.send(Err(e));
            return;
        }
    }
    while let Some(entries) = runtime.block_on(collector.next_batch()) {
        run_batch(&mut model, entries, classes, &metrics);
    }
    tracing::debug!("queue closed; model thread exits");
}

fn run_batch<M: Engine>(model: &mut M, batch: Vec<Entry>, classes: usize, metrics: &BatchMetrics) {
    let now = Instant::now();
    let mut entries = Vec::with_capacity(batch.len());
    let mut pixels = Vec::new();
    for entry in batch {
        // The batch may have waited for the model: drop what went stale meanwhile.
        let Some(mut entry) = entry.still_wanted(now) else {
            continue;
        };
        entry.admission = None;
        metrics
            .queue_wait
            .record(now.saturating_duration_since(entry.enqueued_at));
        pixels.append(&mut entry.pixels);
        entries.push(entry);
    }
    let n: usize = entries.iter().map(|e| e.images).sum();
    if n == 0 {
        return;
    }
    // One span per forward pass, in a trace of its own, linked to every request's queue wait
    // (which ends here).
    let span = tracing::info_span!(
        parent: None,
        "forward_pass",
        batch_size = n,
        requests = entries.len()
    );
    for entry in &mut entries {
        let queue_wait = std::mem::replace(&mut entry.queue_wait, tracing::Span::none());
        span.follows_from(&queue_wait);
    }
    let _in_forward_pass = span.enter();
    let started = std::time::Instant::now();
    let result = forward(model, &pixels, n, classes);
    metrics.inference.record(started.elapsed());
    metrics.batch_size.record(n as f64);
    match result {
        Ok(logits) => {
            metrics.images.increment(n as u64);
            let mut rows = logits.chunks_exact(classes);
            for entry in entries {
                let mine: Vec<f32> = rows
                    .by_ref()
                    .take(entry.images)
                    .flatten()
                    .copied()
                    .collect();
                let _ = entry.respond.send(Ok(mine));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, images = n, "forward pass failed; failing its batch");
            for entry in entries {
                let _ = entry.respond.send(Err(BatchError::Inference(e.clone())));
            }
        }
    }
}

/// One forward pass, with panics and malformed outputs turned into errors so that a failure
/// costs only its own batch. This is the one place where a panicking forward pass is caught: the
/// engines let panics (bugs) unwind to here.
fn forward<M: Engine>(
    model: &mut M,
    pixels: &[f32],
    n: usize,
    classes: usize,
) -> Result<Vec<f32>, String> {
    // AssertUnwindSafe: an engine keeps no state across passes that a pass cut short could
    // leave half-written (its buffers are overwritten by every pass before they are read).
    match std::panic::catch_unwind(AssertUnwindSafe(|| model.logits(pixels, n))) {
        Ok(Ok(logits)) => match check_output(&logits, n, classes) {
            Ok(()) => Ok(logits),
            Err(e) => Err(e.to_string()),
        },
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!(
            "the forward pass panicked: {}",
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown cause".into())
        )),
    }
}
