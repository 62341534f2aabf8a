//! The record format inside a frame body (wire-visible: both ends must agree exactly).
//!
//! A frame body is a sequence of records. Each record starts with a kind byte and the page
//! number, written as a zigzag LEB128 varint of its distance from "previous page + 1" (the
//! first record of a frame counts from page 0), so runs of consecutive pages cost one byte of
//! address each.
//!
//! ```text
//! Zero   : 0x00 pfn
//! Full   : 0x01 pfn  page[4096]
//! Blocks : 0x02 pfn  mask  { slot:u32le | block[1024] | - }x4   mask = 2 bits per block
//! Delta  : 0x03 pfn  len:varint  runs[len]                       runs = { gap:varint n:varint xor[n] }*
//! ```
//!
//! Block kinds in the mask (block i in bits 2i..2i+1): 0 literal, 1 cache reference, 2 zero.

use crate::page::{BLOCK_SIZE, BLOCKS_PER_PAGE, PAGE_SIZE, Pfn};

/// Record kinds, as their wire byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// An all-zero page; no payload.
    Zero = 0,
    /// The whole page, literally.
    Full = 1,
    /// Four blocks, each literal, a cache reference or zero.
    Blocks = 2,
    /// XOR against the page as last sent, run-length encoded.
    Delta = 3,
}

impl RecordKind {
    /// Every kind, in wire order (for counters indexed by kind).
    pub const ALL: [RecordKind; 4] = [Self::Zero, Self::Full, Self::Blocks, Self::Delta];

    /// Parses a kind byte.
    pub fn from_wire(byte: u8) -> Option<Self> {
        Self::ALL.get(usize::from(byte)).copied()
    }

    /// Lower-case name for counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Zero => "zero",
            Self::Full => "full",
            Self::Blocks => "blocks",
            Self::Delta => "delta",
        }
    }
}

/// How one block of a `Blocks` record travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockCode {
    /// 1 KiB follows.
    Literal = 0,
    /// A 32-bit cache slot follows.
    Ref = 1,
    /// The block is zero; nothing follows.
    Zero = 2,
}

impl BlockCode {
    /// Decodes block `i`'s two bits of a mask; `None` for the unused code 3.
    pub fn from_mask(mask: u8, i: usize) -> Option<Self> {
        match (mask >> (2 * i)) & 3 {
            0 => Some(Self::Literal),
            1 => Some(Self::Ref),
            2 => Some(Self::Zero),
            _ => None,
        }
    }

    /// Builds a mask from four codes.
    pub fn mask(codes: &[BlockCode; BLOCKS_PER_PAGE]) -> u8 {
        codes
            .iter()
            .enumerate()
            .fold(0, |m, (i, &c)| m | ((c as u8) << (2 * i)))
    }
}

/// Longest varint we write (a u64 in LEB128).
pub const MAX_VARINT_LEN: usize = 10;
/// Longest record the encoder can produce: a Blocks record of four literals.
pub const MAX_RECORD_LEN: usize = 1 + MAX_VARINT_LEN + 1 + BLOCKS_PER_PAGE * BLOCK_SIZE;
/// Length of a Full record for a page whose address costs one byte: the baseline a record's
/// savings are counted against.
pub const FULL_RECORD_LEN: usize = 1 + 1 + PAGE_SIZE;

/// Appends records to a frame body. Bounds are the caller's: it must leave
/// [`MAX_RECORD_LEN`] bytes of room before each record.
#[derive(Debug)]
pub struct RecordWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
    next_pfn: Pfn,
}

impl<'a> RecordWriter<'a> {
    /// Continues writing into `buf` after `len` bytes already written, the last record having
    /// been for page `next_pfn - 1`.
    pub fn resume(buf: &'a mut [u8], len: usize, next_pfn: Pfn) -> Self {
        RecordWriter { buf, len, next_pfn }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The page number the next record is counted from.
    pub fn next_pfn(&self) -> Pfn {
        self.next_pfn
    }

    /// Starts a record: kind byte and page number.
    pub fn header(&mut self, kind: RecordKind, pfn: Pfn) {
        self.byte(kind as u8);
        let delta = pfn.wrapping_sub(self.next_pfn).cast_signed();
        self.varint(zigzag(delta));
        self.next_pfn = pfn.wrapping_add(1);
    }

    /// Appends one byte.
    pub fn byte(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }

    /// Appends bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }

    /// Appends a little-endian u32.
    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    /// Appends an LEB128 varint.
    pub fn varint(&mut self, v: u64) {
        self.len += write_varint(&mut self.buf[self.len..], v);
    }

    /// Drops everything written after `len` (to abandon a partly written record).
    pub fn truncate(&mut self, len: usize, next_pfn: Pfn) {
        self.len = len;
        self.next_pfn = next_pfn;
    }
}

/// Why a record could not be parsed (structure only; meaning is checked by the decoder).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// record body ends in the middle of a record
    #[error("record truncated at body offset {offset}")]
    Truncated {
        /// Body offset where more bytes were needed.
        offset: usize,
    },
    /// a varint is longer than 10 bytes or overflows 64 bits
    #[error("malformed varint at body offset {offset}")]
    BadVarint {
        /// Body offset of the varint.
        offset: usize,
    },
    /// unknown record kind byte
    #[error("unknown record kind {kind:#04x} at body offset {offset}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
        /// Body offset of the record.
        offset: usize,
    },
    /// block mask uses the reserved code 3
    #[error("block mask {mask:#04x} uses a reserved code at body offset {offset}")]
    BadMask {
        /// The mask byte.
        mask: u8,
        /// Body offset of the mask.
        offset: usize,
    },
}

/// Reads records back from a frame body.
#[derive(Debug)]
pub struct RecordReader<'a> {
    buf: &'a [u8],
    pos: usize,
    next_pfn: Pfn,
}

impl<'a> RecordReader<'a> {
    /// Reads the records of one frame body.
    pub fn new(buf: &'a [u8]) -> Self {
        RecordReader {
            buf,
            pos: 0,
            next_pfn: 0,
        }
    }

    /// True when the whole body was consumed.
    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    /// Body offset of the next byte.
    pub fn offset(&self) -> usize {
        self.pos
    }

    /// Reads a record header.
    pub fn header(&mut self) -> Result<(RecordKind, Pfn), WireError> {
        let offset = self.pos;
        let kind_byte = self.byte()?;
        let kind = RecordKind::from_wire(kind_byte).ok_or(WireError::UnknownKind {
            kind: kind_byte,
            offset,
        })?;
        let delta = unzigzag(self.varint()?);
        let pfn = self.next_pfn.wrapping_add_signed(delta);
        self.next_pfn = pfn.wrapping_add(1);
        Ok((kind, pfn))
    }

    /// Reads one byte.
    pub fn byte(&mut self) -> Result<u8, WireError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(WireError::Truncated { offset: self.pos })?;
        self.pos += 1;
        Ok(b)
    }

    /// Reads `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(WireError::Truncated { offset: self.pos })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// Reads exactly `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<&'a [u8; N], WireError> {
        Ok(self.bytes(N)?.try_into().expect("bytes(N) returns N bytes"))
    }

    /// Reads a little-endian u32.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(*self.array::<4>()?))
    }

    /// Reads an LEB128 varint.
    pub fn varint(&mut self) -> Result<u64, WireError> {
        let offset = self.pos;
        let (v, n) = read_varint(&self.buf[self.pos..]).ok_or_else(|| {
            if self.buf.len() - self.pos < MAX_VARINT_LEN
                && self.buf[self.pos..].iter().all(|b| b & 0x80 != 0)
            {
                WireError::Truncated { offset }
            } else {
                WireError::BadVarint { offset }
            }
        })?;
        self.pos += n;
        Ok(v)
    }
}

/// Writes `v` as LEB128 into `out`, returning the byte count.
pub fn write_varint(out: &mut [u8], mut v: u64) -> usize {
    let mut i = 0;
    while v >= 0x80 {
        out[i] = v.to_le_bytes()[0] | 0x80;
        v >>= 7;
        i += 1;
    }
    out[i] = v.to_le_bytes()[0];
    i + 1
}

/// Reads an LEB128 varint from the front of `buf`: (value, bytes used), or `None` when it is
/// truncated, longer than 10 bytes, overflows, or is not the shortest encoding of its value.
pub fn read_varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &b) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        let part = u64::from(b & 0x7f);
        if i == MAX_VARINT_LEN - 1 && part > 1 {
            return None;
        }
        v |= part << (7 * i);
        if b & 0x80 == 0 {
            // Only the shortest encoding is accepted: one value, one wire form.
            if i > 0 && b == 0 {
                return None;
            }
            return Some((v, i + 1));
        }
    }
    None
}

/// Bytes LEB128 needs for `v`.
pub fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)).cast_unsigned()
}

fn unzigzag(v: u64) -> i64 {
    (v >> 1).cast_signed() ^ -(v & 1).cast_signed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_at_every_width() {
        let mut buf = [0u8; MAX_VARINT_LEN];
        for shift in 0..64 {
            for v in [1u64 << shift, (1u64 << shift) - 1, u64::MAX >> shift] {
                let n = write_varint(&mut buf, v);
                assert_eq!(n, varint_len(v), "{v}");
                assert_eq!(read_varint(&buf[..n]), Some((v, n)));
                assert_eq!(read_varint(&buf[..n - 1]), None, "truncated {v}");
            }
        }
    }

    #[test]
    fn padded_varints_are_refused() {
        assert_eq!(read_varint(&[0x80, 0x00]), None);
        assert_eq!(read_varint(&[0xff, 0x80, 0x00]), None);
        assert_eq!(read_varint(&[0x00]), Some((0, 1)));
    }

    #[test]
    fn overlong_varint_is_refused() {
        assert_eq!(read_varint(&[0xff; 11]), None);
        let mut too_big = [0xffu8; 10];
        too_big[9] = 0x02; // bit 64 set
        assert_eq!(read_varint(&too_big), None);
    }

    #[test]
    fn zigzag_is_a_bijection_on_edges() {
        for v in [0i64, 1, -1, i64::MAX, i64::MIN, 12345, -12345] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }

    #[test]
    fn page_numbers_round_trip_in_any_order() {
        let pfns = [0u64, 1, 2, 7, 3, u64::MAX, 0, 1 << 40, (1 << 40) + 1];
        let mut buf = vec![0u8; 256];
        let mut w = RecordWriter::resume(&mut buf, 0, 0);
        for &p in &pfns {
            w.header(RecordKind::Zero, p);
        }
        let len = w.len();
        let mut r = RecordReader::new(&buf[..len]);
        for &p in &pfns {
            assert_eq!(r.header().unwrap(), (RecordKind::Zero, p));
        }
        assert!(r.is_empty());
        // Consecutive pages cost one address byte each.
        // u64::MAX is 5 below 4 when wrapping; only 1<<40 needs a long varint (6 bytes).
        assert_eq!(len, 2 * pfns.len() + 5);
    }

    #[test]
    fn block_masks_round_trip() {
        let codes = [
            BlockCode::Zero,
            BlockCode::Literal,
            BlockCode::Ref,
            BlockCode::Zero,
        ];
        let m = BlockCode::mask(&codes);
        for (i, &c) in codes.iter().enumerate() {
            assert_eq!(BlockCode::from_mask(m, i), Some(c));
        }
        assert_eq!(BlockCode::from_mask(0b11, 0), None);
    }
}
