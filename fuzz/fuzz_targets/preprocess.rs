//! Fuzzes upload preprocessing: any bytes either become exactly `[3, 32, 32]` finite floats
//! within the normalised range, or a `PreprocessError`; never a panic, hang or memory blow-up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use resnet_serve::preprocess::{decode_rgb8, preprocess, PreprocessError};

/// Large enough for every real upload path, small enough that the fuzzer does not spend its
/// time decoding legal multi-megapixel images.
const MAX_PIXELS: u64 = 4 << 20;
const MEAN: [f32; 3] = [0.491, 0.482, 0.447];
const STD: [f32; 3] = [0.247, 0.243, 0.262];
const OUTPUT_FLOATS: usize = 3 * 32 * 32;

fuzz_target!(|data: &[u8]| {
    match preprocess(data, &MEAN, &STD, MAX_PIXELS) {
        Ok(out) => {
            assert_eq!(out.len(), OUTPUT_FLOATS);
            for (i, v) in out.iter().enumerate() {
                let c = i / (32 * 32);
                let (lo, hi) = ((0.0 - MEAN[c]) / STD[c], (1.0 - MEAN[c]) / STD[c]);
                assert!(v.is_finite() && *v >= lo && *v <= hi, "channel {c}: {v}");
            }
            // The decoded image respects the pixel limit whatever its frames declared.
            let image = decode_rgb8(data, MAX_PIXELS).expect("decoded once already");
            let pixels = u64::from(image.width) * u64::from(image.height);
            assert!(
                pixels > 0 && pixels <= MAX_PIXELS,
                "{}x{}",
                image.width,
                image.height
            );
            assert_eq!(image.pixels.len() as u64, pixels * 3);
        }
        Err(PreprocessError::Empty) => assert!(data.is_empty()),
        Err(PreprocessError::TooManyPixels {
            width,
            height,
            limit,
        }) => assert!(u64::from(width) * u64::from(height) > limit),
        Err(
            PreprocessError::UnsupportedFormat(_)
            | PreprocessError::Decode(_)
            | PreprocessError::Truncated(_),
        ) => {}
    }
});
