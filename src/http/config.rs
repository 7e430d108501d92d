//! [`ServerConfig`]: how the server batches, bounds and times requests, and who may call it;
//! with its defaults, which `serve`'s flags take too. Held by the HTTP state; also at
//! `crate::server::ServerConfig`.

use std::time::Duration;

use super::auth::AccessConfig;
use crate::infer::InferLimits;

/// How the server batches, bounds and times requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub max_batch_size: usize,
    pub max_batch_delay: Duration,
    /// Images admitted (being decoded or queued) at once; beyond that: 429.
    pub queue_capacity: usize,
    /// From arrival to answer; past it: 504.
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_image_pixels: u64,
    /// Keep what truncated or damaged JPEGs decode to, as Pillow's `LOAD_TRUNCATED_IMAGES`.
    pub load_truncated_images: bool,
    /// Most images in one `/classify/batch` request.
    pub max_images_per_request: usize,
    /// API key and CORS; open by default.
    pub access: AccessConfig,
}

impl Default for ServerConfig {
    /// The defaults, which `serve`'s flags take too.
    fn default() -> Self {
        Self {
            max_batch_size: 64,
            max_batch_delay: Duration::ZERO,
            queue_capacity: 1024,
            request_timeout: Duration::from_millis(10_000),
            max_body_bytes: 20 * 1024 * 1024,
            max_image_pixels: 40_000_000,
            load_truncated_images: false,
            max_images_per_request: 64,
            access: AccessConfig::default(),
        }
    }
}

impl ServerConfig {
    /// What bounds each inference request.
    pub fn infer_limits(&self) -> InferLimits {
        InferLimits {
            request_timeout: self.request_timeout,
            max_image_pixels: self.max_image_pixels,
            load_truncated_images: self.load_truncated_images,
            max_batch_size: self.max_batch_size,
        }
    }
}
