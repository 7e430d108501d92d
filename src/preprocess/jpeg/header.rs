//! The JPEG header walk of Pillow's `JpegImageFile._open`: which files `Image.open` accepts,
//! and the size and mode it takes from them, before any pixel is decoded.
//!
//! Pillow walks the markers in Python up to the first start of scan, reading each segment
//! whole and checking the few it interprets (frame header, quantisation tables, JFIF, Adobe,
//! Photoshop, ICC chunks). The same walk here refuses what `Image.open` refuses, for the same
//! reasons. The decoder proper (libjpeg) reads the file again from its start.

use std::fmt;

/// Start of image followed by the first byte of a marker: what Pillow's `_accept` asks for.
pub const MAGIC: [u8; 3] = [0xFF, 0xD8, 0xFF];

/// What `Image.open` learned from a JPEG header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub width: u32,
    pub height: u32,
    /// 1 ("L"), 3 ("RGB") or 4 ("CMYK").
    pub components: u8,
    /// A start of scan was reached: Pillow has something to decode.
    pub has_scan: bool,
}

/// Why `Image.open` would refuse the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// The data ended inside the header (Pillow: `Truncated File Read`, or a short read).
    Truncated(&'static str),
    /// A malformed header (Pillow: a `SyntaxError`, or an index or struct error in a handler).
    Invalid(String),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated(what) => {
                write!(f, "image file is truncated (the data ends inside {what})")
            }
            Self::Invalid(why) => f.write_str(why),
        }
    }
}

/// A read cursor with Python file semantics: short reads at the end, never an error.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// `fp.read(n)`.
    fn read(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.bytes.len());
        let end = start.saturating_add(n).min(self.bytes.len());
        self.pos = end;
        &self.bytes[start..end]
    }

    /// `i16(fp.read(2)) - 2`: a segment's payload length (a short read is a struct error).
    fn segment_length(&mut self, marker: u16) -> Result<i64, HeaderError> {
        match self.read(2) {
            [hi, lo] => Ok(i64::from(u16::from_be_bytes([*hi, *lo])) - 2),
            _ => Err(HeaderError::Truncated(marker_name(marker))),
        }
    }

    /// `ImageFile._safe_read(fp, n)`: exactly `n` bytes or an error; nothing for `n <= 0`.
    fn safe_read(&mut self, n: i64, marker: u16) -> Result<&'a [u8], HeaderError> {
        let Ok(n) = usize::try_from(n) else {
            return Ok(&[]);
        };
        let data = self.read(n);
        if data.len() < n {
            return Err(HeaderError::Truncated(marker_name(marker)));
        }
        Ok(data)
    }

    /// A segment as the `Skip`, `APP`, `COM`, `DQT` and `SOF` handlers read it.
    fn segment(&mut self, marker: u16) -> Result<&'a [u8], HeaderError> {
        let n = self.segment_length(marker)?;
        self.safe_read(n, marker)
    }
}

fn marker_name(marker: u16) -> &'static str {
    match marker {
        0xFFC4 => "a Huffman table",
        0xFFDA => "the scan header",
        0xFFDB => "a quantisation table",
        0xFFC0..=0xFFCF | 0xFFDE => "the frame header",
        0xFFE0..=0xFFEF => "an application segment",
        0xFFFE => "a comment",
        _ => "a marker segment",
    }
}

fn invalid(why: impl Into<String>) -> HeaderError {
    HeaderError::Invalid(why.into())
}

/// Big-endian u16 at `offset`, or the struct error Pillow's `i16` raises.
fn be16(s: &[u8], offset: usize, what: &str) -> Result<u16, HeaderError> {
    s.get(offset..offset.saturating_add(2))
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or_else(|| invalid(format!("{what} is too short")))
}

/// Big-endian u32 at `offset`, if there are four bytes there.
fn be32(s: &[u8], offset: u64) -> Option<u32> {
    let start = usize::try_from(offset).ok()?;
    s.get(start..start.checked_add(4)?)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// What the walk accumulates, as the attributes `_open` sets.
#[derive(Default)]
struct State<'a> {
    size: Option<(u16, u16)>,
    components: u8,
    icc: Vec<&'a [u8]>,
}

/// Walks the header as `JpegImageFile._open` does. `bytes` must start with [`MAGIC`].
pub fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
    if !bytes.starts_with(&MAGIC) {
        return Err(invalid("not a JPEG file"));
    }
    let mut r = Reader { bytes, pos: 3 };
    let mut state = State::default();
    let mut has_scan = false;
    // `s` is the one pending byte of the Python loop: the first byte of the next marker.
    let mut pending: Option<u8> = Some(0xFF);
    while let Some(first) = pending {
        if first != 0xFF {
            // Junk between segments is skipped a byte at a time.
            pending = r.read(1).first().copied();
            continue;
        }
        let Some(&second) = r.read(1).first() else {
            break;
        };
        let marker = u16::from_be_bytes([first, second]);
        match marker {
            0xFFC0..=0xFFFE => {
                handle(marker, &mut r, &mut state)?;
                if marker == 0xFFDA {
                    has_scan = true;
                    break;
                }
                pending = r.read(1).first().copied();
            }
            // A fill byte: the second 0xFF starts the marker.
            0xFFFF => pending = Some(0xFF),
            // A stuffed zero outside a scan: skipped.
            0xFF00 => pending = r.read(1).first().copied(),
            _ => return Err(invalid("no marker found")),
        }
    }
    let (width, height) = match state.size {
        Some((w, h)) if w > 0 && h > 0 => (w, h),
        Some(_) => return Err(invalid("the frame header declares no pixels")),
        None if has_scan => return Err(invalid("a scan without a frame header")),
        None => {
            return Err(HeaderError::Truncated(
                "the header, before any frame header",
            ))
        }
    };
    Ok(Header {
        width: u32::from(width),
        height: u32::from(height),
        components: state.components,
        has_scan,
    })
}

/// The handler `MARKER[marker]` names, for the markers that have one.
fn handle<'a>(marker: u16, r: &mut Reader<'a>, state: &mut State<'a>) -> Result<(), HeaderError> {
    match marker {
        // SOF0..SOF15 (not DHT, JPG or DAC) and DHP.
        0xFFC0..=0xFFC3 | 0xFFC5..=0xFFC7 | 0xFFC9..=0xFFCB | 0xFFCD..=0xFFCF | 0xFFDE => {
            frame_header(r.segment(marker)?, state)
        }
        // DHT, DAC, SOS, DNL, DRI, EXP: skipped.
        0xFFC4 | 0xFFCC | 0xFFDA | 0xFFDC | 0xFFDD | 0xFFDF => r.segment(marker).map(|_| ()),
        0xFFDB => quantisation_tables(r.segment(marker)?),
        0xFFE0..=0xFFEF => application(marker, r.segment(marker)?, state),
        0xFFFE => r.segment(marker).map(|_| ()),
        // JPG, RSTn, SOI, EOI, JPGn: no handler.
        _ => Ok(()),
    }
}

/// `SOF`: size, bit depth, layers, and the ICC chunks seen so far put together.
fn frame_header<'a>(s: &'a [u8], state: &mut State<'a>) -> Result<(), HeaderError> {
    let height = be16(s, 1, "the frame header")?;
    let width = be16(s, 3, "the frame header")?;
    state.size = Some((width, height));
    let bits = s[0]; // be16 at offset 3 succeeded, so s has at least 5 bytes
    if bits != 8 {
        return Err(invalid(format!("cannot handle {bits}-bit layers")));
    }
    let layers = *s
        .get(5)
        .ok_or_else(|| invalid("the frame header is too short"))?;
    if !matches!(layers, 1 | 3 | 4) {
        return Err(invalid(format!("cannot handle {layers}-layer images")));
    }
    state.components = layers;
    if !state.icc.is_empty() {
        // Pillow sorts the chunks and reads the chunk count of the first one.
        let first = state.icc.iter().min().copied().unwrap_or_default();
        if first.len() <= 13 {
            return Err(invalid("an ICC profile chunk is too short"));
        }
        state.icc.clear();
    }
    // Component entries come in threes; a partial one is an index error.
    if !(s.len() - 6).is_multiple_of(3) {
        return Err(invalid("the frame header ends inside a component"));
    }
    Ok(())
}

/// `DQT`: every table must be whole.
fn quantisation_tables(mut s: &[u8]) -> Result<(), HeaderError> {
    while let Some(&v) = s.first() {
        let precision = if v / 16 == 0 { 1 } else { 2 };
        let length = 1 + precision * 64;
        if s.len() < length {
            return Err(invalid("bad quantization table marker"));
        }
        s = &s[length..];
    }
    Ok(())
}

/// `APP`: the application segments Pillow interprets, with the checks their parsing implies.
fn application<'a>(marker: u16, s: &'a [u8], state: &mut State<'a>) -> Result<(), HeaderError> {
    match marker {
        0xFFE0 if s.starts_with(b"JFIF") => be16(s, 5, "the JFIF segment").map(|_| ()),
        0xFFE2 if s.starts_with(b"ICC_PROFILE\0") => {
            state.icc.push(s);
            Ok(())
        }
        0xFFED if s.starts_with(b"Photoshop 3.0\0") => photoshop(s),
        0xFFEE if s.starts_with(b"Adobe") => be16(s, 5, "the Adobe segment").map(|_| ()),
        _ => Ok(()),
    }
}

/// The Photoshop resource walk: a short field ends it quietly (Pillow catches the struct
/// error), but a missing name length byte is an index error that fails `Image.open`.
fn photoshop(s: &[u8]) -> Result<(), HeaderError> {
    // `s[offset:offset + n]` when all `n` bytes are there.
    let get = |offset: u64, n: usize| {
        let start = usize::try_from(offset).ok()?;
        s.get(start..start.checked_add(n)?)
    };
    let mut offset: u64 = 14;
    while get(offset, 4) == Some(b"8BIM".as_slice()) {
        offset += 4;
        let Some(code) = get(offset, 2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
            return Ok(());
        };
        offset += 2;
        let Some(&[name_len]) = get(offset, 1) else {
            return Err(invalid("the Photoshop segment ends inside a resource name"));
        };
        offset += 1 + u64::from(name_len);
        offset += offset & 1;
        let Some(size) = be32(s, offset) else {
            return Ok(());
        };
        offset += 4;
        // ResolutionInfo reads 14 bytes of its data; fewer is a struct error (caught).
        let available = (s.len() as u64).saturating_sub(offset).min(u64::from(size));
        if code == 0x03ED && available < 14 {
            return Ok(());
        }
        offset += u64::from(size);
        offset += offset & 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SOI, a frame header of `w`x`h` with `layers` components, and a scan header.
    fn minimal(w: u16, h: u16, layers: u8) -> Vec<u8> {
        let mut out = vec![0xFF, 0xD8];
        let mut sof = vec![8, (h >> 8) as u8, h as u8, (w >> 8) as u8, w as u8, layers];
        for c in 0..layers {
            sof.extend([c + 1, 0x11, 0]);
        }
        out.extend([0xFF, 0xC0]);
        out.extend(((sof.len() + 2) as u16).to_be_bytes());
        out.extend(sof);
        out.extend([0xFF, 0xDA, 0x00, 0x02]);
        out
    }

    #[test]
    fn size_and_mode_come_from_the_frame_header() {
        let header = parse(&minimal(300, 20, 3)).unwrap();
        assert_eq!(
            header,
            Header {
                width: 300,
                height: 20,
                components: 3,
                has_scan: true
            }
        );
        assert_eq!(parse(&minimal(1, 1, 1)).unwrap().components, 1);
    }

    #[test]
    fn refusals_follow_pillow() {
        assert!(matches!(
            parse(&minimal(10, 10, 2)),
            Err(HeaderError::Invalid(m)) if m.contains("2-layer")
        ));
        assert!(matches!(
            parse(&minimal(0, 10, 3)),
            Err(HeaderError::Invalid(_))
        ));
        let mut twelve_bit = minimal(10, 10, 3);
        twelve_bit[6] = 12;
        assert!(matches!(
            parse(&twelve_bit),
            Err(HeaderError::Invalid(m)) if m.contains("12-bit")
        ));
        let mut no_marker = minimal(10, 10, 3);
        no_marker[3] = 0x01;
        assert_eq!(parse(&no_marker), Err(invalid("no marker found")));
    }

    #[test]
    fn cuts_inside_the_header_are_truncations() {
        let full = minimal(10, 10, 3);
        for cut in 3..full.len() - 1 {
            // Inside a segment: a truncation; between two: opened, with nothing to decode.
            let result = parse(&full[..cut]);
            assert!(
                matches!(
                    result,
                    Err(HeaderError::Truncated(_))
                        | Ok(Header {
                            has_scan: false,
                            ..
                        })
                ),
                "cut at {cut}: {result:?}"
            );
        }
        assert!(parse(&full[..21]).is_ok_and(|h| !h.has_scan));
        // Cut right after the scan header: opened, the decoder finds the data missing.
        assert!(parse(&full).is_ok());
    }

    #[test]
    fn junk_fill_bytes_and_stuffed_zeros_are_skipped() {
        // SOI, a fill byte, a stuffed zero, a junk byte, another stuffed zero, then the frame.
        let mut bytes = vec![0xFF, 0xD8, 0xFF, 0xFF, 0x00, 0x17, 0xFF, 0x00];
        bytes.extend_from_slice(&minimal(5, 6, 1)[2..]);
        assert_eq!(parse(&bytes).map(|h| (h.width, h.height)), Ok((5, 6)));
    }
}
