//! AVX2+FMA convolution kernels: the `direct` kernel on 8-lane ymm registers, where a tile of
//! `P` pixels x `N` vectors accumulates in 12 of the 16 registers.

use std::arch::x86_64::__m256;

use super::{Gemm, RowKernel};

super::direct::instantiate!(__m256, "avx2,fma");

/// Specialised kernels for the convolution shapes of the CIFAR ResNets: `(cin, cout, stride)`.
/// Output channels go in blocks of 16 (two vectors) over tiles of 6 pixels: 12 accumulators,
/// two weight vectors and a broadcast fill the 16 registers without spilling.
pub fn select(cin: usize, cout: usize, stride: usize) -> Option<RowKernel> {
    Some(match (cin, cout, stride) {
        (3, 16, 1) => rows::<6, 2, 3, 16, 1>,
        (16, 16, 1) => rows::<6, 2, 16, 16, 1>,
        (16, 32, 2) => rows::<6, 2, 16, 32, 2>,
        (32, 32, 1) => rows::<6, 2, 32, 32, 1>,
        (32, 64, 2) => rows::<6, 2, 32, 64, 2>,
        (64, 64, 1) => rows::<6, 2, 64, 64, 1>,
        _ => return None,
    })
}

/// Winograd matrix products for `(cin, cout)`, in the same tiles.
pub fn select_gemm(cin: usize, cout: usize) -> Option<Gemm> {
    Some(match (cin, cout) {
        (16, 16) => gemm_of::<6, 2, 16, 16, 16>(),
        (32, 32) => gemm_of::<6, 2, 32, 32, 16>(),
        (64, 64) => gemm_of::<6, 2, 64, 64, 16>(),
        _ => return None,
    })
}
