//! Test helpers shared by the fast engine's unit tests: random data and a convolution computed
//! straight from its definition.

use super::buffers::Plane;
use crate::model::fold::FoldedConv;

/// Deterministic pseudo-random values in [-1, 1).
pub fn noise(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// A bordered image with random interior and zero border.
pub fn image(p: Plane, seed: u64) -> Vec<f32> {
    let values = noise(p.h * p.w * p.c, seed);
    let mut out = vec![0.0; p.floats()];
    for y in 0..p.h {
        for x in 0..p.w {
            let at = p.at(y, x);
            let v = (y * p.w + x) * p.c;
            out[at..at + p.c].copy_from_slice(&values[v..v + p.c]);
        }
    }
    out
}

/// Straight from the definition: NCHW-style indexing on the unpadded image, f64 sums.
pub fn reference(
    conv: &FoldedConv,
    stride: usize,
    input: &[f32],
    src: Plane,
    dst: Plane,
    residual: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let pad = (conv.k / 2) as isize;
    let mut out = vec![0.0; dst.floats()];
    for y in 0..dst.h {
        for x in 0..dst.w {
            for co in 0..conv.cout {
                let mut acc = f64::from(conv.bias[co]);
                for ky in 0..conv.k {
                    for kx in 0..conv.k {
                        let iy = (y * stride + ky) as isize - pad;
                        let ix = (x * stride + kx) as isize - pad;
                        if iy < 0 || ix < 0 || iy >= src.h as isize || ix >= src.w as isize {
                            continue;
                        }
                        for ci in 0..conv.cin {
                            let w = conv.weight[((co * conv.cin + ci) * conv.k + ky) * conv.k + kx];
                            let v = input[src.at(iy as usize, ix as usize) + ci];
                            acc += f64::from(w) * f64::from(v);
                        }
                    }
                }
                let at = dst.at(y, x) + co;
                if let Some(r) = residual {
                    acc += f64::from(r[at]);
                }
                out[at] = if relu { acc.max(0.0) } else { acc } as f32;
            }
        }
    }
    out
}
