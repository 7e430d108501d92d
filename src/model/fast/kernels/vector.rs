//! The handful of vector operations the SIMD convolution tile needs, one implementation per
//! register type, so that [`super::direct`] is written once for every instruction set.

use std::arch::x86_64::*;

/// A register of `LANES` packed `f32`s.
///
/// Every method is an `unsafe fn`: each executes instructions of one instruction set, which the
/// CPU must support, and `load`/`store` also dereference raw pointers. The methods are
/// `#[inline(always)]` without `#[target_feature]`, so that they inline into the kernel and the
/// kernel into a `#[target_feature]` wrapper, where the instructions are enabled.
///
/// # Safety
/// The trait is `unsafe` to implement because the kernels trust `LANES` when they derive
/// addresses: `load` and `store` must access exactly `LANES` consecutive `f32`s from `p` and
/// nothing else, and no method may touch memory otherwise.
pub(super) unsafe trait Vector: Copy {
    /// `f32`s per register.
    const LANES: usize;

    /// All lanes zero.
    ///
    /// # Safety
    /// The CPU supports the implementation's instruction set.
    unsafe fn zero() -> Self;

    /// `LANES` floats from `p`, unaligned.
    ///
    /// # Safety
    /// The CPU supports the implementation's instruction set, and `p` is valid for reading
    /// `LANES` floats.
    unsafe fn load(p: *const f32) -> Self;

    /// `x` in every lane.
    ///
    /// # Safety
    /// The CPU supports the implementation's instruction set.
    unsafe fn splat(x: f32) -> Self;

    /// `a * b + acc`, rounded once.
    ///
    /// # Safety
    /// The CPU supports the implementation's instruction set.
    unsafe fn fmadd(a: Self, b: Self, acc: Self) -> Self;

    /// `a + b`.
    ///
    /// # Safety
    /// The CPU supports the implementation's instruction set.
    unsafe fn add(a: Self, b: Self) -> Self;

    /// The lane-wise maximum of `a` and `b`.
    ///
    /// # Safety
    /// The CPU supports the implementation's instruction set.
    unsafe fn max(a: Self, b: Self) -> Self;

    /// Writes the `LANES` floats of `v` to `p`, unaligned.
    ///
    /// # Safety
    /// The CPU supports the implementation's instruction set, and `p` is valid for writing
    /// `LANES` floats.
    unsafe fn store(p: *mut f32, v: Self);
}

/// AVX2 with FMA: 8 lanes.
// SAFETY: `_mm256_loadu_ps` and `_mm256_storeu_ps` access exactly 8 floats, and no other method
// touches memory.
unsafe impl Vector for __m256 {
    const LANES: usize = 8;

    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the CPU supports AVX2 and FMA (caller's contract).
        unsafe { _mm256_setzero_ps() }
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: AVX2 and FMA are supported and `p` is readable for 8 floats (caller's contract).
        unsafe { _mm256_loadu_ps(p) }
    }

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        // SAFETY: the CPU supports AVX2 and FMA (caller's contract).
        unsafe { _mm256_set1_ps(x) }
    }

    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, acc: Self) -> Self {
        // SAFETY: the CPU supports AVX2 and FMA (caller's contract).
        unsafe { _mm256_fmadd_ps(a, b, acc) }
    }

    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        // SAFETY: the CPU supports AVX2 and FMA (caller's contract).
        unsafe { _mm256_add_ps(a, b) }
    }

    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        // SAFETY: the CPU supports AVX2 and FMA (caller's contract).
        unsafe { _mm256_max_ps(a, b) }
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self) {
        // SAFETY: AVX2 and FMA are supported and `p` is writable for 8 floats (caller's contract).
        unsafe { _mm256_storeu_ps(p, v) }
    }
}

/// AVX-512F: 16 lanes.
// SAFETY: `_mm512_loadu_ps` and `_mm512_storeu_ps` access exactly 16 floats, and no other
// method touches memory.
unsafe impl Vector for __m512 {
    const LANES: usize = 16;

    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the CPU supports AVX-512F (caller's contract).
        unsafe { _mm512_setzero_ps() }
    }

    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: AVX-512F is supported and `p` is readable for 16 floats (caller's contract).
        unsafe { _mm512_loadu_ps(p) }
    }

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        // SAFETY: the CPU supports AVX-512F (caller's contract).
        unsafe { _mm512_set1_ps(x) }
    }

    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, acc: Self) -> Self {
        // SAFETY: the CPU supports AVX-512F (caller's contract).
        unsafe { _mm512_fmadd_ps(a, b, acc) }
    }

    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        // SAFETY: the CPU supports AVX-512F (caller's contract).
        unsafe { _mm512_add_ps(a, b) }
    }

    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        // SAFETY: the CPU supports AVX-512F (caller's contract).
        unsafe { _mm512_max_ps(a, b) }
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self) {
        // SAFETY: AVX-512F is supported and `p` is writable for 16 floats (caller's contract).
        unsafe { _mm512_storeu_ps(p, v) }
    }
}
