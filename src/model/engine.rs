//! The one interface every forward-pass engine offers, and that the batcher, `eval` and `bench`
//! all drive: normalised images in, logits out, both as flat `f32` slices.

use super::spec::IMAGE_FLOATS;

/// Why a forward pass gave no logits.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("expected {expected} floats for {images} images, got {got}")]
    InputLength {
        images: usize,
        expected: usize,
        got: usize,
    },
    #[error("the model returned {got} logits for {images} images of {classes} classes")]
    OutputLength {
        images: usize,
        classes: usize,
        got: usize,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A failure of an engine that has no error type of its own.
    #[error("{0}")]
    Failed(String),
}

/// A forward pass over a batch of images.
///
/// `&mut self` because an engine owns the memory its passes work in: the model thread that owns
/// the engine is its only user, so no lock is needed. Panics are not caught here; the model
/// thread (`batcher::worker`) is the one place that turns a panicking pass into an error of its
/// batch.
pub trait Engine: Send + 'static {
    /// `n` images laid out as `n * [3, 32, 32]` normalised floats to `n * classes` logits,
    /// row-major.
    fn logits(&mut self, images: &[f32], n: usize) -> Result<Vec<f32>, EngineError>;

    /// Runs the batches of `feed` until it has none: how the model thread serves its queue.
    /// This default runs them one at a time through [`Self::logits`]. An engine that shares a
    /// batch between threads overrides it to start the next batch on a thread that has finished
    /// its share of the current one, instead of leaving that thread idle until the others finish.
    fn serve(&mut self, feed: &dyn Feed) {
        let mut pixels = Vec::new();
        while let Some(batch) = feed.next_batch(&mut pixels) {
            match self.logits(&pixels, batch.images) {
                Ok(logits) => feed.deliver(batch.id, 0, &logits),
                Err(e) => feed.fail(batch.id, &e),
            }
            pixels.clear();
        }
    }
}

/// Where [`Engine::serve`] takes its batches and sends their logits: the batcher's queue.
pub trait Feed: Sync {
    /// The next batch (everything queued right now, up to the batch limit), its images appended
    /// to `pixels` as `images * [3, 32, 32]` normalised floats; `None` when nothing is queued.
    /// After the first `None`, the feed is done: every later call returns `None`, and `serve`
    /// returns once the batches it holds are delivered.
    fn next_batch(&self, pixels: &mut Vec<f32>) -> Option<FedBatch>;
    /// The logits (`classes` per image, row-major) of images `first..` of batch `batch`, in any
    /// order and any number of calls: each image of a batch is delivered once.
    fn deliver(&self, batch: u64, first: usize, logits: &[f32]);
    /// The pass of batch `batch` failed: its images not delivered yet get no logits.
    fn fail(&self, batch: u64, error: &EngineError);
}

/// A batch handed out by a [`Feed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FedBatch {
    /// Names the batch in [`Feed::deliver`] and [`Feed::fail`].
    pub id: u64,
    pub images: usize,
}

/// Checks that `images` holds exactly `n` images: the first thing every engine does.
pub fn check_input(images: &[f32], n: usize) -> Result<(), EngineError> {
    let expected = n.saturating_mul(IMAGE_FLOATS);
    if images.len() == expected {
        Ok(())
    } else {
        Err(EngineError::InputLength {
            images: n,
            expected,
            got: images.len(),
        })
    }
}

/// Checks that an engine returned `classes` logits for each of `n` images.
pub fn check_output(logits: &[f32], n: usize, classes: usize) -> Result<(), EngineError> {
    if logits.len() == n.saturating_mul(classes) {
        Ok(())
    } else {
        Err(EngineError::OutputLength {
            images: n,
            classes,
            got: logits.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_checked_in_images_and_classes() {
        assert!(check_input(&vec![0.0; 2 * IMAGE_FLOATS], 2).is_ok());
        let err = check_input(&vec![0.0; IMAGE_FLOATS + 1], 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "expected {IMAGE_FLOATS} floats for 1 images, got {}",
                IMAGE_FLOATS + 1
            )
        );
        assert!(check_output(&[0.0; 20], 2, 10).is_ok());
        assert!(matches!(
            check_output(&[0.0; 19], 2, 10),
            Err(EngineError::OutputLength { got: 19, .. })
        ));
    }
}
