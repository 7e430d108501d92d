//! The model thread: warm-up, then, for as long as the queue is open, the next batch straight
//! off the queue (whatever arrived while the previous one ran), served to the engine with those
//! that arrive while it runs.

use std::any::Any;
use std::panic::AssertUnwindSafe;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use super::feed::QueueFeed;
use super::{Collector, Entry};
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
    while let Some(first) = runtime.block_on(collector.next_batch()) {
        // The engine takes further batches from the feed itself while it has threads to spare,
        // and returns once nothing is queued.
        let feed = QueueFeed::new(first, &mut collector, classes, &metrics);
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| model.serve(&feed))) {
            feed.fail_open(&panicked(&*panic));
        }
    }
    tracing::debug!("queue closed; model thread exits");
}

/// The warm-up's forward pass, with panics and malformed outputs turned into errors. This module
/// is the one place where a panicking forward pass is caught (here and around `serve`): the
/// engines let panics (bugs) unwind to it, and a panic fails only the batches being computed.
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
        Err(panic) => Err(panicked(&*panic)),
    }
}

/// What a caught panic of a forward pass says.
fn panicked(panic: &(dyn Any + Send)) -> String {
    format!(
        "the forward pass panicked: {}",
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".into())
    )
}
