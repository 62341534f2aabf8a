//! Frame-body compression: an optional stage after the codec and before sealing.
//!
//! ```text
//! source: encode records -> [compress body] -> seal      dest: open -> [decompress] -> decode
//! ```
//!
//! Zero pages and cache references are already a few bytes each; what compresses is the
//! literal data (full pages, literal blocks, deltas). The body is compressed as a whole, after
//! the last record, because sealed data no longer compresses. It is sent compressed only when
//! that makes it shorter; the header says how (`FLAG_LZ4`, `FLAG_ZSTD` in [`crate::frame`])
//! and, being the AEAD's associated data, cannot be altered.
//!
//! A receiver decompresses into a buffer of one frame body, so a body can never expand past
//! what an uncompressed frame could hold (no decompression bombs), and it refuses a flag for
//! an algorithm the handshake did not agree on.
//!
//! Everything here works on byte slices with scratch allocated once: after the first frame
//! the hot path allocates nothing (zstd's contexts keep their own workspace).

use std::fmt;
use std::str::FromStr;

use lz4_flex::block::{CompressTable, DecompressError as Lz4Error};
use serde::{Deserialize, Serialize};
use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter};

use crate::frame::{FLAG_LZ4, FLAG_ZSTD, FrameBuf};

/// The operator's setting; wire-visible through the handshake (both ends run the same).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Bodies travel as encoded.
    #[default]
    Off,
    /// Every frame through lz4 (fast, modest ratio).
    Lz4,
    /// Every frame through zstd level 1.
    Zstd1,
    /// Every frame through zstd level 3.
    Zstd3,
    /// The source decides as it runs: compress only while the link, not the CPU, is the
    /// bottleneck (see `codec::adaptive`).
    Auto,
}

impl Compression {
    /// Every setting, as operators write them.
    pub const NAMES: &'static str = "off, lz4, zstd1, zstd3 or auto";

    /// The level every frame gets, for the fixed settings.
    pub fn fixed(self) -> Option<Level> {
        match self {
            Compression::Lz4 => Some(Level::Lz4),
            Compression::Zstd1 => Some(Level::Zstd1),
            Compression::Zstd3 => Some(Level::Zstd3),
            Compression::Off | Compression::Auto => None,
        }
    }

    /// True when a frame compressed with `algorithm` may arrive under this setting.
    pub fn accepts(self, algorithm: Algorithm) -> bool {
        match self {
            Compression::Off => false,
            Compression::Auto => true,
            fixed => fixed.fixed().map(Level::algorithm) == Some(algorithm),
        }
    }

    /// The name operators write.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Off => "off",
            Compression::Lz4 => "lz4",
            Compression::Zstd1 => "zstd1",
            Compression::Zstd3 => "zstd3",
            Compression::Auto => "auto",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.trim() {
            "off" | "none" => Compression::Off,
            "lz4" => Compression::Lz4,
            "zstd1" | "zstd-1" => Compression::Zstd1,
            "zstd3" | "zstd-3" => Compression::Zstd3,
            "auto" => Compression::Auto,
            other => {
                return Err(format!(
                    "unknown compression {other:?}: use {}",
                    Compression::NAMES
                ));
            }
        })
    }
}

/// How one frame is compressed, cheapest first (the adaptive controller climbs this ladder).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// lz4 block.
    Lz4,
    /// zstd level 1.
    Zstd1,
    /// zstd level 3.
    Zstd3,
}

impl Level {
    /// Every level, cheapest first.
    pub const ALL: [Level; 3] = [Level::Lz4, Level::Zstd1, Level::Zstd3];

    /// What the receiver must run to undo it.
    pub fn algorithm(self) -> Algorithm {
        match self {
            Level::Lz4 => Algorithm::Lz4,
            Level::Zstd1 | Level::Zstd3 => Algorithm::Zstd,
        }
    }

    /// Position in [`Level::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The setting that runs this level on every frame.
    pub fn setting(self) -> Compression {
        match self {
            Level::Lz4 => Compression::Lz4,
            Level::Zstd1 => Compression::Zstd1,
            Level::Zstd3 => Compression::Zstd3,
        }
    }

    fn zstd_level(self) -> i32 {
        match self {
            Level::Zstd3 => 3,
            Level::Lz4 | Level::Zstd1 => 1,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.setting().name())
    }
}

/// A compressed body's format, as the header flags name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Algorithm {
    /// `FLAG_LZ4`.
    Lz4,
    /// `FLAG_ZSTD`.
    Zstd,
}

impl Algorithm {
    /// The header flag bit.
    pub fn flag(self) -> u16 {
        match self {
            Algorithm::Lz4 => FLAG_LZ4,
            Algorithm::Zstd => FLAG_ZSTD,
        }
    }

    /// The compression named by header `flags`: `Ok(None)` for none, `Err` when both bits
    /// are set (no sender does that).
    pub fn from_flags(flags: u16) -> Result<Option<Algorithm>, u16> {
        match (flags & FLAG_LZ4 != 0, flags & FLAG_ZSTD != 0) {
            (false, false) => Ok(None),
            (true, false) => Ok(Some(Algorithm::Lz4)),
            (false, true) => Ok(Some(Algorithm::Zstd)),
            (true, true) => Err(flags),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::Lz4 => "lz4",
            Algorithm::Zstd => "zstd",
        })
    }
}

/// A compressed body that cannot be used. The frame was authenticated, so the sender is
/// broken or hostile: the migration aborts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressError {
    /// it would decompress past one frame body (a decompression bomb, or a broken sender)
    #[error("{algorithm} body decompresses to more than the {limit}-byte frame body limit")]
    TooLarge {
        /// The body's format.
        algorithm: Algorithm,
        /// Largest decompressed body accepted.
        limit: usize,
    },
    /// the compressed data is corrupt or not in the form the sender produces
    #[error("malformed {algorithm} body: {detail}")]
    Malformed {
        /// The body's format.
        algorithm: Algorithm,
        /// What is wrong.
        detail: &'static str,
    },
}

/// The result of offering one frame to the compressor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compressed {
    /// Body bytes before.
    pub before: usize,
    /// Body bytes after (equal to `before` when the frame stayed as it was).
    pub after: usize,
}

/// Compresses bodies; one per stream, reused for every frame.
pub struct Compressor {
    lz4: CompressTable,
    zstd: CCtx<'static>,
    /// Level currently set on `zstd` (changing it costs a call, so only on change).
    zstd_level: i32,
    max_input: usize,
    /// Room for lz4's worst case, which it insists on before it starts.
    out: Box<[u8]>,
}

impl fmt::Debug for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Compressor")
            .field("max_input", &self.max_input)
            .field("zstd_level", &self.zstd_level)
            .finish_non_exhaustive()
    }
}

impl Compressor {
    /// A compressor for bodies of up to `max_input` bytes (larger ones are left as they are).
    pub fn new(max_input: usize) -> Self {
        let mut zstd = CCtx::create();
        // The AEAD tag already proves integrity: a zstd checksum would be 4 wasted bytes.
        // The content size stays in the frame: the receiver checks it before decompressing.
        let set = |z: &mut CCtx<'_>, p| z.set_parameter(p).expect("valid zstd parameter");
        set(&mut zstd, CParameter::ChecksumFlag(false));
        set(&mut zstd, CParameter::ContentSizeFlag(true));
        set(&mut zstd, CParameter::CompressionLevel(1));
        Compressor {
            lz4: if max_input < usize::from(u16::MAX) {
                CompressTable::small()
            } else {
                CompressTable::large()
            },
            zstd,
            zstd_level: 1,
            max_input,
            out: vec![0; lz4_flex::block::get_maximum_output_size(max_input)].into_boxed_slice(),
        }
    }

    /// Largest body this compressor takes.
    pub fn max_input(&self) -> usize {
        self.max_input
    }

    /// `input` compressed with `level`, only if that is shorter than `input`.
    pub fn compress(&mut self, level: Level, input: &[u8]) -> Option<&[u8]> {
        if input.is_empty() || input.len() > self.max_input {
            return None;
        }
        let n = match level {
            Level::Lz4 => {
                lz4_flex::block::compress_into_with_table(input, &mut self.out, &mut self.lz4).ok()
            }
            Level::Zstd1 | Level::Zstd3 => {
                let want = level.zstd_level();
                if self.zstd_level != want {
                    self.zstd
                        .set_parameter(CParameter::CompressionLevel(want))
                        .expect("valid zstd level");
                    self.zstd_level = want;
                }
                // Room one byte short of the input: a result that would not be shorter fails
                // with "output too small" instead of being produced and thrown away.
                self.zstd
                    .compress2(&mut self.out[..input.len() - 1], input)
                    .ok()
            }
        }
        .filter(|&n| n < input.len())?;
        Some(&self.out[..n])
    }

    /// Compresses `frame`'s body in place with `level` when that makes it shorter.
    pub fn compress_frame(&mut self, level: Level, frame: &mut FrameBuf) -> Compressed {
        let before = frame.body_len();
        match self.compress(level, frame.body()) {
            Some(bytes) => {
                frame.set_compressed_body(level.algorithm(), bytes);
                Compressed {
                    before,
                    after: frame.body_len(),
                }
            }
            None => Compressed {
                before,
                after: before,
            },
        }
    }
}

/// Decompresses bodies into one frame body's worth of scratch; one per stream.
pub struct Decompressor {
    zstd: DCtx<'static>,
    out: Box<[u8]>,
}

impl fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decompressor")
            .field("limit", &self.out.len())
            .finish_non_exhaustive()
    }
}

impl Decompressor {
    /// A decompressor whose results are at most `limit` bytes (one frame body).
    pub fn new(limit: usize) -> Self {
        let mut zstd = DCtx::create();
        // A window beyond the limit can only come from a frame we would refuse anyway; say
        // so to zstd too, so it never sizes anything after a hostile header.
        let window_log = usize::BITS - limit.max(1).leading_zeros();
        zstd.set_parameter(DParameter::WindowLogMax(window_log.clamp(10, 30)))
            .expect("valid zstd window limit");
        Decompressor {
            zstd,
            out: vec![0; limit].into_boxed_slice(),
        }
    }

    /// Largest decompressed body accepted.
    pub fn limit(&self) -> usize {
        self.out.len()
    }

    /// The records `input` decompresses to, refusing anything a sender would not produce.
    pub fn decompress(
        &mut self,
        algorithm: Algorithm,
        input: &[u8],
    ) -> Result<&[u8], CompressError> {
        let limit = self.out.len();
        let malformed = |detail| CompressError::Malformed { algorithm, detail };
        let n = match algorithm {
            Algorithm::Lz4 => {
                lz4_flex::block::decompress_into(input, &mut self.out).map_err(|e| match e {
                    Lz4Error::OutputTooSmall { .. } => CompressError::TooLarge { algorithm, limit },
                    Lz4Error::LiteralOutOfBounds => malformed("literal run beyond the input"),
                    Lz4Error::ExpectedAnotherByte => malformed("truncated"),
                    Lz4Error::OffsetZero => malformed("match offset 0"),
                    Lz4Error::OffsetOutOfBounds => malformed("match offset before the start"),
                    _ => malformed("corrupt block"),
                })?
            }
            Algorithm::Zstd => {
                // Exactly one frame, stating its size, within the limit: our sender's form.
                let frame_len = zstd_safe::find_frame_compressed_size(input)
                    .map_err(|_| malformed("not a zstd frame"))?;
                if frame_len != input.len() {
                    return Err(malformed("bytes after the zstd frame"));
                }
                let size = match zstd_safe::get_frame_content_size(input) {
                    Ok(Some(size)) => size,
                    Ok(None) => return Err(malformed("frame does not state its content size")),
                    Err(_) => return Err(malformed("corrupt frame header")),
                };
                let size = usize::try_from(size)
                    .ok()
                    .filter(|&s| s <= limit)
                    .ok_or(CompressError::TooLarge { algorithm, limit })?;
                let n = self
                    .zstd
                    .decompress(&mut self.out[..size], input)
                    .map_err(|_| malformed("corrupt frame"))?;
                if n != size {
                    return Err(malformed("content shorter than the frame states"));
                }
                n
            }
        };
        // Our sender never compresses an empty body.
        if n == 0 {
            return Err(malformed("empty body"));
        }
        Ok(&self.out[..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{DEFAULT_FRAME_SIZE, HEADER_LEN, TAG_LEN};
    use proptest::prelude::*;

    const BODY: usize = DEFAULT_FRAME_SIZE - HEADER_LEN - TAG_LEN;

    /// Text-like bytes: compressible, but not trivially.
    fn text(len: usize, seed: u64) -> Vec<u8> {
        let words: [&[u8]; 8] = [
            b"static ",
            b"int ",
            b"return ",
            b"struct page *",
            b"if (",
            b") {\n",
            b"\t",
            b"0x",
        ];
        let mut x = seed | 1;
        let mut v = Vec::with_capacity(len + 16);
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(words[(x % 8) as usize]);
            v.push(b'a' + (x >> 8).to_le_bytes()[0] % 26);
        }
        v.truncate(len);
        v
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24).to_le_bytes()[0]
            })
            .collect()
    }

    #[test]
    fn settings_parse_and_name_themselves() {
        for c in [
            Compression::Off,
            Compression::Lz4,
            Compression::Zstd1,
            Compression::Zstd3,
            Compression::Auto,
        ] {
            assert_eq!(c.name().parse::<Compression>(), Ok(c));
        }
        assert_eq!("zstd-3".parse::<Compression>(), Ok(Compression::Zstd3));
        let e = "gzip".parse::<Compression>().unwrap_err();
        assert!(e.contains("gzip") && e.contains("auto"), "{e}");
    }

    #[test]
    fn receivers_accept_only_what_was_agreed() {
        assert!(!Compression::Off.accepts(Algorithm::Lz4));
        assert!(!Compression::Off.accepts(Algorithm::Zstd));
        assert!(Compression::Lz4.accepts(Algorithm::Lz4));
        assert!(!Compression::Lz4.accepts(Algorithm::Zstd));
        assert!(Compression::Zstd1.accepts(Algorithm::Zstd));
        assert!(Compression::Zstd3.accepts(Algorithm::Zstd));
        assert!(!Compression::Zstd3.accepts(Algorithm::Lz4));
        assert!(Compression::Auto.accepts(Algorithm::Lz4));
        assert!(Compression::Auto.accepts(Algorithm::Zstd));
    }

    #[test]
    fn flags_name_at_most_one_algorithm() {
        assert_eq!(Algorithm::from_flags(1), Ok(None));
        assert_eq!(Algorithm::from_flags(FLAG_LZ4), Ok(Some(Algorithm::Lz4)));
        assert_eq!(
            Algorithm::from_flags(FLAG_ZSTD | 1),
            Ok(Some(Algorithm::Zstd))
        );
        assert!(Algorithm::from_flags(FLAG_LZ4 | FLAG_ZSTD).is_err());
    }

    #[test]
    fn every_level_round_trips_and_shrinks_text() {
        let mut c = Compressor::new(BODY);
        let mut d = Decompressor::new(BODY);
        let input = text(BODY, 7);
        for level in Level::ALL {
            let packed = c.compress(level, &input).expect("text compresses").to_vec();
            assert!(packed.len() < input.len() / 2, "{level}: {}", packed.len());
            assert_eq!(
                d.decompress(level.algorithm(), &packed).unwrap(),
                &input[..]
            );
        }
    }

    #[test]
    fn zstd3_packs_tighter_than_zstd1_and_lz4() {
        let mut c = Compressor::new(BODY);
        let input = text(BODY, 3);
        let len = |c: &mut Compressor, l| c.compress(l, &input).unwrap().len();
        let (lz4, z1, z3) = (
            len(&mut c, Level::Lz4),
            len(&mut c, Level::Zstd1),
            len(&mut c, Level::Zstd3),
        );
        assert!(z3 <= z1 && z1 < lz4, "lz4 {lz4}, zstd1 {z1}, zstd3 {z3}");
        // Switching back re-sets the zstd level.
        assert_eq!(len(&mut c, Level::Zstd1), z1);
    }

    #[test]
    fn incompressible_and_oversized_bodies_are_left_alone() {
        let mut c = Compressor::new(BODY);
        let random = noise(BODY, 9);
        for level in Level::ALL {
            assert!(c.compress(level, &random).is_none(), "{level}");
        }
        assert!(c.compress(Level::Lz4, &[]).is_none());
        assert!(c.compress(Level::Lz4, &text(BODY + 1, 1)).is_none());
    }

    #[test]
    fn frames_carry_the_algorithm_and_the_shorter_body() {
        let mut c = Compressor::new(BODY);
        let mut f = FrameBuf::new(DEFAULT_FRAME_SIZE);
        let input = text(20_000, 5);
        f.append_raw_records(&input, 3);
        let r = c.compress_frame(Level::Zstd1, &mut f);
        assert_eq!(r.before, 20_000);
        assert!(r.after < r.before / 2);
        assert_eq!(f.body_len(), r.after);
        assert_eq!(f.compression(), Some(Algorithm::Zstd));
        assert_eq!(f.records(), 3);
        let mut d = Decompressor::new(BODY);
        assert_eq!(d.decompress(Algorithm::Zstd, f.body()).unwrap(), &input[..]);
        f.clear();
        assert_eq!(f.compression(), None);

        f.append_raw_records(&noise(5000, 1), 1);
        let r = c.compress_frame(Level::Lz4, &mut f);
        assert_eq!(r.after, r.before);
        assert_eq!(f.compression(), None);
    }

    #[test]
    fn bombs_are_refused_before_they_land() {
        // 64 KiB of zeros packs into a few dozen bytes; a receiver limited to 4 KiB refuses.
        let zeros = vec![0u8; BODY];
        let mut c = Compressor::new(BODY);
        let mut small = Decompressor::new(4096);
        for level in Level::ALL {
            let packed = c.compress(level, &zeros).unwrap().to_vec();
            assert!(packed.len() < 400, "{level}: {}", packed.len());
            assert_eq!(
                small.decompress(level.algorithm(), &packed),
                Err(CompressError::TooLarge {
                    algorithm: level.algorithm(),
                    limit: 4096
                })
            );
        }
    }

    #[test]
    fn zstd_frames_not_of_our_form_are_refused() {
        let input = text(10_000, 2);
        let mut d = Decompressor::new(BODY);
        // No content size: a streaming frame.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut enc, &input).unwrap();
        let streamed = enc.finish().unwrap();
        assert!(matches!(
            d.decompress(Algorithm::Zstd, &streamed),
            Err(CompressError::Malformed { .. })
        ));
        // Two frames back to back, and a frame with trailing garbage.
        let mut c = Compressor::new(BODY);
        let one = c.compress(Level::Zstd1, &input).unwrap().to_vec();
        let two = [one.clone(), one.clone()].concat();
        assert!(matches!(
            d.decompress(Algorithm::Zstd, &two),
            Err(CompressError::Malformed { .. })
        ));
        let trailing = [one.clone(), vec![0]].concat();
        assert!(d.decompress(Algorithm::Zstd, &trailing).is_err());
        // Truncated, and not zstd at all.
        assert!(
            d.decompress(Algorithm::Zstd, &one[..one.len() - 3])
                .is_err()
        );
        assert!(d.decompress(Algorithm::Zstd, b"hello").is_err());
        // The decompressor still works after all that.
        assert_eq!(d.decompress(Algorithm::Zstd, &one).unwrap(), &input[..]);
    }

    #[test]
    fn corrupt_lz4_blocks_are_typed_errors() {
        let mut d = Decompressor::new(BODY);
        // A match whose offset points before the start of the output.
        let bad_offset = [0x10, b'a', 0xff, 0x00];
        assert!(matches!(
            d.decompress(Algorithm::Lz4, &bad_offset),
            Err(CompressError::Malformed { .. })
        ));
        // A literal run longer than the input.
        assert!(matches!(
            d.decompress(Algorithm::Lz4, &[0xf0, 0xff, 0x10]),
            Err(CompressError::Malformed { .. })
        ));
        assert!(d.decompress(Algorithm::Lz4, &[]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the body, what comes out is what went in, or the body stays as it was.
        #[test]
        fn round_trip(
            seed in any::<u64>(),
            len in 1usize..BODY,
            textish in any::<bool>(),
            runs in proptest::collection::vec((0usize..BODY, 1usize..2000, any::<u8>()), 0..8),
            level in prop::sample::select(Level::ALL.to_vec()),
        ) {
            let mut input = if textish { text(len, seed) } else { noise(len, seed) };
            for (at, n, b) in runs {
                let at = at % len;
                let end = (at + n).min(len);
                input[at..end].fill(b);
            }
            let mut c = Compressor::new(BODY);
            let mut d = Decompressor::new(BODY);
            if let Some(packed) = c.compress(level, &input) {
                prop_assert!(packed.len() < input.len());
                let packed = packed.to_vec();
                prop_assert_eq!(d.decompress(level.algorithm(), &packed).unwrap(), &input[..]);
            }
        }

        /// Arbitrary bytes never panic the decompressor nor exceed its limit.
        #[test]
        fn hostile_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512), zstd in any::<bool>()) {
            let mut d = Decompressor::new(1024);
            let alg = if zstd { Algorithm::Zstd } else { Algorithm::Lz4 };
            if let Ok(out) = d.decompress(alg, &bytes) {
                prop_assert!(out.len() <= 1024);
            }
        }
    }
}
