//! Fuzzes the JPEG path (Pillow's header walk, then libjpeg-turbo driven as Pillow drives it),
//! with `load_truncated` off and on. Any bytes after the JPEG signature either decode to an
//! RGB image of the declared size within the pixel limit, or give an error that agrees with
//! the input; a file decoded without `load_truncated` decodes to the same pixels with it, and
//! `load_truncated` refuses only what the header walk refuses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resnet_serve::preprocess::{
    declared_dimensions, decode_rgb8_with, resize_shorter_and_center_crop, DecodeOptions,
    PreprocessError,
};

/// Large enough for real uploads' structure, small enough to keep executions fast.
const MAX_PIXELS: u64 = 4 << 20;

fuzz_target!(|tail: &[u8]| {
    // Every input is a JPEG to the format check, so the fuzzer explores the JPEG path only.
    let mut data = Vec::with_capacity(tail.len() + 3);
    data.extend_from_slice(&[0xFF, 0xD8, 0xFF]);
    data.extend_from_slice(tail);
    let declared = declared_dimensions(&data);
    let decode = |load_truncated| {
        decode_rgb8_with(
            &data,
            &DecodeOptions {
                max_pixels: MAX_PIXELS,
                load_truncated,
            },
        )
    };
    let strict = decode(false);
    let lenient = decode(true);
    for result in [&strict, &lenient] {
        match result {
            Ok(image) => {
                let pixels = u64::from(image.width) * u64::from(image.height);
                assert!(pixels > 0 && pixels <= MAX_PIXELS);
                assert_eq!(image.pixels.len() as u64, pixels * 3);
                assert_eq!(declared.as_ref().ok(), Some(&(image.width, image.height)));
                assert_eq!(resize_shorter_and_center_crop(image, 32).pixels.len(), 32 * 32 * 3);
            }
            Err(PreprocessError::TooManyPixels {
                width,
                height,
                limit,
            }) => {
                assert!(u64::from(*width) * u64::from(*height) > *limit);
                assert_eq!(declared.as_ref().ok(), Some(&(*width, *height)));
            }
            Err(PreprocessError::Decode(_) | PreprocessError::Truncated(_)) => {}
            Err(e @ (PreprocessError::Empty | PreprocessError::UnsupportedFormat(_))) => {
                panic!("a JPEG signature cannot give {e:?}")
            }
        }
    }
    match (&strict, &lenient) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "load_truncated changed a complete decode"),
        (Ok(_), Err(e)) => panic!("decoded strictly, refused with load_truncated: {e:?}"),
        // With load_truncated only the header walk (and the pixel limit) can refuse: the same
        // refusal as without it.
        (Err(a), Err(b)) => assert_eq!(a, b),
        (Err(_), Ok(_)) => {}
    }
});
