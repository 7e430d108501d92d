//! One convolution layer of the fast engine: batch-norm-folded weights repacked `[tap][cin][cout]`,
//! the kernel chosen for its shape and SIMD level, and the bounds checks that make running that
//! kernel on caller-provided buffers sound.

use super::buffers::{AlignedBuf, LayerInput, LayerOutput, Plane};
use super::kernels::{self, scalar, Kernel, RawConv};
use super::simd::SimdLevel;
use crate::model::fold::FoldedConv;

/// A 3x3 (padding 1) or 1x1 (padding 0) convolution with bias, ready to run.
#[derive(Debug)]
pub struct ConvLayer {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    /// `[ky][kx][cin][cout]`: one vector load gives consecutive output channels.
    weights: AlignedBuf,
    bias: AlignedBuf,
    kernel: Kernel,
}

impl ConvLayer {
    /// Repacks a folded `[cout, cin, k, k]` convolution for `level`'s kernels.
    pub fn new(conv: &FoldedConv, stride: usize, level: SimdLevel) -> Self {
        let (cin, cout, k) = (conv.cin, conv.cout, conv.k);
        assert!(k == 1 || k == 3, "only 1x1 and 3x3 convolutions");
        let mut weights = AlignedBuf::zeros(k * k * cin * cout);
        let packed = weights.as_mut_slice();
        for co in 0..cout {
            for ci in 0..cin {
                for tap in 0..k * k {
                    packed[(tap * cin + ci) * cout + co] =
                        conv.weight[(co * cin + ci) * k * k + tap];
                }
            }
        }
        let mut bias = AlignedBuf::zeros(cout);
        bias.as_mut_slice().copy_from_slice(&conv.bias);
        Self {
            cin,
            cout,
            k,
            stride,
            weights,
            bias,
            kernel: kernels::select(level, cin, cout, stride),
        }
    }

    /// The output image shape for an input of shape `src`.
    pub fn output_plane(&self, src: Plane) -> Plane {
        Plane::new(
            (src.h - 1) / self.stride + 1,
            (src.w - 1) / self.stride + 1,
            self.cout,
        )
    }

    /// Computes `out.rows` of the output.
    ///
    /// Panics when the buffers do not match the layer's geometry: a bug in the network plan,
    /// never a consequence of input data. These checks are what keeps the kernels in bounds.
    pub fn run(&self, input: LayerInput<'_>, out: LayerOutput<'_>) {
        input.check(self.cin);
        out.check(self.cout);
        assert_eq!(out.plane, self.output_plane(input.plane), "output shape");
        let LayerInput { image, plane: src } = input;
        let LayerOutput {
            band: output,
            plane: dst,
            rows,
            residual,
            relu,
        } = out;
        if rows.is_empty() {
            return;
        }
        match self.kernel {
            Kernel::Scalar => scalar::conv_rows(
                &scalar::ConvParams {
                    cin: self.cin,
                    cout: self.cout,
                    k: self.k,
                    stride: self.stride,
                    weights: self.weights.as_slice(),
                    bias: self.bias.as_slice(),
                },
                LayerInput { image, plane: src },
                LayerOutput {
                    band: output,
                    plane: dst,
                    rows,
                    residual,
                    relu,
                },
            ),
            Kernel::Simd(kernel) => {
                // A 3x3 convolution (padding 1) starts at the border; a 1x1 one inside it.
                let origin = 1 - self.k / 2;
                let mut taps = [0isize; 9];
                for ky in 0..self.k {
                    for kx in 0..self.k {
                        taps[ky * self.k + kx] = (ky * src.row_len() + kx * self.cin) as isize;
                    }
                }
                let first = (rows.start * self.stride + origin) * src.row_len() + origin * self.cin;
                let raw = RawConv {
                    src: image[first..].as_ptr(),
                    src_row: self.stride * src.row_len(),
                    taps,
                    ntaps: self.k * self.k,
                    weights: self.weights.as_slice().as_ptr(),
                    bias: self.bias.as_slice().as_ptr(),
                    dst: output[self.cout..].as_mut_ptr(),
                    res: residual.map_or(std::ptr::null(), |r| r[self.cout..].as_ptr()),
                    dst_row: dst.row_len(),
                    rows: rows.len(),
                    width: dst.w,
                    relu,
                };
                // SAFETY: `kernels::select` returned this kernel only for a level the CPU
                // supports (levels are checked when the engine is built) and for this layer's
                // (cin, cout, stride). The asserts above pin the geometry: output row r < dst.h
                // reads input rows up to (dst.h - 1) * stride + 2 <= src.h + 1 (bordered) and
                // likewise columns, so every tap lies in `image`; writes and residual reads cover
                // pixels 0..dst.w of `rows.len()` bordered rows, which is `output`'s extent.
                unsafe { kernel(&raw) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use super::*;
    use crate::model::fast::testing::{image, noise, reference};

    fn run_band(
        layer: &ConvLayer,
        input: &[f32],
        src: Plane,
        residual: Option<&[f32]>,
        relu: bool,
        bands: &[Range<usize>],
    ) -> Vec<f32> {
        let dst = layer.output_plane(src);
        let mut out = vec![0.0; dst.floats()];
        for rows in bands {
            let span = dst.rows(rows);
            layer.run(
                LayerInput {
                    image: input,
                    plane: src,
                },
                LayerOutput {
                    band: &mut out[span.clone()],
                    plane: dst,
                    rows: rows.clone(),
                    residual: residual.map(|r| &r[span.clone()]),
                    relu,
                },
            );
        }
        out
    }

    /// Every level the CPU has, on every CIFAR ResNet shape and some odd ones (scalar fallback,
    /// tails narrower than a tile), split into uneven row bands, against the definition.
    #[test]
    fn every_kernel_matches_the_definition_on_random_data() {
        let shapes = [
            // (h, w, cin, cout, k, stride)
            (32, 32, 3, 16, 3, 1),
            (32, 32, 16, 16, 3, 1),
            (32, 32, 16, 32, 3, 2),
            (32, 32, 16, 32, 1, 2),
            (16, 16, 32, 32, 3, 1),
            (16, 16, 32, 64, 3, 2),
            (16, 16, 32, 64, 1, 2),
            (8, 8, 64, 64, 3, 1),
            (7, 13, 16, 16, 3, 1),
            (5, 11, 32, 64, 3, 2),
            (3, 9, 64, 64, 3, 1),
            (1, 1, 16, 16, 3, 1),
            (6, 5, 5, 24, 3, 1),
            (9, 7, 8, 80, 1, 2),
        ];
        for (i, &(h, w, cin, cout, k, stride)) in shapes.iter().enumerate() {
            let conv = FoldedConv {
                cout,
                cin,
                k,
                weight: noise(cout * cin * k * k, 10 + i as u64),
                bias: noise(cout, 50 + i as u64),
            };
            let src = Plane::new(h, w, cin);
            let input = image(src, 90 + i as u64);
            for level in SimdLevel::supported() {
                let layer = ConvLayer::new(&conv, stride, level);
                let dst = layer.output_plane(src);
                let residual = image(dst, 130 + i as u64);
                let split = dst.h / 3;
                let bands = [0..split, split..split, split..dst.h];
                for (res, relu) in [(None, true), (Some(&residual[..]), true), (None, false)] {
                    let got = run_band(&layer, &input, src, res, relu, &bands);
                    let want = reference(&conv, stride, &input, src, dst, res, relu);
                    for (j, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{level} shape {:?} residual {} relu {relu}: at {j} got {g}, want {e}",
                            shapes[i],
                            res.is_some()
                        );
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "output band")]
    fn a_band_of_the_wrong_size_is_refused() {
        let conv = FoldedConv {
            cout: 16,
            cin: 16,
            k: 3,
            weight: vec![0.0; 16 * 16 * 9],
            bias: vec![0.0; 16],
        };
        let layer = ConvLayer::new(&conv, 1, SimdLevel::detect());
        let src = Plane::new(8, 8, 16);
        let input = vec![0.0; src.floats()];
        let mut out = vec![0.0; 10];
        layer.run(
            LayerInput {
                image: &input,
                plane: src,
            },
            LayerOutput {
                band: &mut out,
                plane: src,
                rows: 0..8,
                residual: None,
                relu: true,
            },
        );
    }
}
