//! [`InferError`]: why an inference request got no answer, in words every protocol shares; the
//! HTTP and gRPC front-ends each map it to their status codes in one place.

use crate::batcher::BatchError;
use crate::preprocess::PreprocessError;

/// Everything the inference layer can refuse or fail with. The message names the cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InferError {
    /// The request's tensors, parameters or outputs do not fit the model.
    #[error("{0}")]
    InvalidInput(String),
    #[error("unknown model {requested:?}; this server serves {served:?}")]
    UnknownModel { requested: String, served: String },
    /// An image could not become model input; `index` numbers it (from 0) in a request of
    /// several.
    #[error("{}{error}", index.map(|i| format!("image {i}: ")).unwrap_or_default())]
    Image {
        index: Option<usize>,
        error: PreprocessError,
    },
    #[error("the queue is full ({capacity} images admitted)")]
    Overloaded { capacity: usize },
    #[error("the model is not ready yet: the warm-up forward pass has not finished")]
    NotReady,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the request did not complete within its deadline of {ms} ms")]
    Timeout { ms: u64 },
    /// The forward pass or the machinery around it failed; not the client's doing.
    #[error("{0}")]
    Internal(String),
}

impl InferError {
    /// A batching failure, for a request whose deadline was `budget_ms` after arrival.
    pub fn from_batch(error: BatchError, budget_ms: u64) -> Self {
        match error {
            BatchError::Overloaded { capacity } => Self::Overloaded { capacity },
            BatchError::Timeout => Self::Timeout { ms: budget_ms },
            BatchError::Inference(e) => Self::Internal(format!("the forward pass failed: {e}")),
            BatchError::Stopped => Self::ShuttingDown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_errors_name_the_image_in_a_request_of_several() {
        let error = |index| InferError::Image {
            index,
            error: PreprocessError::Empty,
        };
        assert_eq!(error(None).to_string(), "the image is empty (0 bytes)");
        assert_eq!(
            error(Some(2)).to_string(),
            "image 2: the image is empty (0 bytes)"
        );
    }
}
