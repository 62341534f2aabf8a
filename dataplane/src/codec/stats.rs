//! Per-stream codec counters.

use serde::{Deserialize, Serialize};

use super::wire::RecordKind;

/// Counters one encoder or decoder keeps. "Saved" counts payload bytes a full page would have
/// cost and this record did not; record headers (kind and page number) are in `bytes_out`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecStats {
    /// Pages by record kind: zero, full, blocks, delta.
    pub pages: [u64; 4],
    /// Guest bytes that went in (4 KiB a page).
    pub bytes_in: u64,
    /// Record bytes that came out.
    pub bytes_out: u64,
    /// Bytes saved by zero pages and zero blocks.
    pub saved_zero: u64,
    /// Bytes saved by cache references.
    pub saved_cbr: u64,
    /// Bytes saved by page deltas.
    pub saved_delta: u64,
    /// Blocks found in the cache (source only).
    pub cache_hits: u64,
    /// Blocks looked up and not found (source only).
    pub cache_misses: u64,
    /// Lookups whose candidate had the fingerprint but other bytes (source only).
    pub fingerprint_collisions: u64,
    /// Blocks pushed out of the FIFO.
    pub cache_evictions: u64,
    /// Deltas abandoned because they grew past the threshold (source only).
    pub delta_overflows: u64,
    /// Frames whose body travelled compressed.
    pub frames_compressed: u64,
    /// Body bytes compression saved (records in minus compressed bytes out).
    pub saved_compress: u64,
}

impl CodecStats {
    /// Pages of one kind.
    pub fn pages_of(&self, kind: RecordKind) -> u64 {
        self.pages[kind as usize]
    }

    /// All pages.
    pub fn pages_total(&self) -> u64 {
        self.pages.iter().sum()
    }

    /// Adds another stream's counters (for per-migration totals).
    pub fn add(&mut self, o: &CodecStats) {
        for (a, b) in self.pages.iter_mut().zip(o.pages) {
            *a += b;
        }
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.saved_zero += o.saved_zero;
        self.saved_cbr += o.saved_cbr;
        self.saved_delta += o.saved_delta;
        self.cache_hits += o.cache_hits;
        self.cache_misses += o.cache_misses;
        self.fingerprint_collisions += o.fingerprint_collisions;
        self.cache_evictions += o.cache_evictions;
        self.delta_overflows += o.delta_overflows;
        self.frames_compressed += o.frames_compressed;
        self.saved_compress += o.saved_compress;
    }
}
