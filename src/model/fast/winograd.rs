//! Winograd F(4x4, 3x3) and F(2x2, 3x3) for stride-1 3x3 convolutions: each 6x6 (4x4) input
//! tile is transformed (`B^T d B`), multiplied position by position with the transformed filters
//! (`G g G^T`, 36 (16) small matrix products that reuse the SIMD convolution tiles), and
//! transformed back (`A^T m A`) into a 4x4 (2x2) output tile with bias, residual and ReLU fused.
//! F(4x4, 3x3) takes 2.25 multiplies per output instead of 9; F(2x2, 3x3) takes 4, but its
//! transformed filters are 2.25x smaller, which is what counts when few tiles share them.
//!
//! The transforms are plain loops over channels-last pixels, written once and compiled for each
//! instruction set (inlined into `#[target_feature]` wrappers, where they vectorise).

use std::ops::Range;

use super::buffers::{AlignedBuf, ChannelsOutput, LayerInput, LayerOutput, Plane};
use super::kernels::{self, Kernel, RawGemm};
use super::simd::{Isa, SimdLevel};
use crate::model::fold::FoldedConv;

/// A Winograd algorithm F(m x m, 3x3), named by its output tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tiling {
    /// F(4x4, 3x3): 6x6 input tiles, 36 positions.
    F4,
    /// F(2x2, 3x3): 4x4 input tiles, 16 positions.
    F2,
}

impl Tiling {
    /// Output tile side.
    pub const fn tile(self) -> usize {
        match self {
            Self::F4 => 4,
            Self::F2 => 2,
        }
    }

    /// Input tile side.
    const fn alpha(self) -> usize {
        self.tile() + 2
    }

    /// Positions of the transformed tile.
    const fn positions(self) -> usize {
        self.alpha() * self.alpha()
    }

    /// `G` (`alpha x 3`), which transforms the filters.
    fn g(self) -> &'static [[f64; 3]] {
        match self {
            Self::F4 => &G4,
            Self::F2 => &G2,
        }
    }
}

/// The widest input tile of any tiling.
const MAX_ALPHA: usize = Tiling::F4.alpha();
/// The most positions of any tiling; bounds the scratch.
const MAX_POSITIONS: usize = Tiling::F4.positions();
/// Most tiles transformed together (possibly from several images); bounds the scratch.
pub const MAX_GROUP_TILES: usize = 32;
/// Widest layer the transforms are instantiated for.
const MAX_CHANNELS: usize = 64;
/// Floats (one cache line) between one position's tiles and the next's in `V` and `M`.
///
/// Without it, a group of 32 tiles of 64 channels puts the 36 positions 8 KiB apart: a tile's
/// 36 vectors, written by the input transform and read by the output transform, all fall in
/// one set of the first-level cache and evict each other (and 4 KiB apart, loads wait on
/// unrelated stores). With it, consecutive positions fall in consecutive sets.
const POSITION_PAD: usize = 16;

/// Floats from one position of a group of `n` tiles of `c` channels to the next, in `V` or `M`.
const fn position_stride(n: usize, c: usize) -> usize {
    n * c + POSITION_PAD
}

/// `G` of F(4x4, 3x3) (interpolation points 0, 1, -1, 2, -2 and infinity).
const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// `G` of F(2x2, 3x3) (interpolation points 0, 1, -1 and infinity).
const G2: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// Per-thread buffers for transformed tiles: `V` (`[positions][tiles][cin]`) and `M`
/// (`[positions][tiles][cout]`), each position [`position_stride`] floats after the previous one.
#[derive(Debug)]
pub struct Scratch {
    v: AlignedBuf,
    m: AlignedBuf,
}

impl Default for Scratch {
    fn default() -> Self {
        let len = MAX_POSITIONS * position_stride(MAX_GROUP_TILES, MAX_CHANNELS);
        Self {
            v: AlignedBuf::zeros(len),
            m: AlignedBuf::zeros(len),
        }
    }
}

type InputTransform = unsafe fn(&InputArgs<'_>, &mut [f32]);
type OutputTransform = unsafe fn(&OutputArgs<'_>);

/// Where tiles sit in a group of `n` tiles: `[positions][n][channels]` (positions
/// [`position_stride`] apart), these from index `offset`.
#[derive(Debug, Clone, Copy)]
struct Slot {
    offset: usize,
    n: usize,
}

/// What the input transform reads.
#[derive(Debug)]
pub struct InputArgs<'a> {
    input: &'a [f32],
    src: Plane,
    /// Tile rows to transform.
    tiles: Range<usize>,
    slot: Slot,
}

/// What the output transform reads, and where it writes.
#[derive(Debug)]
pub struct OutputArgs<'a> {
    m: &'a [f32],
    /// The output band: `out_len` floats, exactly the bordered rows of `tiles`. A raw pointer,
    /// because threads that split the channels write other channels of the same rows meanwhile.
    out: *mut f32,
    out_len: usize,
    /// Tile rows to produce.
    tiles: Range<usize>,
    /// Output channels to produce (whole vectors of the instruction set).
    channels: Range<usize>,
    slot: Slot,
    bias: &'a [f32],
    dst: Plane,
    residual: Option<&'a [f32]>,
    relu: bool,
}

/// A stride-1 3x3 convolution with bias, computed with Winograd F(4x4, 3x3) or F(2x2, 3x3).
#[derive(Debug)]
pub struct WinogradLayer {
    pub cin: usize,
    pub cout: usize,
    tiling: Tiling,
    /// `[positions][cout / block][cin][block]` transformed filters, in the blocks of `gemm`.
    u: AlignedBuf,
    block: usize,
    bias: AlignedBuf,
    zeros: AlignedBuf,
    input: InputTransform,
    output: OutputTransform,
    gemm: Kernel<kernels::Gemm>,
}

/// Whether `tiling` supports this convolution on a `h x w` image.
pub fn supports(tiling: Tiling, conv: &FoldedConv, stride: usize, h: usize, w: usize) -> bool {
    let widths = |c| matches!(c, 16 | 32 | 64);
    let tile = tiling.tile();
    conv.k == 3
        && stride == 1
        && widths(conv.cin)
        && widths(conv.cout)
        && h.is_multiple_of(tile)
        && w.is_multiple_of(tile)
        && w / tile <= MAX_GROUP_TILES
}

impl WinogradLayer {
    /// Transforms the filters. `supports(tiling, conv, 1, h, w)` must hold.
    pub fn new(conv: &FoldedConv, w: usize, level: SimdLevel, tiling: Tiling) -> Self {
        let (cin, cout) = (conv.cin, conv.cout);
        let (tile, alpha, positions) = (tiling.tile(), tiling.alpha(), tiling.positions());
        assert!(
            supports(tiling, conv, 1, tile, w),
            "unsupported Winograd layer"
        );
        let gemm = kernels::select_gemm(level, cin, cout);
        // The filters' layout is the kernel's: output channels in blocks (the portable kernel
        // reads whole rows).
        let block = match gemm {
            Kernel::Simd(gemm) => gemm.block,
            Kernel::Scalar => cout,
        };
        let g_matrix = tiling.g();
        let mut u = AlignedBuf::zeros(positions * cin * cout);
        let packed = u.as_mut_slice();
        for co in 0..cout {
            for ci in 0..cin {
                let g = &conv.weight[(co * cin + ci) * 9..][..9];
                // G g G^T in f64.
                let mut gg = [[0.0f64; 3]; MAX_ALPHA];
                for (i, row) in gg.iter_mut().take(alpha).enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = (0..3)
                            .map(|k| g_matrix[i][k] * f64::from(g[k * 3 + j]))
                            .sum();
                    }
                }
                for i in 0..alpha {
                    for j in 0..alpha {
                        let v: f64 = (0..3).map(|k| gg[i][k] * g_matrix[j][k]).sum();
                        let (b, lane) = (co / block, co % block);
                        packed[(i * alpha + j) * cin * cout + (b * cin + ci) * block + lane] =
                            v as f32;
                    }
                }
            }
        }
        let mut bias = AlignedBuf::zeros(cout);
        bias.as_mut_slice().copy_from_slice(&conv.bias);
        Self {
            cin,
            cout,
            tiling,
            u,
            bias,
            zeros: AlignedBuf::zeros(cout),
            input: input_transform_for(level, tiling, cin),
            output: output_transform_for(level, tiling, cout),
            gemm,
            block,
        }
    }

    /// Output tile side: the layer's rows and columns go in runs of this many.
    pub fn tile(&self) -> usize {
        self.tiling.tile()
    }

    /// Most tiles to gather (whole tile rows, over rows and images) before each
    /// [`Self::multiply`]; [`supports`] admits only tile rows that fit.
    ///
    /// A multiplication reads the filters of every position once for the whole group, and the
    /// more tiles share that, the nearer it runs to the multiply-add peak. 32 for every width:
    /// for the 16-channel layers, whose filters stay in registers, 8 tiles (one tile row) left
    /// their products at about two thirds of the peak; 32 gave 1.02x the images/s at batch 64
    /// and 1.01x at batch 1 (AVX-512, `bench`, 2 threads, six alternated rounds; AVX2 on the
    /// same machine unchanged), although a group's transformed tiles (74 KB) then outgrow the
    /// first-level cache.
    pub fn group_tiles(&self) -> usize {
        MAX_GROUP_TILES
    }

    /// Bytes of the transformed filters, which every multiplication of a group reads.
    pub fn filter_bytes(&self) -> usize {
        std::mem::size_of_val(self.u.as_slice())
    }

    /// Output channels the matrix product computes together: [`Self::multiply`] and
    /// [`Self::transform_output_channels`] take whole blocks.
    pub fn block(&self) -> usize {
        self.block
    }

    /// Transforms tile rows `tiles` of the bordered image `input` into the scratch, as tiles
    /// `offset..` of a group of `n` tiles.
    pub fn transform_input(
        &self,
        input: LayerInput<'_>,
        tiles: Range<usize>,
        (offset, n): (usize, usize),
        scratch: &mut Scratch,
    ) {
        input.check(self.cin);
        let LayerInput { image, plane: src } = input;
        let tile = self.tile();
        assert!(
            tiles.end * tile <= src.h && src.w.is_multiple_of(tile),
            "tile rows"
        );
        assert!(offset + tiles.len() * (src.w / tile) <= n && n <= MAX_GROUP_TILES);
        let args = InputArgs {
            input: image,
            src,
            tiles,
            slot: Slot { offset, n },
        };
        let positions = self.tiling.positions();
        let v = &mut scratch.v.as_mut_slice()[..positions * position_stride(n, self.cin)];
        // SAFETY: the transform was selected for a `SimdLevel`, which exists only for an
        // instruction set this CPU has; it indexes slices, whose extents it checks once on entry.
        unsafe { (self.input)(&args, v) };
    }

    /// Transforms tiles `offset..` of the group of `n` back into the output rows `out.rows`
    /// (whole tile rows), with bias, residual and ReLU fused.
    pub fn transform_output(&self, scratch: &Scratch, slot: (usize, usize), out: LayerOutput<'_>) {
        let LayerOutput {
            band,
            plane,
            rows,
            residual,
            relu,
        } = out;
        let out = ChannelsOutput {
            band: band.as_mut_ptr(),
            len: band.len(),
            plane,
            rows,
            channels: 0..self.cout,
            residual,
            relu,
        };
        // SAFETY: `band` is borrowed exclusively for this call and `len` is its length;
        // `transform_output_channels` checks that it holds exactly the rows `rows`.
        unsafe { self.transform_output_channels(scratch, slot, out) }
    }

    /// [`Self::transform_output`] for the channels `out.channels` (whole blocks) only: what a
    /// thread computes when threads split a layer's output channels.
    ///
    /// # Safety
    /// `out.band` is valid for reads and writes of `out.len` floats, which are exactly the
    /// bordered rows `out.rows` of an image of `out.plane`, and no other thread reads or writes
    /// channels `out.channels` of those rows during the call.
    pub unsafe fn transform_output_channels(
        &self,
        scratch: &Scratch,
        (offset, n): (usize, usize),
        out: ChannelsOutput<'_>,
    ) {
        out.check(self.cout);
        let ChannelsOutput {
            band,
            len,
            plane: dst,
            rows,
            channels,
            residual,
            relu,
        } = out;
        self.check_channels(&channels);
        let tile = self.tile();
        assert!(
            rows.start.is_multiple_of(tile) && rows.end.is_multiple_of(tile),
            "whole tile rows"
        );
        assert!(dst.w.is_multiple_of(tile), "tile rows");
        let tiles = rows.start / tile..rows.end / tile;
        assert!(offset + tiles.len() * (dst.w / tile) <= n && n <= MAX_GROUP_TILES);
        let positions = self.tiling.positions();
        let args = OutputArgs {
            m: &scratch.m.as_slice()[..positions * position_stride(n, self.cout)],
            out: band,
            out_len: len,
            tiles,
            channels,
            slot: Slot { offset, n },
            bias: self.bias.as_slice(),
            dst,
            residual,
            relu,
        };
        // SAFETY: selected for a `SimdLevel`, as the input transform; it indexes slices and the
        // band, whose extents it checks once on entry, and writes only `channels` of the band,
        // which no other thread accesses meanwhile (function contract).
        unsafe { (self.output)(&args) };
    }

    /// Panics unless `channels` is a run of whole blocks of the output channels.
    fn check_channels(&self, channels: &Range<usize>) {
        assert!(
            channels.start <= channels.end
                && channels.end <= self.cout
                && channels.start.is_multiple_of(self.block)
                && channels.end.is_multiple_of(self.block),
            "output channel blocks"
        );
    }

    /// The convolution of one whole image (`out.rows` must be all its rows), tile rows in
    /// groups: the tests' way in (the network gathers tiles across images instead).
    #[cfg(test)]
    pub fn run(&self, input: LayerInput<'_>, out: LayerOutput<'_>, scratch: &mut Scratch) {
        let LayerOutput {
            band: output,
            plane: dst,
            rows,
            residual,
            relu,
        } = out;
        assert_eq!(rows, 0..dst.h, "whole image");
        // `output` and `residual` start at the first interior row.
        let first = dst.rows(&rows).start;
        let tile = self.tile();
        let tiles_x = dst.w / tile;
        let rows_per_group = (self.group_tiles() / tiles_x).max(1);
        let mut ty = 0;
        while ty < dst.h / tile {
            let tiles = ty..(ty + rows_per_group).min(dst.h / tile);
            let n = tiles.len() * tiles_x;
            self.transform_input(input, tiles.clone(), (0, n), scratch);
            self.multiply(n, 0..self.cout, scratch);
            let rows = tiles.start * tile..tiles.end * tile;
            let band = dst.rows(&rows);
            let band = band.start - first..band.end - first;
            self.transform_output(
                scratch,
                (0, n),
                LayerOutput {
                    band: &mut output[band.clone()],
                    plane: dst,
                    rows,
                    residual: residual.map(|r| &r[band]),
                    relu,
                },
            );
            ty = tiles.end;
        }
    }

    /// `M[p] = V[p] U[p]` for the positions of the `n` tiles in the scratch, output channels
    /// `channels` (whole blocks; the rest of `M` is left as it was).
    pub fn multiply(&self, n: usize, channels: Range<usize>, scratch: &mut Scratch) {
        let (cin, cout) = (self.cin, self.cout);
        assert!(n <= MAX_GROUP_TILES, "group size");
        self.check_channels(&channels);
        let positions = self.tiling.positions();
        let (v_stride, m_stride) = (position_stride(n, cin), position_stride(n, cout));
        let v = &scratch.v.as_slice()[..positions * v_stride];
        let m = &mut scratch.m.as_mut_slice()[..positions * m_stride];
        match self.gemm {
            Kernel::Scalar => {
                for p in 0..positions {
                    let u = &self.u.as_slice()[p * cin * cout..][..cin * cout];
                    for t in 0..n {
                        let x = &v[p * v_stride + t * cin..][..cin];
                        let out = &mut m[p * m_stride + t * cout..][..cout][channels.clone()];
                        out.fill(0.0);
                        for (&xv, w) in x.iter().zip(u.chunks_exact(cout)) {
                            for (o, &w) in out.iter_mut().zip(&w[channels.clone()]) {
                                *o += xv * w;
                            }
                        }
                    }
                }
            }
            Kernel::Simd(gemm) => {
                let raw = RawGemm {
                    v: v.as_ptr(),
                    u: self.u.as_slice().as_ptr(),
                    zeros: self.zeros.as_slice().as_ptr(),
                    m: m.as_mut_ptr(),
                    positions,
                    tiles: n,
                    v_stride,
                    m_stride,
                    channels,
                };
                // SAFETY: selected for this CPU and (cin, cout); `v` holds `positions` of
                // `v_stride` floats, each n x cin from its start, and `m` as many of `m_stride`
                // floats, each n x cout (the slices above), `u` positions x cin x cout in this
                // kernel's blocks (packed in `new`), `zeros` cout; `channels` are whole blocks
                // (checked).
                unsafe { (gemm.run)(&raw) };
            }
        }
    }
}

/// `a * b + c`, fused where the instruction set has FMA (a libm call would be slow elsewhere).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `B^T d` on `A` vectors of `L` channels: six for F(4x4, 3x3), four for F(2x2, 3x3).
#[inline(always)]
fn input_1d<const A: usize, const L: usize, const FMA: bool>(
    d: [&[f32; L]; A],
    t: &mut [[f32; L]; A],
) {
    const { assert!(A == 6 || A == 4) };
    // `A` is a constant of each instantiation, so one branch remains, with constant indices.
    let (d, t) = (&d[..], &mut t[..]);
    if A == 6 {
        for (half, rows) in t.as_chunks_mut::<3>().0.iter_mut().enumerate() {
            input_1d_half::<L, FMA>(d, half, rows);
        }
    } else {
        for c in 0..L {
            let [d0, d1, d2, d3] = [d[0][c], d[1][c], d[2][c], d[3][c]];
            t[0][c] = d0 - d2;
            t[1][c] = d1 + d2;
            t[2][c] = d2 - d1;
            t[3][c] = d1 - d3;
        }
    }
}

/// Rows `3 half..3 half + 3` of `B^T d` for F(4x4, 3x3) (`d`: six vectors): the first half
/// reads `d[0..5]`, the second `d[1..6]`.
#[inline(always)]
fn input_1d_half<const L: usize, const FMA: bool>(
    d: &[&[f32; L]],
    half: usize,
    t: &mut [[f32; L]; 3],
) {
    debug_assert!(d.len() == 6 && half < 2);
    if half == 0 {
        for c in 0..L {
            let [d0, d1, d2, d3, d4] = [d[0][c], d[1][c], d[2][c], d[3][c], d[4][c]];
            t[0][c] = madd::<FMA>(4.0, d0, madd::<FMA>(-5.0, d2, d4));
            t[1][c] = madd::<FMA>(-4.0, d1 + d2, d3 + d4);
            t[2][c] = madd::<FMA>(4.0, d1 - d2, d4 - d3);
        }
    } else {
        for c in 0..L {
            let [d1, d2, d3, d4, d5] = [d[1][c], d[2][c], d[3][c], d[4][c], d[5][c]];
            let (e, f) = (d3 - d1, d4 - d2);
            t[0][c] = madd::<FMA>(2.0, e, f);
            t[1][c] = madd::<FMA>(-2.0, e, f);
            t[2][c] = madd::<FMA>(4.0, d1, madd::<FMA>(-5.0, d3, d5));
        }
    }
}

/// `A^T m` on `A` vectors of `L` channels, to `M`: six to four for F(4x4, 3x3), four to two for
/// F(2x2, 3x3).
#[inline(always)]
fn output_1d<const A: usize, const M: usize, const L: usize, const FMA: bool>(
    m: [&[f32; L]; A],
    o: &mut [[f32; L]; M],
) {
    const { assert!((A == 6 && M == 4) || (A == 4 && M == 2)) };
    let (m, o) = (&m[..], &mut o[..]);
    if A == 6 {
        for c in 0..L {
            let [m0, m1, m2, m3, m4, m5] = [m[0][c], m[1][c], m[2][c], m[3][c], m[4][c], m[5][c]];
            let (a, b, s, d) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
            o[0][c] = m0 + a + s;
            o[1][c] = madd::<FMA>(2.0, d, b);
            o[2][c] = madd::<FMA>(4.0, s, a);
            o[3][c] = madd::<FMA>(8.0, d, b + m5);
        }
    } else {
        for c in 0..L {
            let [m0, m1, m2, m3] = [m[0][c], m[1][c], m[2][c], m[3][c]];
            o[0][c] = m0 + m1 + m2;
            o[1][c] = m1 - m2 - m3;
        }
    }
}

/// The `L` floats of `s` from `at`, unchecked: the transforms check their extent once per call
/// (bounds checks on every vector cost them some 10%).
///
/// # Safety
/// `at + L <= s.len()`.
#[inline(always)]
unsafe fn lanes<const L: usize>(s: &[f32], at: usize) -> &[f32; L] {
    debug_assert!(at + L <= s.len());
    // SAFETY: in bounds (contract); `[f32; L]` has the alignment of `f32`.
    unsafe { &*s.as_ptr().add(at).cast::<[f32; L]>() }
}

/// Writes `L` floats to `p + at`, unchecked.
///
/// # Safety
/// `p + at` is valid for writing `L` floats, which no other thread accesses meanwhile.
#[inline(always)]
unsafe fn store_raw<const L: usize>(p: *mut f32, at: usize, values: &[f32; L]) {
    // SAFETY: valid and unshared (contract); `values` is a distinct local array.
    unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), p.add(at), L) };
}

/// Writes `L` floats into `s` from `at`, unchecked.
///
/// # Safety
/// `at + L <= s.len()`.
#[inline(always)]
unsafe fn store<const L: usize>(s: &mut [f32], at: usize, values: &[f32; L]) {
    debug_assert!(at + L <= s.len());
    // SAFETY: in bounds (contract), and `s` is borrowed exclusively.
    unsafe { store_raw(s.as_mut_ptr(), at, values) };
}

/// `V = B^T d B` for every tile of the tile rows `a.tiles`, `L` channels at a time (one
/// register's worth, so that with AVX-512 a tile's transformed values stay in registers: all
/// `A x A` of them for F(2x2, 3x3), half at a time for F(4x4, 3x3)). `M` is the output tile's
/// side, `A = M + 2` the input tile's.
#[inline(always)]
fn input_transform<
    const M: usize,
    const A: usize,
    const C: usize,
    const L: usize,
    const FMA: bool,
>(
    a: &InputArgs<'_>,
    v: &mut [f32],
) {
    const { assert!(A == M + 2) };
    let tiles_x = a.src.w / M;
    let Slot { offset, n } = a.slot;
    if a.tiles.is_empty() {
        return;
    }
    // The extent of every access below: the last tile's last input pixel, and the last position
    // of the last tile in V.
    assert!(C.is_multiple_of(L) && a.src.c == C && a.src.w.is_multiple_of(M));
    let last_tile = offset + a.tiles.len() * tiles_x - 1;
    let stride = position_stride(n, C);
    assert!(last_tile < n && A * A * stride <= v.len(), "V extent");
    assert!(
        (M * (a.tiles.end - 1) + A) * a.src.row_len() <= a.input.len()
            && M * (tiles_x - 1) + A <= a.src.w + 2,
        "input extent"
    );
    let r = a.src.row_len();
    let mut row = [[0.0f32; L]; A];
    for (t_row, ty) in a.tiles.clone().enumerate() {
        for tx in 0..tiles_x {
            let t = offset + t_row * tiles_x + tx;
            // The tile's input starts one pixel above and left of its output: bordered (M ty,
            // M tx).
            let base = M * ty * r + M * tx * C;
            for c in (0..C).step_by(L) {
                // Column j of the tile's input, channels c..c + L.
                let column = |j: usize| -> [&[f32; L]; A] {
                    let at = base + j * C + c;
                    // SAFETY: rows M ty..M ty + A and columns M tx..M tx + A of the bordered
                    // input are within the extent asserted above.
                    std::array::from_fn(|k| unsafe { lanes::<L>(a.input, at + k * r) })
                };
                // Row i of the transformed columns, transformed and stored as positions
                // (i, 0..A) of tile t.
                let mut transform_row = |i: usize, t_i: [&[f32; L]; A]| {
                    input_1d::<A, L, FMA>(t_i, &mut row);
                    for (j, values) in row.iter().enumerate() {
                        let at = (i * A + j) * stride + t * C + c;
                        // SAFETY: position < A x A, tile t < n, channel c + L <= C: inside V.
                        unsafe { store::<L>(v, at, values) };
                    }
                };
                if A == 6 {
                    // F(4x4, 3x3): 36 transformed column values, more than the registers hold
                    // beside what the row transforms need, went to the stack and back (20 stack
                    // loads and stores in the AVX-512 transform's code, 64-70 in AVX2's). The
                    // columns now go in two halves of three rows, each reading the input rows it
                    // needs: none with AVX-512, 27-31 with AVX2; `bench` at batch 64 1.02x with
                    // either, batch 1 1.01x (alternated pairs).
                    for half in 0..2 {
                        let mut cols = [[[0.0f32; L]; 3]; A];
                        for (j, col) in cols.iter_mut().enumerate() {
                            input_1d_half::<L, FMA>(&column(j), half, col);
                        }
                        for (k, i) in (3 * half..3 * half + 3).enumerate() {
                            transform_row(i, std::array::from_fn(|j| &cols[j][k]));
                        }
                    }
                } else {
                    let mut cols = [[[0.0f32; L]; A]; A];
                    for (j, col) in cols.iter_mut().enumerate() {
                        input_1d::<A, L, FMA>(column(j), col);
                    }
                    // Row i gathers element i of the transformed columns.
                    #[allow(clippy::needless_range_loop)]
                    for i in 0..A {
                        transform_row(i, std::array::from_fn(|j| &cols[j][i]));
                    }
                }
            }
        }
    }
}

/// `Y = A^T M A` + bias (+ residual), ReLU, into channels `a.channels` of the `M x M` output tiles
/// of tile rows `a.tiles`; `a.out` holds exactly the bordered rows of those tiles. `L` channels at
/// a time; `A = M + 2` is the input tile's side.
///
/// # Safety
/// `a.out` is valid for reads and writes of `a.out_len` floats, and no other thread accesses
/// channels `a.channels` of them during the call.
#[inline(always)]
unsafe fn output_transform<
    const M: usize,
    const A: usize,
    const C: usize,
    const L: usize,
    const FMA: bool,
    const SPECIALISE: bool,
>(
    a: &OutputArgs<'_>,
) {
    // SAFETY: the caller's contract.
    unsafe {
        match (SPECIALISE, a.residual.is_some(), a.relu) {
            (false, ..) => output_transform_as::<M, A, C, L, FMA, false, false, false>(a),
            (true, true, true) => output_transform_as::<M, A, C, L, FMA, true, true, true>(a),
            (true, true, false) => output_transform_as::<M, A, C, L, FMA, true, true, false>(a),
            (true, false, true) => output_transform_as::<M, A, C, L, FMA, true, false, true>(a),
            (true, false, false) => output_transform_as::<M, A, C, L, FMA, true, false, false>(a),
        }
    }
}

/// [`output_transform`], with the residual and ReLU known at compile time when `FIXED` (then
/// `a.residual.is_some() == RESIDUAL` and `a.relu == RELU`).
///
/// # Safety
/// As for [`output_transform`].
#[inline(always)]
unsafe fn output_transform_as<
    const M: usize,
    const A: usize,
    const C: usize,
    const L: usize,
    const FMA: bool,
    const FIXED: bool,
    const RESIDUAL: bool,
    const RELU: bool,
>(
    a: &OutputArgs<'_>,
) {
    const { assert!(A == M + 2) };
    let residual = if !FIXED || RESIDUAL { a.residual } else { None };
    let relu = if FIXED { RELU } else { a.relu };
    let tiles_x = a.dst.w / M;
    let Slot { offset, n } = a.slot;
    if a.tiles.is_empty() {
        return;
    }
    // The extent of every access below: M's last position of the last tile, and the last pixel
    // of the band in the output and residual.
    assert!(C.is_multiple_of(L) && a.dst.c == C && a.dst.w.is_multiple_of(M) && a.bias.len() >= C);
    let channels = a.channels.clone();
    assert!(
        channels.end <= C && channels.start.is_multiple_of(L) && channels.end.is_multiple_of(L),
        "channels"
    );
    let stride = position_stride(n, C);
    assert!(
        offset + a.tiles.len() * tiles_x <= n && A * A * stride <= a.m.len(),
        "M extent"
    );
    let band_len = M * a.tiles.len() * a.dst.row_len();
    assert!(band_len <= a.out_len, "output extent");
    assert!(
        a.residual.is_none_or(|r| r.len() == a.out_len),
        "residual extent"
    );
    let mut cols = [[[0.0f32; L]; M]; A];
    let mut row = [[0.0f32; L]; M];
    for (t_row, ty) in a.tiles.clone().enumerate() {
        for tx in 0..tiles_x {
            let t = offset + t_row * tiles_x + tx;
            for c in channels.clone().step_by(L) {
                for (j, col) in cols.iter_mut().enumerate() {
                    // Position (i, j) lies A strides after (i - 1, j).
                    let (at, step) = (j * stride + t * C + c, A * stride);
                    // SAFETY: positions (0..A, j) of tile t < n, channels c..c+L <= C: inside M.
                    let m = std::array::from_fn(|i| unsafe { lanes::<L>(a.m, at + i * step) });
                    output_1d::<A, M, L, FMA>(m, col);
                }
                // SAFETY: c + L <= C <= bias length (asserted).
                let bias = unsafe { lanes::<L>(a.bias, c) };
                // Output row r gathers element r of the transformed columns.
                #[allow(clippy::needless_range_loop)]
                for r in 0..M {
                    let s_r = std::array::from_fn(|j| &cols[j][r]);
                    output_1d::<A, M, L, FMA>(s_r, &mut row);
                    let y = M * (ty - a.tiles.start) + r;
                    for (x, values) in (M * tx..M * tx + M).zip(&row) {
                        let at = y * a.dst.row_len() + (x + 1) * C + c;
                        let mut o = [0.0f32; L];
                        for k in 0..L {
                            o[k] = values[k] + bias[k];
                        }
                        // SAFETY (residual read and output write): row y < M x tile rows and
                        // column x + 1 <= w, so `at + L` is within the asserted band.
                        if let Some(res) = residual {
                            // SAFETY: as above, `at + L` is within the residual's band.
                            let r = unsafe { lanes::<L>(res, at) };
                            for k in 0..L {
                                o[k] += r[k];
                            }
                        }
                        if relu {
                            for v in o.iter_mut() {
                                *v = v.max(0.0);
                            }
                        }
                        // SAFETY: as above, `at + L` is within the band, and these are channels
                        // `c..c + L` of `a.channels`, which only this thread writes (contract).
                        unsafe { store_raw::<L>(a.out, at, &o) };
                    }
                }
            }
        }
    }
}

/// `$specialise`: one output transform for each combination of residual and ReLU, so that
/// neither is tested for every vector written (AVX-512: batch 64 1.069x, batch 1 1.031x, 4 of 4
/// alternated pairs each; AVX2 on the same machine: batch 1 0.969x, 0 of 6, so not there).
macro_rules! instantiate {
    (
        $input:ident,
        $output:ident,
        $lanes:literal,
        $fma:literal,
        $specialise:literal
        $(, $features:literal)?
    ) => {
        /// # Safety
        /// The CPU supports the wrapper's target features.
        $(#[target_feature(enable = $features)])?
        unsafe fn $input<const M: usize, const A: usize, const C: usize>(
            a: &InputArgs<'_>,
            v: &mut [f32],
        ) {
            input_transform::<M, A, C, $lanes, $fma>(a, v)
        }
        /// # Safety
        /// The CPU supports the wrapper's target features, and as for [`output_transform`].
        $(#[target_feature(enable = $features)])?
        unsafe fn $output<const M: usize, const A: usize, const C: usize>(a: &OutputArgs<'_>) {
            // SAFETY: the caller's contract.
            unsafe { output_transform::<M, A, C, $lanes, $fma, $specialise>(a) }
        }
    };
}

// Lanes: one register of the instruction set (the portable build assumes 128-bit vectors).
instantiate!(input_scalar, output_scalar, 4, false, false);
#[cfg(target_arch = "x86_64")]
instantiate!(input_avx2, output_avx2, 8, true, false, "avx2,fma");
#[cfg(target_arch = "x86_64")]
instantiate!(
    input_avx512,
    output_avx512,
    16,
    true,
    true,
    "avx512f,avx2,fma"
);

/// The instance of transform `$f` for a tiling and a channel width.
macro_rules! by_shape {
    ($f:ident, $tiling:expr, $c:expr) => {
        match ($tiling, $c) {
            (Tiling::F4, 16) => $f::<4, 6, 16> as _,
            (Tiling::F4, 32) => $f::<4, 6, 32> as _,
            (Tiling::F4, _) => $f::<4, 6, 64> as _,
            (Tiling::F2, 16) => $f::<2, 4, 16> as _,
            (Tiling::F2, 32) => $f::<2, 4, 32> as _,
            (Tiling::F2, _) => $f::<2, 4, 64> as _,
        }
    };
}

fn input_transform_for(level: SimdLevel, tiling: Tiling, c: usize) -> InputTransform {
    match level.isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => by_shape!(input_avx512, tiling, c),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => by_shape!(input_avx2, tiling, c),
        _ => by_shape!(input_scalar, tiling, c),
    }
}

fn output_transform_for(level: SimdLevel, tiling: Tiling, c: usize) -> OutputTransform {
    match level.isa() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => by_shape!(output_avx512, tiling, c),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => by_shape!(output_avx2, tiling, c),
        _ => by_shape!(output_scalar, tiling, c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fast::testing::{image, noise, reference};

    const TILINGS: [Tiling; 2] = [Tiling::F4, Tiling::F2];

    fn with_every_level(tiling: Tiling) -> impl Iterator<Item = (Tiling, SimdLevel)> {
        SimdLevel::supported()
            .into_iter()
            .map(move |level| (tiling, level))
    }

    /// Both tilings, every level the CPU has, every channel width, one and several tile rows per
    /// group, with and without residual, with and without ReLU, against the definition of the
    /// convolution.
    #[test]
    fn winograd_matches_the_definition_on_random_data() {
        let shapes = [
            (32, 32, 16, 16),
            (16, 16, 32, 32),
            (8, 8, 64, 64),
            (4, 12, 16, 32),
            (12, 8, 64, 16),
            // 3 tiles a row: tile counts that the kernels' widest tiles do not divide.
            (8, 12, 16, 16),
        ];
        for (i, &(h, w, cin, cout)) in shapes.iter().enumerate() {
            let conv = FoldedConv {
                cout,
                cin,
                k: 3,
                weight: noise(cout * cin * 9, 200 + i as u64),
                bias: noise(cout, 300 + i as u64),
            };
            let (src, dst) = (Plane::new(h, w, cin), Plane::new(h, w, cout));
            let input = image(src, 400 + i as u64);
            let residual = image(dst, 500 + i as u64);
            for (tiling, level) in TILINGS.into_iter().flat_map(with_every_level) {
                assert!(supports(tiling, &conv, 1, h, w));
                let layer = WinogradLayer::new(&conv, w, level, tiling);
                let mut scratch = Scratch::default();
                let with_residual = Some(&residual[..]);
                for (res, relu) in [
                    (None, false),
                    (None, true),
                    (with_residual, false),
                    (with_residual, true),
                ] {
                    let mut got = vec![0.0; dst.floats()];
                    let band = dst.rows(&(0..dst.h));
                    layer.run(
                        LayerInput {
                            image: &input,
                            plane: src,
                        },
                        LayerOutput {
                            band: &mut got[band.clone()],
                            plane: dst,
                            rows: 0..dst.h,
                            residual: res.map(|r| &r[band]),
                            relu,
                        },
                        &mut scratch,
                    );
                    let want = reference(&conv, 1, &input, src, dst, res, relu);
                    // Winograd's rounding error grows with the magnitude of the partial sums,
                    // so it is judged against the scale of the output.
                    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    for (j, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - e).abs() <= 1e-4 * scale,
                            "{tiling:?} {level} {:?}: at {j} got {g}, want {e} (scale {scale})",
                            shapes[i]
                        );
                    }
                }
            }
        }
    }

    /// Threads that split a layer's output channels each multiply and transform back only their
    /// blocks: block by block, in any order, gives the whole layer bit for bit, and a block's
    /// write leaves the other channels as they were.
    #[test]
    fn channel_blocks_computed_apart_give_the_whole_layer() {
        for (i, &(h, w, c)) in [(8, 8, 64), (16, 16, 32), (16, 32, 16)].iter().enumerate() {
            let conv = FoldedConv {
                cout: c,
                cin: c,
                k: 3,
                weight: noise(c * c * 9, 600 + i as u64),
                bias: noise(c, 700 + i as u64),
            };
            let (src, dst) = (Plane::new(h, w, c), Plane::new(h, w, c));
            let input = image(src, 800 + i as u64);
            let residual = image(dst, 900 + i as u64);
            let band = dst.rows(&(0..h));
            for (tiling, level) in TILINGS.into_iter().flat_map(with_every_level) {
                let tile = tiling.tile();
                let n = (h / tile) * (w / tile);
                if n > MAX_GROUP_TILES {
                    continue;
                }
                let layer = WinogradLayer::new(&conv, w, level, tiling);
                let mut scratch = Scratch::default();
                let mut whole = vec![0.0; dst.floats()];
                layer.run(
                    LayerInput {
                        image: &input,
                        plane: src,
                    },
                    LayerOutput {
                        band: &mut whole[band.clone()],
                        plane: dst,
                        rows: 0..h,
                        residual: Some(&residual[band.clone()]),
                        relu: true,
                    },
                    &mut scratch,
                );
                let input = LayerInput {
                    image: &input,
                    plane: src,
                };
                let mut scratch = Scratch::default();
                layer.transform_input(input, 0..h / tile, (0, n), &mut scratch);
                let mut split = vec![0.0; dst.floats()];
                let block = layer.block();
                let mut done = vec![false; c];
                for b in (0..c / block).rev() {
                    let channels = b * block..(b + 1) * block;
                    layer.multiply(n, channels.clone(), &mut scratch);
                    let out = ChannelsOutput {
                        band: split[band.clone()].as_mut_ptr(),
                        len: band.len(),
                        plane: dst,
                        rows: 0..h,
                        channels: channels.clone(),
                        residual: Some(&residual[band.clone()]),
                        relu: true,
                    };
                    // SAFETY: `split` is this thread's alone; the band is its interior rows.
                    unsafe { layer.transform_output_channels(&scratch, (0, n), out) };
                    done[channels].fill(true);
                    for (j, (got, want)) in split.iter().zip(&whole).enumerate() {
                        let expected = if done[j % c] { *want } else { 0.0 };
                        assert_eq!(
                            got.to_bits(),
                            expected.to_bits(),
                            "{tiling:?} {level} {c}: float {j}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn only_stride_one_3x3_convolutions_of_supported_widths_qualify() {
        let conv = |cin, cout, k| FoldedConv {
            cout,
            cin,
            k,
            weight: vec![0.0; cout * cin * k * k],
            bias: vec![0.0; cout],
        };
        for tiling in TILINGS {
            assert!(supports(tiling, &conv(16, 16, 3), 1, 32, 32));
            assert!(!supports(tiling, &conv(16, 16, 3), 2, 32, 32));
            assert!(!supports(tiling, &conv(16, 16, 1), 1, 32, 32));
            assert!(!supports(tiling, &conv(3, 16, 3), 1, 32, 32));
            assert!(!supports(tiling, &conv(16, 16, 3), 1, 31, 32));
        }
        // Whole output tiles only.
        assert!(!supports(Tiling::F4, &conv(16, 16, 3), 1, 30, 32));
        assert!(supports(Tiling::F2, &conv(16, 16, 3), 1, 30, 32));
    }
}
