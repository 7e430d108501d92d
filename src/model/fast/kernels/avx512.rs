//! AVX-512F convolution kernels: each output pixel's channels are held in 16-lane registers,
//! a tile of `P` pixels x `V` vectors accumulates in up to 16 of the 32 zmm registers, and every
//! input value is broadcast once per tile and multiplied into all `V` weight vectors.

use std::arch::x86_64::*;

use super::{Band, GemmKernel, RawConv, RawGemm, RowKernel};

const LANES: usize = 16;

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

/// Runs a whole [`RawConv`]: rows, then blocks of `16 V` output channels, then tiles of `P`
/// pixels, with narrower tiles for a tail that `P` does not divide.
///
/// # Safety
/// The CPU supports AVX-512F, every pointer in `t` is valid for the accesses its fields describe
/// (`ConvLayer::run` checks them), and the layer has `CIN` inputs, `COUT` outputs, stride `S`.
#[target_feature(enable = "avx512f")]
unsafe fn rows<
    const P: usize,
    const V: usize,
    const CIN: usize,
    const COUT: usize,
    const S: usize,
>(
    t: &RawConv,
) {
    for r in 0..t.rows {
        for co in (0..COUT).step_by(LANES * V) {
            // SAFETY: row r and channel block co lie inside the task (caller's contract).
            unsafe { run_band::<P, V, CIN, COUT, S>(&t.band(r, co)) };
        }
    }
}

/// Winograd matrix products for `(cin, cout)`: each position is a one-tap "convolution" of a row
/// of `tiles` transformed tiles.
pub fn select_gemm(cin: usize, cout: usize) -> Option<GemmKernel> {
    Some(match (cin, cout) {
        (16, 16) => gemm::<8, 1, 16, 16>,
        (32, 32) => gemm::<8, 2, 32, 32>,
        (64, 64) => gemm::<4, 4, 64, 64>,
        _ => return None,
    })
}

/// # Safety
/// The CPU supports the target features, and `g` describes valid buffers (see [`RawGemm`]) for
/// `CIN` inputs and `COUT` outputs.
#[target_feature(enable = "avx512f")]
unsafe fn gemm<const P: usize, const V: usize, const CIN: usize, const COUT: usize>(g: &RawGemm) {
    let taps = [0isize];
    for p in 0..g.positions {
        for co in (0..COUT).step_by(LANES * V) {
            // SAFETY: position p < positions and channel block co < COUT stay inside the buffers.
            unsafe {
                let band = Band {
                    src: g.v.add(p * g.tiles * CIN),
                    taps: &taps,
                    weights: g.u.add(p * CIN * COUT + co),
                    bias: g.zeros.add(co),
                    dst: g.m.add(p * g.tiles * COUT + co),
                    res: std::ptr::null(),
                    width: g.tiles,
                    relu: false,
                };
                run_band::<P, V, CIN, COUT, 1>(&band);
            }
        }
    }
}

/// One band: tiles of `P` pixels, then narrower tiles for a tail that `P` does not divide.
///
/// # Safety
/// As for [`rows`], for this band.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn run_band<
    const P: usize,
    const V: usize,
    const CIN: usize,
    const COUT: usize,
    const S: usize,
>(
    band: &Band<'_>,
) {
    // SAFETY: each call covers pixels x..x+Q <= band.width (caller's contract).
    unsafe {
        let mut x = tiles::<P, V, CIN, COUT, S>(band, 0);
        if P > 4 {
            x = tiles::<4, V, CIN, COUT, S>(band, x);
        }
        if P > 2 {
            x = tiles::<2, V, CIN, COUT, S>(band, x);
        }
        if P > 1 {
            tiles::<1, V, CIN, COUT, S>(band, x);
        }
    }
}

/// Tiles of `Q` pixels from pixel `x` while they fit in the band's width; returns where it stopped.
///
/// # Safety
/// As for [`rows`], for this band.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tiles<
    const Q: usize,
    const V: usize,
    const CIN: usize,
    const COUT: usize,
    const S: usize,
>(
    band: &Band<'_>,
    mut x: usize,
) -> usize {
    while x + Q <= band.width {
        // SAFETY: pixels x..x+Q are inside the band.
        unsafe { tile::<Q, V, CIN, COUT, S>(band, x) };
        x += Q;
    }
    x
}

/// `P` output pixels from pixel `x` of the band x `16 V` output channels.
///
/// # Safety
/// As for [`rows`], with `x + P <= band.width`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<
    const P: usize,
    const V: usize,
    const CIN: usize,
    const COUT: usize,
    const S: usize,
>(
    band: &Band<'_>,
    x: usize,
) {
    // SAFETY: every offset below stays within pixels x..x+P, taps and channels of the band.
    unsafe {
        let src = band.src.add(x * S * CIN);
        let mut acc = [[_mm512_setzero_ps(); V]; P];
        for v in 0..V {
            let bias = _mm512_loadu_ps(band.bias.add(v * LANES));
            for row in acc.iter_mut() {
                row[v] = bias;
            }
        }
        for (tap, &off) in band.taps.iter().enumerate() {
            let s = src.offset(off);
            let wt = band.weights.add(tap * CIN * COUT);
            for ci in 0..CIN {
                let mut wv = [_mm512_setzero_ps(); V];
                for (v, wv) in wv.iter_mut().enumerate() {
                    *wv = _mm512_loadu_ps(wt.add(ci * COUT + v * LANES));
                }
                for (p, row) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*s.add(p * S * CIN + ci));
                    for (a, &wv) in row.iter_mut().zip(&wv) {
                        *a = _mm512_fmadd_ps(xv, wv, *a);
                    }
                }
            }
        }
        let zero = _mm512_setzero_ps();
        let dst = band.dst.add(x * COUT);
        for (p, row) in acc.iter().enumerate() {
            for (v, &a) in row.iter().enumerate() {
                let o = p * COUT + v * LANES;
                let mut y = a;
                if !band.res.is_null() {
                    y = _mm512_add_ps(y, _mm512_loadu_ps(band.res.add(x * COUT + o)));
                }
                if band.relu {
                    y = _mm512_max_ps(y, zero);
                }
                _mm512_storeu_ps(dst.add(o), y);
            }
        }
    }
}
