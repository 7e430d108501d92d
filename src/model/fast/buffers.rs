//! Activation storage: 64-byte aligned float buffers holding zero-bordered channels-last images,
//! so that 3x3 convolutions read their padding from memory instead of testing bounds, and the
//! operands through which a layer reads and writes them ([`LayerInput`], [`LayerOutput`]).

/// One cache line of floats; a `Vec` of these is a 64-byte aligned float buffer.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A zero-initialised, 64-byte aligned float buffer of fixed length.
#[derive(Debug, Clone)]
pub struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBuf {
    pub fn zeros(len: usize) -> Self {
        Self {
            lines: vec![Line([0.0; 16]); len.div_ceil(16)],
            len,
        }
    }

    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `Line` is `repr(C)` over `[f32; 16]` (size 64, no padding), so the vector's
        // storage is `16 * lines.len() >= len` initialised, contiguous, aligned f32 values.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len) }
    }
}

/// The shape of a zero-bordered NHWC image: `(h + 2) x (w + 2) x c` floats, interior at `(1, 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plane {
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Plane {
    pub const fn new(h: usize, w: usize, c: usize) -> Self {
        Self { h, w, c }
    }

    /// Floats in the whole bordered image.
    pub const fn floats(&self) -> usize {
        (self.h + 2) * (self.w + 2) * self.c
    }

    /// Floats in one bordered row.
    pub const fn row_len(&self) -> usize {
        (self.w + 2) * self.c
    }

    /// Index of interior pixel `(y, x)`, channel 0.
    pub const fn at(&self, y: usize, x: usize) -> usize {
        (y + 1) * self.row_len() + (x + 1) * self.c
    }

    /// The floats of bordered rows holding interior rows `rows` (full width, borders included).
    pub const fn rows(&self, rows: &std::ops::Range<usize>) -> std::ops::Range<usize> {
        (rows.start + 1) * self.row_len()..(rows.end + 1) * self.row_len()
    }
}

/// What a layer reads: a whole bordered image of shape `plane`.
#[derive(Debug, Clone, Copy)]
pub struct LayerInput<'a> {
    pub image: &'a [f32],
    pub plane: Plane,
}

impl LayerInput<'_> {
    /// Panics unless this is a whole bordered image of `channels` channels: the bound every
    /// layer's kernels rely on when they read it.
    pub fn check(&self, channels: usize) {
        assert_eq!(self.plane.c, channels, "input channels");
        assert_eq!(self.image.len(), self.plane.floats(), "input buffer");
    }
}

/// What a layer writes: interior rows `rows` of an image of shape `plane`, and what is fused into
/// that write (a residual added before the optional ReLU).
#[derive(Debug)]
pub struct LayerOutput<'a> {
    /// Exactly the bordered rows holding `rows`: `plane.rows(&rows)` of the whole image.
    pub band: &'a mut [f32],
    pub plane: Plane,
    pub rows: std::ops::Range<usize>,
    /// Same extent as `band`.
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

impl LayerOutput<'_> {
    /// Panics unless `band` (and the residual) are exactly the bordered rows of `rows` of an
    /// image of `channels` channels: the bound every layer's kernels rely on when they write it.
    pub fn check(&self, channels: usize) {
        check_band(
            self.plane,
            &self.rows,
            self.band.len(),
            self.residual.map(<[f32]>::len),
            channels,
        );
    }
}

/// What a layer writes when threads split its output channels: channels `channels` of interior
/// rows `rows`, as in [`LayerOutput`]. The band is a raw pointer (`len` floats, exactly the
/// bordered rows of `rows`) because other threads write other channels of the same rows at the
/// same time; the writer's contract says who may touch what.
#[derive(Debug)]
pub struct ChannelsOutput<'a> {
    pub band: *mut f32,
    pub len: usize,
    pub plane: Plane,
    pub rows: std::ops::Range<usize>,
    pub channels: std::ops::Range<usize>,
    /// Same extent as the band.
    pub residual: Option<&'a [f32]>,
    pub relu: bool,
}

impl ChannelsOutput<'_> {
    /// As [`LayerOutput::check`], for `len` floats from `band`.
    pub fn check(&self, channels: usize) {
        check_band(
            self.plane,
            &self.rows,
            self.len,
            self.residual.map(<[f32]>::len),
            channels,
        );
    }
}

/// Panics unless an output band of `len` floats (and a residual of `residual` floats) is exactly
/// the bordered rows of `rows` of an image of `plane`, which has `channels` channels.
fn check_band(
    plane: Plane,
    rows: &std::ops::Range<usize>,
    len: usize,
    residual: Option<usize>,
    channels: usize,
) {
    assert_eq!(plane.c, channels, "output channels");
    assert!(rows.start <= rows.end && rows.end <= plane.h, "output rows");
    assert_eq!(len, plane.rows(rows).len(), "output band");
    if let Some(residual) = residual {
        assert_eq!(residual, len, "residual band");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_zeroed_and_exactly_sized() {
        for len in [0, 1, 15, 16, 17, 18_496] {
            let mut buf = AlignedBuf::zeros(len);
            assert_eq!(buf.as_slice().len(), len);
            assert!(buf.as_slice().iter().all(|&v| v == 0.0));
            assert_eq!(buf.as_mut_slice().as_ptr() as usize % 64, 0);
        }
    }

    #[test]
    fn plane_indexing_skips_the_border() {
        let p = Plane::new(32, 32, 16);
        assert_eq!(p.floats(), 34 * 34 * 16);
        assert_eq!(p.at(0, 0), 34 * 16 + 16);
        assert_eq!(p.rows(&(0..32)), 34 * 16..33 * 34 * 16);
    }
}
