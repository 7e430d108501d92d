//! Image bytes to model input, exactly as torchvision does on PIL images:
//! decode, `.convert("RGB")`, `Resize(32)` (bilinear, antialiased, rounded to uint8),
//! `CenterCrop(32)`, `ToTensor()`, `Normalize(mean, std)`.

mod decode;
mod jpeg;
mod resample;

pub use decode::{
    declared_dimensions, decode_rgb8, decode_rgb8_with, format_name, DecodeOptions, RgbImage,
};
pub use resample::resize_shorter_and_center_crop;

use crate::model::{IMAGE_FLOATS, INPUT_SIZE};

/// Why an upload cannot become model input. The HTTP layer maps each to a status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreprocessError {
    #[error("the image is empty (0 bytes)")]
    Empty,
    #[error("unsupported image format: {0}")]
    UnsupportedFormat(String),
    #[error("image of {width}x{height} pixels exceeds the limit of {limit} pixels")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("the image could not be decoded: {0}")]
    Decode(String),
    /// The data ends before the image does, and Pillow would refuse it ("image file is
    /// truncated") unless told to load truncated images.
    #[error("the image could not be decoded: {0}")]
    Truncated(String),
}

/// Decodes `bytes` and returns the `[3, 32, 32]` normalised CHW floats torchvision would produce.
/// Images whose header declares more than `max_pixels` are refused before any pixel is decoded.
pub fn preprocess(
    bytes: &[u8],
    mean: &[f32; 3],
    std: &[f32; 3],
    max_pixels: u64,
) -> Result<Vec<f32>, PreprocessError> {
    preprocess_with(
        bytes,
        mean,
        std,
        &DecodeOptions::with_max_pixels(max_pixels),
    )
}

/// [`preprocess`] with every decoding option: the pixel limit and whether truncated images
/// are loaded as Pillow's `ImageFile.LOAD_TRUNCATED_IMAGES` loads them.
pub fn preprocess_with(
    bytes: &[u8],
    mean: &[f32; 3],
    std: &[f32; 3],
    options: &DecodeOptions,
) -> Result<Vec<f32>, PreprocessError> {
    let image = decode_rgb8_with(bytes, options)?;
    let cropped = resize_shorter_and_center_crop(&image, INPUT_SIZE as u32);
    let mut out = Vec::with_capacity(IMAGE_FLOATS);
    normalize_hwc(&cropped.pixels, mean, std, &mut out);
    Ok(out)
}

/// `ToTensor()` then `Normalize(mean, std)` of an interleaved RGB (HWC) u8 image into CHW
/// floats appended to `out`, computed in f32 in torchvision's order so the floats match.
pub fn normalize_hwc(rgb: &[u8], mean: &[f32; 3], std: &[f32; 3], out: &mut Vec<f32>) {
    let tables = normalized_bytes(mean, std);
    let pixels = rgb.chunks_exact(3);
    out.reserve(3 * pixels.len());
    for (c, table) in tables.iter().enumerate() {
        out.extend(pixels.clone().map(|p| table[usize::from(p[c])]));
    }
}

/// `ToTensor()` then `Normalize(mean, std)` of a planar RGB (CHW) u8 image, appended to `out`.
pub fn normalize_chw(pixels: &[u8], mean: &[f32; 3], std: &[f32; 3], out: &mut Vec<f32>) {
    let tables = normalized_bytes(mean, std);
    let plane = pixels.len() / 3;
    out.reserve(pixels.len());
    for (channel, table) in pixels.chunks_exact(plane.max(1)).zip(&tables) {
        out.extend(channel.iter().map(|&v| table[usize::from(v)]));
    }
}

/// Every byte value of each channel, normalised: a byte has 256 values, so looking them up
/// replaces two divisions per value, and the same function fills the table, so the floats are
/// the same.
fn normalized_bytes(mean: &[f32; 3], std: &[f32; 3]) -> [[f32; 256]; 3] {
    std::array::from_fn(|c| std::array::from_fn(|v| normalize(v as u8, mean[c], std[c])))
}

/// torchvision: `to_tensor` divides by 255 in float32, `normalize` does `sub_(mean).div_(std)`.
#[inline]
fn normalize(v: u8, mean: f32, std: f32) -> f32 {
    (v as f32 / 255.0 - mean) / std
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hwc_and_chw_normalisation_agree() {
        let hwc: Vec<u8> = (0..12).map(|v| v * 20).collect(); // 2x2 RGB
        let chw: Vec<u8> = (0..3)
            .flat_map(|c| hwc.iter().skip(c).step_by(3).copied().collect::<Vec<_>>())
            .collect();
        let (mean, std) = ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3]);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        normalize_hwc(&hwc, &mean, &std, &mut a);
        normalize_chw(&chw, &mean, &std, &mut b);
        assert_eq!(a, b);
        assert_eq!(a[0], (0.0 - 0.5) / 0.2);
        assert_eq!(a[4], (20.0 / 255.0 - 0.4) / 0.25); // first green value
    }

    #[test]
    fn empty_input_is_its_own_error() {
        assert_eq!(
            preprocess(&[], &[0.0; 3], &[1.0; 3], 1000),
            Err(PreprocessError::Empty)
        );
    }
}
