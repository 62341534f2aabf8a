//! Frames: the unit that is sealed, sent and opened.
//!
//! ```text
//! +----------------------+---------------------------+-----------+
//! | header (40 B, clear) | body: records (encrypted) | tag (16 B)|
//! +----------------------+---------------------------+-----------+
//! ```
//!
//! The header is authenticated as AES-GCM associated data, so nothing in it can be changed
//! without the tag failing. A receiver reads the 40 header bytes first and checks magic,
//! version and length before it reads or buffers the body, which bounds what a peer can make
//! it allocate.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::codec::compress::Algorithm;
use crate::codec::wire::{MAX_RECORD_LEN, RecordWriter};

/// "SKYF".
pub const MAGIC: [u8; 4] = *b"SKYF";
/// Protocol version of the frame and record formats.
pub const PROTOCOL_VERSION: u16 = 1;
/// Header bytes.
pub const HEADER_LEN: usize = size_of::<FrameHeader>();
/// AES-GCM tag bytes.
pub const TAG_LEN: usize = 16;
/// Default frame size on the wire (header + body + tag): one 64 KiB I/O buffer.
pub const DEFAULT_FRAME_SIZE: usize = 64 << 10;
/// Smallest frame that still holds one record of any kind.
pub const MIN_FRAME_SIZE: usize = HEADER_LEN + MAX_RECORD_LEN + TAG_LEN;
/// Largest frame either end accepts (bounds a receiver's buffers).
pub const MAX_FRAME_SIZE: usize = 16 << 20;

/// Header flag: `cache_digest` holds the sender's running cache digest after this frame.
pub const FLAG_CACHE_DIGEST: u16 = 1;
/// Header flag: the body is one lz4 block (`lz4_flex` block format) that decompresses to the
/// records; `body_len` is the compressed length.
pub const FLAG_LZ4: u16 = 1 << 1;
/// Header flag: the body is one zstd frame (any level) with its content size, which
/// decompresses to the records. At most one compression flag is set.
pub const FLAG_ZSTD: u16 = 1 << 2;
/// Flags this version understands.
pub const KNOWN_FLAGS: u16 = FLAG_CACHE_DIGEST | FLAG_LZ4 | FLAG_ZSTD;

/// The frame header, little-endian on the wire.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct FrameHeader {
    /// [`MAGIC`].
    pub magic: [u8; 4],
    /// [`PROTOCOL_VERSION`].
    pub version: U16,
    /// `FLAG_*` bits; unknown bits are refused.
    pub flags: U16,
    /// Stream within the migration.
    pub stream: U32,
    /// Identifies the key that sealed the frame (derived beside it; reveals nothing of it),
    /// so a wrong key is told apart from a damaged frame.
    pub key_id: U32,
    /// Frame number within the stream, from 0, without gaps; also the GCM nonce.
    pub seq: U64,
    /// Body bytes (excluding header and tag).
    pub body_len: U32,
    /// Records in the body.
    pub records: U32,
    /// Running cache digest when `FLAG_CACHE_DIGEST` is set, else 0.
    pub cache_digest: U64,
}

const _: () = assert!(HEADER_LEN == 40);

/// A frame being filled by an encoder, then sealed in place.
///
/// The buffer is allocated once at its full wire size; the body is written where it will be
/// sent, so sealing adds the header and tag around it without copying.
pub struct FrameBuf {
    buf: Box<[u8]>,
    body_len: usize,
    records: u32,
    next_pfn: u64,
    cache_digest: Option<u64>,
    compression: Option<Algorithm>,
}

impl std::fmt::Debug for FrameBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameBuf")
            .field("size", &self.buf.len())
            .field("body_len", &self.body_len)
            .field("records", &self.records)
            .field("compression", &self.compression)
            .finish()
    }
}

impl FrameBuf {
    /// A frame buffer whose sealed form is at most `frame_size` bytes.
    ///
    /// # Panics
    /// If `frame_size` is outside `MIN_FRAME_SIZE..=MAX_FRAME_SIZE` (configs are validated
    /// before buffers are made).
    pub fn new(frame_size: usize) -> Self {
        assert!(
            (MIN_FRAME_SIZE..=MAX_FRAME_SIZE).contains(&frame_size),
            "frame size {frame_size}"
        );
        FrameBuf {
            buf: vec![0; frame_size].into_boxed_slice(),
            body_len: 0,
            records: 0,
            next_pfn: 0,
            cache_digest: None,
            compression: None,
        }
    }

    /// Size of the whole buffer (the largest sealed frame it holds).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Largest body this buffer holds.
    pub fn body_capacity(&self) -> usize {
        self.buf.len() - HEADER_LEN - TAG_LEN
    }

    /// True while one more record of any kind fits.
    pub fn has_room(&self) -> bool {
        self.body_capacity() - self.body_len >= MAX_RECORD_LEN
    }

    /// True when no record was written.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Records written.
    pub fn records(&self) -> u32 {
        self.records
    }

    /// Body bytes written.
    pub fn body_len(&self) -> usize {
        self.body_len
    }

    /// The body written so far.
    pub fn body(&self) -> &[u8] {
        &self.buf[HEADER_LEN..HEADER_LEN + self.body_len]
    }

    /// Empties the frame for reuse.
    pub fn clear(&mut self) {
        self.body_len = 0;
        self.records = 0;
        self.next_pfn = 0;
        self.cache_digest = None;
        self.compression = None;
    }

    /// Appends one record through `write`, which must write exactly one record.
    ///
    /// # Panics
    /// If the frame has no room (check [`has_room`](Self::has_room) first).
    pub fn append_record<R>(&mut self, write: impl FnOnce(&mut RecordWriter<'_>) -> R) -> R {
        assert!(self.has_room(), "frame full");
        assert!(self.compression.is_none(), "frame already compressed");
        let end = HEADER_LEN + self.body_capacity();
        let mut w =
            RecordWriter::resume(&mut self.buf[HEADER_LEN..end], self.body_len, self.next_pfn);
        let r = write(&mut w);
        self.body_len = w.len();
        self.next_pfn = w.next_pfn();
        self.records += 1;
        r
    }

    /// Appends bytes that already are `count` encoded records (tests and fuzzing craft hostile
    /// bodies this way). Returns how many bytes fit.
    pub fn append_raw_records(&mut self, bytes: &[u8], count: u32) -> usize {
        let n = bytes.len().min(self.body_capacity() - self.body_len);
        let at = HEADER_LEN + self.body_len;
        self.buf[at..at + n].copy_from_slice(&bytes[..n]);
        self.body_len += n;
        self.records += count;
        n
    }

    /// Page number the next record's address is counted from.
    pub fn next_pfn(&self) -> u64 {
        self.next_pfn
    }

    /// Sets the cache digest the header will carry.
    pub fn set_cache_digest(&mut self, digest: Option<u64>) {
        self.cache_digest = digest;
    }

    /// The cache digest the header will carry.
    pub fn cache_digest(&self) -> Option<u64> {
        self.cache_digest
    }

    /// Replaces the records with their compressed form (`bytes`, shorter than the body); the
    /// header will carry `algorithm`'s flag. The record count stays: it counts what the
    /// receiver finds after decompressing. No record may be appended afterwards.
    ///
    /// # Panics
    /// If `bytes` is not shorter than the body, or the body is already compressed.
    pub fn set_compressed_body(&mut self, algorithm: Algorithm, bytes: &[u8]) {
        assert!(
            bytes.len() < self.body_len,
            "compression must shrink the body"
        );
        assert!(self.compression.is_none(), "body already compressed");
        self.buf[HEADER_LEN..HEADER_LEN + bytes.len()].copy_from_slice(bytes);
        self.body_len = bytes.len();
        self.compression = Some(algorithm);
    }

    /// How the body is compressed, if it is.
    pub fn compression(&self) -> Option<Algorithm> {
        self.compression
    }

    /// The whole buffer: the sealer writes around the body; a receiver reads a frame off the
    /// wire into it and opens it there.
    pub fn raw_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The first `len` bytes of the buffer (a sealed frame).
    pub fn raw(&self, len: usize) -> &[u8] {
        &self.buf[..len]
    }
}
