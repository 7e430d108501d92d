//! Files whose headers declare far more data than they hold: reading them must not allocate by
//! the declared sizes. Each case is a reduced input from the fuzz targets in `fuzz/`; the test
//! binary counts the largest single allocation made on the test's thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Cursor, Write};
use std::path::Path;

use resnet_serve::model::pytorch::read_state_dict;

struct LargestAllocation;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: allocations can happen while the thread's locals are being torn down.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's obligations for `alloc` are the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's obligations for `alloc_zeroed` are the system allocator's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// Runs `f` and returns its result with the largest single allocation it made, in bytes.
fn largest_allocation_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|largest| largest.set(0));
    let result = f();
    (result, LARGEST.with(Cell::get))
}

/// Far above anything these few-hundred-byte inputs legitimately need.
const SMALL: usize = 1 << 20;

/// `{"w": <float32 tensor of 4 elements in storage "0">}`, as `torch.save` pickles it.
const ONE_TENSOR_PICKLE: &[u8] = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n\
_rebuild_tensor_v2\nq\x02((X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\
\x00\x00\x000q\x05X\x03\x00\x00\x00cpuq\x06K\x04tq\x07QK\x00K\x04\x85q\x08K\x01\x85q\t\x89\
ccollections\nOrderedDict\nq\n)Rq\x0btq\x0cRq\rs.";

/// Sets the uncompressed size that the local and central headers of `name` declare.
fn declare_uncompressed_size(zip: &mut [u8], name: &[u8], size: u32) {
    // (signature, offset of the size field, offset of the file name) per header kind.
    for (signature, size_at, name_at) in [(b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)] {
        let start = (0..zip.len() - name_at)
            .find(|&i| zip[i..].starts_with(signature) && zip[i + name_at..].starts_with(name))
            .unwrap();
        zip[start + size_at..start + size_at + 4].copy_from_slice(&size.to_le_bytes());
    }
}

#[test]
fn zip_checkpoint_entry_claiming_gigabytes_is_not_preallocated() {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let deflated = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    writer.start_file("archive/data.pkl", deflated).unwrap();
    writer.write_all(ONE_TENSOR_PICKLE).unwrap();
    writer.start_file("archive/data/0", deflated).unwrap();
    writer.write_all(&[0u8; 16]).unwrap();
    let mut zip = writer.finish().unwrap().into_inner();
    declare_uncompressed_size(&mut zip, b"archive/data/0", 0xffff_fff0);

    let (result, largest) =
        largest_allocation_during(|| read_state_dict(Path::new("claims.pth"), &zip));
    assert!(
        largest < SMALL,
        "a {}-byte checkpoint made a {largest}-byte allocation",
        zip.len()
    );
    // Whatever the verdict on the archive, the 16 bytes that are there are all that is read.
    if let Ok(state_dict) = result {
        assert_eq!(state_dict.tensors.len(), 1);
        assert_eq!(state_dict.tensors[0].data, vec![0u8; 16]);
    }
}
