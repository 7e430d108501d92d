//! The SIMD convolution kernel, written once over a [`Vector`] register type: each output pixel's
//! channels are held in registers, a tile of `P` pixels x `N` vectors accumulates in registers,
//! and every input value is broadcast once per tile and multiplied into all `N` weight vectors.
//!
//! Every function here is `#[inline(always)]` and has no target features of its own:
//! [`instantiate!`] compiles it inside `#[target_feature]` wrappers, one set per instruction set,
//! where the vector operations become single instructions.

use super::vector::Vector;
use super::{Band, RawConv, RawGemm};

/// Defines `rows` and `gemm` in the invoking module (a sibling of this one): the kernels below
/// for register type `$vector`, compiled with `$features` enabled. Their const parameters are
/// the tile (`P` pixels x `N` vectors) and the layer (`CIN`, `COUT`, stride `S`).
macro_rules! instantiate {
    ($vector:ty, $features:literal) => {
        /// [`super::direct::rows`] for this instruction set.
        ///
        /// # Safety
        /// As for [`super::direct::rows`].
        #[target_feature(enable = $features)]
        unsafe fn rows<
            const P: usize,
            const N: usize,
            const CIN: usize,
            const COUT: usize,
            const S: usize,
        >(
            t: &super::RawConv,
        ) {
            // SAFETY: the caller's contract is the kernel's.
            unsafe { super::direct::rows::<$vector, P, N, CIN, COUT, S>(t) }
        }

        /// [`super::direct::gemm`] for this instruction set.
        ///
        /// # Safety
        /// As for [`super::direct::gemm`].
        #[target_feature(enable = $features)]
        unsafe fn gemm<
            const P: usize,
            const N: usize,
            const CIN: usize,
            const COUT: usize,
            const BLOCK: usize,
        >(
            g: &super::RawGemm,
        ) {
            // SAFETY: the caller's contract is the kernel's.
            unsafe { super::direct::gemm::<$vector, P, N, CIN, COUT, BLOCK>(g) }
        }

        /// [`gemm`] with the filter layout it reads.
        fn gemm_of<
            const P: usize,
            const N: usize,
            const CIN: usize,
            const COUT: usize,
            const BLOCK: usize,
        >() -> super::Gemm {
            super::Gemm {
                run: gemm::<P, N, CIN, COUT, BLOCK>,
                block: BLOCK,
            }
        }
    };
}
pub(super) use instantiate;

/// Runs a whole [`RawConv`]: rows, then blocks of `N` vectors of output channels, then tiles of
/// `P` pixels, with narrower tiles for a tail that `P` does not divide.
///
/// # Safety
/// The CPU supports `V`'s instruction set, every pointer in `t` is valid for the accesses its
/// fields describe (`ConvLayer::run` checks them), and the layer has `CIN` inputs, `COUT` outputs
/// (a multiple of `N` vectors), stride `S`.
#[inline(always)]
pub(super) unsafe fn rows<
    V: Vector,
    const P: usize,
    const N: usize,
    const CIN: usize,
    const COUT: usize,
    const S: usize,
>(
    t: &RawConv,
) {
    for r in 0..t.rows {
        for co in (0..COUT).step_by(V::LANES * N) {
            // SAFETY: row r and channel block co lie inside the task (caller's contract).
            unsafe { run_band::<V, P, N, CIN, COUT, S, COUT>(&t.band(r, co)) };
        }
    }
}

/// Winograd matrix products for `(CIN, COUT)`: each position is a one-tap "convolution" of a row
/// of `tiles` transformed tiles. A tile holds `BLOCK` output channels (`N` vectors), whose
/// filters are one contiguous run per position (see [`RawGemm`]).
///
/// # Safety
/// The CPU supports `V`'s instruction set, and `g` describes valid buffers (see [`RawGemm`]) for
/// `CIN` inputs and `COUT` outputs (a multiple of `N` vectors), filters in blocks of `BLOCK`.
#[inline(always)]
pub(super) unsafe fn gemm<
    V: Vector,
    const P: usize,
    const N: usize,
    const CIN: usize,
    const COUT: usize,
    const BLOCK: usize,
>(
    g: &RawGemm,
) {
    const { assert!(BLOCK == V::LANES * N && COUT.is_multiple_of(BLOCK)) };
    let taps = [0isize];
    debug_assert!(
        g.channels.end <= COUT
            && g.channels.start.is_multiple_of(BLOCK)
            && g.channels.end.is_multiple_of(BLOCK)
    );
    for p in 0..g.positions {
        for co in g.channels.clone().step_by(BLOCK) {
            // SAFETY: position p < positions and channel block co < COUT (whole blocks, the
            // caller's contract) stay inside the buffers.
            unsafe {
                let band = Band {
                    src: g.v.add(p * g.v_stride),
                    taps: &taps,
                    weights: g.u.add(p * CIN * COUT + co * CIN),
                    bias: g.zeros.add(co),
                    dst: g.m.add(p * g.m_stride + co),
                    res: std::ptr::null(),
                    width: g.tiles,
                    relu: false,
                };
                // The same block's filters at the next position, fetched into the core's
                // second-level cache a few lines per tile while this position computes: the
                // filters of the wider layers come from the shared cache (a layer's are read
                // once per group, and the other layers' have evicted them since), and the
                // hardware prefetcher stops at each page. (None after the last position.)
                let lines = CIN * BLOCK / FLOATS_PER_LINE;
                let next = band.weights.wrapping_add(CIN * COUT);
                let steps = g.tiles / P;
                let per_step = if p + 1 < g.positions && steps > 0 {
                    lines.div_ceil(steps)
                } else {
                    0
                };
                let mut x = 0;
                while x + P <= g.tiles {
                    let first = (x / P) * per_step;
                    let ahead = Prefetch {
                        from: next.wrapping_add(first * FLOATS_PER_LINE),
                        lines: per_step.min(lines.saturating_sub(first)),
                    };
                    tile::<V, P, N, CIN, COUT, 1, BLOCK>(&band, x, ahead);
                    x += P;
                }
                tail::<V, P, N, CIN, COUT, 1, BLOCK>(&band, x);
            }
        }
    }
}

/// Winograd matrix products for a layer whose whole filter matrix at one position fits in
/// registers: `COUT` is one vector, and the `CIN` filter vectors are loaded once per position.
/// Each tile's sum runs as two interleaved chains (even and odd input channels), so that `Q`
/// tiles keep `2Q` independent accumulations in flight: with `CIN` = 16 and one chain per tile,
/// every multiply-add waited on the previous one's result.
///
/// # Safety
/// As for [`gemm`], with `COUT` = `V::LANES` (one block, the filters' layout is then plain
/// `[positions][cin][cout]`).
#[inline(always)]
pub(super) unsafe fn gemm_resident<
    V: Vector,
    const Q: usize,
    const CIN: usize,
    const COUT: usize,
>(
    g: &RawGemm,
) {
    const { assert!(COUT == V::LANES && CIN.is_multiple_of(2)) };
    debug_assert!(g.channels.is_empty() || g.channels == (0..COUT));
    if g.channels.is_empty() {
        return;
    }
    for p in 0..g.positions {
        // SAFETY: position p < positions stays inside the buffers (caller's contract), and
        // every tile below is < tiles.
        unsafe {
            let u = g.u.add(p * CIN * COUT);
            let w: [V; CIN] = std::array::from_fn(|ci| V::load(u.add(ci * COUT)));
            let v = g.v.add(p * g.v_stride);
            let m = g.m.add(p * g.m_stride);
            let mut t = 0;
            while t + Q <= g.tiles {
                resident_tiles::<V, Q, CIN, COUT>(&w, v.add(t * CIN), m.add(t * COUT));
                t += Q;
            }
            while t < g.tiles {
                resident_tiles::<V, 1, CIN, COUT>(&w, v.add(t * CIN), m.add(t * COUT));
                t += 1;
            }
        }
    }
}

/// `Q` consecutive tiles of one position for [`gemm_resident`]: `v` is the first tile's `CIN`
/// inputs, `m` its `COUT` outputs.
///
/// # Safety
/// `v` is readable for `Q * CIN` floats, `m` writable for `Q * COUT`, and the CPU supports `V`'s
/// instruction set.
#[inline(always)]
unsafe fn resident_tiles<V: Vector, const Q: usize, const CIN: usize, const COUT: usize>(
    w: &[V; CIN],
    v: *const f32,
    m: *mut f32,
) {
    // SAFETY: tile q < Q and channel ci < CIN are inside `v`, output q inside `m` (contract).
    unsafe {
        let mut acc = [[V::zero(); 2]; Q];
        for ci in (0..CIN).step_by(2) {
            for (q, acc) in acc.iter_mut().enumerate() {
                let x = v.add(q * CIN + ci);
                acc[0] = V::fmadd(V::splat(*x), w[ci], acc[0]);
                acc[1] = V::fmadd(V::splat(*x.add(1)), w[ci + 1], acc[1]);
            }
        }
        for (q, acc) in acc.iter().enumerate() {
            V::store(m.add(q * COUT), V::add(acc[0], acc[1]));
        }
    }
}

/// Floats in a 64-byte cache line.
const FLOATS_PER_LINE: usize = 16;

/// Asks for the cache line holding `p` to be brought into the second-level cache.
#[inline(always)]
fn prefetch(p: *const f32) {
    // SAFETY: a prefetch is only a hint: it reads nothing into the program and never faults,
    // whatever the address; SSE is part of x86_64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.cast::<i8>())
    };
}

/// Cache lines to fetch ahead while a tile computes: `lines` lines from `from`.
#[derive(Debug, Clone, Copy)]
struct Prefetch {
    from: *const f32,
    lines: usize,
}

impl Prefetch {
    const NONE: Self = Self {
        from: std::ptr::null(),
        lines: 0,
    };
}

/// One band: tiles of `P` pixels, then narrower tiles for a tail that `P` does not divide.
///
/// # Safety
/// As for [`rows`], for this band.
#[inline(always)]
unsafe fn run_band<
    V: Vector,
    const P: usize,
    const N: usize,
    const CIN: usize,
    const COUT: usize,
    const S: usize,
    const W_ROW: usize,
>(
    band: &Band<'_>,
) {
    // SAFETY: each call covers pixels x..x+Q <= band.width (caller's contract).
    unsafe {
        let x = tiles::<V, P, N, CIN, COUT, S, W_ROW>(band, 0);
        tail::<V, P, N, CIN, COUT, S, W_ROW>(band, x);
    }
}

/// The pixels from `x` to the end of the band, fewer than `P`: tiles of 4, 2 and 1.
///
/// # Safety
/// As for [`rows`], for this band.
#[inline(always)]
unsafe fn tail<
    V: Vector,
    const P: usize,
    const N: usize,
    const CIN: usize,
    const COUT: usize,
    const S: usize,
    const W_ROW: usize,
>(
    band: &Band<'_>,
    mut x: usize,
) {
    // SAFETY: each call covers pixels x..x+Q <= band.width (caller's contract).
    unsafe {
        if P > 4 {
            x = tiles::<V, 4, N, CIN, COUT, S, W_ROW>(band, x);
        }
        if P > 2 {
            x = tiles::<V, 2, N, CIN, COUT, S, W_ROW>(band, x);
        }
        if P > 1 {
            tiles::<V, 1, N, CIN, COUT, S, W_ROW>(band, x);
        }
    }
}

/// Tiles of `Q` pixels from pixel `x` while they fit in the band's width; returns where it stopped.
///
/// # Safety
/// As for [`rows`], for this band.
#[inline(always)]
unsafe fn tiles<
    V: Vector,
    const Q: usize,
    const N: usize,
    const CIN: usize,
    const COUT: usize,
    const S: usize,
    const W_ROW: usize,
>(
    band: &Band<'_>,
    mut x: usize,
) -> usize {
    while x + Q <= band.width {
        // SAFETY: pixels x..x+Q are inside the band.
        unsafe { tile::<V, Q, N, CIN, COUT, S, W_ROW>(band, x, Prefetch::NONE) };
        x += Q;
    }
    x
}

/// `P` output pixels from pixel `x` of the band x `N` vectors of output channels. `W_ROW`: floats
/// from one input channel's weights to the next's (`COUT` in a convolution's `[tap][cin][cout]`,
/// the block width in the Winograd filters' blocks). `ahead`: cache lines to prefetch meanwhile
/// (none for a convolution).
///
/// # Safety
/// As for [`rows`], with `x + P <= band.width`.
#[inline(always)]
unsafe fn tile<
    V: Vector,
    const P: usize,
    const N: usize,
    const CIN: usize,
    const COUT: usize,
    const S: usize,
    const W_ROW: usize,
>(
    band: &Band<'_>,
    x: usize,
    ahead: Prefetch,
) {
    // One line to prefetch at each input channel (spread out, so that the loads the tile waits
    // on are not queued behind them), and any beyond `CIN` first.
    for k in CIN..ahead.lines {
        prefetch(ahead.from.wrapping_add(k * FLOATS_PER_LINE));
    }
    // SAFETY: every offset below stays within pixels x..x+P, taps and channels of the band, and
    // the CPU supports `V`'s instruction set (caller's contract).
    unsafe {
        let src = band.src.add(x * S * CIN);
        let mut acc = [[V::zero(); N]; P];
        for v in 0..N {
            let bias = V::load(band.bias.add(v * V::LANES));
            for row in acc.iter_mut() {
                row[v] = bias;
            }
        }
        for (tap, &off) in band.taps.iter().enumerate() {
            let s = src.offset(off);
            let wt = band.weights.add(tap * CIN * W_ROW);
            for ci in 0..CIN {
                if tap == 0 && ci < ahead.lines {
                    prefetch(ahead.from.wrapping_add(ci * FLOATS_PER_LINE));
                }
                let mut wv = [V::zero(); N];
                for (v, wv) in wv.iter_mut().enumerate() {
                    *wv = V::load(wt.add(ci * W_ROW + v * V::LANES));
                }
                for (p, row) in acc.iter_mut().enumerate() {
                    let xv = V::splat(*s.add(p * S * CIN + ci));
                    for (a, &wv) in row.iter_mut().zip(&wv) {
                        *a = V::fmadd(xv, wv, *a);
                    }
                }
            }
        }
        let zero = V::zero();
        let dst = band.dst.add(x * COUT);
        for (p, row) in acc.iter().enumerate() {
            for (v, &a) in row.iter().enumerate() {
                let o = p * COUT + v * V::LANES;
                let mut y = a;
                if !band.res.is_null() {
                    y = V::add(y, V::load(band.res.add(x * COUT + o)));
                }
                if band.relu {
                    y = V::max(y, zero);
                }
                V::store(dst.add(o), y);
            }
        }
    }
}
