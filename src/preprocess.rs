//! Image bytes to model input, exactly as torchvision does on PIL images: decode, RGB,
//! `Resize(32)`, `CenterCrop(32)`, `ToTensor()`, `Normalize(mean, std)`.

use std::io::Cursor;

use image::{imageops::FilterType, ImageFormat, ImageReader, RgbImage};

use crate::model::{INPUT_CHANNELS, INPUT_SIZE};

/// Why image bytes could not become model input.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("the image is empty (0 bytes)")]
    Empty,
    #[error("unsupported image format: {0}")]
    UnsupportedFormat(String),
    #[error("the image declares {width}x{height} pixels, more than the limit of {limit}")]
    TooManyPixels { width: u32, height: u32, limit: u64 },
    #[error("the image could not be decoded: {0}")]
    Decode(String),
}

/// Decodes `bytes` and returns the `[3, 32, 32]` normalised floats (CHW) the model takes.
///
/// The header is read first: an image declaring more than `max_pixels` pixels is refused
/// before any pixel buffer is allocated.
pub fn preprocess(
    bytes: &[u8],
    mean: &[f32; 3],
    std: &[f32; 3],
    max_pixels: u64,
) -> Result<Vec<f32>, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let format = image::guess_format(bytes).map_err(|_| {
        PreprocessError::UnsupportedFormat(format!(
            "the data is not PNG, JPEG, GIF, BMP, WebP or TIFF (it starts with {})",
            hex_prefix(bytes)
        ))
    })?;
    if !matches!(
        format,
        ImageFormat::Png
            | ImageFormat::Jpeg
            | ImageFormat::Gif
            | ImageFormat::Bmp
            | ImageFormat::WebP
            | ImageFormat::Tiff
    ) {
        return Err(PreprocessError::UnsupportedFormat(format!(
            "{format:?} images are not decoded (supported: PNG, JPEG, GIF, BMP, WebP, TIFF)"
        )));
    }
    let reader = || {
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        let mut limits = image::Limits::default();
        // Bounds the decoder's buffers to what an allowed image needs (RGBA, 16 bits per channel).
        limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
        reader.limits(limits);
        reader
    };
    let (width, height) = reader()
        .into_dimensions()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(PreprocessError::TooManyPixels {
            width,
            height,
            limit: max_pixels,
        });
    }
    let decoded = reader()
        .decode()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    // `to_rgb8` drops alpha without compositing, as PIL's `.convert("RGB")` does.
    let rgb = resize_and_crop(decoded.to_rgb8());
    let mut out = Vec::with_capacity(INPUT_CHANNELS * INPUT_SIZE * INPUT_SIZE);
    normalize_chw(&hwc_to_chw(&rgb), mean, std, &mut out);
    Ok(out)
}

/// `Resize(32)` (shorter side to 32, antialiased bilinear) then `CenterCrop(32)`.
fn resize_and_crop(image: RgbImage) -> RgbImage {
    let size = INPUT_SIZE as u32;
    let (w, h) = image.dimensions();
    let resized = if w.min(h) == size {
        image
    } else {
        // torchvision truncates the longer side: int(size * long / short).
        let (short, long) = (w.min(h), w.max(h));
        let long = ((u64::from(size) * u64::from(long)) / u64::from(short).max(1)).max(1) as u32;
        let (nw, nh) = if w <= h { (size, long) } else { (long, size) };
        image::imageops::resize(&image, nw, nh, FilterType::Triangle)
    };
    let (w, h) = resized.dimensions();
    if (w, h) == (size, size) {
        return resized;
    }
    // torchvision: int(round((dim - crop) / 2.0)), Python rounding half to even.
    let offset = |dim: u32| {
        let twice = dim.saturating_sub(size);
        let half = twice / 2;
        if twice % 2 == 1 && half % 2 == 1 {
            half + 1
        } else {
            half
        }
    };
    image::imageops::crop_imm(&resized, offset(w), offset(h), size, size).to_image()
}

/// Interleaved RGB (HWC) to planar (CHW).
fn hwc_to_chw(image: &RgbImage) -> Vec<u8> {
    let plane = (image.width() * image.height()) as usize;
    let mut out = vec![0u8; plane * 3];
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = pixel.0[c];
        }
    }
    out
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `ToTensor()` then `Normalize(mean, std)` of an RGB CHW u8 image, appended to `out`,
/// computed in f32 in the same order as torchvision so the floats match bit for bit.
pub fn normalize_chw(pixels: &[u8], mean: &[f32; 3], std: &[f32; 3], out: &mut Vec<f32>) {
    let plane = pixels.len() / 3;
    out.reserve(pixels.len());
    for (c, channel) in pixels.chunks_exact(plane.max(1)).take(3).enumerate() {
        out.extend(
            channel
                .iter()
                .map(|&v| (v as f32 / 255.0 - mean[c]) / std[c]),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEAN: [f32; 3] = [0.5, 0.5, 0.5];
    const STD: [f32; 3] = [0.25, 0.25, 0.25];

    fn png(width: u32, height: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let image = RgbImage::from_fn(width, height, |x, y| image::Rgb(f(x, y)));
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn a_32x32_png_skips_resizing_and_is_normalised_per_channel() {
        let bytes = png(32, 32, |x, y| [x as u8, y as u8, 255]);
        let out = preprocess(&bytes, &MEAN, &STD, 1 << 20).unwrap();
        assert_eq!(out.len(), 3 * 32 * 32);
        // red at (x=5, y=7) is 5, green is 7, blue is 255.
        let at = |c: usize| out[c * 1024 + 7 * 32 + 5];
        assert_eq!(at(0), (5.0 / 255.0 - 0.5) / 0.25);
        assert_eq!(at(1), (7.0 / 255.0 - 0.5) / 0.25);
        assert_eq!(at(2), (1.0 - 0.5) / 0.25);
    }

    #[test]
    fn a_larger_image_is_resized_and_centre_cropped() {
        let bytes = png(
            96,
            64,
            |x, _| if x < 48 { [0, 0, 0] } else { [255, 255, 255] },
        );
        let out = preprocess(&bytes, &MEAN, &STD, 1 << 20).unwrap();
        assert_eq!(out.len(), 3 * 32 * 32);
        // 96x64 -> 48x32 -> crop columns 8..40: the left quarter black, the right quarter white.
        assert_eq!(out[0], (0.0 - 0.5) / 0.25);
        assert_eq!(out[31], (1.0 - 0.5) / 0.25);
    }

    #[test]
    fn errors_name_their_cause() {
        assert!(matches!(
            preprocess(b"", &MEAN, &STD, 100),
            Err(PreprocessError::Empty)
        ));
        assert!(matches!(
            preprocess(b"hello, world", &MEAN, &STD, 100),
            Err(PreprocessError::UnsupportedFormat(_))
        ));
        let bytes = png(32, 32, |_, _| [1, 2, 3]);
        assert!(matches!(
            preprocess(&bytes, &MEAN, &STD, 1023),
            Err(PreprocessError::TooManyPixels {
                width: 32,
                height: 32,
                limit: 1023
            })
        ));
        assert!(matches!(
            preprocess(&bytes[..bytes.len() / 2], &MEAN, &STD, 1 << 20),
            Err(PreprocessError::Decode(_))
        ));
    }
}
