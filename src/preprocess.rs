//! Image bytes to model input, exactly as torchvision does on PIL images.

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
