//! The call into libjpeg-turbo: `pillow_decode.c` (built by `build.rs` against the library that
//! `turbojpeg-sys` builds from source) run over a whole file, as Pillow's decoder runs.

use std::ffi::{c_char, c_int, c_long, c_uint, CStr};

use super::header::Header;

/// Bytes of the error message buffer (`RS_JPEG_MESSAGE_LEN` in the C file).
const MESSAGE_LEN: usize = 256;

// Results of `rs_pillow_jpeg_decode` (`RS_JPEG_*` in the C file).
const DONE: c_int = 0;
const SUSPENDED: c_int = 1;

// The library is linked through `turbojpeg-sys`, which builds libjpeg-turbo; the shim's libjpeg
// calls resolve against it.
use turbojpeg_sys as _;

extern "C" {
    fn rs_pillow_jpeg_decode(
        data: *const u8,
        len: usize,
        width: c_uint,
        height: c_uint,
        components: c_int,
        load_truncated: c_int,
        max_memory: usize,
        image: *mut u8,
        rows: *mut c_uint,
        unprocessed: *mut usize,
        message: *mut c_char,
    ) -> c_int;
}

/// How decoding ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every row was decoded.
    Done,
    /// The data ended first; `unprocessed` bytes were left unconsumed.
    Suspended { unprocessed: usize },
    /// libjpeg raised an error.
    Broken(String),
}

/// The image as Pillow holds it after decoding (`header.components` bytes a pixel, CMYK
/// un-inverted, rows never written left at zero), how decoding ended, and the rows written.
pub struct Decoded {
    pub pixels: Vec<u8>,
    pub outcome: Outcome,
    pub rows: u32,
}

/// libjpeg's memory for one file: its coefficient buffers (two bytes a sample, each component
/// at most the full size padded to a 32-pixel MCU) and some slack for tables and row buffers.
fn memory_bound(header: &Header) -> usize {
    let padded = (u64::from(header.width) + 32) * (u64::from(header.height) + 32);
    let bytes = padded
        .saturating_mul(2 * u64::from(header.components))
        .saturating_add(16 << 20);
    usize::try_from(bytes)
        .unwrap_or(usize::MAX)
        .min(c_long::MAX as usize)
}

/// Decodes `bytes` (whose header `header` is) as Pillow's `ImageFile.load` does, appending an
/// end marker once the data is exhausted when `load_truncated` is set.
pub fn decode(bytes: &[u8], header: &Header, load_truncated: bool) -> Decoded {
    let len = header.width as usize * header.height as usize * usize::from(header.components);
    let mut pixels = vec![0u8; len];
    let mut rows: c_uint = 0;
    let mut unprocessed = 0usize;
    let mut message = [0 as c_char; MESSAGE_LEN];
    // SAFETY: `bytes` is valid for `bytes.len()` reads; `pixels` holds exactly
    // width * height * components bytes, which the C side writes only within (it checks that
    // libjpeg's frame agrees with `header` before writing a row); `rows`, `unprocessed` and
    // `message` (MESSAGE_LEN >= JMSG_LENGTH_MAX bytes, checked at compile time in C) are valid
    // for writes. The C side keeps no pointer after returning.
    let result = unsafe {
        rs_pillow_jpeg_decode(
            bytes.as_ptr(),
            bytes.len(),
            header.width,
            header.height,
            c_int::from(header.components),
            c_int::from(load_truncated),
            memory_bound(header),
            pixels.as_mut_ptr(),
            &mut rows,
            &mut unprocessed,
            message.as_mut_ptr(),
        )
    };
    let outcome = match result {
        DONE => Outcome::Done,
        SUSPENDED => Outcome::Suspended { unprocessed },
        _ => {
            message[MESSAGE_LEN - 1] = 0;
            // SAFETY: the buffer is NUL-terminated (the C side writes C strings, and the last
            // byte was just set to NUL).
            let text = unsafe { CStr::from_ptr(message.as_ptr()) };
            Outcome::Broken(text.to_string_lossy().into_owned())
        }
    };
    Decoded {
        pixels,
        outcome,
        rows,
    }
}
