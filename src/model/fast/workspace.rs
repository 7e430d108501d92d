//! The activation buffers one image needs on its way through the network, allocated once, and
//! the shared view through which a team of threads writes disjoint bands of the same buffers.

use std::marker::PhantomData;
use std::ops::Range;

use super::buffers::{AlignedBuf, Plane};

/// Most buffers a network plan may use (a CIFAR ResNet uses 13).
pub const MAX_BUFFERS: usize = 16;

/// Zero-bordered images, one per buffer of the network plan. Borders are zeroed here and never
/// written again: kernels write interiors only.
#[derive(Debug)]
pub struct Buffers {
    bufs: Vec<AlignedBuf>,
}

impl Buffers {
    pub fn new(planes: &[Plane]) -> Self {
        assert!(planes.len() <= MAX_BUFFERS, "too many buffers in the plan");
        Self {
            bufs: planes
                .iter()
                .map(|p| AlignedBuf::zeros(p.floats()))
                .collect(),
        }
    }

    /// A view that threads can share; it borrows the buffers exclusively for its lifetime.
    pub fn share(&mut self) -> Shared<'_> {
        let mut ptrs = [(std::ptr::null_mut(), 0); MAX_BUFFERS];
        for (slot, buf) in ptrs.iter_mut().zip(&mut self.bufs) {
            let s = buf.as_mut_slice();
            *slot = (s.as_mut_ptr(), s.len());
        }
        Shared {
            ptrs,
            count: self.bufs.len(),
            _owner: PhantomData,
        }
    }
}

/// The buffers of one [`Buffers`], readable and writable from several threads under the
/// discipline the `unsafe` accessors state (which the partition's `sync` between layers
/// provides).
#[derive(Debug)]
pub struct Shared<'a> {
    ptrs: [(*mut f32, usize); MAX_BUFFERS],
    count: usize,
    _owner: PhantomData<&'a mut Buffers>,
}

// SAFETY: `Shared` is a set of pointers into buffers it borrows exclusively; all access goes
// through `read`/`write`, whose callers guarantee that no two threads conflict.
unsafe impl Send for Shared<'_> {}
// SAFETY: as above.
unsafe impl Sync for Shared<'_> {}

impl Shared<'_> {
    /// The whole of buffer `id`.
    ///
    /// # Safety
    /// While the returned slice lives, no thread writes buffer `id`.
    pub unsafe fn read(&self, id: usize) -> &[f32] {
        assert!(id < self.count, "buffer id");
        let (ptr, len) = self.ptrs[id];
        // SAFETY: ptr/len describe a live buffer borrowed for 'a; no concurrent writer (contract).
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }

    /// Floats `range` of buffer `id`, to write in part while other threads write other parts of
    /// the same floats (other channels of the same rows): a raw pointer, since a `&mut [f32]`
    /// would claim all of them. Safe to call; dereferencing it is where the caller answers for
    /// who touches what.
    pub fn write_shared(&self, id: usize, range: Range<usize>) -> *mut f32 {
        assert!(id < self.count, "buffer id");
        let (ptr, len) = self.ptrs[id];
        assert!(range.start <= range.end && range.end <= len, "buffer range");
        ptr.wrapping_add(range.start)
    }

    /// Floats `range` of buffer `id`, to write.
    ///
    /// # Safety
    /// While the returned slice lives, no other thread reads or writes any of those floats, and
    /// this thread holds no other slice overlapping them.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn write(&self, id: usize, range: Range<usize>) -> &mut [f32] {
        let ptr = self.write_shared(id, range.clone());
        // SAFETY: in bounds (checked by `write_shared`); exclusive for its lifetime (contract).
        unsafe { std::slice::from_raw_parts_mut(ptr, range.len()) }
    }
}
