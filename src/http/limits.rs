//! Request limits beyond the body limit: a body whose declared `Content-Length` exceeds the
//! limit is refused before any of it is read, and concurrent decoding is bounded by pixels as
//! well as by cores, so that many large legal images at once cannot exhaust memory.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::error::ApiError;
use super::AppState;

/// 413 at once for a declared length over `max_body_bytes`; anything else passes through.
pub async fn refuse_declared_oversize(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let limit = state.config.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(length) if length > u64::try_from(limit).unwrap_or(u64::MAX) => {
            tokio::spawn(linger(request.into_body()));
            ApiError::PayloadTooLarge(format!(
                "the request body declares {length} bytes; the limit is {limit}"
            ))
            .into_response()
        }
        _ => next.run(request).await,
    }
}

/// Most bytes of a refused body read and discarded after the 413 is sent.
const LINGER_BYTES: usize = 8 << 20;
/// Longest time a refused body is read and discarded after the 413 is sent.
const LINGER_TIME: Duration = Duration::from_secs(2);

/// Lingering read of a refused body: a client still sending would otherwise meet a connection
/// reset before it reads the 413. Discards chunk by chunk (nothing is kept), bounded in bytes and
/// time, after which the connection is closed.
async fn linger(body: Body) {
    let mut body = body;
    let mut discarded = 0usize;
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            discarded += frame.data_ref().map_or(0, |d| d.len());
            if discarded > LINGER_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// Declared pixels one decode slot stands for: a slot's share of decoding memory is about this
/// many pixels at 8-bit RGB plus the decoder's own buffers (~6 bytes a pixel, 24 MiB).
const PIXELS_PER_SLOT: u64 = 4_000_000;

/// Decode slots the server has: one per core.
pub fn decode_slots() -> u32 {
    std::thread::available_parallelism()
        .map_or(2, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .max(1)
}

/// Slots a request's images take while decoded: one per [`PIXELS_PER_SLOT`] they declare, at
/// least one and at most all of [`decode_slots`]. Images over `max_pixels`, or whose header
/// cannot be read, count for nothing: they are refused before any pixel is decoded.
pub fn decode_permits(images: &[Bytes], max_pixels: u64) -> u32 {
    let pixels: u64 = images
        .iter()
        .filter_map(|bytes| crate::preprocess::declared_dimensions(bytes).ok())
        .map(|(w, h)| u64::from(w) * u64::from(h))
        .filter(|&pixels| pixels <= max_pixels)
        .fold(0, u64::saturating_add);
    let permits = pixels.div_ceil(PIXELS_PER_SLOT).max(1);
    u32::try_from(permits)
        .unwrap_or(u32::MAX)
        .min(decode_slots())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Bytes {
        let image = image::RgbImage::new(width, height);
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        Bytes::from(out.into_inner())
    }

    #[test]
    fn large_images_take_more_decode_slots_and_refused_ones_none() {
        let slots = decode_slots();
        let small = png(32, 32);
        assert_eq!(decode_permits(&[small.clone(), small.clone()], 1 << 30), 1);
        // 3000x3000 = 9 M pixels: three slots' worth, if the machine has them.
        let large = png(3000, 3000);
        assert_eq!(
            decode_permits(std::slice::from_ref(&large), 1 << 30),
            3.min(slots)
        );
        // Over the pixel limit: refused from the header, so it weighs nothing.
        assert_eq!(decode_permits(&[large, small], 1_000_000), 1);
        assert_eq!(
            decode_permits(&[Bytes::from_static(b"not an image")], 100),
            1
        );
    }
}
