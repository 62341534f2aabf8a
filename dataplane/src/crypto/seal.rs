//! AES-256-GCM sealing and opening of frames.
//!
//! The GCM nonce is the frame's sequence number (8 bytes) and stream id (4 bytes). Each
//! (stream, direction) has its own key and its sequence numbers only count up, so a nonce
//! never repeats under a key. The opener accepts exactly the next sequence number: replayed,
//! dropped and reordered frames are all refused, each with its own error.

use zerocopy::{FromBytes, IntoBytes};

use super::aead::{Aead, AeadImpl, default_impl};

use super::keys::StreamKey;
use crate::codec::compress::{Algorithm, Compression};
use crate::frame::{
    FLAG_CACHE_DIGEST, FrameBuf, FrameHeader, HEADER_LEN, KNOWN_FLAGS, MAGIC, MAX_FRAME_SIZE,
    PROTOCOL_VERSION, TAG_LEN,
};

fn nonce(seq: u64, stream: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&seq.to_le_bytes());
    n[8..].copy_from_slice(&stream.to_le_bytes());
    n
}

/// Seals one stream's frames.
pub struct Sealer {
    cipher: Aead,
    stream: u32,
    key_id: u32,
    next_seq: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("stream", &self.stream)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for the stream `key` belongs to, starting at sequence number 0, with the
    /// process's default AES-GCM implementation.
    pub fn new(key: &StreamKey) -> Self {
        Self::with_impl(key, default_impl())
    }

    /// A sealer using implementation `imp`.
    pub fn with_impl(key: &StreamKey, imp: AeadImpl) -> Self {
        Sealer {
            cipher: Aead::new(imp, &key.key),
            stream: key.stream,
            key_id: key.key_id,
            next_seq: 0,
        }
    }

    /// Sequence number of the next frame.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Writes the header, encrypts the body in place and appends the tag; returns the frame
    /// as it goes on the wire.
    pub fn seal<'f>(&mut self, frame: &'f mut FrameBuf) -> &'f [u8] {
        let seq = self.next_seq;
        // 2^64 frames of 64 KiB is beyond any migration; refusing beats reusing a nonce.
        self.next_seq = seq.checked_add(1).expect("frame sequence exhausted");
        let body_len = frame.body_len();
        let header = FrameHeader {
            magic: MAGIC,
            version: PROTOCOL_VERSION.into(),
            flags: (if frame.cache_digest().is_some() {
                FLAG_CACHE_DIGEST
            } else {
                0
            } | frame.compression().map_or(0, Algorithm::flag))
            .into(),
            stream: self.stream.into(),
            key_id: self.key_id.into(),
            seq: seq.into(),
            body_len: u32::try_from(body_len)
                .expect("body below MAX_FRAME_SIZE")
                .into(),
            records: frame.records().into(),
            cache_digest: frame.cache_digest().unwrap_or(0).into(),
        };
        let raw = frame.raw_mut();
        let (head, rest) = raw.split_at_mut(HEADER_LEN);
        head.copy_from_slice(header.as_bytes());
        let (body, rest) = rest.split_at_mut(body_len);
        let tag = self.cipher.seal(nonce(seq, self.stream), head, body);
        rest[..TAG_LEN].copy_from_slice(&tag);
        frame.raw(HEADER_LEN + body_len + TAG_LEN)
    }
}

/// Why a frame was refused. Every variant means the frame is dropped and the migration
/// aborted; none of its content has been used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// fewer bytes than the header says the frame has
    #[error("frame truncated: {got} bytes, need {need}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// bytes after the end the header states
    #[error("frame has {extra} bytes beyond its stated length")]
    TrailingBytes {
        /// Extra bytes.
        extra: usize,
    },
    /// not a skyferry frame
    #[error("bad frame magic {0:02x?} (not a skyferry frame, or the stream is out of step)")]
    BadMagic([u8; 4]),
    /// a protocol version this build does not speak
    #[error("frame protocol version {got}, this build speaks version {PROTOCOL_VERSION}")]
    UnsupportedVersion {
        /// The version found.
        got: u16,
    },
    /// flag bits this version does not know
    #[error("frame has unknown flag bits {0:#06x}")]
    UnknownFlags(u16),
    /// a compression flag for an algorithm the handshake did not agree on (or two of them)
    #[error(
        "frame flags {flags:#06x} name a compression this stream did not agree on (compression = {agreed})"
    )]
    CompressionNotAgreed {
        /// The header's flags.
        flags: u16,
        /// The setting both ends agreed on.
        agreed: Compression,
    },
    /// a body larger than any frame may be
    #[error("frame body of {len} bytes exceeds the {max}-byte limit")]
    TooLong {
        /// Body length stated.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// a frame for another stream
    #[error("frame for stream {got} arrived on stream {expected}")]
    WrongStream {
        /// This opener's stream.
        expected: u32,
        /// The header's stream.
        got: u32,
    },
    /// sealed under another key (the peer has a different pre-shared key or migration)
    #[error(
        "frame sealed with another key (key id {got:08x}, expected {expected:08x}): the peers' pre-shared keys differ"
    )]
    WrongKey {
        /// Our key id.
        expected: u32,
        /// The header's key id.
        got: u32,
    },
    /// the tag does not verify: the frame was altered
    #[error("frame {seq} failed authentication: altered in transit or forged")]
    Tampered {
        /// The sequence number the header claims.
        seq: u64,
    },
    /// a frame already opened
    #[error("frame {seq} replayed (expected {expected})")]
    Replayed {
        /// The frame's sequence number.
        seq: u64,
        /// The next expected.
        expected: u64,
    },
    /// a frame from the future: one or more were lost or reordered
    #[error("frame {seq} out of order (expected {expected}): frames lost or reordered")]
    OutOfOrder {
        /// The frame's sequence number.
        seq: u64,
        /// The next expected.
        expected: u64,
    },
}

/// An authenticated, decrypted frame.
#[derive(Debug)]
pub struct OpenedFrame<'a> {
    /// Sequence number.
    pub seq: u64,
    /// Records the body holds.
    pub records: u32,
    /// The sender's cache digest after this frame, when it sent one.
    pub cache_digest: Option<u64>,
    /// How the body is compressed, if it is (one the stream agreed on).
    pub compression: Option<Algorithm>,
    /// The decrypted body: the records, or their compressed form.
    pub body: &'a [u8],
}

/// Opens one stream's frames, in order.
pub struct Opener {
    cipher: Aead,
    stream: u32,
    key_id: u32,
    next_seq: u64,
    max_frame: usize,
    compression: Compression,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("stream", &self.stream)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// An opener for the stream `key` belongs to, accepting frames up to `max_frame` bytes,
    /// none of them compressed, with the process's default AES-GCM implementation.
    pub fn new(key: &StreamKey, max_frame: usize) -> Self {
        Self::with_impl(key, max_frame, default_impl())
    }

    /// An opener using implementation `imp`.
    pub fn with_impl(key: &StreamKey, max_frame: usize, imp: AeadImpl) -> Self {
        Opener {
            cipher: Aead::new(imp, &key.key),
            stream: key.stream,
            key_id: key.key_id,
            next_seq: 0,
            max_frame: max_frame.min(MAX_FRAME_SIZE),
            compression: Compression::Off,
        }
    }

    /// Accepts compressed frames as the handshake agreed (`codec.compression`); frames with
    /// another algorithm's flag are refused before their body is read.
    pub fn allow_compression(&mut self, agreed: Compression) {
        self.compression = agreed;
    }

    /// Sequence number of the next frame expected.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Checks a header before its body is read; returns the frame's total wire length.
    ///
    /// Only structure is checked here (nothing is authenticated until [`open`](Self::open)),
    /// but it is enough to refuse garbage and bound the read.
    pub fn check_header(&self, bytes: &[u8]) -> Result<usize, OpenError> {
        self.header_checker().check(bytes)
    }

    /// The header checks alone, for a receive thread that reads frames off the socket while
    /// another thread opens them.
    pub fn header_checker(&self) -> HeaderChecker {
        HeaderChecker {
            stream: self.stream,
            key_id: self.key_id,
            max_frame: self.max_frame,
            compression: self.compression,
        }
    }

    /// Authenticates and decrypts one whole frame in place.
    pub fn open<'a>(&mut self, frame: &'a mut [u8]) -> Result<OpenedFrame<'a>, OpenError> {
        let need = self.check_header(frame)?;
        if frame.len() < need {
            return Err(OpenError::Truncated {
                need,
                got: frame.len(),
            });
        }
        if frame.len() > need {
            return Err(OpenError::TrailingBytes {
                extra: frame.len() - need,
            });
        }
        let (head, rest) = frame.split_at_mut(HEADER_LEN);
        let header = FrameHeader::read_from_bytes(head).expect("header length checked");
        let seq = header.seq.get();
        let (body, tag) = rest.split_at_mut(need - HEADER_LEN - TAG_LEN);
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().expect("tag length checked");
        self.cipher
            .open(nonce(seq, self.stream), head, body, tag)
            .map_err(|_| OpenError::Tampered { seq })?;
        // Authentic, so the sequence number is the sender's own: check it only now, so a
        // forged number cannot knock the stream out of step.
        if seq != self.next_seq {
            let expected = self.next_seq;
            return Err(if seq < expected {
                OpenError::Replayed { seq, expected }
            } else {
                OpenError::OutOfOrder { seq, expected }
            });
        }
        self.next_seq += 1;
        let flags = header.flags.get();
        Ok(OpenedFrame {
            seq,
            records: header.records.get(),
            cache_digest: (flags & FLAG_CACHE_DIGEST != 0).then(|| header.cache_digest.get()),
            // Checked with the header above.
            compression: Algorithm::from_flags(flags).unwrap_or(None),
            body,
        })
    }
}

/// The checks a header must pass before its body is read (see [`Opener::check_header`]).
#[derive(Debug, Clone, Copy)]
pub struct HeaderChecker {
    stream: u32,
    key_id: u32,
    max_frame: usize,
    compression: Compression,
}

impl HeaderChecker {
    /// Largest frame accepted.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Checks magic, version, flags (compression as agreed), length bound, stream and key
    /// id; returns the frame's total wire length.
    pub fn check(&self, bytes: &[u8]) -> Result<usize, OpenError> {
        let header = parse_header(bytes)?;
        let flags = header.flags.get();
        match Algorithm::from_flags(flags) {
            Ok(None) => {}
            Ok(Some(a)) if self.compression.accepts(a) => {}
            _ => {
                return Err(OpenError::CompressionNotAgreed {
                    flags,
                    agreed: self.compression,
                });
            }
        }
        let len = usize::try_from(header.body_len.get()).unwrap_or(usize::MAX);
        let max = self.max_frame - HEADER_LEN - TAG_LEN;
        if len > max {
            return Err(OpenError::TooLong { len, max });
        }
        if header.stream.get() != self.stream {
            return Err(OpenError::WrongStream {
                expected: self.stream,
                got: header.stream.get(),
            });
        }
        if header.key_id.get() != self.key_id {
            return Err(OpenError::WrongKey {
                expected: self.key_id,
                got: header.key_id.get(),
            });
        }
        Ok(HEADER_LEN + len + TAG_LEN)
    }
}

/// Structural checks every header must pass: length, magic, version, flags.
fn parse_header(bytes: &[u8]) -> Result<FrameHeader, OpenError> {
    let head = bytes.get(..HEADER_LEN).ok_or(OpenError::Truncated {
        need: HEADER_LEN,
        got: bytes.len(),
    })?;
    let header = FrameHeader::read_from_bytes(head).expect("exactly HEADER_LEN bytes");
    if header.magic != MAGIC {
        return Err(OpenError::BadMagic(header.magic));
    }
    if header.version.get() != PROTOCOL_VERSION {
        return Err(OpenError::UnsupportedVersion {
            got: header.version.get(),
        });
    }
    let flags = header.flags.get();
    if flags & !KNOWN_FLAGS != 0 {
        return Err(OpenError::UnknownFlags(flags));
    }
    Ok(header)
}
