//! The delta index: page number -> the cache slots holding the page as last sent.
//!
//! Both ends keep one and must agree exactly (a delta is applied to the receiver's copy), so
//! every operation is deterministic: a fixed hash of the page number picks a bucket, and a
//! full bucket drops its oldest entry, the same one at both ends. The table is sized from the
//! block cache, not the guest, so memory stays bounded whatever the guest's size, and a
//! lookup touches one bucket.

use super::block_cache::ZERO_SEQ;
use crate::page::{BLOCKS_PER_PAGE, Pfn};

/// Entries per bucket.
const WAYS: usize = 4;

/// One page's entry: its number + 1 (0 marks an empty way) and its blocks' sequence numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    pfn_plus_one: u64,
    seqs: [u64; BLOCKS_PER_PAGE],
}

/// Page number -> block sequence numbers of its last-sent version.
#[derive(Debug)]
pub struct PageIndex {
    buckets: Box<[[Entry; WAYS]]>,
    shift: u32,
}

impl PageIndex {
    /// An index for a block cache of `cache_blocks` blocks: room for every page the cache
    /// can hold, four times over, so live pages rarely evict each other.
    pub fn new(cache_blocks: usize) -> Self {
        let buckets = cache_blocks.div_ceil(WAYS).next_power_of_two().max(2);
        PageIndex {
            buckets: vec![[Entry::default(); WAYS]; buckets].into_boxed_slice(),
            shift: 64 - buckets.trailing_zeros(),
        }
    }

    fn bucket(&self, pfn: Pfn) -> usize {
        // Fibonacci hashing: neighbouring pages land in different buckets.
        usize::try_from(pfn.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift)
            .expect("below the table size")
    }

    /// The sequence numbers recorded for `pfn`, if any (they may since have been evicted
    /// from the cache: the caller checks).
    pub fn get(&self, pfn: Pfn) -> Option<[u64; BLOCKS_PER_PAGE]> {
        self.buckets[self.bucket(pfn)]
            .iter()
            .find(|e| e.pfn_plus_one == pfn + 1)
            .map(|e| e.seqs)
    }

    /// Starts loading `pfn`'s bucket into the CPU cache, for a [`get`](Self::get) soon after.
    pub fn prefetch(&self, pfn: Pfn) {
        crate::page::prefetch(&self.buckets[self.bucket(pfn)]);
    }

    /// Records `pfn`'s blocks. The entry replaces `pfn`'s old one, else an empty way, else
    /// one `live` says is stale, else the one with the oldest newest block.
    pub fn insert(&mut self, pfn: Pfn, seqs: [u64; BLOCKS_PER_PAGE], live: impl Fn(u64) -> bool) {
        let i = self.bucket(pfn);
        let bucket = &mut self.buckets[i];
        let newest = |e: &Entry| {
            let inserted = e.seqs.iter().copied().filter(|&s| s != ZERO_SEQ);
            inserted.max().unwrap_or(0)
        };
        let way = bucket
            .iter()
            .position(|e| e.pfn_plus_one == pfn + 1)
            .or_else(|| bucket.iter().position(|e| e.pfn_plus_one == 0))
            .or_else(|| bucket.iter().position(|e| !e.seqs.iter().all(|&s| live(s))))
            .unwrap_or_else(|| {
                (0..WAYS)
                    .min_by_key(|&w| newest(&bucket[w]))
                    .expect("WAYS > 0")
            });
        bucket[way] = Entry {
            pfn_plus_one: pfn + 1,
            seqs,
        };
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.buckets.fill([Entry::default(); WAYS]);
    }

    /// Every (page, seqs) held, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (Pfn, [u64; BLOCKS_PER_PAGE])> + '_ {
        self.buckets
            .iter()
            .flatten()
            .filter(|e| e.pfn_plus_one != 0)
            .map(|e| (e.pfn_plus_one - 1, e.seqs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_replace_remove() {
        let mut idx = PageIndex::new(1024);
        idx.insert(5, [1, 2, 3, 4], |_| true);
        idx.insert(6, [5, 6, 7, 8], |_| true);
        assert_eq!(idx.get(5), Some([1, 2, 3, 4]));
        idx.insert(5, [9, 2, 3, 4], |_| true);
        assert_eq!(idx.get(5), Some([9, 2, 3, 4]));
        assert_eq!(idx.iter().count(), 2);
        idx.clear();
        assert_eq!(idx.iter().count(), 0);
    }

    #[test]
    fn a_full_bucket_drops_stale_then_oldest_entries() {
        let mut idx = PageIndex::new(1); // two buckets of four ways
        let same_bucket: Vec<Pfn> = (0..1000)
            .filter(|&p| idx.bucket(p) == idx.bucket(0))
            .take(6)
            .collect();
        for (i, &p) in same_bucket[..4].iter().enumerate() {
            let s = 10 * i as u64;
            idx.insert(p, [s, s, s, s], |_| true);
        }
        // Seq 10 is stale: page same_bucket[1] goes first, although page 0 is older.
        idx.insert(same_bucket[4], [50; 4], |s| s != 10);
        assert_eq!(idx.get(same_bucket[1]), None);
        assert!(idx.get(same_bucket[0]).is_some());
        // All live: the entry with the oldest newest block goes.
        idx.insert(same_bucket[5], [60; 4], |_| true);
        assert_eq!(idx.get(same_bucket[0]), None);
        assert_eq!(idx.iter().count(), 4);
    }

    #[test]
    fn size_follows_the_cache_not_the_guest() {
        let idx = PageIndex::new(102_400);
        assert_eq!(idx.buckets.len() * WAYS, 131_072);
    }
}
