//! The page codec: sans-IO, one encoder/decoder pair per stream.
//!
//! The encoder turns staged pages into records (see [`wire`] for the format), choosing per
//! page, in the order of the paper (IV-B, V-C):
//!
//! 1. **zero**: an all-zero page is a record with no payload; zero blocks cost two mask bits;
//! 2. **CBR**: each 1 KiB block is fingerprinted and looked up in the block cache; a hit whose
//!    bytes match is sent as its 32-bit slot;
//! 3. **delta**: if some block missed and the page's previous version is still cached, the
//!    XOR with it is run-length encoded and sent if it beats both the threshold and the
//!    blocks alternative;
//! 4. otherwise the blocks (mixing references and literals) or, if nothing matched, the page.
//!
//! Every block sent literally, and every block a delta touched, is then inserted at the next
//! FIFO slot of both ends' caches ([`block_cache`]). The decoder replays exactly the same
//! insertions from the records, so the caches stay identical; an optional running digest in
//! frame headers proves it.
//!
//! Optionally the encoder then compresses each finished frame's body ([`compress`]), with a
//! fixed algorithm or as an adaptive controller decides ([`adaptive`]); the decoder undoes it
//! before reading records.

pub mod adaptive;
pub mod block_cache;
pub mod compress;
pub mod decoder;
pub mod delta;
pub mod encoder;
pub mod fingerprint;
pub mod page_index;
pub mod stats;
pub mod wire;

pub use compress::{Algorithm, CompressError, Compression, Level};
pub use decoder::{DecodeError, Decoder, PageSink};
pub use encoder::Encoder;
pub use fingerprint::{BlockHasher, Xxh3};
pub use stats::CodecStats;
pub use wire::RecordKind;

use crate::page::{BLOCK_SIZE, PAGE_SIZE};

/// Default cache size per stream (the paper's 100 MB cache, IV-B1).
pub const DEFAULT_CACHE_BYTES: u64 = 100 << 20;

/// Default delta threshold in bytes: the largest value, so any delta that beats the blocks
/// record is sent.
///
/// The encoder already sends a delta only when it is smaller than the record it replaces
/// (the paper's worry that RLE can grow a heavily rewritten page, V-C); the threshold only
/// caps the CPU spent on deltas that will not pay. Measured with
/// `skyferry-bench codec --mib 64 --threshold-sweep` on re-sent pages shaped after Fig. 6:
/// delta sizes are bimodal (kernel-compile-like: 80% of pages <= 256 B; TPC-W-like: 35%
/// <= 256 B), a group at 256..1536 B, and a mode just under a page for pages rewritten
/// almost entirely. Each threshold step that admits a mode lowers the wire bytes (kernel-like
/// 0.1667 -> 0.1438 -> 0.1386 of input at 256 / 1536 / 4095; TPC-W-like 0.6100 -> 0.5869 ->
/// 0.5596), while encode speed showed no trend across thresholds (1.23-1.46 GB/s, within the
/// run-to-run noise). So the default admits them all; lower it only to save CPU on slow hosts.
pub const DEFAULT_DELTA_THRESHOLD: usize = PAGE_SIZE - 1;

/// How one stream's codec behaves. Both ends of a stream must use equal configs (the
/// handshake checks it): the cache capacity and which features run are wire-visible.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CodecConfig {
    /// Send all-zero pages and blocks as markers.
    pub zero_pages: bool,
    /// Content-based redundancy elimination through the block cache.
    pub cbr: bool,
    /// Page deltas against the page as last sent.
    pub delta: bool,
    /// Block cache size in bytes at each end (rounded down to whole 1 KiB blocks).
    pub cache_bytes: u64,
    /// Largest delta payload sent, in bytes; larger deltas fall back to blocks.
    pub delta_threshold: usize,
    /// Keep a running digest of cache insertions and carry it in every frame header, so a
    /// divergence between the two caches is an error instead of silently wrong memory.
    pub verify_caches: bool,
    /// Compression of frame bodies; the receiver accepts only the algorithms it allows.
    pub compression: Compression,
}

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig {
            zero_pages: true,
            cbr: true,
            delta: true,
            cache_bytes: DEFAULT_CACHE_BYTES,
            delta_threshold: DEFAULT_DELTA_THRESHOLD,
            verify_caches: true,
            compression: Compression::Off,
        }
    }
}

impl CodecConfig {
    /// Every optimization off: full pages only (the baseline).
    pub fn baseline() -> Self {
        CodecConfig {
            zero_pages: false,
            cbr: false,
            delta: false,
            ..Self::default()
        }
    }

    /// Applies an operator's optimization list: `all`, `none`, or a comma list of `zero`,
    /// `cbr`, `delta` (the ones named are on, the others off).
    pub fn set_optimizations(&mut self, list: &str) -> Result<(), String> {
        let (mut zero, mut cbr, mut delta) = (false, false, false);
        match list.trim() {
            "all" => (zero, cbr, delta) = (true, true, true),
            "none" => {}
            items => {
                for item in items.split(',').map(str::trim) {
                    match item {
                        "zero" => zero = true,
                        "cbr" => cbr = true,
                        "delta" => delta = true,
                        other => {
                            return Err(format!(
                                "unknown optimization {other:?}: use all, none, or a list like zero,cbr,delta"
                            ));
                        }
                    }
                }
            }
        }
        (self.zero_pages, self.cbr, self.delta) = (zero, cbr, delta);
        Ok(())
    }

    /// The optimizations on, as `set_optimizations` reads them.
    pub fn optimizations(&self) -> String {
        let on: Vec<&str> = [
            (self.zero_pages, "zero"),
            (self.cbr, "cbr"),
            (self.delta, "delta"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        match on.len() {
            0 => "none".into(),
            3 => "all".into(),
            _ => on.join(","),
        }
    }

    /// True when the block cache is kept (for CBR, deltas or both).
    pub fn uses_cache(&self) -> bool {
        self.cbr || self.delta
    }

    /// Cache capacity in blocks.
    pub fn cache_blocks(&self) -> usize {
        usize::try_from(self.cache_bytes / BLOCK_SIZE as u64).unwrap_or(usize::MAX)
    }

    /// Checks the config is usable, with a message for the operator when it is not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.uses_cache() {
            let blocks = self.cache_blocks();
            if blocks == 0 {
                return Err(ConfigError::CacheTooSmall(self.cache_bytes));
            }
            if blocks > 1 << 32 {
                return Err(ConfigError::CacheTooLarge(self.cache_bytes));
            }
        }
        if self.delta && !(1..PAGE_SIZE).contains(&self.delta_threshold) {
            return Err(ConfigError::BadThreshold(self.delta_threshold));
        }
        Ok(())
    }
}

/// A codec config that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// the block cache must hold at least one 1 KiB block
    #[error(
        "codec cache_bytes = {0} holds no 1 KiB block; use at least 1024 or turn cbr and delta off"
    )]
    CacheTooSmall(u64),
    /// slots travel as 32-bit numbers
    #[error("codec cache_bytes = {0} exceeds 4 TiB (2^32 blocks, the 32-bit slot limit)")]
    CacheTooLarge(u64),
    /// the delta threshold must leave a delta smaller than a page
    #[error("codec delta_threshold = {0} must be between 1 and 4095 bytes")]
    BadThreshold(usize),
}
