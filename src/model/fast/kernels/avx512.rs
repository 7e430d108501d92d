//! AVX-512F convolution kernels: the `direct` kernel on 16-lane zmm registers, where a tile of
//! `P` pixels x `N` vectors accumulates in up to 16 of the 32 registers.

use std::arch::x86_64::__m512;

use super::{Gemm, RowKernel};

super::direct::instantiate!(__m512, "avx512f");

/// Specialised kernels for the convolution shapes of the CIFAR ResNets: `(cin, cout, stride)`.
/// Tiles are sized so that a row of 32, 16 or 8 pixels splits evenly.
pub fn select(cin: usize, cout: usize, stride: usize) -> Option<RowKernel> {
    Some(match (cin, cout, stride) {
        (3, 16, 1) => rows::<16, 1, 3, 16, 1>,
        (16, 16, 1) => rows::<16, 1, 16, 16, 1>,
        (16, 32, 2) => rows::<8, 2, 16, 32, 2>,
        (32, 32, 1) => rows::<8, 2, 32, 32, 1>,
        (32, 64, 2) => rows::<4, 4, 32, 64, 2>,
        (64, 64, 1) => rows::<4, 4, 64, 64, 1>,
        _ => return None,
    })
}

/// Winograd matrix products for `(cin, cout)`. The 64-channel filters go in two blocks of 32, so
/// that at small batches the threads can split those layers' output channels, each reading
/// half of the 590 KB of filters (with one block of 64, both read all of them).
pub fn select_gemm(cin: usize, cout: usize) -> Option<Gemm> {
    Some(match (cin, cout) {
        (16, 16) => Gemm {
            run: gemm_resident::<4, 16, 16>,
            block: 16,
        },
        (32, 32) => gemm_of::<8, 2, 32, 32, 32>(),
        (64, 64) => gemm_of::<8, 2, 64, 64, 32>(),
        _ => return None,
    })
}

/// [`super::direct::gemm_resident`] for AVX-512.
///
/// # Safety
/// As for [`super::direct::gemm_resident`].
#[target_feature(enable = "avx512f")]
unsafe fn gemm_resident<const Q: usize, const CIN: usize, const COUT: usize>(g: &super::RawGemm) {
    // SAFETY: the caller's contract is the kernel's.
    unsafe { super::direct::gemm_resident::<__m512, Q, CIN, COUT>(g) }
}
