//! Convolution microkernels behind one pointer-level task description ([`RawConv`]) that
//! [`super::conv::ConvLayer`] builds after checking every bound: the portable kernel
//! ([`scalar`]), and one SIMD kernel (`direct`, over the `vector` trait) instantiated for each
//! instruction set ([`avx2`], [`avx512`]) with that set's tile shapes.
//!
//! All kernels compute the same thing: for each output pixel of some rows of a zero-bordered NHWC
//! image, `relu?(bias + sum over taps and input channels of x * w (+ residual))`, with weights laid
//! out `[tap][cin][cout]` so that one vector load yields a run of output channels.

pub mod scalar;

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "x86_64")]
mod direct;
#[cfg(target_arch = "x86_64")]
mod vector;

use super::simd::{Isa, SimdLevel};

/// One convolution over a band of output rows, as raw pointers. Built only by
/// `ConvLayer::run`, which has checked that every address the kernel derives lies in bounds.
#[derive(Debug)]
pub struct RawConv {
    /// Input element read by tap 0 for output pixel `(first row, 0)`, channel 0.
    pub src: *const f32,
    /// Floats between the tap-0 inputs of successive output rows (`stride * input row length`).
    pub src_row: usize,
    /// Offset of each tap from tap 0, in floats; only the first `ntaps` are used.
    pub taps: [isize; 9],
    pub ntaps: usize,
    /// `[tap][cin][cout]` weights with batch norm folded in.
    pub weights: *const f32,
    /// `[cout]` bias.
    pub bias: *const f32,
    /// Output pixel `(first row, 0)`, channel 0.
    pub dst: *mut f32,
    /// Residual pixel at the same position as `dst`, or null when there is none.
    pub res: *const f32,
    /// Floats per output (and residual) row.
    pub dst_row: usize,
    pub rows: usize,
    pub width: usize,
    pub relu: bool,
}

/// A SIMD row kernel. Callers must guarantee that the CPU supports the kernel's instruction set
/// and that the task's pointers are valid for every access described on [`RawConv`].
pub type RowKernel = unsafe fn(&RawConv);

/// The 36 matrix products of a Winograd layer, with the same obligations on [`RawGemm`].
pub type GemmKernel = unsafe fn(&RawGemm);

/// The kernel a layer runs: a specialised SIMD kernel, or the portable one.
#[derive(Debug, Clone, Copy)]
pub enum Kernel<K = RowKernel> {
    Scalar,
    Simd(K),
}

/// `M[p] = V[p] U[p]` for `positions` positions: `V` is `[positions][tiles][cin]` with positions
/// `v_stride` floats apart, `U` `[positions][cout / block][cin][block]` (the [`Gemm`]'s block),
/// `M` `[positions][tiles][cout]` with positions `m_stride` floats apart, `zeros` `cout` zeros.
#[derive(Debug)]
pub struct RawGemm {
    pub v: *const f32,
    pub u: *const f32,
    pub zeros: *const f32,
    pub m: *mut f32,
    pub positions: usize,
    pub tiles: usize,
    pub v_stride: usize,
    pub m_stride: usize,
    /// Output channels to compute: whole blocks, within `cout` (the rest of `M` is untouched).
    pub channels: std::ops::Range<usize>,
}

/// The best kernel of `level` for a convolution of this shape. Shapes without a specialised
/// kernel (none in the CIFAR ResNets) fall back to the portable kernel, which is always correct.
/// A [`SimdLevel`] exists only for an instruction set this CPU has, which is what makes the
/// returned kernel safe to call on valid buffers.
pub fn select(level: SimdLevel, cin: usize, cout: usize, stride: usize) -> Kernel {
    let simd = match level.isa() {
        Isa::Scalar => None,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::select(cin, cout, stride),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::select(cin, cout, stride),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx512 | Isa::Avx2 => None,
    };
    simd.map_or(Kernel::Scalar, Kernel::Simd)
}

/// A Winograd matrix-product kernel and the layout of the transformed filters it reads.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub run: GemmKernel,
    /// The filters are `[positions][cout / block][cin][block]`: the kernel holds `block` output
    /// channels in registers, and reads their filters as one contiguous run per position (with
    /// whole rows of `cout`, it would read one short piece per cache line when `block < cout`,
    /// and it streams the widest layers' filters from the shared cache at batch 1).
    pub block: usize,
}

/// The best Winograd matrix-product kernel of `level` for these channel counts.
pub fn select_gemm(level: SimdLevel, cin: usize, cout: usize) -> Kernel<Gemm> {
    let simd = match level.isa() {
        Isa::Scalar => None,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::select_gemm(cin, cout),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::select_gemm(cin, cout),
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx512 | Isa::Avx2 => None,
    };
    simd.map_or(Kernel::Scalar, Kernel::Simd)
}

/// One output row and one block of output channels of a [`RawConv`], as the SIMD tiles see it.
#[derive(Debug)]
pub struct Band<'a> {
    /// Tap 0 of pixel 0.
    pub src: *const f32,
    pub taps: &'a [isize],
    /// This channel block's first weight (`W_ROW` floats per input channel, see the kernels).
    pub weights: *const f32,
    pub bias: *const f32,
    /// Pixel 0 of the row, first channel of the block.
    pub dst: *mut f32,
    /// Like `dst` in the residual, or null.
    pub res: *const f32,
    pub width: usize,
    pub relu: bool,
}

impl RawConv {
    /// Row `r`, channels from `co` on.
    ///
    /// # Safety
    /// `r < self.rows` and `co` is below the layer's output channel count, so that every
    /// pointer stays inside the buffers this task was built from.
    pub unsafe fn band(&self, r: usize, co: usize) -> Band<'_> {
        // SAFETY: offsets within the validated task (function contract).
        unsafe {
            Band {
                src: self.src.add(r * self.src_row),
                taps: &self.taps[..self.ntaps],
                weights: self.weights.add(co),
                bias: self.bias.add(co),
                dst: self.dst.add(r * self.dst_row + co),
                res: if self.res.is_null() {
                    self.res
                } else {
                    self.res.add(r * self.dst_row + co)
                },
                width: self.width,
                relu: self.relu,
            }
        }
    }
}
