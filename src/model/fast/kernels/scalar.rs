//! The portable convolution kernel: plain loops over the same layouts as the SIMD kernels,
//! correct on every target and the yardstick the SIMD kernels are tested against.

use crate::model::fast::buffers::{LayerInput, LayerOutput};

/// Output channels accumulated at once (the widest layer of a CIFAR ResNet).
const BLOCK: usize = 64;

/// A convolution's parameters: `[tap][cin][cout]` weights, `[cout]` bias.
#[derive(Debug, Clone, Copy)]
pub struct ConvParams<'a> {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub weights: &'a [f32],
    pub bias: &'a [f32],
}

/// Output rows `out.rows` of the convolution of the bordered image `input`, written into
/// `out.band` with the residual and ReLU fused.
pub fn conv_rows(c: &ConvParams<'_>, input: LayerInput<'_>, out: LayerOutput<'_>) {
    let LayerInput {
        image: input,
        plane: src,
    } = input;
    let LayerOutput {
        band: output,
        plane: dst,
        rows,
        residual,
        relu,
    } = out;
    // A 3x3 convolution (padding 1) starts at the border; a 1x1 one (padding 0) inside it.
    let origin = 1 - c.k / 2;
    let mut acc = [0.0f32; BLOCK];
    for (i, r) in rows.enumerate() {
        for x in 0..dst.w {
            let out_at = i * dst.row_len() + (x + 1) * c.cout;
            for co in (0..c.cout).step_by(BLOCK) {
                let n = BLOCK.min(c.cout - co);
                let acc = &mut acc[..n];
                acc.copy_from_slice(&c.bias[co..co + n]);
                for ky in 0..c.k {
                    for kx in 0..c.k {
                        let at = (r * c.stride + ky + origin) * src.row_len()
                            + (x * c.stride + kx + origin) * c.cin;
                        let taps = &c.weights[(ky * c.k + kx) * c.cin * c.cout..];
                        for (ci, &xv) in input[at..at + c.cin].iter().enumerate() {
                            let w = &taps[ci * c.cout + co..ci * c.cout + co + n];
                            for (a, &w) in acc.iter_mut().zip(w) {
                                *a += xv * w;
                            }
                        }
                    }
                }
                let out = &mut output[out_at + co..out_at + co + n];
                out.copy_from_slice(acc);
                if let Some(res) = residual {
                    for (o, &r) in out.iter_mut().zip(&res[out_at + co..out_at + co + n]) {
                        *o += r;
                    }
                }
                if relu {
                    for o in out.iter_mut() {
                        *o = o.max(0.0);
                    }
                }
            }
        }
    }
}
