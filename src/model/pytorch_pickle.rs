//! Bounded unpickling of PyTorch checkpoint pickles: candle's pickle machine, driven one opcode
//! at a time behind a guard that refuses the streams that would make it panic, nest without
//! limit or allocate without bound.

use std::collections::HashMap;

use candle_core::pickle::{Object, OpCode, Stack};

/// Deepest object nesting accepted. A state dict nests about 8 levels; dropping, cloning and
/// inspecting [`Object`] trees recurses, so a deeper stream would overflow the thread's stack.
const MAX_DEPTH: u32 = 100;

/// Rough bytes the decoded objects may take, memo copies included. candle's memo stores copies,
/// so a stream can double its size with a handful of opcodes; a state dict needs a few MiB.
const MAX_OBJECT_BYTES: u64 = 256 << 20;

/// Estimated size of one decoded object before its own string bytes.
const OBJECT_BYTES: u64 = 64;

/// What the guard knows about each value on candle's stack.
#[derive(Debug, Clone, Copy)]
struct Shape {
    depth: u32,
    bytes: u64,
    mark: bool,
}

impl Shape {
    fn leaf(extra_bytes: u64) -> Self {
        Self {
            depth: 1,
            bytes: OBJECT_BYTES + extra_bytes,
            mark: false,
        }
    }

    fn wrapping(items: &[Shape]) -> Self {
        Self {
            depth: items.iter().map(|s| s.depth).max().unwrap_or(0) + 1,
            bytes: OBJECT_BYTES + items.iter().map(|s| s.bytes).sum::<u64>(),
            mark: false,
        }
    }
}

/// Mirrors the stack effect of every opcode candle's [`Stack`] executes, to check depth and
/// size before the opcode runs.
#[derive(Debug, Default)]
struct Guard {
    stack: Vec<Shape>,
    memo: HashMap<u32, Shape>,
    total_bytes: u64,
}

impl Guard {
    fn pop(&mut self, n: usize) -> Result<Vec<Shape>, String> {
        if self.stack.len() < n {
            return Err("malformed pickle: stack underflow".into());
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn pop_to_mark(&mut self) -> Result<Vec<Shape>, String> {
        let mark = self
            .stack
            .iter()
            .rposition(|s| s.mark)
            .ok_or("malformed pickle: MARK missing")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn push(&mut self, shape: Shape) -> Result<(), String> {
        if shape.depth > MAX_DEPTH {
            return Err(format!(
                "pickle nests objects deeper than {MAX_DEPTH} levels"
            ));
        }
        self.stack.push(shape);
        Ok(())
    }

    /// Adds `items` into the container on top of the stack (APPEND, SETITEM and friends).
    fn extend_last(&mut self, items: &[Shape]) -> Result<(), String> {
        let added = Shape::wrapping(items);
        let last = self
            .stack
            .last_mut()
            .ok_or("malformed pickle: stack underflow")?;
        last.depth = last.depth.max(added.depth);
        last.bytes += added.bytes - OBJECT_BYTES;
        if last.depth > MAX_DEPTH {
            return Err(format!(
                "pickle nests objects deeper than {MAX_DEPTH} levels"
            ));
        }
        Ok(())
    }

    fn charge(&mut self, bytes: u64) -> Result<(), String> {
        self.total_bytes = self.total_bytes.saturating_add(bytes);
        if self.total_bytes > MAX_OBJECT_BYTES {
            return Err(format!(
                "pickle expands to more than {} MiB of objects",
                MAX_OBJECT_BYTES >> 20
            ));
        }
        Ok(())
    }

    /// Checks and records the effect of `op`, whose argument bytes start at `args`.
    fn step(&mut self, op: &OpCode, args: &[u8]) -> Result<(), String> {
        let truncated = || "truncated pickle".to_string();
        let arg = |n: usize| args.get(..n).ok_or_else(truncated);
        let u32_arg = || -> Result<u32, String> {
            let b = arg(4)?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        match op {
            OpCode::Proto | OpCode::Stop => {}
            OpCode::Global => {
                // Two newline-terminated lines: module and class name.
                let first = args
                    .iter()
                    .position(|&b| b == b'\n')
                    .ok_or_else(truncated)?;
                let second = args[first + 1..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .ok_or_else(truncated)?;
                self.charge(OBJECT_BYTES + (first + second) as u64)?;
                self.push(Shape::leaf((first + second) as u64))?;
            }
            OpCode::BinUnicode => {
                let len = u64::from(u32_arg()?);
                if len > (args.len() as u64).saturating_sub(4) {
                    return Err(truncated());
                }
                self.charge(OBJECT_BYTES + len)?;
                self.push(Shape::leaf(len))?;
            }
            OpCode::Long1 => {
                let n = arg(1)?[0];
                if n > 8 {
                    return Err(format!("pickle integer of {n} bytes is wider than 64 bits"));
                }
                self.charge(OBJECT_BYTES)?;
                self.push(Shape::leaf(0))?;
            }
            OpCode::BinInt1
            | OpCode::BinInt2
            | OpCode::BinInt
            | OpCode::BinFloat
            | OpCode::None
            | OpCode::NewTrue
            | OpCode::NewFalse
            | OpCode::EmptyDict
            | OpCode::Dict
            | OpCode::EmptyTuple
            | OpCode::EmptyList => {
                self.charge(OBJECT_BYTES)?;
                self.push(Shape::leaf(0))?;
            }
            OpCode::Mark => {
                self.charge(OBJECT_BYTES)?;
                self.push(Shape {
                    mark: true,
                    ..Shape::leaf(0)
                })?;
            }
            OpCode::BinPersId => {
                let items = self.pop(1)?;
                self.charge(OBJECT_BYTES)?;
                self.push(Shape::wrapping(&items))?;
            }
            OpCode::Tuple => {
                let items = self.pop_to_mark()?;
                self.charge(OBJECT_BYTES)?;
                self.push(Shape::wrapping(&items))?;
            }
            OpCode::Tuple1 | OpCode::Tuple2 | OpCode::Tuple3 => {
                let n = match op {
                    OpCode::Tuple1 => 1,
                    OpCode::Tuple2 => 2,
                    _ => 3,
                };
                let items = self.pop(n)?;
                self.charge(OBJECT_BYTES)?;
                self.push(Shape::wrapping(&items))?;
            }
            OpCode::Build | OpCode::Reduce | OpCode::NewObj => {
                let items = self.pop(2)?;
                self.charge(OBJECT_BYTES)?;
                self.push(Shape::wrapping(&items))?;
            }
            OpCode::Append => {
                let items = self.pop(1)?;
                self.extend_last(&items)?;
            }
            OpCode::SetItem => {
                let items = self.pop(2)?;
                self.extend_last(&items)?;
            }
            OpCode::Appends | OpCode::SetItems => {
                let items = self.pop_to_mark()?;
                self.extend_last(&items)?;
            }
            OpCode::BinGet | OpCode::LongBinGet => {
                let id = match op {
                    OpCode::BinGet => u32::from(arg(1)?[0]),
                    _ => u32_arg()?,
                };
                let shape = *self
                    .memo
                    .get(&id)
                    .ok_or_else(|| format!("malformed pickle: memo entry {id} is missing"))?;
                self.charge(shape.bytes)?;
                self.push(shape)?;
            }
            OpCode::BinPut | OpCode::LongBinPut => {
                let id = match op {
                    OpCode::BinPut => u32::from(arg(1)?[0]),
                    _ => u32_arg()?,
                };
                let last = *self
                    .stack
                    .last()
                    .ok_or("malformed pickle: stack underflow")?;
                self.charge(last.bytes)?;
                self.memo.insert(id, last);
            }
        }
        Ok(())
    }
}

/// Decodes one pickle from the start of `bytes`: the object it holds and the bytes it spans.
/// Errors are reasons in plain words; the caller adds the file name.
pub(crate) fn unpickle(bytes: &[u8]) -> Result<(Object, usize), String> {
    let mut stack = Stack::empty();
    let mut guard = Guard::default();
    let mut cursor = bytes;
    loop {
        let offset = bytes.len() - cursor.len();
        let Some((&code, args)) = cursor.split_first() else {
            return Err("truncated pickle (no STOP opcode)".into());
        };
        let op = OpCode::try_from(code).map_err(|code| {
            format!("unsupported pickle opcode 0x{code:02x} at byte {offset} (only pickle protocol 2 is read)")
        })?;
        guard.step(&op, args)?;
        let done = stack
            .read(&mut cursor)
            .map_err(|e| format!("malformed pickle at byte {offset}: {e}"))?;
        if stack.stack().len() != guard.stack.len() {
            return Err(format!(
                "malformed pickle at byte {offset}: unexpected stack effect of {op:?}"
            ));
        }
        if done {
            let object = stack
                .finalize()
                .map_err(|_| "malformed pickle: nothing to return at STOP".to_string())?;
            return Ok((object, bytes.len() - cursor.len()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_small_dict_and_reports_its_length() {
        // pickle.dumps({"a": (1, 2.5)}, protocol=2) + trailing bytes
        let mut bytes =
            b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01G@\x04\x00\x00\x00\x00\x00\x00\x86q\x02s."
                .to_vec();
        let len = bytes.len();
        bytes.extend_from_slice(b"trailing");
        let (object, used) = unpickle(&bytes).unwrap();
        assert_eq!(used, len);
        assert_eq!(
            object,
            Object::Dict(vec![(
                Object::Unicode("a".into()),
                Object::Tuple(vec![Object::Int(1), Object::Float(2.5)])
            )])
        );
    }

    #[test]
    fn refuses_deep_nesting_before_it_overflows_the_stack() {
        let mut bytes = b"\x80\x02N".to_vec();
        bytes.extend(std::iter::repeat_n(0x85u8, 1_000_000)); // TUPLE1
        bytes.push(b'.');
        let err = unpickle(&bytes).unwrap_err();
        assert!(err.contains("deeper than"), "{err}");
    }

    #[test]
    fn refuses_memo_copies_that_grow_without_bound() {
        // l = []; repeat: l = (l, l) through the memo: doubles the object per round.
        let mut bytes = b"\x80\x02]q\x00".to_vec();
        for _ in 0..64 {
            bytes.extend_from_slice(b"h\x00h\x00\x86q\x00");
        }
        bytes.push(b'.');
        let err = unpickle(&bytes).unwrap_err();
        assert!(err.contains("MiB"), "{err}");
    }

    #[test]
    fn refuses_wide_integers_and_overlong_strings() {
        let err = unpickle(b"\x80\x02\x8a\x0a0123456789.").unwrap_err();
        assert!(err.contains("wider than 64 bits"), "{err}");
        let err = unpickle(b"\x80\x02X\xff\xff\xff\xffabc.").unwrap_err();
        assert!(err.contains("truncated"), "{err}");
    }

    #[test]
    fn malformed_streams_are_errors() {
        for bytes in [
            &b""[..],
            b"\x80\x02",
            b"\x80\x02t.",
            b"\x80\x02a.",
            b"\x80\x02h\x05.",
            b"\x80\x02\xff.",
            b"\x80\x02Ns.",
        ] {
            assert!(unpickle(bytes).is_err(), "{bytes:?}");
        }
    }
}
