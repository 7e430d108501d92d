//! JPEG exactly as Pillow reads it: `Image.open` (the header walk), `load()` (libjpeg-turbo
//! with Pillow's settings and truncation rules) and `.convert("RGB")`.

mod header;
mod libjpeg;

pub use header::{Header, HeaderError, MAGIC};
use libjpeg::Outcome;

use super::{PreprocessError, RgbImage};

/// Whether Pillow would open `bytes` with its JPEG plugin.
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

/// `Image.open`: the header, or why Pillow refuses the file.
pub fn header(bytes: &[u8]) -> Result<Header, PreprocessError> {
    header::parse(bytes).map_err(|e| match e {
        HeaderError::Truncated(_) => PreprocessError::Truncated(format!("JPEG: {e}")),
        HeaderError::Invalid(_) => PreprocessError::Decode(format!("JPEG header: {e}")),
    })
}

/// `Image.open(...).convert("RGB")` of a JPEG whose header is `header` (already checked against
/// the pixel limit). With `load_truncated`, as Pillow with `ImageFile.LOAD_TRUNCATED_IMAGES`:
/// a file cut short or broken mid-way keeps what was decoded, the rest black.
pub fn decode_rgb8(
    bytes: &[u8],
    header: &Header,
    load_truncated: bool,
) -> Result<RgbImage, PreprocessError> {
    if !header.has_scan {
        // Pillow: "cannot load this image", LOAD_TRUNCATED_IMAGES or not.
        return Err(PreprocessError::Truncated(
            "JPEG: image file is truncated (the data ends before the image data)".into(),
        ));
    }
    let decoded = libjpeg::decode(bytes, header, load_truncated);
    match decoded.outcome {
        Outcome::Done => {}
        _ if load_truncated => {
            tracing::debug!(
                outcome = ?decoded.outcome,
                rows = decoded.rows,
                height = header.height,
                "incomplete JPEG kept (load truncated images)"
            );
        }
        Outcome::Suspended { unprocessed } => {
            return Err(PreprocessError::Truncated(format!(
                "JPEG: image file is truncated ({unprocessed} bytes not processed)"
            )));
        }
        Outcome::Broken(message) => {
            return Err(PreprocessError::Decode(format!(
                "JPEG: broken data stream when reading image file ({message})"
            )));
        }
    }
    Ok(RgbImage {
        width: header.width,
        height: header.height,
        pixels: to_rgb(decoded.pixels, header.components),
    })
}

/// Pillow's `.convert("RGB")` from "L" (replicated), "RGB" (as is) or "CMYK" (`cmyk2rgb`).
fn to_rgb(pixels: Vec<u8>, components: u8) -> Vec<u8> {
    let mut rgb = Vec::new();
    match components {
        1 => {
            rgb.reserve_exact(pixels.len() * 3);
            for &v in &pixels {
                rgb.extend_from_slice(&[v; 3]);
            }
        }
        4 => {
            rgb.reserve_exact(pixels.len() / 4 * 3);
            for p in pixels.chunks_exact(4) {
                let nk = 255 - i32::from(p[3]);
                rgb.extend_from_slice(
                    &[p[0], p[1], p[2]].map(|c| clip8(nk - muldiv255(i32::from(c), nk))),
                );
            }
        }
        _ => return pixels,
    }
    rgb
}

/// Pillow's `MULDIV255`: a * b / 255, rounded, in integers.
#[inline]
fn muldiv255(a: i32, b: i32) -> i32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}

/// Pillow's `CLIP8`.
#[inline]
fn clip8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_converts_as_pillow() {
        // Values computed with Pillow: Image.new("CMYK", (1, 1), c).convert("RGB").
        let cases: [([u8; 4], [u8; 3]); 4] = [
            ([0, 0, 0, 0], [255, 255, 255]),
            ([255, 255, 255, 255], [0, 0, 0]),
            ([10, 100, 200, 30], [216, 137, 49]),
            ([0, 128, 255, 128], [127, 63, 0]),
        ];
        for (cmyk, rgb) in cases {
            assert_eq!(to_rgb(cmyk.to_vec(), 4), rgb.to_vec(), "{cmyk:?}");
        }
    }

    #[test]
    fn gray_is_replicated() {
        assert_eq!(to_rgb(vec![7, 200], 1), vec![7, 7, 7, 200, 200, 200]);
    }
}
