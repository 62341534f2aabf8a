//! Block fingerprints and the source-side content index (paper IV-B1).
//!
//! Only the source looks blocks up by content; the destination just follows slot numbers.
//! A fingerprint only nominates a candidate: the encoder compares the bytes before it sends a
//! reference, so a collision costs a miss, never a wrong page.

use crate::page::Block;

/// Hashes a 1 KiB block to a 64-bit fingerprint.
pub trait BlockHasher {
    /// The block's fingerprint.
    fn fingerprint(&self, block: &Block) -> u64;

    /// True when fingerprints are plain XXH3-64, which the cache digest can then reuse
    /// instead of hashing each inserted block a second time.
    fn is_xxh3(&self) -> bool {
        false
    }
}

/// XXH3-64: about 30 GB/s over 1 KiB blocks with SSE2/AVX2, and well mixed in all 64 bits
/// (`perf`'s `skyferry-bench codec` prints it beside the alternatives).
#[derive(Debug, Default, Clone, Copy)]
pub struct Xxh3;

impl BlockHasher for Xxh3 {
    fn fingerprint(&self, block: &Block) -> u64 {
        xxhash_rust::xxh3::xxh3_64(block)
    }

    fn is_xxh3(&self) -> bool {
        true
    }
}

/// Ways per bucket: one 64-byte cache line of (fingerprint, sequence) pairs.
const WAYS: usize = 4;

/// One cache line of the index. `seqs` holds sequence number + 1, so 0 marks an empty way.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(64))]
struct Bucket {
    fps: [u64; WAYS],
    seqs: [u64; WAYS],
}

/// Fingerprint -> sequence number of the newest cache insertion with that fingerprint.
///
/// A set-associative table sized from the cache (twice as many ways as cache slots), so a
/// lookup or an insertion touches one cache line and the index never grows or rehashes. It
/// is never told about evictions: an entry may name a block the FIFO has dropped, and the
/// encoder checks that the slot is live and the bytes match before it sends a reference.
#[derive(Debug)]
pub struct FingerprintIndex {
    buckets: Box<[Bucket]>,
    mask: u64,
}

impl FingerprintIndex {
    /// An index for a cache of `capacity` blocks.
    pub fn new(capacity: usize) -> Self {
        let buckets = (2 * capacity).div_ceil(WAYS).next_power_of_two();
        FingerprintIndex {
            buckets: vec![Bucket::default(); buckets].into_boxed_slice(),
            mask: buckets as u64 - 1,
        }
    }

    fn bucket(&self, fp: u64) -> usize {
        // Fingerprints are well mixed in every bit; the top bits are independent of the low
        // ones a hash map would also use.
        usize::try_from((fp >> 32 ^ fp) & self.mask).expect("masked below the table size")
    }

    /// The newest insertion with fingerprint `fp`, if the index still holds it (it may have
    /// been evicted from the cache since: check with the store).
    pub fn lookup(&self, fp: u64) -> Option<u64> {
        let b = &self.buckets[self.bucket(fp)];
        (0..WAYS)
            .find(|&w| b.seqs[w] != 0 && b.fps[w] == fp)
            .map(|w| b.seqs[w] - 1)
    }

    /// Starts loading `fp`'s bucket into the CPU cache, for a [`lookup`](Self::lookup) soon
    /// after.
    pub fn prefetch(&self, fp: u64) {
        crate::page::prefetch(&self.buckets[self.bucket(fp)]);
    }

    /// Records that the block with fingerprint `fp` went into the cache as insertion `seq`.
    /// It replaces an entry with the same fingerprint, else an empty way, else the oldest.
    pub fn inserted(&mut self, fp: u64, seq: u64) {
        let i = self.bucket(fp);
        let b = &mut self.buckets[i];
        let way = (0..WAYS)
            .find(|&w| b.seqs[w] != 0 && b.fps[w] == fp)
            .unwrap_or_else(|| (0..WAYS).min_by_key(|&w| b.seqs[w]).expect("WAYS > 0"));
        b.fps[way] = fp;
        b.seqs[way] = seq + 1;
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.buckets.fill(Bucket::default());
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.buckets
            .iter()
            .map(|b| b.seqs.iter().filter(|&&s| s != 0).count())
            .sum()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_insertion_wins_and_full_buckets_drop_the_oldest() {
        let mut idx = FingerprintIndex::new(2); // one bucket of four ways
        assert_eq!(idx.buckets.len(), 1);
        idx.inserted(10, 0);
        idx.inserted(11, 1);
        idx.inserted(10, 2); // same content again: the entry moves to the newer copy
        assert_eq!(idx.lookup(10), Some(2));
        assert_eq!(idx.len(), 2);
        idx.inserted(12, 3);
        idx.inserted(13, 4);
        idx.inserted(14, 5); // full: replaces the oldest, 11 (seq 1)
        assert_eq!(idx.lookup(11), None);
        assert_eq!(idx.lookup(10), Some(2));
        assert_eq!(idx.lookup(14), Some(5));
        assert_eq!(idx.len(), 4);
        idx.clear();
        assert!(idx.is_empty() && idx.lookup(10).is_none());
    }

    #[test]
    fn sized_from_the_cache_and_one_line_per_bucket() {
        assert_eq!(size_of::<Bucket>(), 64);
        let idx = FingerprintIndex::new(102_400);
        assert!(idx.buckets.len() * WAYS >= 2 * 102_400);
    }
}
