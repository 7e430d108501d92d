//! torchvision's `Resize(size)` + `CenterCrop(size)` on PIL images, bit-exact: Pillow's
//! antialiased bilinear resampling (separable, horizontal pass first, 22-bit fixed point,
//! each pass rounded to uint8), evaluated only for the pixels the center crop keeps.
//!
//! Every output pixel of Pillow's resize depends only on its own filter window, so computing
//! just the cropped window gives the same bytes as resizing the whole image and cropping after,
//! while keeping memory bounded for extreme aspect ratios (a 1x1,000,000 image would otherwise
//! resize to 32x32,000,000).

use super::RgbImage;

/// Pillow's `PRECISION_BITS` for 8-bit images (32 - 8 - 2).
const PRECISION_BITS: u32 = 22;

/// The filter taps of one output coordinate: first source index and fixed-point weights.
#[derive(Debug, Clone, PartialEq)]
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// Pillow's bilinear ("triangle") filter, support 1.
fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for output coordinate `out_index` of
/// a resize from `in_size` to `out_size` over the whole input.
fn taps(in_size: usize, out_size: usize, out_index: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale; // bilinear support (1.0) * filter_scale
    let center = (out_index as f64 + 0.5) * scale;
    let inv = 1.0 / filter_scale;
    // C casts truncate toward zero; Pillow clamps after the cast.
    let xmin = ((center - support + 0.5) as i64).max(0) as usize;
    let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
    let raw: Vec<f64> = (xmin..xmax)
        .map(|x| bilinear((x as f64 - center + 0.5) * inv))
        .collect();
    let total: f64 = raw.iter().sum();
    let one = f64::from(1u32 << PRECISION_BITS);
    let weights = raw
        .iter()
        .map(|&w| {
            let w = if total != 0.0 { w / total } else { w };
            if w < 0.0 {
                (-0.5 + w * one) as i32
            } else {
                (0.5 + w * one) as i32
            }
        })
        .collect();
    Taps {
        first: xmin,
        weights,
    }
}

/// Pillow's `clip8`: a rounded fixed-point accumulator to a byte.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

fn convolve(taps: &Taps, sample: impl Fn(usize) -> u8) -> u8 {
    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
    for (k, &w) in taps.weights.iter().enumerate() {
        acc += i64::from(sample(taps.first + k)) * i64::from(w);
    }
    clip8(acc)
}

/// torchvision's output size for `Resize(size)`: the shorter side becomes `size`, the longer
/// `int(size * long / short)`.
fn resized_dimensions(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (w, h) = (u64::from(width), u64::from(height));
    let size64 = u64::from(size);
    // Saturating rather than wrapping: past 2^27:1 (only reachable with a pixel limit raised
    // above 134M) a wrapped side would move the crop window and the filter out of the image.
    let longer = |long: u64, short: u64| u32::try_from(size64 * long / short).unwrap_or(u32::MAX);
    if w <= h {
        (size, longer(h, w))
    } else {
        (longer(w, h), size)
    }
}

/// torchvision's `CenterCrop` offset: `int(round((in - out) / 2.0))`, Python's round-half-even.
fn crop_offset(in_size: u32, out_size: u32) -> usize {
    let diff = in_size.saturating_sub(out_size);
    let half = diff / 2;
    // diff odd: exactly x.5, which Python rounds to the even neighbour.
    if diff % 2 == 1 && half % 2 == 1 {
        (half + 1) as usize
    } else {
        half as usize
    }
}

/// `CenterCrop(size)(Resize(size)(image))` as torchvision computes it on a PIL image.
pub fn resize_shorter_and_center_crop(image: &RgbImage, size: u32) -> RgbImage {
    let (width, height) = (image.width as usize, image.height as usize);
    let (rw, rh) = resized_dimensions(image.width, image.height, size);
    let (left, top) = (crop_offset(rw, size), crop_offset(rh, size));
    let out = size as usize;
    let mut pixels = vec![0u8; out * out * 3];
    if (rw as usize, rh as usize) == (width, height) {
        // Pillow returns a copy when the size is unchanged: only the crop remains.
        for y in 0..out {
            let src = ((top + y) * width + left) * 3;
            pixels[y * out * 3..(y + 1) * out * 3]
                .copy_from_slice(&image.pixels[src..src + out * 3]);
        }
        return RgbImage {
            width: size,
            height: size,
            pixels,
        };
    }
    let col_taps: Vec<Taps> = (left..left + out)
        .map(|x| taps(width, rw as usize, x))
        .collect();
    let row_taps: Vec<Taps> = (top..top + out)
        .map(|y| taps(height, rh as usize, y))
        .collect();
    let horizontal = rw as usize != width;
    let vertical = rh as usize != height;
    // Source rows the vertical pass reads (all of them, relative to the crop, when no vertical pass).
    let (row_start, row_end) = if vertical {
        let first = row_taps.iter().map(|t| t.first).min().unwrap_or(0);
        let last = row_taps
            .iter()
            .map(|t| t.first + t.weights.len())
            .max()
            .unwrap_or(0);
        (first, last)
    } else {
        (top, top + out)
    };
    // Horizontal pass (or plain column crop) into an intermediate of `out` columns, rounded to u8.
    let rows = row_end - row_start;
    let mut temp = vec![0u8; rows * out * 3];
    for r in 0..rows {
        let src_row = &image.pixels[(row_start + r) * width * 3..(row_start + r + 1) * width * 3];
        for (x, taps) in col_taps.iter().enumerate() {
            for c in 0..3 {
                temp[(r * out + x) * 3 + c] = if horizontal {
                    convolve(taps, |sx| src_row[sx * 3 + c])
                } else {
                    src_row[(left + x) * 3 + c]
                };
            }
        }
    }
    for y in 0..out {
        for x in 0..out {
            for c in 0..3 {
                pixels[(y * out + x) * 3 + c] = if vertical {
                    convolve(&row_taps[y], |sy| {
                        temp[((sy - row_start) * out + x) * 3 + c]
                    })
                } else {
                    temp[(y * out + x) * 3 + c]
                };
            }
        }
    }
    RgbImage {
        width: size,
        height: size,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchvision_sizes_and_offsets() {
        assert_eq!(resized_dimensions(200, 150, 32), (42, 32)); // int(32 * 200 / 150) = 42
        assert_eq!(resized_dimensions(97, 130, 32), (32, 42)); // int(32 * 130 / 97) = 42
        assert_eq!(resized_dimensions(31, 33, 32), (32, 34));
        // 32 * 2^28 does not fit in u32: the long side saturates instead of wrapping to 0.
        assert_eq!(resized_dimensions(1, 1 << 28, 32), (32, u32::MAX));
        assert_eq!(resized_dimensions(1 << 28, 1, 32), (u32::MAX, 32));
        // round((42 - 32) / 2) = 5; round(0.5) = 0; round(1.5) = 2; round(2.5) = 2
        assert_eq!(crop_offset(42, 32), 5);
        assert_eq!(crop_offset(33, 32), 0);
        assert_eq!(crop_offset(35, 32), 2);
        assert_eq!(crop_offset(37, 32), 2);
        assert_eq!(crop_offset(32, 32), 0);
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (inp, out) in [(64, 32), (200, 32), (31, 32), (33, 34), (1000, 7)] {
            for i in 0..out {
                let t = taps(inp, out, i);
                let sum: i64 = t.weights.iter().map(|&w| i64::from(w)).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i64,
                    "{inp}->{out} at {i}"
                );
                assert!(t.first + t.weights.len() <= inp);
            }
        }
    }

    #[test]
    fn halving_averages_pixel_pairs() {
        // Downscaling by exactly 2 with Pillow's triangle filter: support 2, taps at offsets
        // -0.5+0.5.. weights (0.25, 0.75, 0.75, 0.25)/2 around each pair.
        let img = RgbImage {
            width: 64,
            height: 64,
            pixels: vec![77; 64 * 64 * 3],
        };
        let out = resize_shorter_and_center_crop(&img, 32);
        assert!(
            out.pixels.iter().all(|&v| v == 77),
            "a flat image stays flat"
        );
    }

    #[test]
    fn extreme_aspect_ratio_stays_bounded() {
        let img = RgbImage {
            width: 1,
            height: 100_000,
            pixels: (0..300_000).map(|i| (i % 251) as u8).collect(),
        };
        let out = resize_shorter_and_center_crop(&img, 32);
        assert_eq!(out.pixels.len(), 32 * 32 * 3);
    }

    #[test]
    fn same_size_is_a_plain_crop() {
        let img = RgbImage {
            width: 32,
            height: 40,
            pixels: (0..32 * 40 * 3).map(|i| (i % 256) as u8).collect(),
        };
        // Resize(32) of 32x40 keeps 32x40; CenterCrop takes rows 4..36.
        let out = resize_shorter_and_center_crop(&img, 32);
        assert_eq!(&out.pixels[..96], &img.pixels[4 * 96..5 * 96]);
    }
}
