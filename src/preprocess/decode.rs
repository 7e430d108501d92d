//! Decoding uploads to 8-bit RGB the way PIL's `Image.open(...).convert("RGB")` does, with the
//! pixel limit checked against the header before any pixel is decoded. JPEG goes through
//! libjpeg-turbo as in Pillow (see `jpeg`); every other format through the `image` crate.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use super::{jpeg, PreprocessError};

/// How uploads are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Images whose header declares more pixels are refused before decoding.
    pub max_pixels: u64,
    /// Keep what a truncated or damaged JPEG yields instead of refusing it, as Pillow does with
    /// `ImageFile.LOAD_TRUNCATED_IMAGES = True`.
    pub load_truncated: bool,
}

impl DecodeOptions {
    /// Pillow's defaults (truncated images refused) with a pixel limit.
    pub fn with_max_pixels(max_pixels: u64) -> Self {
        Self {
            max_pixels,
            load_truncated: false,
        }
    }
}

/// An interleaved 8-bit RGB image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    /// `height * width * 3` bytes, row-major RGB.
    pub pixels: Vec<u8>,
}

/// Formats we decode; anything else is 415.
const SUPPORTED: [ImageFormat; 6] = [
    ImageFormat::Png,
    ImageFormat::Jpeg,
    ImageFormat::Gif,
    ImageFormat::Bmp,
    ImageFormat::WebP,
    ImageFormat::Tiff,
];

/// A reader over an upload whose format has been recognised as one we decode.
type FormatReader<'a> = (ImageReader<Cursor<&'a [u8]>>, ImageFormat);

fn reader(bytes: &[u8]) -> Result<FormatReader<'_>, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PreprocessError::Decode(e.to_string()))?;
    match reader.format() {
        Some(format) if SUPPORTED.contains(&format) => Ok((reader, format)),
        Some(format) => Err(PreprocessError::UnsupportedFormat(format!(
            "{format:?} is not decoded (PNG, JPEG, GIF, BMP, WebP and TIFF are)"
        ))),
        None => Err(PreprocessError::UnsupportedFormat(
            "not a recognised image (PNG, JPEG, GIF, BMP, WebP or TIFF)".into(),
        )),
    }
}

/// The format of an upload by its magic bytes, as `resnet_input_format_total` names it: `png`,
/// `jpeg`, `gif`, `bmp`, `webp`, `tiff`, or `other` for anything not decoded.
pub fn format_name(bytes: &[u8]) -> &'static str {
    match image::guess_format(bytes) {
        Ok(ImageFormat::Png) => "png",
        Ok(ImageFormat::Jpeg) => "jpeg",
        Ok(ImageFormat::Gif) => "gif",
        Ok(ImageFormat::Bmp) => "bmp",
        Ok(ImageFormat::WebP) => "webp",
        Ok(ImageFormat::Tiff) => "tiff",
        _ => "other",
    }
}

/// The width and height the image's header declares, reading nothing else.
pub fn declared_dimensions(bytes: &[u8]) -> Result<(u32, u32), PreprocessError> {
    if jpeg::is_jpeg(bytes) {
        return jpeg::header(bytes).map(|h| (h.width, h.height));
    }
    if let Some(dimensions) = png_header_dimensions(bytes) {
        return Ok(dimensions);
    }
    let (reader, format) = reader(bytes)?;
    reader
        .into_dimensions()
        .map_err(|e| PreprocessError::Decode(format!("{format:?} header: {e}")))
}

/// The dimensions in a PNG's `IHDR`, which the format requires to be the first chunk, right
/// after the signature; `None` unless the upload starts that way, and then the decoder has its
/// say. Admission reads every upload's header, and a PNG decoder made only for that allocated
/// its inflate state and read every chunk before the pixels.
fn png_header_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    let rest = bytes.strip_prefix(SIGNATURE)?;
    let (length, rest) = rest.split_first_chunk::<4>()?;
    let (kind, rest) = rest.split_first_chunk::<4>()?;
    let (width, rest) = rest.split_first_chunk::<4>()?;
    let (height, _) = rest.split_first_chunk::<4>()?;
    (u32::from_be_bytes(*length) == 13 && kind == b"IHDR")
        .then(|| (u32::from_be_bytes(*width), u32::from_be_bytes(*height)))
}

/// Decodes `bytes` to 8-bit RGB as PIL's `.convert("RGB")` does, refusing images whose header
/// declares more than `max_pixels` pixels before decoding any of them.
pub fn decode_rgb8(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, PreprocessError> {
    decode_rgb8_with(bytes, &DecodeOptions::with_max_pixels(max_pixels))
}

/// [`decode_rgb8`] with every decoding option.
pub fn decode_rgb8_with(
    bytes: &[u8],
    options: &DecodeOptions,
) -> Result<RgbImage, PreprocessError> {
    let max_pixels = options.max_pixels;
    let check_pixels = |width: u32, height: u32| {
        if u64::from(width) * u64::from(height) > max_pixels {
            return Err(PreprocessError::TooManyPixels {
                width,
                height,
                limit: max_pixels,
            });
        }
        Ok(())
    };
    if jpeg::is_jpeg(bytes) {
        let header = jpeg::header(bytes)?;
        check_pixels(header.width, header.height)?;
        return jpeg::decode_rgb8(bytes, &header, options.load_truncated);
    }
    let (mut reader, format) = reader(bytes)?;
    // A second guard for decoders whose frames can be larger than the header says (GIF, TIFF):
    // never allocate more than the allowed pixels at 16-bit RGBA, plus slack for decoder state.
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits.clone());
    // One decoder reads the header, is checked against the limit, then decodes: the header is
    // not read a second time.
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| PreprocessError::Decode(format!("{format:?} header: {e}")))?;
    let (width, height) = decoder.dimensions();
    check_pixels(width, height)?;
    if width == 0 || height == 0 {
        return Err(PreprocessError::Decode(format!(
            "the image declares {width}x{height} pixels"
        )));
    }
    // What `ImageReader::decode` does between making its decoder and decoding.
    let decode_error = |e: image::ImageError| PreprocessError::Decode(format!("{format:?}: {e}"));
    limits
        .reserve(decoder.total_bytes())
        .map_err(decode_error)?;
    decoder.set_limits(limits).map_err(decode_error)?;
    let image = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    Ok(to_rgb8_like_pil(image))
}

/// PIL's conversions to RGB: alpha is dropped (not composited); 16-bit RGB keeps the high byte
/// (Pillow unpacks "RGB;16B"); 16-bit grayscale is clipped to 255 (Pillow's I;16 -> RGB clips,
/// it does not rescale).
fn to_rgb8_like_pil(image: DynamicImage) -> RgbImage {
    let (width, height) = (image.width(), image.height());
    let pixels = match image {
        DynamicImage::ImageRgb8(buf) => buf.into_raw(),
        DynamicImage::ImageRgba8(buf) => buf.pixels().flat_map(|p| [p[0], p[1], p[2]]).collect(),
        DynamicImage::ImageLuma8(buf) => buf.pixels().flat_map(|p| [p[0]; 3]).collect(),
        DynamicImage::ImageLumaA8(buf) => buf.pixels().flat_map(|p| [p[0]; 3]).collect(),
        DynamicImage::ImageLuma16(buf) => buf
            .pixels()
            .flat_map(|p| [p[0].min(255) as u8; 3])
            .collect(),
        DynamicImage::ImageLumaA16(buf) => {
            buf.pixels().flat_map(|p| [(p[0] >> 8) as u8; 3]).collect()
        }
        DynamicImage::ImageRgb16(buf) => buf
            .pixels()
            .flat_map(|p| p.0.map(|v| (v >> 8) as u8))
            .collect(),
        DynamicImage::ImageRgba16(buf) => buf
            .pixels()
            .flat_map(|p| [p[0], p[1], p[2]].map(|v| (v >> 8) as u8))
            .collect(),
        other => other.to_rgb8().into_raw(),
    };
    RgbImage {
        width,
        height,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, Rgb, Rgba};

    fn png(image: DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn alpha_is_dropped_not_composited() {
        let img = ImageBuffer::from_pixel(2, 2, Rgba([200u8, 100, 50, 0]));
        let rgb = decode_rgb8(&png(DynamicImage::ImageRgba8(img)), 100).unwrap();
        assert_eq!(&rgb.pixels[..3], &[200, 100, 50]);
    }

    #[test]
    fn sixteen_bit_follows_pil() {
        let rgb16 = ImageBuffer::from_pixel(1, 1, Rgb([0x12ffu16, 0xff00, 0x0080]));
        let rgb = decode_rgb8(&png(DynamicImage::ImageRgb16(rgb16)), 100).unwrap();
        assert_eq!(rgb.pixels, vec![0x12, 0xff, 0x00]);
        let gray16 = ImageBuffer::from_fn(2, 1, |x, _| Luma([if x == 0 { 100u16 } else { 1000 }]));
        let rgb = decode_rgb8(&png(DynamicImage::ImageLuma16(gray16)), 100).unwrap();
        assert_eq!(rgb.pixels, vec![100, 100, 100, 255, 255, 255]);
    }

    #[test]
    fn pixel_limit_is_checked_before_decoding() {
        let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(10, 10, Rgb([1u8, 2, 3])));
        let err = decode_rgb8(&png(img), 99).unwrap_err();
        assert_eq!(
            err,
            PreprocessError::TooManyPixels {
                width: 10,
                height: 10,
                limit: 99
            }
        );
    }

    #[test]
    fn text_is_unsupported_and_garbage_png_is_invalid() {
        assert!(matches!(
            decode_rgb8(b"hello, world", 100),
            Err(PreprocessError::UnsupportedFormat(_))
        ));
        let mut bad = png(DynamicImage::ImageRgb8(ImageBuffer::from_pixel(
            4,
            4,
            Rgb([1u8, 2, 3]),
        )));
        let len = bad.len();
        bad[len - 20..].fill(0xAB);
        assert!(matches!(
            decode_rgb8(&bad, 100),
            Err(PreprocessError::Decode(_))
        ));
    }

    #[test]
    fn a_png_header_is_read_without_a_decoder_and_anything_else_goes_to_one() {
        let image = png(DynamicImage::ImageRgb8(ImageBuffer::from_pixel(
            7,
            3,
            Rgb([1u8, 2, 3]),
        )));
        assert_eq!(png_header_dimensions(&image), Some((7, 3)));
        assert_eq!(declared_dimensions(&image), Ok((7, 3)));
        // Cut inside the header, or a first chunk that is not IHDR: the decoder decides.
        assert_eq!(png_header_dimensions(&image[..20]), None);
        assert!(declared_dimensions(&image[..20]).is_err());
        let mut other_first = image.clone();
        other_first[12..16].copy_from_slice(b"tEXt");
        assert_eq!(png_header_dimensions(&other_first), None);
        assert!(matches!(
            declared_dimensions(&other_first),
            Err(PreprocessError::Decode(_))
        ));
    }
}
