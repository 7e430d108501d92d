//! Decode admission: how many of the server's decode slots (one per core) a request's images
//! take while they are decoded, weighed by the pixels their headers declare, so that many large
//! legal images at once cannot exhaust memory.

use std::sync::OnceLock;

use bytes::Bytes;

/// Declared pixels one decode slot stands for: a slot's share of decoding memory is about this
/// many pixels at 8-bit RGB plus the decoder's own buffers (~6 bytes a pixel, 24 MiB).
const PIXELS_PER_SLOT: u64 = 4_000_000;

/// Declared pixels (all of a request's images together) up to which they are decoded on the
/// runtime's worker instead of the blocking pool. Reading the header, decoding and normalising
/// took 17 us for the 32x32 cat PNG and about 95 us for a 64x64 one here
/// (`examples/preprocess_bench.rs`): about what the pool's two thread hand-offs cost, and within
/// the 100 us a task may run between awaits without holding up the worker's other tasks.
pub const INLINE_DECODE_PIXELS: u64 = 64 * 64;

/// Decode slots the server has: one per core.
pub fn decode_slots() -> u32 {
    // Read once: `available_parallelism` reads the cgroup's CPU quota files on every call, and
    // every request with images asks.
    static SLOTS: OnceLock<u32> = OnceLock::new();
    *SLOTS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(2, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .max(1)
    })
}

/// Whether images declaring these pixels are decoded on the runtime's worker: small enough, or
/// refused from their headers anyway (unreadable, or over `max_pixels`).
pub fn decode_inline(declared: &[Option<u64>], max_pixels: u64) -> bool {
    let mut total: u64 = 0;
    for pixels in declared {
        match *pixels {
            Some(pixels) if pixels <= max_pixels => total = total.saturating_add(pixels),
            _ => return true,
        }
    }
    total <= INLINE_DECODE_PIXELS
}

/// Slots a request's images take while decoded: one per [`PIXELS_PER_SLOT`] they declare, at
/// least one and at most all of [`decode_slots`]. Images over `max_pixels`, or whose header
/// cannot be read, count for nothing: they are refused before any pixel is decoded.
pub fn decode_permits(images: &[Bytes], max_pixels: u64) -> u32 {
    permits_for(
        images.iter().map(|bytes| declared_pixels(bytes)),
        max_pixels,
    )
}

/// The pixels an image's header declares, if it can be read.
pub fn declared_pixels(bytes: &[u8]) -> Option<u64> {
    crate::preprocess::declared_dimensions(bytes)
        .ok()
        .map(|(w, h)| u64::from(w) * u64::from(h))
}

/// [`decode_permits`] from each image's [`declared_pixels`], for callers that have read them.
pub fn permits_for(declared: impl IntoIterator<Item = Option<u64>>, max_pixels: u64) -> u32 {
    let pixels: u64 = declared
        .into_iter()
        .flatten()
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
    fn only_small_or_refused_images_decode_inline() {
        let limit = 1 << 20;
        assert!(decode_inline(&[Some(32 * 32)], limit));
        assert!(decode_inline(&[Some(32 * 32); 4], limit));
        assert!(!decode_inline(&[Some(32 * 32); 5], limit));
        assert!(!decode_inline(&[Some(224 * 224)], limit));
        // Refused before any pixel is decoded: nothing to hand to the pool.
        assert!(decode_inline(&[Some(224 * 224), None], limit));
        assert!(decode_inline(&[Some(limit + 1)], limit));
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
